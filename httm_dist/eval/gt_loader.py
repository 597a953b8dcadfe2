"""Ground-truth scene folders: images with known cameras and depth, on any fsspec URL.

Format (version 1, documented in docs/evaluation.md)::

    SCENE/
      frame_0000.png ...            images (any PIL-readable format; names are free)
      cameras.json                  {"format": "httm-dist-gt", "version": 1, "frames": [...]}
      depth/frame_0000.npy ...      float32 [H, W] z-depth (or 16-bit PNG with depth_scale)

Each entry of ``frames`` (in frame order) has ``image`` (path relative to SCENE), ``depth``
(relative path, optional), ``intrinsic`` (3x3) and either ``extrinsic`` (3x4 or 4x4,
camera-from-world, OpenCV axes) or ``cam_to_world`` (3x4 or 4x4, its inverse: what 7-Scenes
and ScanNet store). Optional top-level ``depth_scale`` (default 1.0): stored depth values are
divided by it (1000 for millimetre PNGs); optional ``max_depth``: scaled depth at or above it
is invalid (7-Scenes marks holes with 65535). Depth <= 0 or non-finite is invalid (masked).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from httm_dist.errors import SceneError, StorageError
from httm_dist.model.config import PATCH_SIZE
from httm_dist.storage import error_text, full_url, get_fs, read_bytes_fs, redact, write_bytes_fs

from .metrics import unproject_depth

logger = logging.getLogger(__name__)

GT_FORMAT = "httm-dist-gt"
GT_VERSION = 1
CAMERAS_FILE = "cameras.json"


@dataclass
class GroundTruth:
    """Per-frame ground truth of one scene: ``depth`` [S,H,W] float32 (0 = invalid),
    ``extrinsic`` [S,3,4] camera-from-world, ``intrinsic`` [S,3,3]."""

    depth: np.ndarray
    extrinsic: np.ndarray
    intrinsic: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.depth) & (self.depth > 0)

    def world_points(self) -> np.ndarray:
        """Unprojected ground-truth points [S,H,W,3] (invalid pixels included; mask with
        :attr:`valid`)."""
        return unproject_depth(np.where(self.valid, self.depth, 0.0), self.extrinsic, self.intrinsic)

    def resized(self, height: int, width: int, mode: str = "crop") -> "GroundTruth":
        """Ground truth at the model's input size, following the preprocessing geometry.

        ``crop`` (VGGT's default): scale to ``width``, height ``round(h*width/w/14)*14``, then
        centre-crop to ``height`` (or pad with invalid depth if shorter). ``stretch``: scale
        each axis independently to (height, width). Depth is resampled nearest-neighbour (no
        blending across edges); intrinsics follow the same scaling and crop (pixel grid
        u = 0..W-1 without +0.5, as VGGT's geometry uses).
        """
        if mode not in ("crop", "stretch"):
            raise ValueError(f"resize mode must be 'crop' or 'stretch', got {mode!r}")
        S, h, w = self.depth.shape
        if mode == "crop":
            new_w = width
            new_h = (int(round(h * width / w / PATCH_SIZE) * PATCH_SIZE) if width % PATCH_SIZE == 0
                     else int(round(h * width / w)))
        else:
            new_w, new_h = width, height
        sx, sy = new_w / w, new_h / h
        ys = np.clip(np.round(np.arange(new_h) / sy).astype(np.int64), 0, h - 1)
        xs = np.clip(np.round(np.arange(new_w) / sx).astype(np.int64), 0, w - 1)
        depth = self.depth[:, ys][:, :, xs]
        K = self.intrinsic.astype(np.float64).copy()
        K[:, 0, :] *= sx
        K[:, 1, :] *= sy
        top = (new_h - height) // 2
        if top >= 0:
            depth = depth[:, top : top + height]
        else:
            pad = np.zeros((S, height, new_w), dtype=depth.dtype)
            pad[:, -top : -top + new_h] = depth
            depth = pad
        K[:, 1, 2] -= top
        return GroundTruth(depth.astype(np.float32), self.extrinsic.copy(), K.astype(np.float32))


def _as_extrinsic(frame: dict[str, Any], where: str) -> np.ndarray:
    if "extrinsic" in frame:
        m = np.asarray(frame["extrinsic"], dtype=np.float64)
        inverse = False
    elif "cam_to_world" in frame:
        m = np.asarray(frame["cam_to_world"], dtype=np.float64)
        inverse = True
    else:
        raise SceneError(f"{where}: needs 'extrinsic' (camera-from-world) or 'cam_to_world'")
    if m.shape not in ((3, 4), (4, 4)) or not np.isfinite(m).all():
        raise SceneError(f"{where}: camera matrix must be a finite 3x4 or 4x4, got shape {m.shape}")
    R, t = m[:3, :3], m[:3, 3]
    if inverse:
        R, t = R.T, -R.T @ t
    return np.concatenate([R, t[:, None]], axis=1)


def _read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The bytes of ``path``, transient errors retried (then StorageError); a file that is
    missing raises FileNotFoundError, one that cannot be read (refused) SceneError naming it."""
    url = full_url(fs, path)
    try:
        return read_bytes_fs(fs, path, shown=url)
    except (StorageError, FileNotFoundError):
        raise
    except OSError as exc:
        raise SceneError(f"ground truth {redact(url)} cannot be read: {error_text(exc)}") from exc


def _read_depth(fs: fsspec.AbstractFileSystem, path: str, scale: float, max_depth: float) -> np.ndarray:
    try:
        data = _read_bytes(fs, path)
    except FileNotFoundError as exc:
        raise SceneError(f"depth {redact(full_url(fs, path))} not found") from exc
    if path.lower().endswith(".npy"):
        depth = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
    else:
        depth = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise SceneError(f"depth {path}: expected a [H, W] map, got shape {depth.shape}")
    depth = depth / np.float32(scale)
    depth[~np.isfinite(depth) | (depth <= 0) | (depth >= max_depth)] = 0.0
    return depth


def load_gt_scene(path_or_url: str, storage_options: dict[str, Any] | None = None) -> tuple[list[str], GroundTruth]:
    """Read a ground-truth scene folder: returns (image URLs in frame order, GroundTruth).

    Frames without a ``depth`` entry get an all-invalid (zero) depth map of the first depth's
    size; at least one frame must have depth. Errors name the file and the field at fault.
    """
    fs, root = get_fs(str(path_or_url), storage_options)
    root = root.rstrip("/")
    cams_path = posixpath.join(root, CAMERAS_FILE)
    try:
        meta = json.loads(_read_bytes(fs, cams_path))
    except FileNotFoundError as exc:
        raise SceneError(f"no {CAMERAS_FILE} in ground-truth scene {path_or_url!r} (see docs/evaluation.md)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SceneError(f"{path_or_url}/{CAMERAS_FILE} is not valid JSON: {exc}") from exc
    if meta.get("format", GT_FORMAT) != GT_FORMAT or int(meta.get("version", GT_VERSION)) > GT_VERSION:
        raise SceneError(f"{cams_path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SceneError(f"{cams_path}: 'frames' must be a non-empty list")
    scale = float(meta.get("depth_scale", 1.0))
    if not scale > 0:
        raise SceneError(f"{cams_path}: 'depth_scale' must be > 0, got {scale}")
    max_depth = float(meta.get("max_depth", np.inf))
    uris, extrinsics, intrinsics, depths = [], [], [], []
    for i, fr in enumerate(frames):
        where = f"{cams_path} frame {i}"
        if "image" not in fr or "intrinsic" not in fr:
            raise SceneError(f"{where}: needs 'image' and 'intrinsic'")
        uris.append(full_url(fs, posixpath.join(root, fr["image"])))  # an HTTP path is its URL already
        extrinsics.append(_as_extrinsic(fr, where))
        K = np.asarray(fr["intrinsic"], dtype=np.float64)
        if K.shape != (3, 3) or not np.isfinite(K).all():
            raise SceneError(f"{where}: 'intrinsic' must be a finite 3x3, got shape {K.shape}")
        intrinsics.append(K)
        depths.append(_read_depth(fs, posixpath.join(root, fr["depth"]), scale, max_depth) if fr.get("depth") else None)
    shapes = {d.shape for d in depths if d is not None}
    if not shapes:
        raise SceneError(f"{cams_path}: no frame has a 'depth' file")
    if len(shapes) > 1:
        raise SceneError(f"{cams_path}: depth maps differ in size {sorted(shapes)}")
    (shape,) = shapes
    depth = np.stack([d if d is not None else np.zeros(shape, np.float32) for d in depths])
    gt = GroundTruth(depth, np.stack(extrinsics).astype(np.float32), np.stack(intrinsics).astype(np.float32))
    return uris, gt


def write_gt_scene(
    path_or_url: str,
    images: np.ndarray,
    depth: np.ndarray,
    extrinsic: np.ndarray,
    intrinsic: np.ndarray,
    storage_options: dict[str, Any] | None = None,
    image_format: str = "png",
    extra: dict[str, Any] | None = None,
) -> str:
    """Write images uint8 [S,H,W,3], depth [S,H,W], cameras as a ground-truth scene folder
    (each object in one write, ``cameras.json`` last so a complete folder is recognisable)."""
    fmt = image_format.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg", "webp"):
        raise ValueError(f"image_format must be png, jpg or webp, got {image_format!r}")
    S = images.shape[0]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [S,H,W,3], got {images.dtype} {images.shape}")
    if depth.shape != images.shape[:3] or extrinsic.shape != (S, 3, 4) or intrinsic.shape != (S, 3, 3):
        raise ValueError(
            f"shapes disagree: images {images.shape}, depth {depth.shape}, extrinsic {extrinsic.shape}, intrinsic {intrinsic.shape}"
        )
    fs, root = get_fs(str(path_or_url), storage_options)
    root = root.rstrip("/")
    fs.makedirs(posixpath.join(root, "depth"), exist_ok=True)
    frames = []
    pil_fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    for i in range(S):
        name = f"frame_{i:04d}.{fmt}"
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format=pil_fmt)
        write_bytes_fs(fs, posixpath.join(root, name), buf.getvalue())
        dname = f"depth/frame_{i:04d}.npy"
        buf = io.BytesIO()
        np.save(buf, np.asarray(depth[i], dtype=np.float32))
        write_bytes_fs(fs, posixpath.join(root, dname), buf.getvalue())
        frames.append(
            {
                "image": name,
                "depth": dname,
                "extrinsic": np.asarray(extrinsic[i], dtype=np.float64).tolist(),
                "intrinsic": np.asarray(intrinsic[i], dtype=np.float64).tolist(),
            }
        )
    meta = {"format": GT_FORMAT, "version": GT_VERSION, "depth_scale": 1.0, **(extra or {}), "frames": frames}
    write_bytes_fs(fs, posixpath.join(root, CAMERAS_FILE), json.dumps(meta, indent=1).encode())
    return str(path_or_url).rstrip("/")
