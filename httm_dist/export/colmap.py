"""A scene as a COLMAP sparse model (``sparse/0``), built with pycolmap.

One PINHOLE camera per frame at the original photo's resolution (``K_orig``), one image per
frame named by its file name with ``cam_from_world`` = the stored extrinsic, and one 3D point
per selected depth pixel whose track is the single observation it came from (its pixel in the
original photo). pycolmap writes what COLMAP writes: ``cameras``, ``images``, ``points3D``,
plus ``rigs`` and ``frames`` (COLMAP >= 3.12; older readers of the first three still work).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from httm_dist.errors import ConfigError

if TYPE_CHECKING:
    from httm_dist.export.scenes import ExportScene

MODEL_FILES = ("cameras", "images", "points3D", "rigs", "frames")


def require_pycolmap() -> Any:
    """Import pycolmap, or raise ``ConfigError`` saying what to install."""
    try:
        import pycolmap  # optional: the [export] extra
    except ImportError:
        raise ConfigError(
            "--format colmap needs pycolmap, which is not installed: install the export extra "
            "into the Python that runs httm-dist (from a clone: .venv/bin/pip install -e '.[export]'; "
            "from an index: pip install 'httm-dist[export]')"
        ) from None
    return pycolmap


def build_reconstruction(scene: "ExportScene") -> Any:
    """The ``pycolmap.Reconstruction`` of a scene (camera/image/frame/rig id = frame number + 1)."""
    pycolmap = require_pycolmap()
    rec = pycolmap.Reconstruction()
    k = scene.intrinsic_original
    pts = scene.points
    xy_orig = pts.original
    order = np.argsort(pts.frame, kind="stable")
    starts = np.searchsorted(pts.frame[order], np.arange(scene.num_frames + 1))
    point2d_idx = np.empty(len(pts), dtype=np.int64)
    for i in range(scene.num_frames):  # one camera + image per frame
        h, w = (int(v) for v in scene.geometry.original_hw[i])
        camera = pycolmap.Camera(
            model="PINHOLE", width=w, height=h,
            params=[k[i, 0, 0], k[i, 1, 1], k[i, 0, 2], k[i, 1, 2]], camera_id=i + 1,
        )
        rec.add_camera_with_trivial_rig(camera)
        mine = order[starts[i]:starts[i + 1]]
        point2d_idx[mine] = np.arange(len(mine))
        image = pycolmap.Image(
            name=scene.names[i], keypoints=xy_orig[mine].reshape(-1, 2), camera_id=i + 1, image_id=i + 1
        )
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(scene.extrinsic[i].astype(np.float64)))
    for p in range(len(pts)):  # pycolmap adds points one at a time
        track = pycolmap.Track()
        track.add_element(int(pts.frame[p]) + 1, int(point2d_idx[p]))
        rec.add_point3D(pts.xyz[p], track, pts.rgb[p])
    return rec


def colmap_files(scene: "ExportScene", text: bool = False) -> dict[str, bytes]:
    """``{file name: bytes}`` of the scene's model: ``*.bin`` (COLMAP's binary format, the
    default) or ``*.txt`` with ``text``."""
    rec = build_reconstruction(scene)
    with tempfile.TemporaryDirectory(prefix="httm-colmap-") as tmp:
        (rec.write_text if text else rec.write_binary)(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}
