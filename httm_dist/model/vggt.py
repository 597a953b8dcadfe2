"""VGGT: one feed-forward pass from S images of a scene to cameras, depth and world points.

A clean-room implementation of the official model (facebookresearch/vggt, commit 44b3afb)
whose state-dict keys and shapes match the official checkpoint, minus the track head.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from httm_dist.model.aggregator import Aggregator, check_images
from httm_dist.model.camera_head import CameraHead
from httm_dist.model.config import VGGTConfig
from httm_dist.model.dpt_head import DPTHead


class VGGT(nn.Module):
    """``model(images)`` with images [S,3,H,W] or [B,S,3,H,W] in [0,1], H and W multiples of
    the patch size (14). Returns a dict with a leading batch axis B (1 for [S,3,H,W] input, as
    the official model, which adds it):

    - ``pose_enc`` [B,S,9]: camera encoding (t, quaternion XYZW, fov_h, fov_w), the last of
    - ``pose_enc_list``: the 4 refinement iterations, each [B,S,9];
    - ``depth`` [B,S,H,W,1], ``depth_conf`` [B,S,H,W];
    - ``world_points`` [B,S,H,W,3] (first camera's frame), ``world_points_conf`` [B,S,H,W].

    On CUDA the aggregator runs under autocast (``aggregator.use_amp``) and the heads in fp32
    with autocast off, as the official inference; on CPU everything is fp32. The forward does
    not disable autograd: call it under ``torch.inference_mode()`` for inference.
    """

    def __init__(self, config: VGGTConfig) -> None:
        super().__init__()
        self.config = config
        self.aggregator = Aggregator(config, output_layers=config.head_layers)
        self.camera_head = CameraHead(config.camera_head)
        self.depth_head = DPTHead(config.dpt, config.depth_head, config.patch_size)
        self.point_head = DPTHead(config.dpt, config.point_head, config.patch_size)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        # shape only: the aggregator checks the values (one host read per forward, not two)
        images = check_images(images, self.config.patch_size, check_finite=False)
        tokens, patch_start_idx = self.aggregator(images)
        no_autocast = (
            torch.autocast(images.device.type, enabled=False)
            if images.device.type in ("cuda", "cpu")
            else contextlib.nullcontext()
        )
        with no_autocast:
            tokens = [None if t is None else t.float() for t in tokens]
            pose_enc_list = self.camera_head(tokens)
            depth, depth_conf = self.depth_head(tokens, images, patch_start_idx)
            points, points_conf = self.point_head(tokens, images, patch_start_idx)
        return {
            "pose_enc": pose_enc_list[-1],
            "pose_enc_list": pose_enc_list,
            "depth": depth,
            "depth_conf": depth_conf,
            "world_points": points,
            "world_points_conf": points_conf,
        }


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
