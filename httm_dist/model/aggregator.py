"""The alternating-attention aggregator: per-frame patch tokens -> scene-aware tokens.

Images [B,S,3,H,W] in [0,1] are normalised, embedded by DINOv2 into patch tokens, and each
frame is given [camera, registers...] special tokens (frame 0 of a scene gets the first set,
all other frames the second). Then ``depth`` times: a frame block (attention within each
frame, tokens [B*S, P, C]) and a global block (attention across all frames, [B, S*P, C]).
Layer i's output is cat(frame_out, global_out) -> [B, S, P, 2C].

Only the layers in ``output_layers`` are kept (the others are returned as None at their index
so heads index the list by layer number): the VGGT* memory trim. ``None`` keeps every layer.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from httm_dist.model.config import VGGTConfig
from httm_dist.model.dinov2 import DinoV2
from httm_dist.model.hooks import AttentionContext
from httm_dist.model.layers import Block
from httm_dist.model.rope import RopeTable

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def check_images(images: torch.Tensor, patch_size: int, check_finite: bool = True) -> torch.Tensor:
    """Validate model input and return it as [B, S, 3, H, W] ([S,3,H,W] gets B = 1).

    Raises TypeError / ValueError naming what is wrong (type, shape, channels, a size that is
    not a multiple of ``patch_size``, integer dtype, and with ``check_finite`` NaN or inf
    values: that last check reads one value on the host, a sync on CUDA)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim == 4:
        images = images.unsqueeze(0)
    if images.ndim != 5:
        raise ValueError(f"images must have shape [S,3,H,W] or [B,S,3,H,W], got {tuple(images.shape)}")
    B, S, C, H, W = images.shape
    if B == 0 or S == 0:
        raise ValueError(f"images has zero frames (shape {tuple(images.shape)}); pass at least one")
    if C != 3:
        raise ValueError(f"images must have 3 (RGB) channels, got {C} (shape {tuple(images.shape)})")
    if H == 0 or W == 0 or H % patch_size or W % patch_size:
        raise ValueError(
            f"image height and width must be positive multiples of the patch size {patch_size}, "
            f"got H={H}, W={W}; resize or crop them (httm_dist.model.preprocess does)"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    if check_finite and images.device.type != "meta" and not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or infinite values")
    return images


def _per_frame(tokens: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """[1, 2, n, C] -> [B*S, n, C]: set 0 for each scene's first frame, set 1 for the rest."""
    first = tokens[:, :1].expand(B, 1, -1, -1)
    rest = tokens[:, 1:].expand(B, S - 1, -1, -1)
    return torch.cat([first, rest], dim=1).flatten(0, 1)


class Aggregator(nn.Module):
    def __init__(self, config: VGGTConfig, output_layers: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        C = config.embed_dim
        self.patch_size = config.patch_size
        self.rope_freq = config.rope_freq
        self.head_dim = C // config.num_heads
        self.patch_embed = DinoV2(config.patch_embed, config.patch_size)

        def block() -> Block:
            return Block(C, config.num_heads, config.mlp_ratio, config.init_values, qk_norm=True)

        self.frame_blocks = nn.ModuleList(block() for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(block() for _ in range(config.depth))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, C))
        self.register_token = nn.Parameter(torch.zeros(1, 2, config.num_register_tokens, C))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)
        self.patch_start_idx = 1 + config.num_register_tokens
        self.output_layers: Optional[tuple[int, ...]] = (
            None if output_layers is None else tuple(sorted(set(output_layers)))
        )
        self.use_amp = True
        """On CUDA, run under autocast (bf16 from compute capability 8, else fp16), as the
        official inference does; set False to run in the parameters' dtype."""

    def forward(self, images: torch.Tensor) -> tuple[list[Optional[torch.Tensor]], int]:
        """Tokens of every layer ([B,S,P,2C], None where not kept) and ``patch_start_idx``."""
        images = check_images(images, self.patch_size)
        B, S, _, H, W = images.shape
        grid = (H // self.patch_size, W // self.patch_size)
        keep = set(range(len(self.frame_blocks)) if self.output_layers is None else self.output_layers)
        with self.autocast(images.device):
            mean = images.new_tensor(IMAGE_MEAN).view(1, 1, 3, 1, 1)
            std = images.new_tensor(IMAGE_STD).view(1, 1, 3, 1, 1)
            patches = self.patch_embed(((images - mean) / std).flatten(0, 1))  # [B*S, rows*cols, C]
            tokens = torch.cat(
                [_per_frame(self.camera_token, B, S), _per_frame(self.register_token, B, S), patches],
                dim=1,
            )
            P, C = tokens.shape[1:]
            rope = RopeTable(grid, self.patch_start_idx, self.head_dim, self.rope_freq, images.device)
            outputs: list[Optional[torch.Tensor]] = []
            for i, (frame_block, global_block) in enumerate(zip(self.frame_blocks, self.global_blocks)):
                frame_out = frame_block(tokens.reshape(B * S, P, C), rope=rope)
                ctx = AttentionContext(
                    num_frames=S, tokens_per_frame=P, patch_grid=grid,
                    patch_start_idx=self.patch_start_idx, layer_idx=i,
                )
                tokens = global_block(frame_out.reshape(B, S * P, C), rope=rope, ctx=ctx)
                outputs.append(
                    torch.cat([frame_out.reshape(B, S, P, C), tokens.reshape(B, S, P, C)], dim=-1)
                    if i in keep
                    else None
                )
        return outputs, self.patch_start_idx

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast context the forward runs its blocks under on ``device`` (``use_amp``
        on CUDA: bf16 from compute capability 8, else fp16; nothing elsewhere), for callers
        that run one of its blocks alone as the forward would (benchmarks)."""
        if device.type != "cuda" or not self.use_amp:
            return contextlib.nullcontext()
        major, _ = torch.cuda.get_device_capability(device)
        return torch.autocast("cuda", dtype=torch.bfloat16 if major >= 8 else torch.float16)
