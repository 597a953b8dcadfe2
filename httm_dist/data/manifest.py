"""Manifest inputs: a ``.parquet``, ``.csv`` or ``.jsonl`` file listing frames explicitly.

Columns: ``scene_id`` (required), ``uri`` (required; absolute URL, or a path relative to the
manifest's folder), ``frame_index`` (optional integer). Within a scene frames are ordered by
``frame_index`` when the column exists, else in manifest order.

Each frame's object version (size and ETag or modification time) is looked up by
:func:`with_frame_versions` once the scenes are filtered, one listing per folder, so that a frame
rewritten in place under the same URI changes its scene's ``input_fingerprint``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import fsspec

from httm_dist.data.spec import FrameRef, SceneSpec, object_version, validate_scene_id
from httm_dist.errors import ConfigError, StorageError
from httm_dist.storage import full_url, get_fs, is_local, normalize_local_path, normalize_url, redact, retry

log = logging.getLogger(__name__)

REQUIRED = ("scene_id", "uri")


def _rows(fs: fsspec.AbstractFileSystem, path: str, url: str) -> list[dict]:
    raw = retry(lambda: fs.cat_file(path), what=f"read manifest {redact(url)}")
    ext = posixpath.splitext(path)[1].lower()
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq  # deferred (heavy): only Parquet manifests need it

            return pq.read_table(io.BytesIO(raw)).to_pylist()
        text = raw.decode("utf-8-sig")
        if ext == ".csv":
            return list(csv.DictReader(io.StringIO(text)))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"manifest {redact(url)} cannot be parsed as {ext}: {exc}") from exc


def resolve_uri(uri: str, manifest_url: str, fs: fsspec.AbstractFileSystem) -> str:
    """An absolute URL for a manifest row's ``uri`` (relative = relative to the manifest).

    Local paths (plain, ``file://``, the last link of a chained URL) come out in one spelling
    (:func:`~httm_dist.storage.normalize_url`: no ``.``, ``..``, ``//`` or trailing ``/``), so
    rows naming the same file the same way twice give the same URI and fingerprint; remote
    URLs are kept as written (object keys are names, not paths)."""
    if "://" in uri or "::" in uri:
        return normalize_url(uri)
    if uri.startswith("/"):
        return normalize_local_path(uri) if is_local(fs) else fs.unstrip_protocol(uri.lstrip("/"))
    if is_local(fs) and "://" not in manifest_url:
        return normalize_local_path(posixpath.join(posixpath.dirname(manifest_url), uri))
    if "://" in manifest_url:
        scheme, _, rest = manifest_url.partition("://")
    else:
        scheme, rest = "", manifest_url
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(rest), uri))
    return f"{scheme}://{joined}" if scheme else joined


def manifest_scenes(fs: fsspec.AbstractFileSystem, path: str, url: str) -> list[SceneSpec]:
    """Scenes of a manifest, frames ordered but not yet strided/capped."""
    rows = _rows(fs, path, url)
    if not rows:
        raise ConfigError(f"manifest {redact(url)} has no rows")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise ConfigError(
            f"manifest {redact(url)} lacks column(s) {missing}; it needs scene_id, uri and "
            "optionally frame_index"
        )
    has_index = "frame_index" in rows[0]
    per_scene: dict[str, list[tuple[int, int, str]]] = {}
    for n, row in enumerate(rows):
        sid, uri = row.get("scene_id"), row.get("uri")
        if sid is None or uri is None or str(uri) == "":
            raise ConfigError(f"manifest {redact(url)} row {n}: scene_id and uri must be set")
        sid = validate_scene_id(str(sid), f"{url} row {n}")
        order = n
        if has_index:
            try:
                order = int(row["frame_index"])
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"manifest {redact(url)} row {n}: frame_index {row['frame_index']!r} is not "
                    "an integer"
                ) from exc
        per_scene.setdefault(sid, []).append((order, n, resolve_uri(str(uri), url, fs)))
    scenes = []
    for sid, items in per_scene.items():
        items.sort()
        frames = tuple(
            FrameRef(
                uri=u,
                frame_index=order if has_index else i,
                name=posixpath.basename(u.split("::", 1)[0].split("://", 1)[-1]),
            )
            for i, (order, _, u) in enumerate(items)
        )
        scenes.append(SceneSpec(sid, url, "manifest", frames))
    return scenes


def _versioned_object(uri: str) -> str:
    """The URL of the stored object whose version stands for frame ``uri``: the URI itself, or
    for a chained URL (``tar://f1.jpg::s3://bucket/a.tar``) its last link, the object that
    holds the bytes (an archive member changes only when its archive is rewritten)."""
    return uri.rsplit("::", 1)[-1]


def _list_folder(fs: fsspec.AbstractFileSystem, folder: str, paths: Sequence[str]) -> dict[str, str]:
    """Versions of ``paths`` (all in ``folder`` on ``fs``): one ``ls(detail=True)`` of the
    folder, then ``info`` for each path the listing did not return (a folder that cannot be
    listed, e.g. an S3 prefix readable without ListBucket). A path that cannot be found or
    read gets ``""``: reading it fails later with the error naming it. Transient storage
    errors are retried, then raise :class:`StorageError`."""
    fs.invalidate_cache(folder)  # a rerun in the same process must see rewritten frames
    try:
        entries = retry(lambda: fs.ls(folder, detail=True), what=f"list {redact(full_url(fs, folder))}")
    except StorageError:
        raise
    except (OSError, ValueError, NotImplementedError) as exc:
        log.debug("cannot list %s (%s: %s): looking its frames up one by one",
                  redact(full_url(fs, folder)), type(exc).__name__, redact(str(exc)))
        entries = []
    listed = {entry["name"].rstrip("/"): entry for entry in entries}
    versions = {}
    missing = []
    for path in paths:
        info = listed.get(path)
        if info is None:
            try:
                info = retry(lambda: fs.info(path), what=f"stat {redact(full_url(fs, path))}")
            except StorageError:
                raise
            except (OSError, ValueError):
                missing.append(path)
                versions[path] = ""
                continue
        versions[path] = object_version(info)
    if missing:
        log.warning("%d manifest frame(s) in %s cannot be found or read (%s%s): their scenes will "
                    "fail", len(missing), redact(full_url(fs, folder)),
                    posixpath.basename(missing[0]), ", ..." if len(missing) > 1 else "")
    return versions


def with_frame_versions(scenes: Sequence[SceneSpec], storage_options: dict | None = None) -> list[SceneSpec]:
    """``scenes`` (manifest scenes, already filtered) with each frame's ``version`` set to its
    object version (:func:`~httm_dist.data.spec.object_version`: size and ETag or
    modification time), as discovery sets it for folder scenes, so that
    :func:`~httm_dist.data.spec.scene_fingerprint` sees a frame rewritten in place.

    Cheap on object stores: frames are grouped by folder (of the object that holds their bytes,
    see :func:`_versioned_object`) and each folder is listed once (``ls(detail=True)``, up to 8
    folders at a time), whatever its number of frames; ``info`` is asked only for frames its
    listing did not return. (A folder is listed whole: a manifest naming a few frames of a
    folder of millions pays for listing all of it.) A missing frame gets the version ``""``
    and a warning; its scene then fails when read, with the error naming the frame. Raises
    :class:`StorageError` when the storage stays unreachable after retries.
    """
    folders: dict[tuple[int, str], tuple[fsspec.AbstractFileSystem, set[str]]] = {}
    where: dict[str, tuple[tuple[int, str], str]] = {}
    for scene in scenes:
        for frame in scene.frames:
            if frame.uri in where:
                continue
            fs, path = get_fs(_versioned_object(frame.uri), storage_options)
            path = path.rstrip("/")
            key = (id(fs), posixpath.dirname(path))
            folders.setdefault(key, (fs, set()))[1].add(path)
            where[frame.uri] = (key, path)
    if not folders:
        return list(scenes)

    def list_one(key: tuple[int, str]) -> tuple[tuple[int, str], dict[str, str]]:
        fs, paths = folders[key]
        return key, _list_folder(fs, key[1], sorted(paths))

    with ThreadPoolExecutor(max_workers=min(8, len(folders))) as pool:
        versions = dict(pool.map(list_one, list(folders)))
    log.debug("looked up the versions of %d manifest frames in %d folders", len(where), len(folders))
    out = []
    for scene in scenes:
        frames = tuple(
            dataclasses.replace(f, version=versions[where[f.uri][0]][where[f.uri][1]])
            for f in scene.frames
        )
        out.append(dataclasses.replace(scene, frames=frames))
    return out
