"""Scene discovery on fsspec URLs (folders, tar/zip archives, manifests) and frame reading."""

from httm_dist.data.scenes import (
    IMAGE_EXTENSIONS,
    discover_scenes,
    natural_key,
    read_scene_frames,
    select_frames,
)
from httm_dist.data.spec import FrameRef, SceneSpec, scene_fingerprint, validate_scene_id

__all__ = [
    "IMAGE_EXTENSIONS",
    "FrameRef",
    "SceneSpec",
    "discover_scenes",
    "natural_key",
    "read_scene_frames",
    "scene_fingerprint",
    "select_frames",
    "validate_scene_id",
]
