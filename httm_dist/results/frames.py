"""The per-frame table (one Parquet row per frame) and the per-scene NPZ arrays.

Cameras are stored as ``fixed_size_list<float32>`` columns, row-major: ``extrinsic`` has 12
values (3x4 camera-from-world ``[R|t]``, OpenCV axes), ``intrinsic`` 9 (3x3). Fixed-size
lists survive Parquet round trips in every reader (pyarrow, pandas, DuckDB, Spark), unlike the
``fixed_shape_tensor`` extension type; :func:`column_matrices` turns them back into
``[N, 3, 4]`` / ``[N, 3, 3]`` arrays.

Since ``format_version`` 2 each row also says how its input pixels map to the original photo
(``input_to_original``, 3x3 affine), the intrinsics in original pixels
(``intrinsic_original`` = ``input_to_original @ intrinsic``), which input pixels are real
content (``valid_box``; :func:`validity_mask`), and whether an EXIF orientation was applied.
Depth and confidence statistics are over the valid box only.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from httm_dist.results.layout import FORMAT_VERSION

FRAME_SCHEMA = pa.schema(
    [
        pa.field("scene_id", pa.string(), nullable=False),
        pa.field("frame_index", pa.int32(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("orig_height", pa.int32()),
        pa.field("orig_width", pa.int32()),
        pa.field("input_height", pa.int32()),
        pa.field("input_width", pa.int32()),
        pa.field("extrinsic", pa.list_(pa.float32(), 12)),
        pa.field("intrinsic", pa.list_(pa.float32(), 9)),
        pa.field("input_to_original", pa.list_(pa.float32(), 9)),
        pa.field("intrinsic_original", pa.list_(pa.float32(), 9)),
        pa.field("valid_box", pa.list_(pa.int32(), 4)),
        pa.field("exif_orientation", pa.int8()),
        pa.field("orientation_applied", pa.bool_()),
        pa.field("depth_min", pa.float32()),
        pa.field("depth_max", pa.float32()),
        pa.field("depth_mean", pa.float32()),
        pa.field("depth_median", pa.float32()),
        pa.field("conf_mean", pa.float32()),
        pa.field("conf_median", pa.float32()),
    ],
    metadata={
        "format_version": str(FORMAT_VERSION),
        "extrinsic": "row-major 3x4 camera-from-world [R|t], OpenCV axes",
        "intrinsic": "row-major 3x3 pixel intrinsics at the model input size",
        "input_to_original": "row-major 3x3 affine: [x_orig, y_orig, 1] = A @ [x_in, y_in, 1], "
        "pixel-corner origin",
        "intrinsic_original": "row-major 3x3 pixel intrinsics of the original (oriented) image",
        "valid_box": "x0, y0, x1, y1 (exclusive) of real content in input pixels",
    },
)

#: Columns added in format_version 2 (absent from version-1 Parquet files).
V2_COLUMNS = ("input_to_original", "intrinsic_original", "valid_box", "exif_orientation", "orientation_applied")

DENSE_KEYS = ("depth", "depth_conf", "world_points", "world_points_conf")
#: Confidences (1 + exp(x), so values crowd just above 1) are always float32: float16's step
#: of ~0.001 at 1.0 would tie a third of a scene's confidences and break their ranking.
CONF_KEYS = ("depth_conf", "world_points_conf")
CAMERA_KEYS = ("extrinsic", "intrinsic")
DENSE_DTYPES = ("float16", "float32")


def _numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like (torch tensors are moved to CPU first)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _maps(x: Any, name: str, s: int) -> np.ndarray:
    """``[S, H, W]`` float array from ``[S, H, W]`` or ``[S, H, W, 1]``."""
    a = _numpy(x)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3 or a.shape[0] != s:
        raise ValueError(f"{name} must have shape [S={s}, H, W] (or [S, H, W, 1]), got {a.shape}")
    return a


def _stats(maps: np.ndarray, ops: Sequence[str], valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-frame statistics over finite values inside ``valid`` ([S, H, W] bool, default all):
    non-finite and padded pixels are ignored."""
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    keep = np.isfinite(flat) if valid is None else np.isfinite(flat) & valid.reshape(flat.shape)
    flat = np.where(keep, flat, np.nan)
    funcs = {"min": np.nanmin, "max": np.nanmax, "mean": np.nanmean, "median": np.nanmedian}
    with warnings.catch_warnings():  # an all-NaN frame gives NaN, which is what we want
        warnings.simplefilter("ignore", RuntimeWarning)
        return {op: funcs[op](flat, axis=1).astype(np.float32) for op in ops}


def _matrix_column(x: Any, name: str, s: int, cols: int) -> pa.FixedSizeListArray:
    """``[S, 3, cols]`` matrices as a row-major ``fixed_size_list<float32>[3*cols]`` column."""
    a = _numpy(x).astype(np.float32)
    if a.shape != (s, 3, cols):
        raise ValueError(f"{name} must have shape [S={s}, 3, {cols}], got {a.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), 3 * cols)


def box_mask(boxes: Any, input_hw: tuple[int, int]) -> np.ndarray:
    """``[N, H, W]`` bool, True inside each ``(x0, y0, x1, y1)`` box (end exclusive)."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    h, w = (int(v) for v in input_hw)
    ys, xs = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    return (
        (xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None])
        & (ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None])
    )


def build_frame_table(
    scene_id: str,
    frame_uris: Sequence[str],
    original_hw: Sequence[tuple[int, int]],
    input_hw: tuple[int, int],
    extrinsic: Any,
    intrinsic: Any,
    depth: Any,
    depth_conf: Any,
    frame_indices: Sequence[int] | None = None,
    geometry: Sequence[Any] | None = None,
) -> pa.Table:
    """One row per frame of ``scene_id`` with :data:`FRAME_SCHEMA`.

    ``extrinsic`` ``[S,3,4]``, ``intrinsic`` ``[S,3,3]``, ``depth`` / ``depth_conf``
    ``[S,H,W]`` (or ``[S,H,W,1]``), numpy or torch. ``frame_indices`` defaults to
    ``0..S-1``; pass the scene's ``FrameRef.frame_index`` values to keep source positions.
    ``geometry``: each frame's :class:`~httm_dist.model.preprocess.FrameGeometry`; without it
    the input is taken as the original resized per axis with no padding (valid box = whole
    input). Statistics are over the valid box only.
    """
    s = len(frame_uris)
    if len(original_hw) != s:
        raise ValueError(f"original_hw has {len(original_hw)} entries for {s} frames")
    indices = list(range(s)) if frame_indices is None else [int(i) for i in frame_indices]
    if len(indices) != s:
        raise ValueError(f"frame_indices has {len(indices)} entries for {s} frames")
    orig = np.asarray(original_hw, dtype=np.int64).reshape(s, 2)
    h, w = (int(v) for v in input_hw)
    if geometry is None:
        # Not a cycle: imported here so that reading results never imports torch.
        from httm_dist.model.preprocess import FrameGeometry

        geometry = [FrameGeometry((int(oh), int(ow)), (h, w)) for oh, ow in orig]
    if len(geometry) != s:
        raise ValueError(f"geometry has {len(geometry)} entries for {s} frames")
    boxes = np.asarray([g.valid_box() for g in geometry], dtype=np.int32).reshape(s, 4)
    to_orig = np.stack([g.input_to_original() for g in geometry]).reshape(s, 3, 3)
    k_in = _numpy(intrinsic).astype(np.float64)
    if k_in.shape != (s, 3, 3):
        raise ValueError(f"intrinsic must have shape [S={s}, 3, 3], got {k_in.shape}")
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite cameras stay non-finite
        k_orig = to_orig @ k_in
    valid = box_mask(boxes, (h, w))
    depth_stats = _stats(_maps(depth, "depth", s), ("min", "max", "mean", "median"), valid)
    conf_stats = _stats(_maps(depth_conf, "depth_conf", s), ("mean", "median"), valid)
    columns = {
        "scene_id": pa.array([scene_id] * s, pa.string()),
        "frame_index": pa.array(indices, pa.int32()),
        "image_uri": pa.array([str(u) for u in frame_uris], pa.string()),
        "orig_height": pa.array(orig[:, 0], pa.int32()),
        "orig_width": pa.array(orig[:, 1], pa.int32()),
        "input_height": pa.array([h] * s, pa.int32()),
        "input_width": pa.array([w] * s, pa.int32()),
        "extrinsic": _matrix_column(extrinsic, "extrinsic", s, 4),
        "intrinsic": _matrix_column(intrinsic, "intrinsic", s, 3),
        "input_to_original": _matrix_column(to_orig, "input_to_original", s, 3),
        "intrinsic_original": _matrix_column(k_orig, "intrinsic_original", s, 3),
        "valid_box": pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1), pa.int32()), 4),
        "exif_orientation": pa.array([int(g.exif_orientation) for g in geometry], pa.int8()),
        "orientation_applied": pa.array([bool(g.orientation_applied) for g in geometry], pa.bool_()),
        **{f"depth_{k}": pa.array(v, pa.float32()) for k, v in depth_stats.items()},
        **{f"conf_{k}": pa.array(v, pa.float32()) for k, v in conf_stats.items()},
    }
    return pa.Table.from_pydict(columns, schema=FRAME_SCHEMA)


def validity_mask(table: pa.Table) -> np.ndarray:
    """``[N, H, W]`` bool from a frame table: True where the model input pixel is real image
    content, False on padding (pad mode, or a frame padded to its batch's largest shape).

    Needs ``valid_box``, ``input_height`` and ``input_width`` (tables of ``format_version`` 1
    have no ``valid_box``: ``ValueError``). All rows must share one input size (one scene).
    """
    if "valid_box" not in table.column_names:
        raise ValueError(
            "the frame table has no 'valid_box' column (written before format_version 2, or "
            "not selected): rerun the scene, or select the column"
        )
    sizes = set(zip(table.column("input_height").to_pylist(), table.column("input_width").to_pylist()))
    if len(sizes) > 1:
        raise ValueError(f"rows have different input sizes {sorted(sizes)}: take one scene at a time")
    if not sizes:
        return np.zeros((0, 0, 0), bool)
    boxes = table.column("valid_box").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return box_mask(boxes, sizes.pop())


def column_matrices(table: pa.Table, name: str) -> np.ndarray:
    """``[N, 3, 4]`` (extrinsic) or ``[N, 3, 3]`` (intrinsic, intrinsic_original,
    input_to_original) float32 array from a frame table."""
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(len(col), 3, width // 3)


def scene_arrays(pred_arrays: Mapping[str, Any], dense_dtype: str = "float16") -> dict[str, np.ndarray]:
    """The per-scene NPZ content: dense maps in ``dense_dtype``, confidences and cameras
    float32, URIs as str.

    Known keys: ``depth``, ``world_points`` (cast to ``dense_dtype``, ``"float16"`` by default
    or ``"float32"``), ``depth_conf``, ``world_points_conf`` (float32 whatever
    ``dense_dtype``, so their order survives), ``extrinsic``, ``intrinsic`` (float32),
    ``frame_uris`` (unicode array, loadable without pickle). Other keys are kept as
    numpy arrays; ``None`` values are dropped.
    """
    if dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"dense_dtype must be one of {DENSE_DTYPES}, got {dense_dtype!r}")
    out: dict[str, np.ndarray] = {}
    for key, value in pred_arrays.items():
        if value is None:
            continue
        if key == "frame_uris":
            out[key] = np.asarray([str(u) for u in value], dtype=str)
            continue
        a = _numpy(value)
        if key in CONF_KEYS or key in CAMERA_KEYS:
            a = a.astype(np.float32)
        elif key in DENSE_KEYS:
            a = a.astype(dense_dtype)
        if a.dtype == object:
            raise ValueError(f"array {key!r} has dtype object; NPZ outputs must load without pickle")
        out[key] = a
    return out


def npz_bytes(arrays: Mapping[str, np.ndarray], compress: bool = True) -> bytes:
    """Serialize ``arrays`` to NPZ bytes in memory, for one whole-object PUT."""
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """Arrays from NPZ bytes (never unpickles)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
