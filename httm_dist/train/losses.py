"""VGGT-style training objectives.

- Camera: an L1 (or Huber) loss on the 9-d pose encoding (translation, quaternion, field of
  view) for every refinement iteration of the camera head, later iterations weighted more
  (``gamma ** (n - 1 - i)``), as VGGT trains its iterative head. L1 is the default, as in
  VGGT's released training code: the relative rotations of short synthetic clips are a few
  degrees (quaternion parts ~0.05), where a Huber loss with delta 0.1 is quadratic and its
  gradient vanishes, and a model trained with it learned no rotation at all.
- Depth and point maps: the confidence-aware regression of VGGT (after Kendall & Gal):
  ``conf * |pred - gt| - alpha * log(conf)`` over valid pixels, so the model may down-weight
  pixels it cannot predict but pays for doing so, plus a confidence-weighted loss on the
  spatial gradient of the error, which sharpens edges.
All terms are means over valid pixels, so their size does not depend on the image size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from httm_dist.errors import ConfigError
from httm_dist.train.data import SceneBatch


POSE_PARTS = (slice(0, 3), slice(3, 7), slice(7, 9))
"""Translation, quaternion and field-of-view parts of the 9-d pose encoding."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms and the confidence/iteration hyper-parameters."""

    camera: float = 5.0
    camera_kind: str = "l1"
    camera_parts: tuple[float, float, float] = (1.0, 1.0, 0.5)
    depth: float = 1.0
    points: float = 1.0
    gradient: float = 1.0
    alpha: float = 0.2
    gamma: float = 0.6
    huber_delta: float = 0.1

    def __post_init__(self) -> None:
        if self.camera_kind not in ("l1", "huber"):
            raise ConfigError(f"LossWeights.camera_kind must be 'l1' or 'huber', got {self.camera_kind!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["camera_parts"] = list(self.camera_parts)
        return d


def camera_loss(
    pose_enc_list: Sequence[torch.Tensor],
    gt_pose_enc: torch.Tensor,
    gamma: float = 0.6,
    delta: float = 0.1,
    kind: str = "l1",
    part_weights: Sequence[float] = (1.0, 1.0, 0.5),
) -> torch.Tensor:
    """L1 (``kind="l1"``) or Huber (``kind="huber"``, threshold ``delta``) loss between each
    iteration's pose encoding [B,S,9] and the ground truth: the translation, quaternion and
    field-of-view parts averaged separately and summed with ``part_weights``, iterations
    weighted by ``gamma ** (n - 1 - i)`` and those weights normalised to sum to one."""
    if len(pose_enc_list) == 0:
        raise ConfigError("camera_loss: pose_enc_list is empty; the camera head returned no iterations")
    if kind not in ("l1", "huber"):
        raise ConfigError(f"camera_loss: kind must be 'l1' or 'huber', got {kind!r}")
    n = len(pose_enc_list)
    weights = torch.tensor([gamma ** (n - 1 - i) for i in range(n)], dtype=gt_pose_enc.dtype)
    weights = weights / weights.sum()
    total = gt_pose_enc.new_zeros(())
    for w, pred in zip(weights, pose_enc_list):
        parts = [
            pw * (F.l1_loss(pred[..., sl], gt_pose_enc[..., sl]) if kind == "l1"
                  else F.huber_loss(pred[..., sl], gt_pose_enc[..., sl], delta=delta))
            for pw, sl in zip(part_weights, POSE_PARTS)
        ]
        total = total + w * sum(parts)
    return total


def conf_regression_loss(
    pred: torch.Tensor,
    conf: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor,
    alpha: float = 0.2,
    gradient_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence-aware regression of a dense map ``pred`` [B,S,H,W,C] to ``gt`` (same shape),
    with confidence ``conf`` [B,S,H,W] (>= 1 from the heads' 1 + exp) and ``valid`` mask.

    Returns ``(regression, gradient)``: the mean of ``conf * ||pred - gt|| - alpha * log conf``
    over valid pixels, and the mean over pairs of valid horizontal/vertical neighbours of the
    confidence-weighted norm of the error's finite difference (times ``gradient_weight``).
    """
    if pred.shape != gt.shape or pred.shape[:-1] != conf.shape or conf.shape != valid.shape:
        raise ConfigError(
            "conf_regression_loss: pred and gt must be [B,S,H,W,C] and conf, valid [B,S,H,W]; got "
            f"{tuple(pred.shape)}, {tuple(gt.shape)}, {tuple(conf.shape)}, {tuple(valid.shape)}"
        )
    mask = valid.to(pred.dtype)
    count = mask.sum().clamp(min=1.0)
    diff = (pred - gt) * mask[..., None]
    err = diff.norm(dim=-1)
    regression = ((conf * err - alpha * torch.log(conf)) * mask).sum() / count

    gradient = pred.new_zeros(())
    if gradient_weight > 0:
        for dim in (2, 3):  # H then W of [B,S,H,W]
            length = diff.shape[dim]
            if length < 2:
                continue
            d_err = (diff.narrow(dim, 1, length - 1) - diff.narrow(dim, 0, length - 1)).norm(dim=-1)
            pair = mask.narrow(dim, 1, length - 1) * mask.narrow(dim, 0, length - 1)
            pair_conf = 0.5 * (conf.narrow(dim, 1, length - 1) + conf.narrow(dim, 0, length - 1))
            gradient = gradient + (pair_conf * d_err * pair).sum() / pair.sum().clamp(min=1.0)
        gradient = gradient_weight * gradient
    return regression, gradient


def vggt_loss(
    outputs: Mapping[str, torch.Tensor | list[torch.Tensor]], batch: SceneBatch, weights: LossWeights = LossWeights()
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total training loss of one forward pass and its parts (as floats, for logging).

    ``outputs`` is the model's dict (``pose_enc`` or ``pose_enc_list``, ``depth``,
    ``depth_conf``, ``world_points``, ``world_points_conf``); terms whose outputs are absent
    (a head switched off) are skipped.
    """
    parts: dict[str, torch.Tensor] = {}
    pose_list = outputs.get("pose_enc_list") or ([outputs["pose_enc"]] if "pose_enc" in outputs else None)
    if pose_list is not None:
        parts["camera"] = weights.camera * camera_loss(
            pose_list, batch.pose_enc, weights.gamma, weights.huber_delta, weights.camera_kind, weights.camera_parts
        )
    if "depth" in outputs:
        reg, grad = conf_regression_loss(
            outputs["depth"], outputs["depth_conf"], batch.depth[..., None], batch.valid, weights.alpha, weights.gradient
        )
        parts["depth"] = weights.depth * reg
        parts["depth_grad"] = weights.depth * grad
    if "world_points" in outputs:
        reg, grad = conf_regression_loss(
            outputs["world_points"], outputs["world_points_conf"], batch.world_points, batch.valid,
            weights.alpha, weights.gradient,
        )
        parts["points"] = weights.points * reg
        parts["points_grad"] = weights.points * grad
    if not parts:
        raise ConfigError("vggt_loss: the model returned none of pose_enc, depth, world_points")
    total = sum(parts.values())
    logged = {k: float(v.detach()) for k, v in parts.items()}
    if pose_list is not None:
        logged.update(camera_errors(pose_list[-1], batch.pose_enc))
    return total, logged


@torch.no_grad()
def camera_errors(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """Mean absolute error of each part of the pose encoding [B,S,9] (translation,
    quaternion, field of view), for logging: the camera loss alone cannot tell which part a
    run is learning (the shipped run learned the field of view, not the rotation)."""
    names = ("cam_trans_l1", "cam_quat_l1", "cam_fov_l1")
    return {n: float((pred[..., sl] - gt[..., sl]).abs().mean()) for n, sl in zip(names, POSE_PARTS)}
