"""Scene discovery and frame reading on any fsspec URL (local path, ``s3://``, ``gs://``...).

An input is either

- a root whose immediate children are scenes: a folder/prefix of images (searched
  recursively, frames in natural-sort order of their path relative to the scene folder, numbers
  by value with decimals: :func:`natural_key`), or a
  ``.tar`` / ``.tar.gz`` / ``.zip`` archive of images (scene id = the name without
  that suffix) read in place through fsspec's archive filesystems, never extracted to disk
  (a gzipped tar can only be read front to back: each scene's frames are read in one pass); or
- a manifest file (``.parquet``, ``.csv``, ``.jsonl``) naming ``scene_id``, ``uri`` and an
  optional ``frame_index`` per row (see :mod:`httm_dist.data.manifest`).

Discovery only lists; the worker reads a scene's bytes with :func:`read_scene_frames`.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import gzip
import logging
import posixpath
import re
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import fsspec
from fsspec.implementations.tar import TarFileSystem
from fsspec.implementations.zip import ZipFileSystem
import natsort
from PIL import Image

from httm_dist.data.manifest import manifest_scenes, with_frame_versions
from httm_dist.data.spec import FrameRef, SceneSpec, listed_version, object_version, validate_scene_id
from httm_dist.errors import ConfigError, SceneError, StorageError
from httm_dist.storage import error_text, full_url, get_fs, is_transient, normalize_url, read_bytes_fs, redact, retry

log = logging.getLogger(__name__)

_PILLOW_STUBS = frozenset({".bufr", ".grib", ".h5", ".hdf", ".wmf", ".emf", ".eps", ".ps", ".mpeg", ".mpg"})
"""Extensions Pillow registers but cannot decode without outside help (stub plugins,
Ghostscript, Windows-only metafiles, video): not frames."""


def _pillow_image_extensions() -> frozenset[str]:
    """Every file extension of a format Pillow opens (JPEG, PNG, WebP, TIFF, BMP, GIF, ...),
    less :data:`_PILLOW_STUBS`."""
    Image.init()
    registered = Image.registered_extensions()
    return frozenset(ext for ext, fmt in registered.items() if fmt in Image.OPEN) - _PILLOW_STUBS


IMAGE_EXTENSIONS = _pillow_image_extensions()
"""Frame file extensions (lower case): every format Pillow decodes."""
SHOWN_FORMATS = ".jpg, .png, .webp, .tif, .bmp, .gif and the other formats Pillow reads"
ARCHIVE_KINDS = {".tar.gz": "tar", ".tar": "tar", ".zip": "zip"}
"""Archive suffixes (longest first) and the fsspec archive filesystem that reads them."""
MANIFEST_EXTENSIONS = frozenset({".parquet", ".csv", ".jsonl"})
"""Extensions of a manifest file (see :mod:`httm_dist.data.manifest`)."""

# --------------------------------------------------------------------------- helpers


_NATSORT_KEY = natsort.natsort_keygen(alg=natsort.ns.PATH | natsort.ns.FLOAT | natsort.ns.NOEXP | natsort.ns.IGNORECASE)


def natural_key(relpath: str) -> tuple:
    """Sort key of a frame's path relative to its scene: natsort's path order.

    Folder by folder, case-insensitively, numbers by value with decimals (``frame_9`` before
    ``frame_10``; ``1700000000.05.png`` before ``1700000000.1.png``), no signs (``frame-2`` is
    2) and no exponents; the path itself breaks ties. A manifest ``frame_index`` overrides it.
    """
    return (_NATSORT_KEY(relpath), relpath)


def is_image_name(name: str) -> bool:
    """An image frame by extension (any case); hidden files (``.x``, ``__MACOSX``) excluded."""
    parts = name.strip("/").split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return posixpath.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS


def _check_positive(name: str, value: int | None, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def select_frames(
    frames: Sequence[FrameRef], frame_stride: int = 1, max_frames: int | None = None
) -> tuple[FrameRef, ...]:
    """Apply the stride, then the cap, to frames already in order."""
    picked = list(frames)[::frame_stride]
    if max_frames is not None:
        picked = picked[:max_frames]
    return tuple(picked)


def _wanted(scene_id: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include and not any(fnmatch.fnmatchcase(scene_id, g) for g in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(scene_id, g) for g in exclude))


def _as_globs(name: str, value: Sequence[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not all(isinstance(g, str) for g in value):
        raise ConfigError(f"{name} must be a list of glob strings, got {value!r}")
    return list(value)


def archive_suffix(name: str) -> str | None:
    """The archive suffix of a file name (``.tar.gz``, ``.tar``, ``.zip``), or None.

    ``.tgz`` is not one: frame URIs (``tar://member::scene.tgz``) must open with plain fsspec,
    which recognises gzip by the ``.gz`` suffix only."""
    lower = name.lower()
    return next((suffix for suffix in ARCHIVE_KINDS if lower.endswith(suffix)), None)


def _open_archive(kind: str, fh, name: str) -> fsspec.AbstractFileSystem:
    """An archive filesystem over an already open file (read in place, never extracted);
    ``name`` (the archive's path) tells a gzipped tar from a plain one."""
    if kind == "tar":
        gzipped = archive_suffix(name) == ".tar.gz"
        return TarFileSystem(fo=fh, compression="gzip" if gzipped else None, skip_instance_cache=True)
    return ZipFileSystem(fo=fh, mode="r", skip_instance_cache=True)


def _archive_errors() -> tuple[type[BaseException], ...]:
    return (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError, KeyError, ValueError)


def _archive_members(fs: fsspec.AbstractFileSystem, path: str, kind: str) -> tuple[list[str], list[str]]:
    """``(image members in natural order, other members)`` of an archive. Raises on
    unreadable archives."""
    with fs.open(path, "rb") as fh:
        afs = _open_archive(kind, fh, path)
        names = [n.lstrip("/") for n in afs.find("", withdirs=False)]
    images = sorted((n for n in names if is_image_name(n)), key=natural_key)
    return images, [n for n in names if not is_image_name(n)]


def _not_frames(names: Sequence[str]) -> dict[str, int]:
    """How many of ``names`` (files of a scene that are not frames) there are per extension;
    hidden files and ``__MACOSX`` folders are not counted."""
    parts = (name.strip("/").split("/") for name in names)
    return dict(collections.Counter(
        posixpath.splitext(p[-1])[1].lower() or "(no suffix)"
        for p in parts if not any(q.startswith(".") or q == "__MACOSX" for q in p)
    ))


_SHOWN_KINDS = 4
"""How many file kinds (extensions) or names a summary log line shows before "..."."""


def _by_extension(counts: dict[str, int]) -> str:
    """``"24 .npy, 3 .json"``: the commonest extensions first, at most :data:`_SHOWN_KINDS`."""
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{n:,} {ext}" for ext, n in top[:_SHOWN_KINDS])
    return shown + (f" and {len(top) - _SHOWN_KINDS} other kinds" if len(top) > _SHOWN_KINDS else "")


def _log_skipped(skipped: dict[str, dict[str, int]], num_scenes: int) -> None:
    """Log the files of scenes that are not frames (``skipped``: counts per extension per
    scene id, from :func:`_not_frames`) in one INFO line for the whole discovery, however many
    scenes there are; the count of each scene goes to DEBUG."""
    skipped = {sid: counts for sid, counts in skipped.items() if counts}
    for sid, counts in sorted(skipped.items()):
        log.debug("scene %r: skipped %d files that are not images Pillow reads (%s)",
                  sid, sum(counts.values()), _by_extension(counts))
    if len(skipped) == 1:
        ((sid, counts),) = skipped.items()
        log.info("scene %r: skipped %d files that are not images Pillow reads (%s)",
                 sid, sum(counts.values()), _by_extension(counts))
    elif skipped:
        total = sum((collections.Counter(c) for c in skipped.values()), collections.Counter())
        log.info("skipped %s files that are not images Pillow reads in %d of %d scenes (%s); -v "
                 "counts them per scene", f"{sum(total.values()):,}", len(skipped), num_scenes,
                 _by_extension(total))


def _log_not_scenes(names: Sequence[str], shown_root: str) -> None:
    """One line for the files directly under the input root that are neither scenes nor
    frames (``names``): INFO, or WARNING when one of them is a manifest (by its extension,
    :data:`MANIFEST_EXTENSIONS`), which is read only when it is the input itself. A ``.json``
    file is no manifest (``transforms.json``...): named at INFO like any other file."""
    if not names:
        return
    listed = ", ".join(sorted(names)[:_SHOWN_KINDS]) + (", ..." if len(names) > _SHOWN_KINDS else "")
    manifests = sorted(n for n in names if posixpath.splitext(n)[1].lower() in MANIFEST_EXTENSIONS)
    if manifests:
        log.warning("ignoring %d files under %s that are not scenes (%s); a manifest is read only "
                    "when it is the input itself: set input to %s to read %s", len(names),
                    shown_root, listed, f"{shown_root.rstrip('/')}/{manifests[0]}", manifests[0])
    else:
        log.info("ignoring %d files under %s that are not scenes (%s); scenes are folders or .tar, "
                 ".tar.gz, .zip archives", len(names), shown_root, listed)


# --------------------------------------------------------------------------- discovery


def _folder_scene(
    fs, scene_path: str, scene_id: str, ignore: frozenset[str] = frozenset()
) -> tuple[SceneSpec, dict[str, int]]:
    """The scene of one folder, and its files that are not frames (:func:`_not_frames`)."""
    base = scene_path.rstrip("/")
    fs.invalidate_cache(base)
    found = retry(lambda: fs.find(base, withdirs=False, detail=True), what=f"list {full_url(fs, base)}")
    infos = {p[len(base) + 1:]: info for p, info in found.items()
             if p.startswith(base + "/") and not (ignore and _ignored(fs, p, ignore))}
    skipped = _not_frames([r for r in infos if not is_image_name(r)])
    rels = sorted((r for r in infos if is_image_name(r)), key=natural_key)
    frames = tuple(
        FrameRef(uri=full_url(fs, f"{base}/{rel}"), frame_index=i, name=rel,
                 version=object_version(infos[rel]))
        for i, rel in enumerate(rels)
    )
    return SceneSpec(scene_id, full_url(fs, base), "folder", frames), skipped


def _archive_scene(
    fs, path: str, scene_id: str, kind: str, entry: dict | None = None
) -> tuple[SceneSpec, dict[str, int]]:
    """The scene of one archive at ``path``, and its members that are not frames
    (:func:`_not_frames`); ``entry`` is its root-listing entry, reused for the version when it
    has one (see :func:`~httm_dist.data.spec.listed_version`)."""
    url = full_url(fs, path)
    try:
        members, others = retry(lambda: _archive_members(fs, path, kind), what=f"index archive {redact(url)}")
        version = listed_version(fs, path, entry)
    except StorageError:  # unreachable after retries, as for a folder: the run stops
        raise
    except (OSError, *_archive_errors()) as exc:  # corrupt, gone, forbidden (an HTTP 403...)
        msg = f"scene {scene_id!r}: cannot read {kind} archive {redact(url)}: {error_text(exc)}"
        log.warning("%s", msg)
        return SceneSpec(scene_id, url, kind, (), error=msg), {}
    frames = tuple(
        FrameRef(uri=f"{kind}://{m}::{url}", frame_index=i, name=m) for i, m in enumerate(members)
    )
    return SceneSpec(scene_id, url, kind, frames, version=version), _not_frames(others)


def _ignored(fs, path: str, ignore: frozenset[str]) -> bool:
    """Is ``path`` one of the ``ignore`` URLs, or inside one?"""
    url = full_url(fs, path).rstrip("/")
    return any(url == i or url.startswith(i + "/") for i in ignore)


def _list_root(
    fs, root: str, input_url: str, ignore: frozenset[str] = frozenset()
) -> tuple[list[tuple[str, str, str, dict]], int, list[str]]:
    """Immediate children of ``root`` as ``(scene_id, path, kind, listing entry)``, how
    many image files lie directly in ``root`` (frames of a scene when ``root`` is one scene's
    folder), and the names of its other files (not scenes; hidden ones and ``.tgz`` archives,
    warned about here, left out)."""
    fs.invalidate_cache(root)
    entries = retry(lambda: fs.ls(root, detail=True), what=f"list {redact(input_url)}")
    found: dict[str, tuple[str, str, str, dict]] = {}
    root_images = 0
    others: list[str] = []
    for entry in entries:
        path = entry["name"].rstrip("/")
        name = posixpath.basename(path)
        if not name or name.startswith((".", "_")) or path == root.rstrip("/"):
            continue
        if _ignored(fs, path, ignore):
            log.warning("skipping %s under the input: it is this job's output, not a scene",
                        redact(full_url(fs, path)))
            continue
        if entry.get("type") == "directory":
            sid, kind = name, "folder"
        else:
            suffix = archive_suffix(name)
            if suffix is None:
                if name.lower().endswith(".tgz"):
                    log.warning("ignoring %s: rename it to .tar.gz to read it as a scene",
                                redact(full_url(fs, path)))
                elif is_image_name(name):
                    root_images += 1
                else:
                    others.append(name)
                continue
            sid, kind = name[: -len(suffix)], ARCHIVE_KINDS[suffix]
        validate_scene_id(sid, full_url(fs, path))
        if sid in found:
            raise ConfigError(
                f"scene id {sid!r} appears twice under {redact(input_url)} "
                f"({posixpath.basename(found[sid][1])} and {name}); rename one of them"
            )
        found[sid] = (sid, path, kind, entry)
    return list(found.values()), root_images, others


def discover_scenes(
    input_url: str,
    storage_options: dict | None = None,
    *,
    frame_stride: int = 1,
    max_frames: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> list[SceneSpec]:
    """List the scenes under ``input_url`` (a root of scenes, or a manifest file).

    ``ignore``: URLs (e.g. the job's output) that are never scenes nor frames, even when they
    lie inside the input; a root entry skipped for it is logged.

    Local paths are used in one spelling (:func:`~httm_dist.storage.normalize_local_path`:
    absolute, no ``.``, ``..``, ``//`` or trailing ``/``), so the same files given as
    ``../data/scenes`` or ``/data/scenes/`` get the same frame URIs and scene fingerprints
    (a rerun skips what is done); remote keys are kept as written.

    Frames are ordered (natural sort, or the manifest's ``frame_index``), then every
    ``frame_stride``-th is kept, then at most ``max_frames``. ``include`` / ``exclude`` are
    fnmatch globs on scene ids. Empty scenes are returned with ``frames=()`` so the driver can
    record them as failed (an empty folder on an object store does not exist, so only a prefix
    holding non-image files shows up as an empty scene). Root entries whose names start with
    ``.`` or ``_`` are ignored, and so are root files that are not archives
    (:data:`ARCHIVE_KINDS`), named in one log line (a warning when one is a manifest,
    :data:`MANIFEST_EXTENSIONS`, which is read only as the input itself), except that a root holding images and no scene
    folder or archive is itself one scene (logged). Frames are files of any format Pillow reads
    (:data:`IMAGE_EXTENSIONS`); other files are counted in one log line for the whole input
    (per scene at DEBUG). Returns scenes sorted by ``scene_id``.

    Raises :class:`ConfigError` for a missing input or unusable scene ids, and
    :class:`StorageError` when the storage cannot be reached after retries.
    """
    _check_positive("frame_stride", frame_stride, allow_none=False)
    _check_positive("max_frames", max_frames, allow_none=True)
    include_g, exclude_g = _as_globs("include", include), _as_globs("exclude", exclude)
    shown = redact(input_url)
    fs, root = get_fs(input_url, storage_options)
    try:
        is_dir = retry(lambda: fs.isdir(root), what=f"check {shown}")
        is_file = not is_dir and retry(lambda: fs.isfile(root), what=f"check {shown}")
    except (FileNotFoundError, PermissionError) as exc:
        raise ConfigError(f"input {shown!r} is not reachable: {exc}") from exc
    if is_file:
        ext = posixpath.splitext(root)[1].lower()
        if ext not in MANIFEST_EXTENSIONS:
            raise ConfigError(
                f"input {shown!r} is a file but not a manifest (.parquet, .csv, .jsonl); "
                "point input at a folder of scenes or at a manifest"
            )
        scenes = manifest_scenes(fs, root, full_url(fs, root))
    elif is_dir:
        ignored = frozenset(normalize_url(u).rstrip("/") for u in ignore)
        children, root_images, not_scenes = _list_root(fs, root, input_url, ignored)
        if root_images and not children:  # the input is one scene's folder of images
            sid = posixpath.basename(root.rstrip("/"))
            validate_scene_id(sid, input_url)
            log.info("input %s holds %d images and no scene folders or archives: reading it "
                     "as one scene %r", shown, root_images, sid)
            children = [(sid, root, "folder", None)]
        else:  # (when the root is one scene, its other files are that scene's, counted below)
            _log_not_scenes(not_scenes, shown)
            if root_images:
                log.warning("ignoring %d images directly under %s: it also holds scenes; put each "
                            "scene in its own folder or archive", root_images, shown)
        children = [c for c in children if _wanted(c[0], include_g, exclude_g)]

        def build(child: tuple[str, str, str, dict | None]) -> tuple[SceneSpec, dict[str, int]]:
            sid, path, kind, entry = child
            if kind == "folder":
                return _folder_scene(fs, path, sid, ignored)
            return _archive_scene(fs, path, sid, kind, entry)

        with ThreadPoolExecutor(max_workers=min(8, max(1, len(children)))) as pool:
            built = list(pool.map(build, children))
        scenes = [scene for scene, _ in built]
        _log_skipped({scene.scene_id: skipped for scene, skipped in built}, len(built))
    else:
        raise ConfigError(f"input {shown!r} does not exist (check the path and storage_options)")

    out = []
    for scene in scenes:
        if not _wanted(scene.scene_id, include_g, exclude_g):
            continue
        frames = select_frames(scene.frames, frame_stride, max_frames)
        out.append(dataclasses.replace(scene, frames=frames))
    out.sort(key=lambda s: s.scene_id)
    if is_file:  # manifest frames were not listed: look up the versions of those kept
        out = with_frame_versions(out, storage_options)
    log.info("found %d scenes (%d frames) under %s", len(out), sum(len(s.frames) for s in out), shown)
    return out


# --------------------------------------------------------------------------- reading


def _scene_error(scene: SceneSpec, what: str, exc: BaseException) -> SceneError:
    """The :class:`SceneError` of ``scene``: ``what`` went wrong (naming the file), ``exc``
    why (:func:`~httm_dist.storage.error_text`: the file is not named twice)."""
    return SceneError(f"scene {scene.scene_id!r}: {what}: {error_text(exc)}")


def _read_archive(scene: SceneSpec, storage_options: dict | None) -> list[bytes]:
    fs, path = get_fs(scene.source, storage_options)
    shown = redact(scene.source)

    def read_all() -> list[bytes]:
        fh = fs.open(path, "rb")  # a missing or refused archive: raised by retry, below
        with fh:
            try:
                afs = _open_archive(scene.kind, fh, path)
            except _archive_errors() as exc:
                raise _scene_error(scene, f"cannot open {scene.kind} archive {shown}", exc) from exc
            out = []
            for frame in scene.frames:
                try:
                    out.append(afs.cat_file(frame.name))
                except (FileNotFoundError, *_archive_errors()) as exc:
                    if is_transient(exc):  # the storage, not the member: retried
                        raise
                    raise _scene_error(scene, f"cannot read {frame.name!r} in archive {shown}", exc) from exc
            return out

    try:
        return retry(read_all, what=f"read archive {shown}")
    except StorageError:  # unreachable after retries: not this scene's fault
        raise
    except FileNotFoundError as exc:
        raise _scene_error(scene, f"archive {shown} not found", exc) from exc
    except OSError as exc:  # forbidden (an HTTP 403 too), unreadable
        raise _scene_error(scene, f"cannot read archive {shown}", exc) from exc


def _read_files(scene: SceneSpec, storage_options: dict | None) -> list[bytes]:
    """Read plain frame URIs, batched per filesystem (object stores fetch concurrently)."""
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str, FrameRef]]]] = {}
    for i, frame in enumerate(scene.frames):
        try:
            fs, path = get_fs(frame.uri, storage_options)
        except (ValueError, ImportError) as exc:
            raise _scene_error(scene, f"cannot open frame {redact(frame.uri)}", exc) from exc
        groups.setdefault(id(fs), (fs, []))[1].append((i, path, frame))
    out: list[bytes | None] = [None] * len(scene.frames)
    for fs, items in groups.values():
        paths = [p for _, p, _ in items]
        got = fs.cat(paths, on_error="return") if len(paths) > 1 else {paths[0]: _safe_cat(fs, paths[0])}
        for i, path, frame in items:
            data = got.get(path)
            if isinstance(data, BaseException) or data is None:
                try:  # one more careful attempt with backoff, to tell transient from permanent
                    data = read_bytes_fs(fs, path, shown=frame.uri)
                except StorageError:
                    raise
                except (OSError, ValueError, *_archive_errors()) as exc:
                    raise _scene_error(scene, f"cannot read frame {redact(frame.uri)}", exc) from exc
            out[i] = data
    return out  # type: ignore[return-value]


def _safe_cat(fs, path: str):
    try:
        return fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - handled by the caller
        return exc


def read_scene_frames(scene: SceneSpec, storage_options: dict | None = None) -> list[bytes]:
    """The encoded bytes of every frame of ``scene``, in frame order.

    Archives are opened once per call, not once per frame; transient storage errors are
    retried (then :class:`StorageError`). A scene with no frames, a missing or corrupt
    archive, or a missing/unreadable file raises :class:`SceneError` naming the scene and
    the file.
    """
    if scene.error:
        raise SceneError(scene.error)
    if not scene.frames:
        raise SceneError(
            f"scene {scene.scene_id!r} has no image frames in {redact(scene.source)} "
            f"(frames are {SHOWN_FORMATS})"
        )
    if scene.kind in ("tar", "zip"):
        return _read_archive(scene, storage_options)
    return _read_files(scene, storage_options)
