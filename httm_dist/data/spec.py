"""What scene discovery produces: a scene's ordered frames, whatever the input was.

Folders, archives (:mod:`httm_dist.data.scenes`) and manifests (:mod:`httm_dist.data.manifest`)
all list scenes as :class:`SceneSpec` values of :class:`FrameRef` frames.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import fsspec

from httm_dist.storage import full_url, redact, retry, safe_name


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


# Change tags, first found wins: object stores' ETag (s3fs "ETag", gcsfs "etag"), gcs "md5Hash",
# the local disk's "mtime", "LastModified"/"last_modified" (s3 / azure without ETag), gcs
# "updated", memory's "created"; then what fsspec's HTTPFileSystem.info takes from an HTTP
# response besides "ETag": "Content-MD5", "Digest", "Last-Modified". The HTTP keys come last so
# that no version these filesystems gave before changes (committed outputs keep their
# input_fingerprint): only an entry with none of the other keys can use them.
_CHANGE_TAGS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated",
                "created", "Content-MD5", "Digest", "Last-Modified")


def object_version(info: dict) -> str:
    """``"<size>:<tag>"`` from an fsspec ``info()``/``ls(detail=True)`` entry, the tag being
    the first of ETag (object stores, HTTP), modification time (local disk, gcs), creation
    time (memory), or an HTTP server's Content-MD5, Digest or Last-Modified that the
    filesystem reports (see ``_CHANGE_TAGS``); it changes whenever the object is rewritten,
    except on an HTTP server that sends none of these headers (then only the size can tell,
    and the tag is empty)."""
    tag = next((info[k] for k in _CHANGE_TAGS if info.get(k) is not None), "")
    return f"{info.get('size', '')}:{tag}"


def listed_version(fs: fsspec.AbstractFileSystem, path: str, entry: dict | None) -> str:
    """The :func:`object_version` of ``path`` on ``fs``: from ``entry``, its entry in a folder
    listing (no request), when that entry tells a size and a change tag, as local disk, S3,
    GCS and memory listings do; else from ``fs.info(path)`` (one request, transient errors
    retried), e.g. for an HTTP listing, which has neither, or no entry at all.

    Raises what ``fs.info`` raises (``FileNotFoundError`` for a missing object, ...), and
    :class:`~httm_dist.errors.StorageError` when the storage stays unreachable after retries.
    """
    if entry and entry.get("size") is not None:
        version = object_version(entry)
        if not version.endswith(":"):  # "<size>:<tag>", the tag empty when the entry has none
            return version
    return object_version(retry(lambda: fs.info(path), what=f"stat {redact(full_url(fs, path))}"))


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
