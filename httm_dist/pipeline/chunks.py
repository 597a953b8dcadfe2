"""Long scenes as overlapping chunks: planning, and assembly of per-chunk predictions into one scene.

A scene longer than ``chunk.max_frames`` is cut into chunks of at most ``max_frames`` frames,
consecutive chunks sharing ``chunk.overlap`` frames (VGGT-Long: 60-75 frames, overlap ~30). Each
chunk is reconstructed alone, in its own frame and scale, possibly on a different worker.
:func:`assemble_chunks` then estimates, for every consecutive pair, the Sim(3) that maps the later
chunk onto the earlier one from the points both predict on the shared frames, composes them so
every chunk lands in chunk 0's frame, and writes each frame once.

Choices (documented because they change results):

- Alignment points (``points_source``): by default ``"depth"``, i.e. the depth maps unprojected
  with the predicted cameras, weighted by ``depth_conf`` (the VGGT authors find depth + cameras
  more accurate than the point head); ``"point_head"`` uses ``world_points`` and
  ``world_points_conf`` instead. A pair's weight is the product of both chunks' confidences at
  that pixel. At most ``max_points`` randomly chosen overlap pixels (fixed seed) are used.
- Overlap frames come from the chunk whose mean confidence on that frame (the confidence of
  ``points_source``) is higher; ties go to the earlier chunk. No blending.
- A pair is flagged when its weighted median alignment residual (units of the scene's extent,
  see :class:`~httm_dist.pipeline.align.AlignmentReport`) exceeds ``residual_threshold`` or its
  inlier fraction is below ``min_inlier_fraction``. Flagged pairs are still composed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from httm_dist.errors import ConfigError, SceneError
from httm_dist.model.geometry import pose_encoding_to_extri_intri
from httm_dist.pipeline.align import (
    AlignmentReport,
    Sim3,
    robust_sim3,
    scale_depth,
    transform_extrinsics,
)

logger = logging.getLogger(__name__)

PointsSource = Literal["depth", "point_head"]
POINTS_SOURCES = ("depth", "point_head")

#: Per-frame prediction arrays of a chunk or scene (leading axis = frame), besides frame metadata.
PRED_KEYS = ("depth", "depth_conf", "world_points", "world_points_conf", "extrinsic", "intrinsic")


def plan_chunks(num_frames: int, max_frames: int, overlap: int) -> list[tuple[int, int]]:
    """Split ``num_frames`` frames into chunks ``(start, end)`` (end exclusive).

    A scene of at most ``max_frames`` frames is one chunk. Otherwise the fewest chunks of at most
    ``max_frames`` frames such that each consecutive pair shares exactly ``overlap`` frames,
    with lengths balanced (they differ by at most one, so the last chunk is never a sliver).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise SceneError(f"a scene needs at least one frame to plan chunks, got num_frames={num_frames!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 1:
        raise ConfigError(f"chunk.max_frames must be a positive integer, got {max_frames!r}")
    if num_frames <= max_frames:
        return [(0, int(num_frames))]
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 1 <= overlap < max_frames:
        raise ConfigError(
            f"chunk.overlap must be an integer with 1 <= overlap < chunk.max_frames ({max_frames}) to "
            f"align chunks of a {num_frames}-frame scene, got {overlap!r}"
        )
    count = math.ceil((num_frames - overlap) / (max_frames - overlap))
    base, extra = divmod(num_frames + (count - 1) * overlap, count)
    ranges = []
    start = 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end - overlap
    assert ranges[-1][1] == num_frames
    return ranges


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


@dataclass
class ChunkPrediction:
    """One chunk's predictions, per frame, in the chunk's own frame (numpy arrays).

    depth [n, H, W] (a trailing 1 is dropped), depth_conf [n, H, W], world_points [n, H, W, 3],
    world_points_conf [n, H, W], extrinsic [n, 3, 4] (camera from world), intrinsic [n, 3, 3].
    """

    depth: np.ndarray
    depth_conf: np.ndarray
    world_points: np.ndarray
    world_points_conf: np.ndarray
    extrinsic: np.ndarray
    intrinsic: np.ndarray

    def __post_init__(self) -> None:
        for name in PRED_KEYS:
            setattr(self, name, _numpy(getattr(self, name)))
        if self.depth.ndim == 4 and self.depth.shape[-1] == 1:
            self.depth = self.depth[..., 0]
        if self.depth.ndim != 3:
            raise ValueError(f"chunk depth must be [n, H, W] or [n, H, W, 1], got {self.depth.shape}")
        n, H, W = self.depth.shape
        expected = {
            "depth_conf": (n, H, W),
            "world_points": (n, H, W, 3),
            "world_points_conf": (n, H, W),
            "extrinsic": (n, 3, 4),
            "intrinsic": (n, 3, 3),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"chunk {name} must be {list(shape)} to match depth {list(self.depth.shape)}, "
                    f"got {list(getattr(self, name).shape)}"
                )

    @property
    def num_frames(self) -> int:
        return self.depth.shape[0]

    @classmethod
    def from_predictions(cls, preds: Mapping[str, Any], image_size_hw: Sequence[int] | None = None) -> "ChunkPrediction":
        """From a model output dict (torch or numpy, optional leading batch axis of 1).

        Cameras come from ``extrinsic``/``intrinsic`` when present, else from ``pose_enc`` and
        ``image_size_hw`` (default: the depth map's H, W).
        """
        arrays = {k: _numpy(v) for k, v in preds.items() if k != "pose_enc_list"}
        if arrays["depth"].ndim == 5:  # [1, S, H, W, 1]: drop the batch axis
            if arrays["depth"].shape[0] != 1:
                raise ValueError("from_predictions takes one scene: the batch axis must be 1")
            arrays = {k: v[0] for k, v in arrays.items()}
        if "extrinsic" not in arrays:
            hw = image_size_hw if image_size_hw is not None else arrays["depth"].shape[1:3]
            arrays["extrinsic"], arrays["intrinsic"] = pose_encoding_to_extri_intri(arrays["pose_enc"], hw)
        return cls(**{k: arrays[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PairAlignment:
    """The alignment of chunk ``later`` onto chunk ``earlier`` from their shared frames."""

    earlier: int
    later: int
    frames: tuple[int, int]  # shared global frames [start, end)
    sim3: Sim3  # maps chunk ``later``'s frame into chunk ``earlier``'s
    report: AlignmentReport
    flagged: bool

    def as_record(self) -> dict:
        return {
            "chunks": [self.earlier, self.later],
            "frames": list(self.frames),
            "scale": self.report.scale,
            "residual": self.report.residual_median,
            "residual_mean": self.report.residual_mean,
            "inlier_fraction": self.report.inlier_fraction,
            "num_points": self.report.num_points,
            "flagged": self.flagged,
        }


@dataclass
class AssembledScene(ChunkPrediction):
    """The whole scene in chunk 0's frame: the arrays of :class:`ChunkPrediction` for every frame,
    plus where each frame came from and how the chunks were aligned."""

    source_chunk: np.ndarray  # [num_frames] int: the chunk each frame was taken from
    ranges: list[tuple[int, int]]
    chunk_to_first: list[Sim3]  # per chunk: its frame -> chunk 0's frame
    alignments: list[PairAlignment] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return any(a.flagged for a in self.alignments)

    def record(self) -> dict:
        """Summary for the per-scene record: chunk count, per-pair residuals and flags."""
        return {
            "chunk_count": len(self.ranges),
            "chunk_ranges": [list(r) for r in self.ranges],
            "alignments": [a.as_record() for a in self.alignments],
            "alignment_flagged": self.flagged,
        }


def _check_ranges(chunks: Sequence[ChunkPrediction], ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    if not chunks:
        raise SceneError("assemble_chunks needs at least one chunk")
    if len(chunks) != len(ranges):
        raise ValueError(f"got {len(chunks)} chunk predictions but {len(ranges)} frame ranges")
    ranges = [(int(s), int(e)) for s, e in ranges]
    if ranges[0][0] != 0:
        raise ValueError(f"the first chunk must start at frame 0, got range {ranges[0]}")
    shape = chunks[0].depth.shape[1:]
    for i, (chunk, (start, end)) in enumerate(zip(chunks, ranges)):
        if chunk.num_frames != end - start:
            raise ValueError(f"chunk {i} has {chunk.num_frames} frames but its range {(start, end)} has {end - start}")
        if chunk.depth.shape[1:] != shape:
            raise ValueError(f"chunk {i} has depth maps of {chunk.depth.shape[1:]}, chunk 0 has {shape}")
        if i and not (ranges[i - 1][0] < start < ranges[i - 1][1] and end > ranges[i - 1][1]):
            raise ValueError(
                f"chunk ranges must advance and overlap by at least one frame: {ranges[i - 1]} then {(start, end)}"
            )
    return ranges


def _unproject_pixels(chunk: ChunkPrediction, frame: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """World points of chosen pixels from depth + cameras (same maths as the full unprojection)."""
    K = chunk.intrinsic[frame].astype(np.float64)
    E = chunk.extrinsic[frame].astype(np.float64)
    d = chunk.depth[frame, v, u].astype(np.float64)
    cam = np.stack([(u - K[:, 0, 2]) * d / K[:, 0, 0], (v - K[:, 1, 2]) * d / K[:, 1, 1], d], axis=-1)
    return np.einsum("nji,nj->ni", E[:, :, :3], cam - E[:, :, 3])  # R^T (cam - t)


def _overlap_pairs(
    a: ChunkPrediction,
    b: ChunkPrediction,
    frames_a: np.ndarray,
    frames_b: np.ndarray,
    points_source: str,
    conf_weighted: bool,
    max_points: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points of b, points of a, weights) at up to ``max_points`` random pixels of the shared frames."""
    H, W = a.depth.shape[1:]
    total = len(frames_a) * H * W
    flat = rng.choice(total, size=max_points, replace=False) if total > max_points else np.arange(total)
    f, rest = np.divmod(flat, H * W)
    v, u = np.divmod(rest, W)
    fa, fb = frames_a[f], frames_b[f]
    if points_source == "depth":
        pa, pb = _unproject_pixels(a, fa, v, u), _unproject_pixels(b, fb, v, u)
        ca, cb = a.depth_conf[fa, v, u], b.depth_conf[fb, v, u]
    else:
        pa, pb = a.world_points[fa, v, u], b.world_points[fb, v, u]
        ca, cb = a.world_points_conf[fa, v, u], b.world_points_conf[fb, v, u]
    weights = ca.astype(np.float64) * cb if conf_weighted else np.ones(len(flat))
    return pb, pa, weights


def assemble_chunks(
    chunks: Sequence[ChunkPrediction],
    ranges: Sequence[tuple[int, int]],
    *,
    points_source: PointsSource = "depth",
    conf_weighted: bool = True,
    residual_threshold: float = 0.05,
    min_inlier_fraction: float = 0.5,
    max_points: int = 100_000,
    seed: int = 0,
    align_options: Mapping[str, Any] | None = None,
) -> AssembledScene:
    """Align consecutive chunks by robust Sim(3) on their overlap and merge them into one scene.

    ``ranges[i]`` is chunk ``i``'s global frames ``(start, end)``, as from :func:`plan_chunks`.
    ``align_options`` go to :func:`~httm_dist.pipeline.align.robust_sim3` (loss, threshold,
    iters, ransac, inlier_threshold, ...). See the module docstring for the choices made.
    Raises :class:`~httm_dist.pipeline.align.AlignmentError` (a ``SceneError``) when a pair
    has too few valid points to align.
    """
    if points_source not in POINTS_SOURCES:
        raise ConfigError(f"alignment points_source must be one of {POINTS_SOURCES}, got {points_source!r}")
    if max_points < 3:
        raise ConfigError(f"alignment max_points must be at least 3, got {max_points}")
    ranges = _check_ranges(chunks, ranges)
    rng = np.random.default_rng(seed)
    options = dict(align_options or {})
    options.setdefault("seed", seed)

    to_first = [Sim3.identity()]
    alignments: list[PairAlignment] = []
    for i in range(len(chunks) - 1):
        (sa, ea), (sb, _) = ranges[i], ranges[i + 1]
        shared = np.arange(sb, ea)
        src, dst, w = _overlap_pairs(
            chunks[i], chunks[i + 1], shared - sa, shared - sb, points_source, conf_weighted, max_points, rng
        )
        sim, report = robust_sim3(src, dst, w, **options)
        flagged = report.residual_median > residual_threshold or report.inlier_fraction < min_inlier_fraction
        if flagged:
            logger.warning(
                "chunks %d->%d (frames %d-%d) align poorly: residual %.4f, inliers %.2f",
                i + 1, i, sb, ea - 1, report.residual_median, report.inlier_fraction,
            )
        alignments.append(PairAlignment(i, i + 1, (int(sb), int(ea)), sim, report, flagged))
        to_first.append(to_first[-1].compose(sim))

    num_frames = ranges[-1][1]
    conf_name = "depth_conf" if points_source == "depth" else "world_points_conf"
    frame_conf = np.full((len(chunks), num_frames), -np.inf)
    for i, (chunk, (start, end)) in enumerate(zip(chunks, ranges)):
        frame_conf[i, start:end] = getattr(chunk, conf_name).reshape(chunk.num_frames, -1).mean(-1)
    source = np.argmax(frame_conf, axis=0)  # first maximum: ties go to the earlier chunk

    first = chunks[0]
    out = {
        name: np.empty((num_frames,) + getattr(first, name).shape[1:], dtype=getattr(first, name).dtype)
        for name in ChunkPrediction.__dataclass_fields__
    }
    for i, (chunk, (start, _)) in enumerate(zip(chunks, ranges)):
        frames = np.nonzero(source == i)[0]
        local = frames - start
        sim = to_first[i]
        out["depth"][frames] = scale_depth(chunk.depth[local], sim)
        out["depth_conf"][frames] = chunk.depth_conf[local]
        out["world_points"][frames] = sim.apply(chunk.world_points[local])
        out["world_points_conf"][frames] = chunk.world_points_conf[local]
        out["extrinsic"][frames] = transform_extrinsics(chunk.extrinsic[local], sim)
        out["intrinsic"][frames] = chunk.intrinsic[local]
    return AssembledScene(
        **out, source_chunk=source, ranges=list(ranges), chunk_to_first=to_first, alignments=alignments
    )


__all__ = [
    "AssembledScene",
    "ChunkPrediction",
    "PairAlignment",
    "assemble_chunks",
    "plan_chunks",
]
