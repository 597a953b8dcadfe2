"""Committed scenes in the formats of the next tools: COLMAP sparse models and nerfstudio datasets.

``export_scenes(OUTPUT, TO, "colmap" | "nerfstudio")`` (also ``httm-dist export``) reads
committed scenes through :mod:`httm_dist.results` only, and writes per scene:

- ``colmap``: ``TO/<scene_id>/sparse/0/`` built with pycolmap (``pip install 'httm-dist[export]'``);
- ``nerfstudio``: ``TO/<scene_id>/transforms.json`` and ``sparse_pc.ply``.

Cameras are at the original photo's resolution; conventions are in docs/output-format.md.
"""

from httm_dist.export.cameras import SceneGeometry, derive_geometry, image_names, resolve_mode, stored_geometry
from httm_dist.export.points import ScenePoints, ply_bytes, read_ply, scene_points
from httm_dist.export.scenes import FORMATS, ExportScene, export_scenes, load_scene

__all__ = [
    "FORMATS",
    "ExportScene",
    "SceneGeometry",
    "ScenePoints",
    "derive_geometry",
    "export_scenes",
    "image_names",
    "load_scene",
    "ply_bytes",
    "read_ply",
    "resolve_mode",
    "scene_points",
    "stored_geometry",
]
