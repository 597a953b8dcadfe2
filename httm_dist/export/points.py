"""Coloured 3D points of a scene for the exporters, and PLY files (written with plyfile).

Points come from the depth maps unprojected with the predicted cameras at pixel centres
(see :func:`unproject_pixels`), filtered per frame by confidence (VGGT's authors suggest
dropping a percentile of the lowest-confidence pixels) and subsampled to a budget. Each point
remembers the frame and pixel it came from, so an exporter can add it as an observation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from plyfile import PlyData, PlyElement

from httm_dist.results.frames import box_mask

PLY_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


# ----------------------------------------------------------------------------- PLY


def ply_bytes(points: Any, colors: Any, comment: str = "written by httm-dist") -> bytes:
    """A binary little-endian PLY of ``points`` [N, 3] (float32 x, y, z) with ``colors``
    [N, 3] (uint8, or float in [0, 1]; stored as uchar red, green, blue), written by plyfile.

    Raises ``ValueError`` when the counts differ.
    """
    p = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    c = np.asarray(colors)
    if c.dtype != np.uint8:
        c = np.clip(np.rint(c.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    c = c.reshape(-1, 3)
    if len(c) != len(p):
        raise ValueError(f"PLY: {len(p)} points but {len(c)} colours")
    verts = np.empty(len(p), dtype=PLY_DTYPE)
    verts["x"], verts["y"], verts["z"] = p[:, 0], p[:, 1], p[:, 2]
    verts["red"], verts["green"], verts["blue"] = c[:, 0], c[:, 1], c[:, 2]
    buf = io.BytesIO()
    PlyData([PlyElement.describe(verts, "vertex")], text=False, byte_order="<", comments=[comment]).write(buf)
    return buf.getvalue()


def read_ply(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(points [N, 3] float32, colours [N, 3] uint8)`` of a PLY with x/y/z and red/green/blue
    vertex properties (binary or ASCII), read with plyfile."""
    v = PlyData.read(io.BytesIO(data))["vertex"].data
    return (
        np.stack([v["x"], v["y"], v["z"]], -1).astype(np.float32),
        np.stack([v["red"], v["green"], v["blue"]], -1).astype(np.uint8),
    )


# ----------------------------------------------------------------------------- points


@dataclass(frozen=True)
class ScenePoints:
    """M selected points of a scene.

    - ``xyz`` [M, 3] float64: world position (the scene's world: the first camera's frame);
    - ``rgb`` [M, 3] uint8: colour of the original photo's pixel under it;
    - ``frame`` [M] int64: index (0..S-1) of the frame it came from;
    - ``pixel`` [M, 2] float64: its (x, y) in that frame's *input* image, corner convention
      (the pixel centre, j + 0.5, i + 0.5);
    - ``original`` [M, 2] float64: that position in the original photo.
    """

    xyz: np.ndarray
    rgb: np.ndarray
    frame: np.ndarray
    pixel: np.ndarray
    original: np.ndarray

    def __len__(self) -> int:
        return len(self.xyz)


def unproject_pixels(
    depth: np.ndarray, extrinsic: np.ndarray, intrinsic: np.ndarray, frame: np.ndarray, xy: np.ndarray
) -> np.ndarray:
    """World points [M, 3] (float64) of pixels ``xy`` [M, 2] (corner convention) of frames
    ``frame`` [M] with depths ``depth`` [M]: ``X = R^T (d K^-1 [x, y, 1] - t)``.

    ``extrinsic`` [S, 3, 4] camera-from-world, ``intrinsic`` [S, 3, 3]. At pixel centres this
    is :func:`httm_dist.model.geometry.unproject_depth_map_to_point_map` (which puts pixel j at
    x = j) with the principal point moved by half a pixel; only the selected pixels are computed.
    """
    e = np.asarray(extrinsic, dtype=np.float64)[frame]
    k = np.asarray(intrinsic, dtype=np.float64)[frame]
    d = np.asarray(depth, dtype=np.float64)
    cam = np.stack(
        [(xy[:, 0] - k[:, 0, 2]) * d / k[:, 0, 0], (xy[:, 1] - k[:, 1, 2]) * d / k[:, 1, 1], d], axis=-1
    )
    return np.einsum("mji,mj->mi", e[:, :, :3], cam - e[:, :, 3])


def select_pixels(
    depth: np.ndarray,
    conf: np.ndarray | None,
    valid_box: np.ndarray,
    conf_percentile: float,
    max_points: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels to export: ``(frame [M], row [M], col [M])`` int64, sorted.

    Keeps pixels inside each frame's ``valid_box`` [S, 4] (x0, y0, x1, y1: no padding) with
    finite positive depth [S, H, W] and finite confidence, then per frame those whose
    confidence is at or above that frame's ``conf_percentile``-th percentile (0 keeps all),
    then a seeded random subset of at most ``max_points`` over the scene.
    """
    s, h, w = depth.shape
    keep = box_mask(valid_box, (h, w))
    keep &= np.isfinite(depth) & (depth > 0)
    if conf is not None:
        c = np.asarray(conf)
        keep &= np.isfinite(c)
        if conf_percentile > 0:
            for k in range(s):  # per frame: one percentile over H*W values
                valid = c[k][keep[k]]
                if len(valid):
                    keep[k] &= c[k] >= np.percentile(valid.astype(np.float64), conf_percentile)
    idx = np.flatnonzero(keep)
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_points, replace=False))
    f, r, col = np.unravel_index(idx, (s, h, w))
    return f.astype(np.int64), r.astype(np.int64), col.astype(np.int64)


def scene_points(
    depth: Any,
    conf: Any,
    extrinsic: Any,
    intrinsic: Any,
    valid_box: np.ndarray,
    *,
    conf_percentile: float = 50.0,
    max_points: int = 200_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Select (see :func:`select_pixels`) and unproject (see :func:`unproject_pixels`) the
    points of a scene: ``(frame [M] int64, pixel [M, 2] input-pixel centres, xyz [M, 3])``.

    ``depth`` [S, H, W] or [S, H, W, 1], ``conf`` [S, H, W] or None, ``extrinsic`` [S, 3, 4],
    ``intrinsic`` [S, 3, 3] (input size), ``valid_box`` [S, 4].
    """
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim == 4 and d.shape[-1] == 1:
        d = d[..., 0]
    if d.ndim != 3:
        raise ValueError(f"depth must be [S, H, W] or [S, H, W, 1], got {np.shape(depth)}")
    f, r, c = select_pixels(d, conf, valid_box, conf_percentile, max_points, seed)
    xy = np.stack([c + 0.5, r + 0.5], axis=-1)
    return f, xy, unproject_pixels(d[f, r, c], extrinsic, intrinsic, f, xy)
