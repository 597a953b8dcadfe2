"""Reconstruction metrics against ground truth (numpy, scipy's cKDTree).

- Depth: AbsRel and delta < 1.25 after per-scene median scaling (monocular-style: the model's
  scale is arbitrary), over valid ground-truth pixels.
- Point clouds: accuracy (pred -> GT nearest-neighbour distance) and completeness (GT -> pred),
  mean and median, after a Sim(3) fitted on pixel correspondences (weighted Umeyama).
- Cameras: relative rotation and translation-direction errors over all frame pairs, AUC@30
  (as VGGT's evaluation computes it), and ATE (RMSE of camera centres after Sim(3)).

Conventions: extrinsic = camera-from-world [R|t] (OpenCV axes), intrinsic with pixel grid
u = 0..W-1, v = 0..H-1 (no +0.5), as in docs/VGGT.md.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from httm_dist.model.geometry import unproject_depth_map_to_point_map
from httm_dist.pipeline.align import umeyama_sim3 as _umeyama

logger = logging.getLogger(__name__)

__all__ = [
    "unproject_depth",
    "camera_centers",
    "umeyama_sim3",
    "apply_sim3",
    "median_scale",
    "depth_metrics",
    "pointcloud_metrics",
    "rotation_angle_deg",
    "relative_pose_errors",
    "auc",
    "ate",
    "camera_metrics",
    "evaluate_scene",
]


# ----------------------------------------------------------------------------- geometry


def unproject_depth(depth: np.ndarray, extrinsic: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
    """World points [S,H,W,3] (float64) of z-depth maps [S,H,W] seen by cameras [S,3,4] /
    [S,3,3]; the model's own unprojection, so metrics and outputs share one convention."""
    return unproject_depth_map_to_point_map(
        np.asarray(depth, dtype=np.float64),
        np.asarray(extrinsic, dtype=np.float64),
        np.asarray(intrinsic, dtype=np.float64),
    )


def camera_centers(extrinsic: np.ndarray) -> np.ndarray:
    """Camera centres [S,3] in the world: C = -R^T t."""
    E = np.asarray(extrinsic, dtype=np.float64)
    return -np.einsum("sji,sj->si", E[:, :, :3], E[:, :, 3])


def umeyama_sim3(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """Sim(3) (s, R, t) with dst ~ s R src + t in weighted least squares: the project's
    estimator (``httm_dist.pipeline.align.umeyama_sim3``, the one chunk alignment uses) as a
    plain tuple. Needs at least 3 finite point pairs."""
    sim = _umeyama(np.asarray(src, dtype=np.float64).reshape(-1, 3), np.asarray(dst, dtype=np.float64).reshape(-1, 3), weights)
    return sim.scale, sim.rotation, sim.translation


def apply_sim3(points: np.ndarray, s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """s R p + t for points [..., 3]."""
    return s * np.asarray(points, dtype=np.float64) @ np.asarray(R).T + np.asarray(t)


# ----------------------------------------------------------------------------- depth


def _valid_mask(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    mask = np.isfinite(gt) & (gt > 0) & np.isfinite(pred)
    if valid is not None:
        mask &= np.asarray(valid, dtype=bool)
    return mask


def _squeeze_depth(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    return d[..., 0] if d.ndim == 4 and d.shape[-1] == 1 else d


def median_scale(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> float:
    """median(gt) / median(pred) over the valid pixels of the whole scene."""
    pred, gt = _squeeze_depth(pred), _squeeze_depth(gt)
    mask = _valid_mask(gt, pred, valid)
    if not mask.any():
        raise ValueError("median_scale: no valid pixels (ground-truth depth > 0 and finite predictions)")
    mp = float(np.median(pred[mask]))
    if mp <= 0:
        raise ValueError(f"median_scale: median predicted depth is {mp} (must be > 0)")
    return float(np.median(gt[mask])) / mp


def depth_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """AbsRel = mean |s·pred - gt| / gt and delta<1.25 = share of max(s·pred/gt, gt/(s·pred))
    below 1.25, with s the per-scene median scale; over pixels with gt > 0 (and ``valid``)."""
    pred, gt = _squeeze_depth(pred), _squeeze_depth(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"depth_metrics: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    mask = _valid_mask(gt, pred, valid)
    s = median_scale(pred, gt, mask)
    p = np.maximum(s * pred[mask], 1e-12)
    g = gt[mask]
    ratio = np.maximum(p / g, g / p)
    return {"abs_rel": float(np.mean(np.abs(p - g) / g)), "delta_1.25": float(np.mean(ratio < 1.25)), "depth_scale": s}


# ----------------------------------------------------------------------------- points


def _subsample(n: int, max_points: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= max_points else np.sort(rng.choice(n, max_points, replace=False))


def pointcloud_metrics(
    pred_points: np.ndarray,
    gt_points: np.ndarray,
    valid: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    align: bool = True,
    max_points: int = 50_000,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy / completeness (mean and median NN distance, in GT units) of a predicted
    point map [...,3] against the GT point map of the same pixels.

    With ``align``, a Sim(3) fitted by (``weights``-weighted) Umeyama on the pixel
    correspondences first maps the prediction into the GT frame. Both clouds are then
    subsampled to ``max_points`` (seeded) for the nearest-neighbour queries.
    """
    from scipy.spatial import cKDTree  # deferred (heavy): only the point metrics need it

    pred = np.asarray(pred_points, dtype=np.float64).reshape(-1, 3)
    gt = np.asarray(gt_points, dtype=np.float64).reshape(-1, 3)
    if pred.shape != gt.shape:
        raise ValueError(f"pointcloud_metrics: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    mask = np.isfinite(pred).all(1) & np.isfinite(gt).all(1)
    if valid is not None:
        mask &= np.asarray(valid, dtype=bool).reshape(-1)
    if mask.sum() < 3:
        raise ValueError("pointcloud_metrics: fewer than 3 valid points")
    pred, gt = pred[mask], gt[mask]
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)[mask]
    scale = 1.0
    if align:
        scale, R, t = umeyama_sim3(pred, gt, w)
        pred = apply_sim3(pred, scale, R, t)
    rng = np.random.default_rng(seed)
    pred = pred[_subsample(len(pred), max_points, rng)]
    gt = gt[_subsample(len(gt), max_points, rng)]
    acc = cKDTree(gt).query(pred, k=1)[0]
    comp = cKDTree(pred).query(gt, k=1)[0]
    return {
        "accuracy": float(acc.mean()),
        "accuracy_median": float(np.median(acc)),
        "completeness": float(comp.mean()),
        "completeness_median": float(np.median(comp)),
        "chamfer": float(0.5 * (acc.mean() + comp.mean())),
        "points_scale": float(scale),
    }


# ----------------------------------------------------------------------------- cameras


def rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation taking Rb to Ra, for stacks [..., 3, 3]. Uses
    |Ra - Rb|_F = 2 sqrt(2) sin(angle / 2), which stays accurate near 0 (arccos of the trace
    loses ~0.01 degree to float32 rounding)."""
    diff = np.linalg.norm(np.asarray(Ra, np.float64) - np.asarray(Rb, np.float64), axis=(-2, -1))
    return np.degrees(2.0 * np.arcsin(np.clip(diff / (2.0 * np.sqrt(2.0)), 0.0, 1.0)))


def relative_pose_errors(
    pred_extrinsic: np.ndarray, gt_extrinsic: np.ndarray, translation_ambiguity: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per frame pair i < j: the rotation error (degrees) between predicted and GT relative
    rotations R_i R_j^T, and the angle between predicted and GT relative translations
    t_i - R_ij t_j (scale-free). With ``translation_ambiguity`` (VGGT's evaluation) the
    translation error is min(e, 180 - e)."""
    P = np.asarray(pred_extrinsic, dtype=np.float64)
    G = np.asarray(gt_extrinsic, dtype=np.float64)
    if P.shape != G.shape or P.ndim != 3 or P.shape[1:] != (3, 4):
        raise ValueError(f"relative_pose_errors: need two [S,3,4] extrinsics, got {P.shape} and {G.shape}")
    i, j = np.triu_indices(P.shape[0], k=1)

    def rel(E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        R = E[i, :, :3] @ np.swapaxes(E[j, :, :3], -1, -2)
        t = E[i, :, 3] - np.einsum("pab,pb->pa", R, E[j, :, 3])
        return R, t

    Rp, tp = rel(P)
    Rg, tg = rel(G)
    rot = rotation_angle_deg(Rp, Rg)
    npn, ngn = np.linalg.norm(tp, axis=-1), np.linalg.norm(tg, axis=-1)
    cos = (tp * tg).sum(-1) / np.maximum(npn * ngn, 1e-12)
    trans = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    # A zero-length translation has no direction: count it as the worst case unless both are zero.
    degenerate = (npn < 1e-12) | (ngn < 1e-12)
    trans = np.where(degenerate, np.where((npn < 1e-12) & (ngn < 1e-12), 0.0, 90.0), trans)
    if translation_ambiguity:
        trans = np.minimum(trans, 180.0 - trans)
    return rot, trans


def auc(errors: np.ndarray, max_threshold: int = 30) -> float:
    """Area under the accuracy-threshold curve up to ``max_threshold`` degrees (VGGT's
    calculate_auc_np): the mean over t = 1..max of the share of errors below t."""
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if errors.size == 0:
        raise ValueError("auc: no errors given (need at least two frames)")
    hist, _ = np.histogram(errors, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(hist / errors.size)))


def ate(pred_extrinsic: np.ndarray, gt_extrinsic: np.ndarray) -> float:
    """Absolute trajectory error: RMSE of camera centres after a Sim(3) alignment to GT."""
    cp, cg = camera_centers(pred_extrinsic), camera_centers(gt_extrinsic)
    if len(cp) < 3:
        return 0.0  # one or two centres always match exactly under some Sim(3)
    s, R, t = umeyama_sim3(cp, cg)
    return float(np.sqrt(np.mean(np.sum((apply_sim3(cp, s, R, t) - cg) ** 2, axis=1))))


def camera_metrics(pred_extrinsic: np.ndarray, gt_extrinsic: np.ndarray, max_threshold: int = 30) -> dict[str, float]:
    """Relative rotation / translation errors (mean, median, degrees), AUC@max_threshold on
    max(rot, trans) per pair, and ATE."""
    rot, trans = relative_pose_errors(pred_extrinsic, gt_extrinsic)
    if rot.size == 0:
        raise ValueError("camera_metrics: need at least two frames")
    return {
        "rot_err_mean": float(rot.mean()),
        "rot_err_median": float(np.median(rot)),
        "trans_err_mean": float(trans.mean()),
        "trans_err_median": float(np.median(trans)),
        f"auc@{max_threshold}": auc(np.maximum(rot, trans), max_threshold),
        "ate": ate(pred_extrinsic, gt_extrinsic),
    }


# ----------------------------------------------------------------------------- all together


def evaluate_scene(
    pred: Mapping[str, Any],
    gt_depth: np.ndarray,
    gt_extrinsic: np.ndarray,
    gt_intrinsic: np.ndarray,
    point_source: str = "world_points",
    max_points: int = 50_000,
    seed: int = 0,
) -> dict[str, float]:
    """Every metric for one scene. ``pred`` has ``depth`` [S,H,W(,1)], ``extrinsic`` [S,3,4],
    ``intrinsic`` [S,3,3] and, for ``point_source="world_points"``, ``world_points``
    [S,H,W,3]; ``point_source="depth"`` unprojects the predicted depth with the predicted
    cameras instead. GT must be at the prediction's resolution (see GroundTruth.resized)."""
    if point_source not in ("world_points", "depth"):
        raise ValueError(f"point_source must be 'world_points' or 'depth', got {point_source!r}")
    pdepth = _squeeze_depth(pred["depth"])
    gdepth = _squeeze_depth(gt_depth)
    if pdepth.shape != gdepth.shape:
        raise ValueError(
            f"prediction depth {pdepth.shape} and ground truth {gdepth.shape} differ: render or resize the ground truth to the model input size"
        )
    valid = np.isfinite(gdepth) & (gdepth > 0)
    out: dict[str, float] = {}
    out.update(depth_metrics(pdepth, gdepth, valid))
    if point_source == "world_points":
        ppoints = np.asarray(pred["world_points"], dtype=np.float64)
    else:
        ppoints = unproject_depth(pdepth, pred["extrinsic"], pred["intrinsic"])
    gpoints = unproject_depth(np.where(valid, gdepth, 0.0), gt_extrinsic, gt_intrinsic)
    out.update(pointcloud_metrics(ppoints, gpoints, valid, max_points=max_points, seed=seed))
    if pdepth.shape[0] >= 2:
        out.update(camera_metrics(pred["extrinsic"], gt_extrinsic))
    return out
