"""Manifest inputs: a ``.parquet``, ``.csv`` or ``.jsonl`` file listing frames explicitly.

Columns: ``scene_id`` (required), ``uri`` (required; absolute URL, or a path relative to the
manifest's folder), ``frame_index`` (optional integer). Within a scene frames are ordered by
``frame_index`` when the column exists, else in manifest order.

Each frame's object version (size and ETag or modification time) is looked up by
:func:`with_frame_versions` once the scenes are filtered, one listing per folder (over HTTP, one
HEAD request per frame), so that a frame rewritten in place under the same URI changes its
scene's ``input_fingerprint``.
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

from httm_dist.data.spec import FrameRef, SceneSpec, listed_version, validate_scene_id
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
    rows naming the same file the same way twice give the same URI and fingerprint. Remote
    URLs are kept as written (object keys are names, not paths: ``a//b`` and ``a/b`` are two
    S3 objects). A remote relative row is joined to the manifest's folder and normalised as
    before (``posixpath.normpath``: committed outputs keep their fingerprints, and
    ``../other-bucket/x.png`` from a manifest at a bucket's root still names that bucket),
    except a row holding an empty segment (``x//y``), which normpath would turn into another
    key: its ``.`` and ``..`` segments are resolved (never above the bucket or host), its
    empty segments kept."""
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
    if is_local(fs) or "//" not in uri:  # one spelling, as before (outputs keep their fingerprints)
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(rest), uri))
    else:
        joined = _join_relative(rest.rpartition("/")[0], uri)
    return f"{scheme}://{joined}" if scheme else joined


def _join_relative(folder: str, relative: str) -> str:
    """``folder/relative`` for a remote ``folder`` (``bucket/key/prefix`` or ``host/path``,
    as written) and a relative reference: ``.`` segments of ``relative`` dropped, each ``..``
    removing the segment before it but never ``folder``'s first (the bucket or host), every
    other segment kept as written, empty ones too (RFC 3986 5.2.4 on the part joined)."""
    segments = folder.split("/")
    for segment in relative.split("/"):
        if segment == ".":
            continue
        if segment == "..":
            if len(segments) > 1:
                segments.pop()
            continue
        segments.append(segment)
    return "/".join(segments)


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


def _lists_folders(fs: fsspec.AbstractFileSystem) -> bool:
    """Is a folder listing on ``fs`` worth asking for frame versions? Not over HTTP(S):
    fsspec's HTTP "listing" scrapes the links of an HTML page (an autoindex page, or a 403
    where the server lists nothing), without sizes or dates, so each frame's ``info`` (a HEAD
    request) is needed anyway."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return not {"http", "https"} & set(protocols)


def _list_folder(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, dict]:
    """``{path: listing entry}`` of the files in ``folder`` on ``fs`` (one ``ls(detail=True)``),
    or ``{}`` when it cannot be listed, whatever the reason (an S3 prefix readable without
    ListBucket, a server answering 403 for folders, storage unreachable after retries...):
    its frames are then looked up one by one, and those lookups report what is wrong."""
    if not _lists_folders(fs):
        return {}
    fs.invalidate_cache(folder)  # a rerun in the same process must see rewritten frames
    try:
        entries = retry(lambda: fs.ls(folder, detail=True), what=f"list {redact(full_url(fs, folder))}")
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot list"
        log.debug("cannot list %s (%s: %s): looking its frames up one by one",
                  redact(full_url(fs, folder)), type(exc).__name__, redact(str(exc)))
        return {}
    return {entry["name"].rstrip("/"): entry for entry in entries}


def _locate(objects: Sequence[str], storage_options: dict | None) -> dict[str, tuple[fsspec.AbstractFileSystem, str] | None]:
    """``(filesystem, path)`` of each object URL in ``objects`` (as :func:`get_fs` gives it),
    calling :func:`get_fs` once per folder: URLs up to their last ``/`` alike share one
    filesystem, and the others' paths are their filesystem's ``_strip_protocol`` (all
    ``url_to_fs`` does with a one-link URL), local ones normalised as :func:`get_fs` does. A URL with a ``?`` (presigned, S3 ``versionId``:
    options may come from the query) gets its own ``get_fs``.

    ``None`` for a URL no filesystem opens (unknown protocol, protocol package not installed),
    with one warning per distinct error naming the first such URL: reading those frames fails
    later with the error naming them, failing their scenes only."""
    groups: dict[str, list[str]] = {}
    for obj in objects:
        key = obj.rpartition("/")[0] if "/" in obj and "?" not in obj else obj
        groups.setdefault(key, []).append(obj)
    located: dict[str, tuple[fsspec.AbstractFileSystem, str] | None] = {}
    failed: dict[str, list[str]] = {}
    for objs in groups.values():
        try:
            fs, first = get_fs(objs[0], storage_options)
        except (ValueError, ImportError) as exc:
            failed.setdefault(f"{type(exc).__name__}: {exc}", []).extend(objs)
            located.update(dict.fromkeys(objs))
            continue
        located[objs[0]] = (fs, first)
        local = is_local(fs)
        for obj in objs[1:]:  # the path get_fs gives (see storage.get_fs)
            path = fs._strip_protocol(obj)
            located[obj] = (fs, normalize_local_path(path) if local else path)
    for error, objs in failed.items():
        log.warning("cannot open manifest frame %s%s (%s): its scene fails when read",
                    redact(objs[0]), f" and {len(objs) - 1} more" if len(objs) > 1 else "",
                    redact(error))
    return located


def _look_up(fs: fsspec.AbstractFileSystem, path: str, entry: dict | None) -> str | None:
    """:func:`listed_version` of ``path``, or ``None`` when it cannot be found or read (any
    error but :class:`StorageError`, which is raised: the storage stayed unreachable)."""
    try:
        return listed_version(fs, path, entry)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - FileNotFoundError, 403, ...: the read will say
        log.debug("cannot look up %s: %s: %s", redact(full_url(fs, path)), type(exc).__name__,
                  redact(str(exc)))
        return None


def with_frame_versions(scenes: Sequence[SceneSpec], storage_options: dict | None = None) -> list[SceneSpec]:
    """``scenes`` (manifest scenes, already filtered) with each frame's ``version`` set to its
    object version (:func:`~httm_dist.data.spec.object_version`: size and ETag or
    modification time), as discovery sets it for folder scenes, so that
    :func:`~httm_dist.data.spec.scene_fingerprint` sees a frame rewritten in place.

    Cheap on object stores: frames are grouped by folder (of the object that holds their bytes,
    see :func:`_versioned_object`; :func:`get_fs` is called once per folder, see
    :func:`_locate`) and each folder is listed once (``ls(detail=True)``, up to 8 folders at
    a time), whatever its number of frames. ``info`` is asked (up to 16 at a time) only for
    frames the listing did not return or returned without a size and change tag
    (:func:`~httm_dist.data.spec.listed_version`), for every frame of a folder that cannot be
    listed (any listing error counts as "cannot list"), and for every frame over HTTP(S),
    whose folders are not listed (:func:`_lists_folders`). (A folder is listed whole: a
    manifest naming a few frames of a folder of millions pays for listing all of it.)

    A frame that cannot be found or read, or whose URL no filesystem opens, gets the version
    ``""`` and a warning; its scene then fails when read, with the error naming the frame.
    Raises :class:`StorageError` when a lookup finds the storage unreachable after retries.
    """
    objects = {f.uri: _versioned_object(f.uri) for scene in scenes for f in scene.frames}
    if not objects:
        return list(scenes)
    located = _locate(list(dict.fromkeys(objects.values())), storage_options)
    folders: dict[tuple[int, str], tuple[fsspec.AbstractFileSystem, list[str]]] = {}
    for obj, where in located.items():
        if where is not None:
            fs, path = where
            path = path.rstrip("/")
            folders.setdefault((id(fs), posixpath.dirname(path)), (fs, []))[1].append(path)

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(folders)))) as pool:
        listings = dict(zip(folders, pool.map(lambda key: _list_folder(folders[key][0], key[1]), folders)))
    versions: dict[tuple[int, str], str | None] = {}  # (id(fs), path) -> version
    lookups = []
    for key, (fs, paths) in folders.items():
        listed = listings[key]
        for path in paths:
            if path in listed:
                versions[(id(fs), path)] = _look_up(fs, path, listed[path])
            else:
                lookups.append((fs, path))
    if lookups:
        with ThreadPoolExecutor(max_workers=min(16, len(lookups))) as pool:
            futures = [pool.submit(_look_up, fs, path, None) for fs, path in lookups]
            try:
                for (fs, path), future in zip(lookups, futures):
                    versions[(id(fs), path)] = future.result()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # no more retries of a dead store
                raise

    for key, (fs, paths) in folders.items():
        gone = [p for p in paths if versions[(id(fs), p)] is None]
        if gone:
            log.warning("%d manifest frame(s) in %s cannot be found or read (%s%s): their "
                        "scenes will fail", len(gone), redact(full_url(fs, key[1])),
                        redact(posixpath.basename(gone[0])), ", ..." if len(gone) > 1 else "")
    log.debug("looked up the versions of %d manifest frames in %d folders (%d one by one)",
              len(objects), len(folders), len(lookups))

    def version(uri: str) -> str:
        where = located[objects[uri]]
        if where is None:
            return ""
        return versions[(id(where[0]), where[1].rstrip("/"))] or ""

    return [dataclasses.replace(scene, frames=tuple(dataclasses.replace(f, version=version(f.uri))
                                                    for f in scene.frames))
            for scene in scenes]
