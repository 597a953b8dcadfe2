"""Camera head: iteratively refines a 9-d pose encoding per frame from the camera tokens.

Encoding "absT_quaR_FoV": translation (3), quaternion XYZW (4), field of view (h, w).
Each of 4 iterations embeds the current estimate (a learned empty token first), modulates the
normalised camera tokens with it (adaLN: shift, scale, gate), runs a transformer trunk across
the S frames and adds the predicted delta. All 4 activated estimates are returned.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from httm_dist.model.config import CameraHeadConfig
from httm_dist.model.layers import Block, Mlp

POSE_DIM = 9


def activate_pose(pred: torch.Tensor) -> torch.Tensor:
    """Translation and quaternion linear, FoV through ReLU."""
    return torch.cat([pred[..., :7], F.relu(pred[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    def __init__(self, cfg: CameraHeadConfig) -> None:
        super().__init__()
        C = cfg.dim_in
        self.trunk = nn.Sequential(
            *(Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.init_values) for _ in range(cfg.trunk_depth))
        )
        self.token_norm = nn.LayerNorm(C)
        self.trunk_norm = nn.LayerNorm(C)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.embed_pose = nn.Linear(POSE_DIM, C)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 3 * C))
        self.adaln_norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(C, C // 2, POSE_DIM)

    def forward(
        self, tokens: Sequence[Optional[torch.Tensor]], num_iterations: int = 4
    ) -> list[torch.Tensor]:
        """``tokens``: the aggregator's layer list (the last is read). Returns [B,S,9] x iterations."""
        pose_tokens = self.token_norm(tokens[-1][:, :, 0])  # camera token of each frame [B,S,C]
        normed = self.adaln_norm(pose_tokens)
        B, S, _ = pose_tokens.shape
        pred: Optional[torch.Tensor] = None
        out = []
        for _ in range(num_iterations):
            last = self.empty_pose_tokens.expand(B, S, -1) if pred is None else pred.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(last)).chunk(3, dim=-1)
            h = gate * (normed * (1 + scale) + shift) + pose_tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(h)))
            pred = delta if pred is None else pred + delta
            out.append(activate_pose(pred))
        return out
