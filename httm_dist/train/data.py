"""Training data: rendered synthetic scenes turned into VGGT-normalised batches.

VGGT predicts every camera and point map in the frame of the first camera, at a scale fixed by
the scene itself (the mean distance of the points to the first camera's centre). The ground
truth is normalised the same way here, per sample, so the model learns a well-posed target:
``normalize_to_first_camera`` is that step. ``ScenePool`` keeps a fixed, seeded set of
pre-rendered sequences (rendering costs CPU that training needs) and draws samples from them:
a window of consecutive frames, random stride, optionally reversed, so one rendered sequence
gives many distinct samples. Every draw goes through a caller-owned ``numpy`` generator, so a
run is reproducible from its seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from httm_dist.errors import ConfigError
from httm_dist.eval.synthetic import render_scene
from httm_dist.model.geometry import closed_form_inverse_se3, extri_intri_to_pose_encoding

log = logging.getLogger(__name__)

HELD_OUT_SEED_BASE = 1_000_000
"""Held-out scenes use seeds from here on; training pools use seeds below it."""


@dataclass
class SceneBatch:
    """One normalised training or evaluation batch (``B`` samples of ``S`` frames).

    ``images`` [B,S,3,H,W] float in [0, 1]; ``depth`` [B,S,H,W]; ``world_points`` [B,S,H,W,3]
    in the first camera's frame; ``valid`` [B,S,H,W] bool (finite, positive depth);
    ``extrinsic`` [B,S,3,4] camera-from-first-camera; ``intrinsic`` [B,S,3,3];
    ``pose_enc`` [B,S,9] the encoding of those cameras; ``scale`` [B] the factor the scene was
    divided by.
    """

    images: torch.Tensor
    depth: torch.Tensor
    world_points: torch.Tensor
    valid: torch.Tensor
    extrinsic: torch.Tensor
    intrinsic: torch.Tensor
    pose_enc: torch.Tensor
    scale: torch.Tensor

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])


def normalize_to_first_camera(
    depth: torch.Tensor,
    world_points: torch.Tensor,
    extrinsic: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Express one batch of scenes in its first camera's frame, at unit mean point distance.

    Inputs are batched: ``depth`` [B,S,H,W], ``world_points`` [B,S,H,W,3], ``extrinsic``
    [B,S,3,4] (camera-from-world, OpenCV axes). Returns ``(depth, world_points, extrinsic,
    valid, scale)``: points mapped by the first camera's extrinsic, cameras composed with its
    inverse (so frame 0 becomes the identity), and depth, points and translations divided by
    the mean distance of the valid points to the first camera's centre, as VGGT's training
    does. ``valid`` marks finite, positive depth; invalid pixels are zeroed.
    """
    if depth.ndim != 4 or world_points.shape != (*depth.shape, 3) or extrinsic.shape != (*depth.shape[:2], 3, 4):
        raise ConfigError(
            "normalize_to_first_camera: expected depth [B,S,H,W], world_points [B,S,H,W,3] and "
            f"extrinsic [B,S,3,4]; got {tuple(depth.shape)}, {tuple(world_points.shape)}, "
            f"{tuple(extrinsic.shape)}"
        )
    valid = torch.isfinite(depth) & (depth > 0) & torch.isfinite(world_points).all(dim=-1)
    first = extrinsic[:, 0]  # [B,3,4]
    rot0, t0 = first[..., :3], first[..., 3]
    pts = torch.einsum("bij,bshwj->bshwi", rot0, torch.nan_to_num(world_points)) + t0[:, None, None, None]
    pts = torch.where(valid[..., None], pts, torch.zeros_like(pts))
    dist = pts.norm(dim=-1) * valid
    count = valid.flatten(1).sum(dim=1).clamp(min=1)
    scale = (dist.flatten(1).sum(dim=1) / count).clamp(min=eps)  # [B]

    rel = extrinsic @ closed_form_inverse_se3(first)[:, None]  # [B,S,3,4] @ [B,1,4,4]
    rel[..., 3] = rel[..., 3] / scale[:, None, None]
    out_depth = torch.where(valid, depth, torch.zeros_like(depth)) / scale[:, None, None, None]
    out_pts = pts / scale[:, None, None, None, None]
    return out_depth, out_pts, rel, valid, scale


def make_batch(scenes: Sequence[dict[str, np.ndarray]]) -> SceneBatch:
    """Stack per-sample arrays (``images`` uint8 [S,H,W,3], ``depth``, ``world_points``,
    ``extrinsic``, ``intrinsic``) into a normalised :class:`SceneBatch` with GT pose encodings."""
    images = torch.from_numpy(np.stack([s["images"] for s in scenes])).permute(0, 1, 4, 2, 3).float() / 255.0
    depth = torch.from_numpy(np.stack([s["depth"] for s in scenes]).astype(np.float32))
    points = torch.from_numpy(np.stack([s["world_points"] for s in scenes]).astype(np.float32))
    extrinsic = torch.from_numpy(np.stack([s["extrinsic"] for s in scenes]).astype(np.float32))
    intrinsic = torch.from_numpy(np.stack([s["intrinsic"] for s in scenes]).astype(np.float32))
    depth, points, extrinsic, valid, scale = normalize_to_first_camera(depth, points, extrinsic)
    height, width = images.shape[-2:]
    pose_enc = extri_intri_to_pose_encoding(extrinsic, intrinsic, (int(height), int(width)))
    return SceneBatch(images, depth, points, valid, extrinsic, intrinsic, pose_enc, scale)


def render_sequence(num_frames: int, height: int, width: int, seed: int, **options: Any) -> dict[str, np.ndarray]:
    """Render one synthetic sequence with the evaluation renderer, as a dict of arrays."""
    scene = render_scene(num_frames, height, width, seed, **options)
    return {
        "images": np.asarray(scene.images, dtype=np.uint8),
        "depth": np.asarray(scene.depth, dtype=np.float32),
        "world_points": np.asarray(scene.world_points, dtype=np.float32),
        "extrinsic": np.asarray(scene.extrinsic, dtype=np.float32),
        "intrinsic": np.asarray(scene.intrinsic, dtype=np.float32),
    }


class ScenePool:
    """A seeded pool of pre-rendered sequences that training samples are drawn from.

    ``size`` sequences of ``frames_per_scene`` frames are rendered with seeds
    ``seed * 100_003 + i`` (kept below :data:`HELD_OUT_SEED_BASE`). ``refresh(rng)`` replaces
    one sequence with a newly rendered one so a long run keeps seeing new scenes at a bounded
    rendering cost.
    """

    def __init__(
        self,
        size: int,
        frames_per_scene: int,
        height: int,
        width: int,
        seed: int = 0,
        render_options: dict[str, Any] | None = None,
    ) -> None:
        if size < 1 or frames_per_scene < 1:
            raise ConfigError(f"ScenePool: size and frames_per_scene must be >= 1, got {size}, {frames_per_scene}")
        self.frames_per_scene = frames_per_scene
        self.height, self.width = height, width
        self.render_options = dict(render_options or {})
        self._next_seed = (seed * 100_003) % (HELD_OUT_SEED_BASE // 2)
        self.scenes = [self._render_next() for _ in range(size)]
        log.info("rendered a pool of %d sequences of %d frames at %dx%d", size, frames_per_scene, height, width)

    def _render_next(self) -> dict[str, np.ndarray]:
        seed = self._next_seed
        self._next_seed += 1
        if self._next_seed >= HELD_OUT_SEED_BASE:
            raise ConfigError("ScenePool: training seeds ran into the held-out range; use a smaller seed")
        return render_sequence(self.frames_per_scene, self.height, self.width, seed, **self.render_options)

    def refresh(self, rng: np.random.Generator) -> None:
        """Replace one random sequence of the pool with a newly rendered one."""
        self.scenes[int(rng.integers(len(self.scenes)))] = self._render_next()

    def sample(self, rng: np.random.Generator, batch_size: int, num_frames: int, max_stride: int = 2) -> SceneBatch:
        """Draw ``batch_size`` samples of ``num_frames`` frames: a random sequence, a random
        stride in ``1..max_stride`` that fits, a random start, reversed half of the time."""
        if num_frames > self.frames_per_scene:
            raise ConfigError(
                f"ScenePool.sample: num_frames={num_frames} exceeds frames_per_scene={self.frames_per_scene}"
            )
        samples = []
        for _ in range(batch_size):
            scene = self.scenes[int(rng.integers(len(self.scenes)))]
            fit = max(1, min(max_stride, (self.frames_per_scene - 1) // max(num_frames - 1, 1)))
            stride = int(rng.integers(1, fit + 1))
            span = stride * (num_frames - 1) + 1
            start = int(rng.integers(0, self.frames_per_scene - span + 1))
            idx = np.arange(start, start + span, stride)
            if rng.random() < 0.5:
                idx = idx[::-1]
            samples.append({k: v[idx] for k, v in scene.items()})
        return make_batch(samples)


def held_out_scenes(
    count: int, num_frames: int, height: int, width: int, first_seed_offset: int = 0, **options: Any
) -> list[SceneBatch]:
    """Fixed held-out scenes (seeds ``HELD_OUT_SEED_BASE + first_seed_offset + i``), each a
    batch of one. Training monitors offsets 0.. ; tests use their own higher offsets."""
    base = HELD_OUT_SEED_BASE + first_seed_offset
    return [make_batch([render_sequence(num_frames, height, width, base + i, **options)]) for i in range(count)]
