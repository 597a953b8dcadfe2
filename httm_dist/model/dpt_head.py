"""DPT head: dense per-pixel prediction (depth or world points) with confidence.

For each of 4 aggregator layers: patch tokens -> LayerNorm -> [B*S, 2C, rows, cols] -> 1x1
projection -> + UV position embedding -> resize (x4, x2, x1, x0.5). The four maps are fused
top-down by RefineNet blocks, upsampled to the image size, given the position embedding
again and mapped to ``output_dim`` channels: values (activation) and confidence (1 + exp).
Frames are processed in chunks of ``frames_chunk_size`` (identical results, less memory).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from httm_dist.model.config import DenseHeadConfig, DPTConfig


def uv_position_embedding(rows: int, cols: int, channels: int, aspect: float, like: torch.Tensor) -> torch.Tensor:
    """Sin/cos embedding [channels, rows, cols] of a UV grid spanning the image's aspect.

    The grid spans x in ±aspect/sqrt(aspect²+1), y in ±1/sqrt(aspect²+1) (pixel centres);
    channels are [sin(u ω), cos(u ω), sin(v ω), cos(v ω)] with ω_k = 100^(-k / (channels/4)),
    computed in float64 and returned in ``like``'s dtype family (float32).
    """
    diag = math.sqrt(aspect**2 + 1.0)
    span_x, span_y = aspect / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (cols - 1) / cols, span_x * (cols - 1) / cols, cols, dtype=like.dtype, device=like.device)
    ys = torch.linspace(-span_y * (rows - 1) / rows, span_y * (rows - 1) / rows, rows, dtype=like.dtype, device=like.device)
    quarter = channels // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=like.device) / quarter
    omega = 1.0 / 100.0**omega

    def sincos(p: torch.Tensor) -> torch.Tensor:
        a = p.double()[:, None] * omega
        return torch.cat([a.sin(), a.cos()], dim=-1).float()

    u = sincos(xs)[None, :, :].expand(rows, cols, -1)  # varies along columns
    v = sincos(ys)[:, None, :].expand(rows, cols, -1)  # varies along rows
    return torch.cat([u, v], dim=-1).permute(2, 0, 1)


def _add_pos(x: torch.Tensor, aspect: float) -> torch.Tensor:
    return x + 0.1 * uv_position_embedding(x.shape[-2], x.shape[-1], x.shape[1], aspect, x)


class ResidualConvUnit(nn.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))): the official in-place ReLU makes the skip
    connection carry the ReLU'd input."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FusionBlock(nn.Module):
    """RefineNet fusion: (x + RCU(skip)) -> RCU -> bilinear resize -> 1x1 conv."""

    def __init__(self, features: int, has_skip: bool = True) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features) if has_skip else None
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(
        self, x: torch.Tensor, skip: Optional[torch.Tensor] = None, size: Optional[tuple[int, int]] = None
    ) -> torch.Tensor:
        if self.resConfUnit1 is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    """The decoder body (the official ``scratch`` namespace, for checkpoint key names)."""

    def __init__(self, in_channels: Sequence[int], features: int, output_dim: int) -> None:
        super().__init__()
        self.layer1_rn, self.layer2_rn, self.layer3_rn, self.layer4_rn = (
            nn.Conv2d(c, features, 3, padding=1, bias=False) for c in in_channels
        )
        self.refinenet1 = FusionBlock(features)
        self.refinenet2 = FusionBlock(features)
        self.refinenet3 = FusionBlock(features)
        self.refinenet4 = FusionBlock(features, has_skip=False)
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
        )

    def fuse(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four maps, finest first -> fused map at twice the finest resolution."""
        r1, r2, r3, r4 = self.layer1_rn(maps[0]), self.layer2_rn(maps[1]), self.layer3_rn(maps[2]), self.layer4_rn(maps[3])
        x = self.refinenet4(r4, size=r3.shape[-2:])
        x = self.refinenet3(x, r3, size=r2.shape[-2:])
        x = self.refinenet2(x, r2, size=r1.shape[-2:])
        x = self.refinenet1(x, r1)
        return self.output_conv1(x)


class DPTHead(nn.Module):
    def __init__(self, dpt: DPTConfig, head: DenseHeadConfig, patch_size: int) -> None:
        super().__init__()
        oc = dpt.out_channels
        self.patch_size = patch_size
        self.layer_idx = tuple(dpt.intermediate_layer_idx)
        self.activation = head.activation
        self.frames_chunk_size = 8
        self.norm = nn.LayerNorm(dpt.dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dpt.dim_in, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = Scratch(oc, dpt.features, head.output_dim)

    def forward(
        self, tokens: Sequence[Optional[torch.Tensor]], images: torch.Tensor, patch_start_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values [B,S,H,W,output_dim-1] and confidence [B,S,H,W] for images [B,S,3,H,W]."""
        S, H, W = images.shape[1], images.shape[-2], images.shape[-1]
        step = self.frames_chunk_size or S
        chunks = [self._predict(tokens, patch_start_idx, s, min(s + step, S), H, W) for s in range(0, S, step)]
        values, conf = zip(*chunks)
        return torch.cat(values, dim=1), torch.cat(conf, dim=1)

    def _predict(
        self, tokens: Sequence[Optional[torch.Tensor]], patch_start_idx: int, s0: int, s1: int, H: int, W: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = H // self.patch_size, W // self.patch_size
        maps = []
        for i, layer in enumerate(self.layer_idx):
            x = tokens[layer][:, s0:s1, patch_start_idx:]  # [B, s, rows*cols, 2C]
            B, s = x.shape[:2]
            x = self.norm(x.reshape(B * s, rows * cols, -1))
            x = x.permute(0, 2, 1).reshape(B * s, -1, rows, cols)
            x = _add_pos(self.projects[i](x), W / H)
            maps.append(self.resize_layers[i](x))
        x = self.scratch.fuse(maps)
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=True)
        x = self.scratch.output_conv2(_add_pos(x, W / H))
        x = x.permute(0, 2, 3, 1).unflatten(0, (B, s))  # [B, s, H, W, output_dim]
        values, conf = x[..., :-1], x[..., -1]
        if self.activation == "exp":
            values = torch.exp(values)
        else:  # inv_log: sign(y) * (e^|y| - 1)
            values = torch.sign(values) * torch.expm1(values.abs())
        return values, 1 + conf.exp()
