"""A scene as a nerfstudio dataset: ``transforms.json`` plus a PLY point cloud.

Per frame ``fl_x, fl_y, cx, cy, w, h`` at the original photo's resolution, ``file_path`` the
source image (an absolute local path, or its fsspec URL when it is not on local disk), and
``transform_matrix`` the camera-to-world matrix in nerfstudio's OpenGL camera axes (x right,
y up, z back): ``inv([R|t]) @ diag(1, -1, -1, 1)``. ``ply_file_path`` names the point cloud
next to it, in the same world coordinates.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from httm_dist.export.cameras import camera_to_world_opengl
from httm_dist.export.points import ply_bytes

if TYPE_CHECKING:
    from httm_dist.export.scenes import ExportScene

TRANSFORMS = "transforms.json"
PLY_NAME = "sparse_pc.ply"


def _file_path(uri: str) -> str:
    """What nerfstudio should open: absolute local paths, other URLs unchanged."""
    return uri if "://" in uri or "::" in uri else os.path.abspath(uri)


def transforms(scene: "ExportScene") -> dict[str, Any]:
    """The ``transforms.json`` content of a scene (a JSON-ready dict)."""
    k = scene.intrinsic_original
    c2w = camera_to_world_opengl(scene.extrinsic)
    frames = []
    for i in range(scene.num_frames):  # one entry per frame
        h, w = (int(v) for v in scene.geometry.original_hw[i])
        frames.append({
            "file_path": _file_path(scene.uris[i]),
            "transform_matrix": c2w[i].tolist(),
            "fl_x": float(k[i, 0, 0]), "fl_y": float(k[i, 1, 1]),
            "cx": float(k[i, 0, 2]), "cy": float(k[i, 1, 2]),
            "w": w, "h": h,
            "frame_index": int(scene.frame_index[i]),
        })
    return {
        "camera_model": "PINHOLE",
        "ply_file_path": PLY_NAME,
        "httm_dist": {"scene_id": scene.scene_id, "world": "first camera's frame, VGGT's non-metric scale"},
        "frames": frames,
    }


def nerfstudio_files(scene: "ExportScene") -> dict[str, bytes]:
    """``{file name: bytes}``: the PLY, then ``transforms.json``."""
    return {
        PLY_NAME: ply_bytes(scene.points.xyz, scene.points.rgb),
        TRANSFORMS: json.dumps(transforms(scene), indent=2).encode(),
    }
