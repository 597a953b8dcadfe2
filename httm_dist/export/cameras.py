"""Cameras at the original photo's resolution, image names, and camera axes for the exporters.

Format-2 frame tables store each frame's input->original geometry and original-size
intrinsics (:func:`stored_geometry`); for format-1 tables they are rebuilt from the stored sizes
and the preprocessing mode (:func:`derive_geometry`, :func:`resolve_mode`).

Pixel convention (COLMAP's, nerfstudio's, and PIL's resize): continuous coordinates with the
top-left *corner* of the image at (0, 0), so the centre of pixel (row i, column j) is
(j + 0.5, i + 0.5). The model's intrinsics put the principal point at (W/2, H/2), the image
centre in this convention.

A frame's model input was made by the official loader's arithmetic
(:mod:`httm_dist.model.preprocess`): resize the original (w, h) to (new_w, new_h), then in
``crop`` mode centre-crop the height to the target size, in ``pad`` mode pad white to a square,
and in both pad white (centred) to the batch's largest H and W. Every step is a per-axis
scale or shift, so input pixels map to original pixels by an affine map
``A = [[sx, 0, tx], [0, sy, ty], [0, 0, 1]]`` (``x_orig = A @ x_input``, homogeneous) and the
intrinsics at the original resolution are ``K_orig = A @ K_input``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import fsspec
import numpy as np

from httm_dist.errors import ConfigError, SceneError
from httm_dist.results import column_matrices

MODES = ("crop", "pad")

# OpenCV camera axes (x right, y down, z forward) -> OpenGL/nerfstudio (x right, y up, z back).
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SceneGeometry:
    """Where each frame's model input came from in its original photo, for S frames.

    - ``input_to_original`` [S, 3, 3] float64: the affine ``A`` of the module doc;
    - ``valid_box`` [S, 4] int64: ``(x0, y0, x1, y1)`` of the input pixels that hold the photo
      (not white padding), half-open, in input pixels;
    - ``original_hw`` [S, 2], ``input_hw`` [S, 2] int64: (height, width) of each;
    - ``orientation_applied`` [S] bool: the photo's EXIF orientation was applied before
      resizing (so the original is the upright image);
    - ``intrinsic_original`` [S, 3, 3] float64 or None: stored original-size intrinsics;
    - ``source``: ``"stored"`` (the frame table's format-2 columns) or ``"derived"``.
    """

    input_to_original: np.ndarray
    valid_box: np.ndarray
    original_hw: np.ndarray
    input_hw: np.ndarray
    orientation_applied: np.ndarray
    intrinsic_original: np.ndarray | None = None
    source: str = "derived"

    def original_intrinsics(self, intrinsic: np.ndarray) -> np.ndarray:
        """[S, 3, 3] float64 intrinsics at the original size: the stored ones when there are,
        else ``A @ K_input`` of the input-size ``intrinsic`` [S, 3, 3]."""
        if self.intrinsic_original is not None:
            return self.intrinsic_original
        return self.input_to_original @ np.asarray(intrinsic, dtype=np.float64)

    def to_original(self, frame: np.ndarray, xy_input: np.ndarray) -> np.ndarray:
        """Input-pixel positions [M, 2] (corner convention) of frames ``frame`` [M] -> original [M, 2]."""
        a = self.input_to_original[np.asarray(frame)]
        xy = np.asarray(xy_input, dtype=np.float64)
        return np.stack([a[:, 0, 0] * xy[:, 0] + a[:, 0, 2], a[:, 1, 1] * xy[:, 1] + a[:, 1, 2]], axis=-1)


def derive_frames(original_hw: Any, input_hw: Any, mode: str) -> list:
    """Each frame's :class:`httm_dist.model.preprocess.FrameGeometry`, rebuilt from the sizes a
    format-1 frame table stores and the preprocessing ``mode`` (``crop``/``pad``).

    ``original_hw`` [S, 2] and ``input_hw`` [S, 2] (height, width) are the ``orig_*`` and
    ``input_*`` columns. The target size is the input width in crop mode (every frame is
    resized to it) and the input side in pad mode (inputs are square); the geometry is the
    loader's own (:func:`httm_dist.model.preprocess.frame_geometry`, placed in the stored
    input). Raises ``ValueError`` naming the frame for an unknown mode or sizes that this
    mode cannot have produced (e.g. a non-square input in pad mode).
    """
    from httm_dist.model.preprocess import frame_geometry  # deferred (torch)

    if mode not in MODES:
        raise ValueError(f"preprocessing mode must be one of {MODES}, got {mode!r}")
    orig = np.asarray(original_hw, dtype=np.int64).reshape(-1, 2)
    inp = np.asarray(input_hw, dtype=np.int64).reshape(-1, 2)
    if len(orig) != len(inp):
        raise ValueError(f"original_hw has {len(orig)} frames but input_hw has {len(inp)}")
    frames = []
    for k, (hw, (in_h, in_w)) in enumerate(zip(orig.tolist(), inp.tolist())):  # a few integer operations per frame
        if mode == "pad" and in_h != in_w:
            raise ValueError(f"frame {k}: input {in_h}x{in_w} is not square, so not made in pad mode")
        try:
            frames.append(frame_geometry(tuple(hw), mode, in_w, (in_h, in_w)))
        except ValueError as exc:
            raise ValueError(f"frame {k}: {exc}") from None
    return frames


def derive_geometry(original_hw: Any, input_hw: Any, mode: str) -> SceneGeometry:
    """:class:`SceneGeometry` of a format-1 scene (see :func:`derive_frames`; EXIF orientation
    was not applied in format 1)."""
    frames = derive_frames(original_hw, input_hw, mode)
    return SceneGeometry(
        input_to_original=np.stack([f.input_to_original() for f in frames]).reshape(-1, 3, 3),
        valid_box=np.asarray([f.valid_box() for f in frames], dtype=np.int64).reshape(-1, 4),
        original_hw=np.asarray(original_hw, dtype=np.int64).reshape(-1, 2),
        input_hw=np.asarray(input_hw, dtype=np.int64).reshape(-1, 2),
        orientation_applied=np.zeros(len(frames), dtype=bool),
    )


def stored_geometry(table: Any) -> SceneGeometry | None:
    """:class:`SceneGeometry` from a frame table's format-2 columns (``input_to_original``,
    ``intrinsic_original``, ``valid_box``, ``orientation_applied``), or None when any row lacks
    them (a format-1 scene, whose reader gives nulls)."""
    names = ("input_to_original", "intrinsic_original", "valid_box", "orientation_applied")
    if any(n not in table.column_names or table.column(n).null_count for n in names):
        return None
    boxes = table.column("valid_box").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return SceneGeometry(
        input_to_original=column_matrices(table, "input_to_original").astype(np.float64),
        valid_box=boxes.astype(np.int64).reshape(-1, 4),
        original_hw=np.stack([table.column("orig_height").to_numpy(), table.column("orig_width").to_numpy()], -1),
        input_hw=np.stack([table.column("input_height").to_numpy(), table.column("input_width").to_numpy()], -1),
        orientation_applied=table.column("orientation_applied").to_numpy(zero_copy_only=False).astype(bool),
        intrinsic_original=column_matrices(table, "intrinsic_original").astype(np.float64),
        source="stored",
    )


def ambiguous_mode(original_hw: Any, input_hw: Any) -> bool:
    """Can ``crop`` and ``pad`` give different geometry for these frames?

    Only for portrait photos (height > width) in square inputs: a non-square input is always
    crop mode, and landscape or square photos are resized, placed and padded the same way by
    both modes.
    """
    orig = np.asarray(original_hw).reshape(-1, 2)
    inp = np.asarray(input_hw).reshape(-1, 2)
    return bool((inp[:, 0] == inp[:, 1]).all() and (orig[:, 0] > orig[:, 1]).any())


def resolve_mode(
    scene_id: str,
    original_hw: Any,
    input_hw: Any,
    record: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    image_mode: str | None = None,
) -> str:
    """The preprocessing mode of a format-1 scene (whose frame table does not store it).

    ``image_mode`` (the user's) wins. Else: a non-square input means crop; frames for which
    both modes agree (see :func:`ambiguous_mode`) use crop; else the ``image.mode`` of the
    run that wrote the scene (the record's ``run_id`` in the run summaries). Raises
    ``SceneError`` naming ``--image-mode`` when none of these tells.
    """
    if image_mode is not None:
        if image_mode not in MODES:
            raise ConfigError(f"image mode must be one of {MODES}, got {image_mode!r}")
        return image_mode
    inp = np.asarray(input_hw).reshape(-1, 2)
    if (inp[:, 0] != inp[:, 1]).any():
        return "crop"
    if not ambiguous_mode(original_hw, input_hw):
        return "crop"
    run_id = record.get("run_id")
    for run in runs:
        if run_id is not None and run.get("run_id") == run_id:
            mode = ((run.get("config") or {}).get("image") or {}).get("mode")
            if mode in MODES:
                return mode
    raise SceneError(
        f"scene '{scene_id}' has portrait photos in square inputs and its preprocessing mode "
        f"(crop or pad) is not recorded (run {run_id!r} has no summary with image.mode): pass "
        "--image-mode (image_mode=) with the image.mode of the job that wrote it"
    )


def image_names(uris: Sequence[str]) -> list[str]:
    """Names of the frames' images, unique within the scene: each image's path relative to the
    deepest folder holding them all (the file names when they share one folder).

    For a chained URL (``tar://f1.jpg::s3://bucket/scene.tar``) the path is the innermost
    file's (``f1.jpg``); protocols are dropped. Raises ``SceneError`` if two frames have
    the same path (e.g. the same member of two archives).
    """
    paths = []
    for uri in uris:
        first = str(uri).split("::", 1)[0]
        paths.append(fsspec.core.strip_protocol(first) if "://" in first else first)
    parts = [p.split("/") for p in paths]
    common = 0
    if parts:
        folders = [q[:-1] for q in parts]
        shortest = min(len(f) for f in folders)
        while common < shortest and len({tuple(f[: common + 1]) for f in folders}) == 1:
            common += 1
    names = ["/".join(q[common:]) for q in parts]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SceneError(f"frames share the image name(s) {dup[:3]}: their URIs name the same file")
    return names


def camera_to_world_opengl(extrinsic: Any) -> np.ndarray:
    """[S, 3, 4] camera-from-world ``[R|t]`` (OpenCV axes) -> [S, 4, 4] camera-to-world in
    OpenGL axes (nerfstudio's): ``inv([R|t; 0 0 0 1]) @ diag(1, -1, -1, 1)``."""
    from httm_dist.model.geometry import closed_form_inverse_se3  # deferred (torch)

    c2w = closed_form_inverse_se3(np.asarray(extrinsic, dtype=np.float64))
    return c2w @ OPENCV_TO_OPENGL
