"""What scene discovery produces: a scene's ordered frames, whatever the input was.

Folders, archives (:mod:`httm_dist.data.scenes`) and manifests (:mod:`httm_dist.data.manifest`)
all list scenes as :class:`SceneSpec` values of :class:`FrameRef` frames.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from httm_dist.storage import redact, safe_name


@dataclass(frozen=True)
class FrameRef:
    """One frame of a scene.

    ``uri``: a URL fsspec can open (for archive members a chained URL such as
    ``tar://sub/f1.jpg::s3://bucket/root/scene.tar``); ``frame_index``: the frame's position
    in the full ordered sequence (before stride), or the manifest's ``frame_index``;
    ``name``: its path relative to the scene folder / archive (manifest: the file name);
    ``version``: the file's size and ETag or modification time, from discovery's listing
    (manifest frames: see :func:`~httm_dist.data.manifest.with_frame_versions`, which gives a
    chained URL the version of the object holding its bytes, and ``""`` to a frame it cannot
    find); ``""`` for the members of an archive scene, whose archive's version stands for them.
    """

    uri: str
    frame_index: int
    name: str
    version: str = ""


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
    version: str = ""
    """Size and ETag/modification time of the archive (``""`` for folders and manifests)."""


def object_version(info: dict) -> str:
    """``"<size>:<tag>"`` from an fsspec ``info()``/``find(detail=True)`` entry, the tag being
    the first of ETag (object stores), modification time (local disk, gcs) or creation
    time that the filesystem reports; it changes whenever the object is rewritten."""
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified",
                                  "last_modified", "updated", "created") if info.get(k) is not None), "")
    return f"{info.get('size', '')}:{tag}"


def scene_fingerprint(scene: SceneSpec) -> str:
    """sha256 of what a scene's outputs are computed from: its source and version, and the
    URI and version of each frame kept (after stride and cap). Recorded with each committed
    scene; a rerun reprocesses a scene whose fingerprint changed (frames added, removed or
    rewritten). A manifest scene counts its frames' URIs and versions, not the manifest's own
    version (that would change for every scene when one row is added)."""
    parts = [scene.source, scene.kind, scene.version, [[f.uri, f.version] for f in scene.frames]]
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def validate_scene_id(scene_id: str, where: str) -> str:
    """Check that ``scene_id`` is safe as a file name and a hive partition value; ``where``
    names its source in the ConfigError raised otherwise. Returns ``scene_id``."""
    return safe_name(scene_id, f"scene id (from {redact(where)}; rename the folder/archive or fix the manifest)")
