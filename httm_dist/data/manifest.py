"""Manifest inputs: a ``.parquet``, ``.csv`` or ``.jsonl`` file listing frames explicitly.

Columns: ``scene_id`` (required), ``uri`` (required; absolute URL, or a path relative to the
manifest's folder), ``frame_index`` (optional integer). Within a scene frames are ordered by
``frame_index`` when the column exists, else in manifest order.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath

import fsspec

from httm_dist.data.spec import FrameRef, SceneSpec, validate_scene_id
from httm_dist.errors import ConfigError
from httm_dist.storage import is_local, redact, retry

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
    """An absolute URL for a manifest row's ``uri`` (relative = relative to the manifest)."""
    if "://" in uri or "::" in uri:
        return uri
    if uri.startswith("/"):
        return uri if is_local(fs) else fs.unstrip_protocol(uri.lstrip("/"))
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
