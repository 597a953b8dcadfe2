"""What scene discovery produces: a scene's ordered frames, whatever the input was.

Folders, archives (:mod:`httm_dist.data.scenes`) and manifests (:mod:`httm_dist.data.manifest`)
all list scenes as :class:`SceneSpec` values of :class:`FrameRef` frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from httm_dist.storage import redact, safe_name


@dataclass(frozen=True)
class FrameRef:
    """One frame of a scene.

    ``uri``: a URL fsspec can open (for archive members a chained URL such as
    ``tar://sub/f1.jpg::s3://bucket/root/scene.tar``); ``frame_index``: the frame's position
    in the full ordered sequence (before stride), or the manifest's ``frame_index``;
    ``name``: its path relative to the scene folder / archive (manifest: the file name).
    """

    uri: str
    frame_index: int
    name: str


@dataclass(frozen=True)
class SceneSpec:
    """A unit of work: one scene's ordered frames.

    ``kind`` is ``"folder"``, ``"tar"``, ``"zip"`` or ``"manifest"``; ``source`` the scene
    folder, archive or manifest URL. ``error`` is set when discovery already knows the scene
    cannot be read (e.g. a corrupt archive); :func:`~httm_dist.data.scenes.read_scene_frames` then raises it as a
    :class:`SceneError`, so the driver records the scene as failed and goes on.
    """

    scene_id: str
    source: str
    kind: str
    frames: tuple[FrameRef, ...]
    error: str | None = None


def validate_scene_id(scene_id: str, where: str) -> str:
    """Check that ``scene_id`` is safe as a file name and a hive partition value; ``where``
    names its source in the ConfigError raised otherwise. Returns ``scene_id``."""
    return safe_name(scene_id, f"scene id (from {redact(where)}; rename the folder/archive or fix the manifest)")
