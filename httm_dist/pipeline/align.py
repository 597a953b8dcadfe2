"""Similarity transforms (Sim(3)) that align overlapping chunks of a long scene (VGGT-Long style).

Each chunk of a long scene is reconstructed in its own frame (its first camera at the origin, its
own scale). Consecutive chunks share ``overlap`` frames, whose world points are predicted by both;
a Sim(3) ``x -> s R x + t`` estimated from those point pairs maps one chunk's frame into the
other's. This module holds the estimator (weighted Umeyama, made robust by IRLS and a
least-median-of-squares RANSAC start) and the helpers that move cameras, points and depth into
the new frame consistently. Pure numpy, float64 internally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from httm_dist.errors import SceneError

logger = logging.getLogger(__name__)

Loss = Literal["cauchy", "huber"]
LOSSES = ("cauchy", "huber")
#: Floor of the IRLS threshold, in units of the scene scale: keeps noise-free data exact and
#: the robust weights finite.
_MIN_THRESHOLD = 1e-7


class AlignmentError(SceneError, ValueError):
    """Two chunks cannot be aligned (too few valid points, degenerate geometry)."""


@dataclass(frozen=True)
class Sim3:
    """A similarity transform ``x -> scale * rotation @ x + translation``."""

    scale: float
    rotation: np.ndarray  # [3, 3], det +1
    translation: np.ndarray  # [3]

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "rotation", np.asarray(self.rotation, dtype=np.float64).reshape(3, 3))
        object.__setattr__(self, "translation", np.asarray(self.translation, dtype=np.float64).reshape(3))
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Sim3 scale must be positive and finite, got {self.scale}")

    @classmethod
    def identity(cls) -> "Sim3":
        return cls(1.0, np.eye(3), np.zeros(3))

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> "Sim3":
        """From a 4x4 matrix ``[[sR, t], [0, 1]]``."""
        m = np.asarray(matrix, dtype=np.float64)
        scale = float(np.cbrt(np.linalg.det(m[:3, :3])))
        return cls(scale, m[:3, :3] / scale, m[:3, 3])

    def as_matrix(self) -> np.ndarray:
        """The 4x4 homogeneous matrix ``[[sR, t], [0, 1]]``."""
        m = np.eye(4)
        m[:3, :3] = self.scale * self.rotation
        m[:3, 3] = self.translation
        return m

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform points [..., 3]. Floating inputs keep their dtype (float32 stays float32)."""
        p = np.asarray(points)
        dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
        A = (self.scale * self.rotation).astype(dtype)
        return (p.astype(dtype, copy=False) @ A.T + self.translation.astype(dtype)).astype(dtype, copy=False)

    def compose(self, other: "Sim3") -> "Sim3":
        """``self ∘ other``: apply ``other`` first, then ``self``."""
        return Sim3(
            self.scale * other.scale,
            self.rotation @ other.rotation,
            self.scale * self.rotation @ other.translation + self.translation,
        )

    def inverse(self) -> "Sim3":
        inv_scale = 1.0 / self.scale
        return Sim3(inv_scale, self.rotation.T, -inv_scale * self.rotation.T @ self.translation)


@dataclass(frozen=True)
class AlignmentReport:
    """How well a Sim(3) explains the point pairs it was estimated from.

    Residuals are ``‖s R src + t − dst‖`` divided by ``scene_scale`` (the median distance of
    the ``dst`` points from their coordinate-wise median), so thresholds are scale-free:
    0.05 means 5% of the scene's extent. Medians and means are weighted by the input weights.
    """

    scale: float
    residual_median: float
    residual_mean: float
    inlier_fraction: float  # weighted share of points with residual < inlier_threshold
    inlier_threshold: float
    num_points: int
    iterations: int
    converged: bool
    scene_scale: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _umeyama_batch(
    src: np.ndarray, dst: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted Umeyama for K problems at once: src, dst [K, n, 3], weights [K, n].

    Returns scale [K], rotation [K, 3, 3], translation [K, 3]. A degenerate problem (all src
    points equal, zero total weight) gets scale NaN.
    """
    w_sum = weights.sum(-1, keepdims=True)  # [K, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = weights / w_sum
    mu_src = np.einsum("kn,knd->kd", w, src)
    mu_dst = np.einsum("kn,knd->kd", w, dst)
    src_c = src - mu_src[:, None]
    dst_c = dst - mu_dst[:, None]
    cov = np.einsum("kn,kni,knj->kij", w, dst_c, src_c)  # Σ w dst_c src_cᵀ
    var_src = np.einsum("kn,knd->k", w, src_c * src_c)
    cov = np.nan_to_num(cov)
    U, D, Vt = np.linalg.svd(cov)
    sign = np.sign(np.linalg.det(U) * np.linalg.det(Vt))
    sign[sign == 0] = 1.0
    S = np.ones((len(src), 3))
    S[:, 2] = sign
    R = np.einsum("kij,kj,kjl->kil", U, S, Vt)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = (D * S).sum(-1) / var_src
    scale = np.where((var_src > 0) & (scale > 0) & np.isfinite(scale), scale, np.nan)
    t = mu_dst - scale[:, None] * np.einsum("kij,kj->ki", R, mu_src)
    return scale, R, t


def _check_pairs(src, dst, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[-1] != 3 or src.shape != dst.shape:
        raise ValueError(f"src and dst must both be [N, 3] point sets, got {src.shape} and {dst.shape}")
    if weights is None:
        weights = np.ones(len(src))
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(src),):
        raise ValueError(f"weights must be [N] = [{len(src)}], got {weights.shape}")
    if np.any(weights < 0):
        raise ValueError("weights must be non-negative (confidences)")
    return src, dst, weights


def umeyama_sim3(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> Sim3:
    """The Sim(3) minimising ``Σ w ‖s R src + t − dst‖²`` in closed form (Umeyama 1991).

    ``src``, ``dst`` [N, 3]; ``weights`` [N] non-negative (None: all 1). The rotation is proper
    (det +1). Raises :class:`AlignmentError` when the problem is degenerate.
    """
    src, dst, weights = _check_pairs(src, dst, weights)
    if not (np.isfinite(src).all() and np.isfinite(dst).all() and np.isfinite(weights).all()):
        raise ValueError("umeyama_sim3 needs finite points and weights; filter NaN/inf first")
    if len(src) < 3 or weights.sum() <= 0:
        raise AlignmentError(f"a Sim(3) needs at least 3 weighted point pairs, got {int((weights > 0).sum())}")
    scale, R, t = _umeyama_batch(src[None], dst[None], weights[None])
    if not np.isfinite(scale[0]):
        raise AlignmentError("the source points are degenerate (all identical): no scale can be estimated")
    return Sim3(scale[0], R[0], t[0])


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted median along the last axis (values, weights [..., n])."""
    order = np.argsort(values, axis=-1)
    v = np.take_along_axis(values, order, -1)
    cw = np.cumsum(np.take_along_axis(weights, order, -1), axis=-1)
    idx = (cw < 0.5 * cw[..., -1:]).sum(-1, keepdims=True)
    return np.take_along_axis(v, np.minimum(idx, v.shape[-1] - 1), -1)[..., 0]


def _residuals(sim: Sim3, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    return np.linalg.norm(sim.apply(src) - dst, axis=-1)


def _lmeds_start(
    src: np.ndarray,
    dst: np.ndarray,
    weights: np.ndarray,
    rng: np.random.Generator,
    hypotheses: int,
    sample_points: int,
) -> Sim3:
    """RANSAC start: the minimal-sample (or all-point) Sim(3) with the least weighted median residual."""
    n = len(src)
    pick = rng.choice(n, size=min(n, sample_points), replace=False)
    s_src, s_dst, s_w = src[pick], dst[pick], weights[pick]
    # repeated indices make a degenerate sample: NaN scale or a poor fit, which LMedS rejects
    idx = rng.integers(0, n, size=(hypotheses, 3))
    scale, R, t = _umeyama_batch(src[idx], dst[idx], np.ones(idx.shape))
    full = umeyama_sim3(src, dst, weights)
    scale = np.append(scale, full.scale)
    R = np.concatenate([R, full.rotation[None]])
    t = np.concatenate([t, full.translation[None]])
    pred = scale[:, None, None] * np.einsum("kij,nj->kni", R, s_src) + t[:, None]
    res = np.linalg.norm(pred - s_dst[None], axis=-1)  # [K+1, m]
    score = _weighted_median(res, np.broadcast_to(s_w, res.shape))
    score[~np.isfinite(scale)] = np.inf
    best = int(np.argmin(score))
    return Sim3(scale[best], R[best], t[best])


def _check_options(loss, threshold, iters, ransac, ransac_hypotheses, ransac_sample_points,
                   inlier_threshold, tol) -> None:
    """Raise ValueError naming the first option of :func:`robust_sim3` that is out of range.

    (A job checks the same options when its config loads: ``httm_dist.config.AlignOptions``,
    which also asks for ``iters >= 1``; here 0 is allowed and means "the start, unrefined".)
    """
    if loss not in LOSSES:
        raise ValueError(f"alignment loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(ransac, (bool, np.bool_)):
        raise ValueError(f"alignment ransac must be true or false, got {ransac!r}")
    for name, value, low in (("iters", iters, 0), ("ransac_hypotheses", ransac_hypotheses, 1),
                             ("ransac_sample_points", ransac_sample_points, 3)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"alignment {name} must be an integer >= {low}, got {value!r}")
    for name, value, allow_none in (("threshold", threshold, True), ("inlier_threshold", inlier_threshold, False)):
        if value is None and allow_none:
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
                or not (np.isfinite(value) and value > 0):
            raise ValueError(f"alignment {name} must be a positive finite number (units of the "
                             f"scene's extent), got {value!r}")
    if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, (int, float, np.number)) or not 0 <= tol < 1:
        raise ValueError(f"alignment tol must be a number >= 0 and < 1 (relative change), got {tol!r}")


def robust_sim3(
    src: np.ndarray,
    dst: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    loss: Loss = "cauchy",
    threshold: float | None = None,
    iters: int = 30,
    ransac: bool = True,
    ransac_hypotheses: int = 128,
    ransac_sample_points: int = 2000,
    inlier_threshold: float = 0.05,
    tol: float = 1e-12,
    seed: int = 0,
) -> tuple[Sim3, AlignmentReport]:
    """Robust weighted Sim(3) from point pairs: IRLS around weighted Umeyama.

    - Points with a non-finite coordinate or a zero weight are ignored.
    - Start: with ``ransac``, the best of ``ransac_hypotheses`` 3-point Sim(3)s and the plain
      weighted Umeyama fit, by least weighted median residual (LMedS: no threshold needed,
      breaks down only beyond 50% outliers); otherwise the plain fit.
    - IRLS: each round re-weights every pair by ``weight * ψ(r)/r`` of the ``loss`` ("cauchy":
      ``1 / (1 + (r/k)²)``, redescending, for gross outliers; "huber": ``min(1, k/r)``) and refits.
      ``k`` is ``threshold`` (units of the scene scale) or, when None, twice the weighted median
      residual of the current fit (adapts to the noise level), floored at 1e-7.
    - Stops when the transform changes by less than ``tol`` (relative) or after ``iters`` rounds
      (0: the start, unrefined).

    Returns the transform (mapping ``src`` onto ``dst``) and an :class:`AlignmentReport`.
    Raises ValueError naming an option out of range (loss not cauchy/huber, threshold or
    inlier_threshold not > 0, iters < 0, ransac_hypotheses < 1, ransac_sample_points < 3,
    tol not in [0, 1), a non-integer count) and :class:`AlignmentError` when fewer than 3
    valid pairs remain or the target points are degenerate.
    """
    _check_options(loss, threshold, iters, ransac, ransac_hypotheses, ransac_sample_points,
                   inlier_threshold, tol)
    src, dst, weights = _check_pairs(src, dst, weights)
    valid = np.isfinite(src).all(-1) & np.isfinite(dst).all(-1) & np.isfinite(weights) & (weights > 0)
    src, dst, weights = src[valid], dst[valid], weights[valid]
    if len(src) < 3:
        raise AlignmentError(
            f"only {len(src)} valid point pairs (finite, positive confidence) to align; need at least 3"
        )
    center = np.median(dst, axis=0)
    scene_scale = float(np.median(np.linalg.norm(dst - center, axis=-1)))
    if not scene_scale > 0:
        raise AlignmentError("the target points are degenerate (all identical): cannot align")

    rng = np.random.default_rng(seed)
    sim = (
        _lmeds_start(src, dst, weights, rng, ransac_hypotheses, ransac_sample_points)
        if ransac
        else umeyama_sim3(src, dst, weights)
    )
    converged = False
    it = 0
    for it in range(1, iters + 1):
        r = _residuals(sim, src, dst) / scene_scale
        k = threshold if threshold is not None else 2.0 * float(_weighted_median(r, weights))
        k = max(k, _MIN_THRESHOLD)
        if loss == "cauchy":
            robust = 1.0 / (1.0 + (r / k) ** 2)
        else:
            robust = np.minimum(1.0, k / np.maximum(r, 1e-300))
        try:
            new = umeyama_sim3(src, dst, weights * robust)
        except AlignmentError:
            logger.warning("IRLS round %d degenerated; keeping the previous estimate", it)
            break
        change = np.abs(new.as_matrix() - sim.as_matrix()).max() / max(1.0, np.abs(sim.as_matrix()).max())
        sim = new
        if change < tol:
            converged = True
            break
    r = _residuals(sim, src, dst) / scene_scale
    report = AlignmentReport(
        scale=sim.scale,
        residual_median=float(_weighted_median(r, weights)),
        residual_mean=float(np.average(r, weights=weights)),
        inlier_fraction=float(weights[r < inlier_threshold].sum() / weights.sum()),
        inlier_threshold=float(inlier_threshold),
        num_points=int(len(src)),
        iterations=it,
        converged=converged,
        scene_scale=scene_scale,
    )
    return sim, report


def transform_points(points: np.ndarray, sim: Sim3) -> np.ndarray:
    """World points [..., 3] into the new frame: ``s R x + t``."""
    return sim.apply(points)


def scale_depth(depth: np.ndarray, sim: Sim3) -> np.ndarray:
    """Depth maps in the new frame: distances scale by ``s`` (rotation and shift do not change them)."""
    d = np.asarray(depth)
    return d * np.asarray(sim.scale, dtype=d.dtype if np.issubdtype(d.dtype, np.floating) else np.float64)


def transform_extrinsics(extrinsic: np.ndarray, sim: Sim3) -> np.ndarray:
    """Camera-from-world extrinsics [..., 3, 4] (or [..., 4, 4]) for the world ``X' = s R X + t``.

    With ``x_cam = Rc X + tc`` and ``X = R^T (X' − t) / s``, the camera keeps its axes and its
    intrinsics but its frame is scaled by ``s`` along with the world (so depth becomes ``s · d``,
    see :func:`scale_depth`): ``x'_cam = s x_cam = (Rc Rᵀ) X' + (s tc − Rc Rᵀ t)``.
    Camera centres move like points: ``C' = s R C + t``.
    """
    E = np.asarray(extrinsic)
    if E.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"extrinsic must be [..., 3, 4] or [..., 4, 4], got {E.shape}")
    dtype = E.dtype if np.issubdtype(E.dtype, np.floating) else np.float64
    E64 = E.astype(np.float64)
    Rc, tc = E64[..., :3, :3], E64[..., :3, 3]
    new_R = Rc @ sim.rotation.T
    new_t = sim.scale * tc - new_R @ sim.translation
    out = E64.copy()
    out[..., :3, :3] = new_R
    out[..., :3, 3] = new_t
    return out.astype(dtype, copy=False)


__all__ = [
    "AlignmentError",
    "AlignmentReport",
    "Sim3",
    "robust_sim3",
    "scale_depth",
    "transform_extrinsics",
    "transform_points",
    "umeyama_sim3",
]
