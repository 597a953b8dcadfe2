"""Previews of a finished scene: a PNG contact sheet and a coloured PLY point cloud.

Why: after an overnight job, a glance at a few frames, their depth and confidence, and a point
cloud in any viewer (MeshLab, CloudCompare, Blender) says whether the run worked.

- ``OUTPUT/previews/<id>.png``: rows = input frames, depth (turbo, 2-98th percentile range over
  the scene), confidence (viridis, same rule); columns = up to ``max_frames`` evenly spaced frames.
- ``OUTPUT/previews/<id>.ply``: binary little-endian PLY written with plyfile (x, y, z
  float32; red, green, blue uchar), points whose confidence is at or above the scene's ``conf_percentile``-th percentile,
  randomly subsampled (seeded) to ``max_points``, coloured from the input images.

Colour maps come from matplotlib, image encoding from PIL.
"""

from __future__ import annotations

import io
import logging
import posixpath
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np
from PIL import Image

from httm_dist import results
from httm_dist.export.points import ply_bytes, read_ply  # noqa: F401 - read_ply re-exported
from httm_dist.model.config import PATCH_SIZE
from httm_dist.model.geometry import unproject_depth_map_to_point_map
from httm_dist.model.preprocess import preprocess_image
from httm_dist.storage import read_bytes, write_bytes_atomic

logger = logging.getLogger(__name__)

PREVIEW_DIR = "previews"


# ----------------------------------------------------------------------------- pictures


def _to_uint8_images(images: np.ndarray) -> np.ndarray:
    """[N,H,W,3] (or [N,3,H,W]) uint8 or float in [0,1] -> uint8 [N,H,W,3]."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [N,H,W,3] or [N,3,H,W], got shape {x.shape}")
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] != 3:
        raise ValueError(f"images must have 3 channels, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint(np.nan_to_num(x.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)


def colorize(values: np.ndarray, cmap: str = "turbo", percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
    """Map values [...] to uint8 RGB [..., 3] with a matplotlib colour map, normalised to the
    given percentiles of the finite values (non-finite pixels are black)."""
    import matplotlib  # deferred: only previews need it, and every worker imports this module

    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if finite.any():
        lo, hi = np.percentile(v[finite], percentiles)
    else:
        lo, hi = 0.0, 1.0
    norm = np.clip((np.where(finite, v, lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    rgb = matplotlib.colormaps[cmap](norm)[..., :3]
    rgb[~finite] = 0.0
    return np.rint(rgb * 255.0).astype(np.uint8)


def contact_sheet(images: np.ndarray, depth: np.ndarray, conf: np.ndarray | None = None, pad: int = 4) -> Image.Image:
    """A grid with one column per frame and rows: image, depth (turbo), confidence (viridis;
    omitted when ``conf`` is None). Size: width N*W + (N+1)*pad, height R*H + (R+1)*pad."""
    imgs = _to_uint8_images(images)
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim == 4 and d.shape[-1] == 1:
        d = d[..., 0]
    N, H, W, _ = imgs.shape
    if d.shape != (N, H, W):
        raise ValueError(f"depth must be [N,H,W] = {(N, H, W)} to match the images, got {d.shape}")
    rows = [imgs, colorize(d, "turbo")]
    if conf is not None:
        c = np.asarray(conf, dtype=np.float64)
        if c.shape != (N, H, W):
            raise ValueError(f"conf must be [N,H,W] = {(N, H, W)} to match the images, got {c.shape}")
        rows.append(colorize(c, "viridis"))
    R = len(rows)
    sheet = np.full((R * H + (R + 1) * pad, N * W + (N + 1) * pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        y = pad + r * (H + pad)
        for i in range(N):  # one paste per tile (a few dozen at most)
            x = pad + i * (W + pad)
            sheet[y : y + H, x : x + W] = row[i]
    return Image.fromarray(sheet)


def write_ply(
    path_or_file: str | BinaryIO,
    points: np.ndarray,
    colors: np.ndarray,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Write a binary little-endian PLY of points [N,3] with colours [N,3] (uint8, or float in
    [0,1]) to a path/fsspec URL (whole, atomically) or a binary file object, with plyfile (see
    :func:`httm_dist.export.points.ply_bytes`). Returns the number of bytes."""
    data = ply_bytes(points, colors)
    if isinstance(path_or_file, str):
        write_bytes_atomic(path_or_file, data, storage_options)
    else:
        path_or_file.write(data)
    return len(data)


# ----------------------------------------------------------------------------- point selection


def select_points(
    points: np.ndarray,
    conf: np.ndarray | None,
    images: np.ndarray,
    max_points: int = 200_000,
    conf_percentile: float = 50.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence-filtered, subsampled points [M,3] and their colours [M,3] uint8.

    Keeps finite points with confidence >= the ``conf_percentile``-th percentile of the
    scene's confidence, then a seeded random subset of at most ``max_points``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    col = _to_uint8_images(images).reshape(-1, 3)
    if len(col) != len(p):
        raise ValueError(f"points ({len(p)}) and image pixels ({len(col)}) differ in number")
    keep = np.isfinite(p).all(1)
    if conf is not None:
        c = np.asarray(conf, dtype=np.float64).reshape(-1)
        keep &= np.isfinite(c)
        if keep.any() and conf_percentile > 0:
            keep &= c >= np.percentile(c[keep], conf_percentile)
    idx = np.flatnonzero(keep)
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_points, replace=False))
    return p[idx].astype(np.float32), col[idx]


# ----------------------------------------------------------------------------- scene level


def _load_frames(uris: Sequence[str], height: int, width: int, storage_options: dict[str, Any] | None) -> np.ndarray:
    """Frames as the model saw them, uint8 [S,H,W,3]: the project's preprocessing in crop
    mode (target width = W) or pad mode (target = max(H, W)) when that gives (H, W), else a
    plain resize. An unreadable frame is grey (logged): a preview must not fail on it."""
    out = np.full((len(uris), height, width, 3), 128, dtype=np.uint8)
    for i, uri in enumerate(uris):  # one decode per frame
        try:
            data = read_bytes(str(uri), storage_options)
            tensor = None
            for mode, target in (("crop", width), ("pad", max(height, width))):
                if target % PATCH_SIZE:
                    continue
                t, _ = preprocess_image(data, mode=mode, target_size=target)
                if tuple(t.shape[1:]) == (height, width):
                    tensor = t
                    break
            if tensor is not None:
                out[i] = np.rint(tensor.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
            else:
                out[i] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
        except Exception as exc:  # noqa: BLE001 - a preview shows what it can
            logger.warning("preview: frame %s unreadable (%s); shown grey", uri, exc)
    return out


def write_preview_files(
    output_url: str,
    scene_id: str,
    arrays: Mapping[str, Any],
    images: np.ndarray | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    max_frames: int = 8,
    max_points: int = 200_000,
    conf_percentile: float = 50.0,
    point_source: str = "world_points",
) -> dict[str, str]:
    """Write ``OUTPUT/previews/<scene_id>.png`` and ``.ply`` from a scene's arrays in memory
    (the keys of the results NPZ). ``images`` uint8 [S,H,W,3] or float [0,1] in the model's
    input size; when None they are read from ``arrays["frame_uris"]``. ``point_source``:
    ``world_points`` (the point head) or ``depth`` (depth unprojected with the cameras)."""
    if point_source not in ("world_points", "depth"):
        raise ValueError(f"point_source must be 'world_points' or 'depth', got {point_source!r}")
    depth = np.asarray(arrays["depth"], dtype=np.float32)
    if depth.ndim == 4:
        depth = depth[..., 0]
    S, H, W = depth.shape
    if images is None:
        uris = [str(u) for u in np.asarray(arrays["frame_uris"]).reshape(-1)]
        images = _load_frames(uris, H, W, storage_options)
    images = _to_uint8_images(images)
    if images.shape[:3] != (S, H, W):
        raise ValueError(f"images {images.shape[:3]} do not match the depth maps {(S, H, W)}")
    depth_conf = arrays.get("depth_conf")
    idx = np.unique(np.linspace(0, S - 1, min(S, max(int(max_frames), 1))).round().astype(int))
    sheet = contact_sheet(images[idx], depth[idx], None if depth_conf is None else np.asarray(depth_conf, np.float32)[idx])
    if point_source == "depth":
        points = unproject_depth_map_to_point_map(depth, arrays["extrinsic"], arrays["intrinsic"])
        conf = depth_conf
    else:
        points, conf = arrays["world_points"], arrays.get("world_points_conf")
    pts, cols = select_points(points, conf, images, max_points, conf_percentile)
    root = posixpath.join(str(output_url).rstrip("/"), PREVIEW_DIR)
    png_url, ply_url = posixpath.join(root, f"{scene_id}.png"), posixpath.join(root, f"{scene_id}.ply")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes_atomic(png_url, buf.getvalue(), storage_options)
    write_ply(ply_url, pts, cols, storage_options)
    logger.info("preview of %s: %s (%dx%d), %s (%d points)", scene_id, png_url, sheet.width, sheet.height, ply_url, len(pts))
    return {"png": png_url, "ply": ply_url}


def write_scene_preview(
    output_url: str,
    scene_id: str,
    storage_options: dict[str, Any] | None = None,
    *,
    max_frames: int = 8,
    max_points: int = 200_000,
    conf_percentile: float = 50,
) -> dict[str, str]:
    """Previews of a finished scene of a results folder (``httm-dist preview OUTPUT SCENE``):
    reads it with ``httm_dist.results.open(output_url).arrays(scene_id)`` and writes
    ``OUTPUT/previews/<scene_id>.png`` and ``.ply``; returns their URLs {"png", "ply"}."""
    reader = results.open(output_url, storage_options=storage_options)
    arrays = reader.arrays(scene_id)
    return write_preview_files(
        output_url,
        scene_id,
        arrays,
        None,
        storage_options,
        max_frames=max_frames,
        max_points=max_points,
        conf_percentile=conf_percentile,
    )
