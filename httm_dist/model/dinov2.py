"""DINOv2 ViT with register tokens: the aggregator's per-frame patch embedding.

Frames -> 14x14 conv patches (row-major) -> prepend cls -> add the (interpolated) position
embedding -> insert the register tokens after cls (they get no position embedding) ->
blocks -> final norm -> patch tokens only (cls and registers dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from httm_dist.model.config import PatchEmbedConfig
from httm_dist.model.layers import Block


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a stride-``patch_size`` convolution, flattened row-major."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, rows*cols, C]


class DinoV2(nn.Module):
    """The patch-embed backbone; ``forward`` returns normalised patch tokens [N, rows*cols, C]."""

    def __init__(self, cfg: PatchEmbedConfig, patch_size: int) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.patch_size = patch_size
        self.pos_grid = cfg.img_size // patch_size
        self.antialias = cfg.interpolate_antialias
        self.patch_embed = PatchEmbed(patch_size, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid**2 + 1, C))
        R = cfg.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, R, C)) if R else None
        # Unused at inference (masked pre-training only) but part of the official checkpoint.
        self.mask_token = nn.Parameter(torch.zeros(1, C), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.layerscale_init, norm_eps=1e-6)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(C, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, H, W = images.shape
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = x + self.position_embedding(H // self.patch_size, W // self.patch_size, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 1 + (0 if self.register_tokens is None else self.register_tokens.shape[1]) :]

    def position_embedding(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1 + rows*cols, C]: the learned grid, bicubic-resized in fp32 unless it fits."""
        M = self.pos_grid
        if rows == M and cols == M:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=self.antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)
