"""Writing results with a commit protocol that survives killed workers and drivers.

Per scene: the frame Parquet, then the NPZ, then the record ``scenes/<id>.json`` last. A scene
is committed exactly when its record exists with ``status == "done"``; every object is
written whole (one PUT, or temp file + rename on local disk), so a reader that trusts only
records never sees partial or stale data. Rewriting a scene first removes its old record
(uncommitting it), then overwrites its objects in place, so reruns never leave duplicates.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from httm_dist.results import layout
from httm_dist.results.frames import FRAME_SCHEMA, load_npz, npz_bytes
from httm_dist.results.record import (RunSummary, SceneRecord, read_run_summary,
                                      read_scene_record, to_json_bytes, utc_now)
from httm_dist.storage import full_url, get_fs, is_local, join_url, redact, retry, write_bytes_fs

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Temporary files under ``_tmp/`` untouched this long are leftovers of killed writers: one
#: object's write takes seconds, so ten minutes leaves a wide margin for slow disks.
STALE_TEMP_S = 600.0


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes of ``table`` (zstd), for one whole-object PUT."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ResultStore:
    """Reads and writes the output layout (see :mod:`httm_dist.results.layout`) at one URL.

    Safe to use from many workers at once as long as each scene is written by one worker at
    a time (the driver's job).
    """

    def __init__(self, output_url: str, storage_options: dict | None = None):
        self.url = output_url.rstrip("/") or output_url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = get_fs(self.url, self.storage_options)
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"ResultStore({redact(self.url)!r})"

    # ------------------------------------------------------------------ low level

    def path(self, key: str) -> str:
        """Filesystem path of a layout key."""
        return join_url(self.root, key)

    def url_of(self, key: str) -> str:
        """Full URL of a layout key (plain path on local disk)."""
        return full_url(self.fs, self.path(key))

    def _put(self, key: str, data: bytes) -> None:
        path, tmp = self.path(key), self.path(layout.TMP_DIR)  # temp files never sit in frames/
        retry(lambda: write_bytes_fs(self.fs, path, data, tmp), what=f"write {redact(self.url_of(key))}")

    def _get(self, key: str) -> bytes:
        path = self.path(key)
        return retry(lambda: self.fs.cat_file(path), what=f"read {redact(self.url_of(key))}")

    def _exists(self, key: str) -> bool:
        path = self.path(key)
        self.fs.invalidate_cache(path)
        return retry(lambda: self.fs.exists(path), what=f"check {redact(self.url_of(key))}")

    def _list(self, key: str) -> list[str]:
        """Paths of the files directly under a layout folder ([] when it does not exist)."""
        path = self.path(key)
        self.fs.invalidate_cache(path)
        try:
            entries = retry(lambda: self.fs.ls(path, detail=True), what=f"list {redact(self.url_of(key))}")
        except FileNotFoundError:
            return []
        return sorted(e["name"] for e in entries if e.get("type") != "directory")

    def _rm(self, paths: list[str]) -> None:
        for path in paths:
            try:
                retry(lambda p=path: self.fs.rm_file(p), what=f"remove {redact(full_url(self.fs, path))}")
            except FileNotFoundError:
                pass
        if paths:
            self.fs.invalidate_cache(self.root)

    def _read_json_many(self, paths: list[str]) -> dict[str, dict]:
        """path -> parsed JSON, read concurrently on object stores."""
        if not paths:
            return {}
        raw = retry(lambda: self.fs.cat(paths, on_error="return"), what=f"read records under {redact(self.url)}")
        out = {}
        for path in paths:
            data = raw.get(path)
            if isinstance(data, FileNotFoundError):
                continue  # removed between list and read (a scene being rewritten)
            if isinstance(data, BaseException) or data is None:  # one path failed: retry it alone
                data = retry(lambda p=path: self.fs.cat_file(p), what=f"read {redact(full_url(self.fs, path))}")
            try:
                out[path] = json.loads(data)
            except ValueError:
                log.warning("skipping unreadable JSON %s", redact(full_url(self.fs, path)))
        return out

    # ------------------------------------------------------------------ scene records

    def _parse_all(self, raw: Mapping[str, Any], parse: Callable[[Any], T], what: str,
                   errors: tuple[type[Exception], ...]) -> list[T]:
        """``parse`` of each JSON object of ``raw`` (path -> data); one that ``errors`` reject
        is logged as a malformed ``what`` and skipped."""
        out = []
        for path, data in raw.items():
            try:
                out.append(parse(data))
            except errors as exc:
                log.warning("skipping malformed %s %s: %s", what, redact(full_url(self.fs, path)), exc)
        return out

    def _parse_records(self, raw: Mapping[str, Any]) -> list[SceneRecord]:
        return self._parse_all(raw, read_scene_record, "record", (ValueError, TypeError))

    def records(self) -> dict[str, SceneRecord]:
        """Every scene record (done and failed, any ``format_version``), keyed by scene id."""
        paths = [p for p in self._list(layout.SCENES_DIR) if p.endswith(".json")]
        recs = self._parse_records(self._read_json_many(paths))
        return dict(sorted((rec.scene_id, rec) for rec in recs))

    def committed(self) -> dict[str, SceneRecord]:
        """Records of committed scenes (``status == "done"``), keyed by scene id."""
        return {sid: r for sid, r in self.records().items() if r.is_done}

    def record(self, scene_id: str) -> SceneRecord | None:
        """One scene's record, or ``None`` when it has none."""
        try:
            return read_scene_record(self._get(layout.record_key(scene_id)))
        except FileNotFoundError:
            return None

    def _remove_scene_data(self, scene_id: str, keep: tuple[str, ...] = ()) -> None:
        """Remove the scene's data objects except ``keep``: its frame table and NPZ, and a
        format_version 1 frame folder (``frames/scene_id=<id>/``) left by an older run."""
        stale = [p for p in self._list(layout.legacy_frames_dir(scene_id)) if p not in keep]
        for key in (layout.frames_key(scene_id), layout.arrays_key(scene_id)):
            if self.path(key) not in keep and self._exists(key):
                stale.append(self.path(key))
        self._rm(stale)
        legacy = self.path(layout.legacy_frames_dir(scene_id))
        if is_local(self.fs) and os.path.isdir(legacy) and not os.listdir(legacy):
            os.rmdir(legacy)  # an empty hive folder would still steer pyarrow's inference

    def write_scene(
        self,
        scene_id: str,
        frames: pa.Table,
        arrays: Mapping[str, np.ndarray],
        record: SceneRecord,
    ) -> SceneRecord:
        """Write one scene's results and commit it; returns the record as written.

        Order: remove the old record (uncommit), remove stale objects of the scene, write
        ``frames/<id>.parquet``, then ``arrays/<id>.npz``, then the record
        ``scenes/<id>.json`` (``record``, a :meth:`SceneRecord.done`, completed with
        ``format_version``, ``written_at``, ``num_frames``, the keys of both data objects and
        the commit's seconds so far: encoding and the two data writes, added to ``seconds``
        and ``timings["commit"]``). Raises ValueError when the table holds another scene's rows
        or ``record`` is not a done record of ``scene_id``.
        """
        if record.scene_id != scene_id or not record.is_done:
            raise ValueError(f"write_scene({scene_id!r}) needs a done record of that scene, got "
                             f"{record.status!r} of {record.scene_id!r}")
        t0 = time.perf_counter()
        frames_key, arrays_key, record_key = (
            layout.frames_key(scene_id), layout.arrays_key(scene_id), layout.record_key(scene_id),
        )
        table = frames.select(FRAME_SCHEMA.names).cast(FRAME_SCHEMA)
        ids = set(table.column("scene_id").to_pylist())
        if ids - {scene_id}:
            raise ValueError(f"frame table for scene {scene_id!r} has rows of scene(s) {sorted(ids - {scene_id})}")
        parquet, npz = table_bytes(table), npz_bytes(arrays, compress=True)
        self._rm([self.path(record_key)] if self._exists(record_key) else [])
        self._remove_scene_data(scene_id, keep=(self.path(frames_key), self.path(arrays_key)))
        self._put(frames_key, parquet)
        self._put(arrays_key, npz)
        commit_s = time.perf_counter() - t0
        rec = record.replace(
            error=None,
            format_version=layout.FORMAT_VERSION,
            written_at=utc_now(),
            num_frames=table.num_rows,
            frames_path=frames_key,
            arrays_path=arrays_key,
            arrays={k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in arrays.items()},
            seconds=round(record.seconds + commit_s, 4),
            timings={**record.timings, "commit": round(commit_s, 4)},
        )
        body = rec.to_json()
        self._put(record_key, body)
        log.debug("committed scene %s (%d frames)", scene_id, table.num_rows)
        return read_scene_record(body)

    def write_failure(self, record: SceneRecord) -> SceneRecord | None:
        """Record a scene as failed (``record``: a :meth:`SceneRecord.failed`).

        A committed scene is never downgraded: if a ``done`` record exists, nothing is written
        and ``None`` is returned. Otherwise leftovers of an interrupted write of this scene
        are removed (so raw readers of ``frames/`` see no orphan rows) and the failure record
        is written and returned. Raises ValueError when ``record`` is not a failure.
        """
        if not record.is_failed or not record.error:
            raise ValueError(f"write_failure needs a failed record with an error, got "
                             f"{record.status!r} of {record.scene_id!r}")
        scene_id = record.scene_id
        existing = self.record(scene_id)
        if existing is not None and existing.is_done:
            log.warning("scene %s is already committed; not recording a failure over it", scene_id)
            return None
        self._remove_scene_data(scene_id)
        body = record.replace(format_version=layout.FORMAT_VERSION, written_at=utc_now()).to_json()
        self._put(layout.record_key(scene_id), body)
        return read_scene_record(body)

    def config_conflicts(
        self, model_hash: str | None, merge_hash: str | None,
        records: Mapping[str, SceneRecord] | None = None,
    ) -> list[str]:
        """Committed scene ids whose record's ``model_hash`` / ``merge_hash`` differ from these.

        A ``None`` hash means "do not compare that hash". ``records`` (from :meth:`records`)
        saves re-reading every record when the caller already has them: on an output of many
        thousand scenes that read is the slow part of a resume's start.
        """
        out = []
        records = self.records() if records is None else records
        for sid, rec in records.items():
            if not rec.is_done:
                continue
            if (model_hash is not None and rec.model_hash != model_hash) or (
                merge_hash is not None and rec.merge_hash != merge_hash
            ):
                out.append(sid)
        return out

    # ------------------------------------------------------------------ chunks of long scenes

    def write_chunk(
        self, scene_id: str, chunk_index: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
    ) -> float:
        """Save one chunk's intermediate arrays, then its JSON marker (the chunk's commit).

        Returns the seconds spent encoding and writing the arrays (the marker PUT excluded),
        which a chunk's record counts as its commit, as :meth:`write_scene` does for a scene.
        """
        t0 = time.perf_counter()
        self._put(layout.chunk_key(scene_id, chunk_index, "npz"), npz_bytes(arrays, compress=False))
        commit_s = time.perf_counter() - t0
        marker = {**dict(meta), "chunk_index": chunk_index, "written_at": utc_now()}
        self._put(layout.chunk_key(scene_id, chunk_index, "json"), to_json_bytes(marker))
        return commit_s

    def read_chunk(self, scene_id: str, chunk_index: int) -> tuple[dict[str, np.ndarray], dict]:
        """``(arrays, meta)`` of a committed chunk; ``FileNotFoundError`` if it has no marker."""
        meta = json.loads(self._get(layout.chunk_key(scene_id, chunk_index, "json")))
        return self.read_chunk_arrays(scene_id, chunk_index), meta

    def read_chunk_arrays(self, scene_id: str, chunk_index: int) -> dict[str, np.ndarray]:
        """The arrays of a committed chunk (its marker read already, e.g. by :meth:`done_chunks`)."""
        return load_npz(self._get(layout.chunk_key(scene_id, chunk_index, "npz")))

    def done_chunks(self, scene_id: str) -> dict[int, dict]:
        """``{chunk_index: meta}`` for every chunk whose marker exists."""
        paths = [p for p in self._list(layout.chunks_dir(scene_id)) if p.endswith(".json")]
        return {
            int(path.rsplit("/", 1)[-1][: -len(".json")]): meta
            for path, meta in self._read_json_many(paths).items()
        }

    def clear_chunks(self, scene_id: str) -> None:
        """Remove every intermediate chunk object of ``scene_id`` (after its commit), and on
        local disk its then empty folder ``_chunks/<id>/``. ``_chunks/`` itself stays: another
        worker may be about to write its first chunk there (its ``makedirs`` saw the folder)."""
        self._rm(self._list(layout.chunks_dir(scene_id)))
        if is_local(self.fs):
            try:
                os.rmdir(self.path(layout.chunks_dir(scene_id)))
            except OSError:  # absent (never chunked), or written again meanwhile
                pass

    def remove_stale_temp_files(self, older_than_s: float = STALE_TEMP_S) -> tuple[int, int]:
        """Remove the files under ``_tmp/`` (local disk only) not modified for
        ``older_than_s`` seconds: left by writers killed mid-write (a SIGKILLed worker or
        driver gets no chance to remove its temporary file), never read by anyone. A file
        being written is modified as it grows, so live writes are kept. Returns ``(files,
        bytes)`` removed; ``(0, 0)`` on object stores, whose writes leave no temporary object."""
        if not is_local(self.fs):
            return 0, 0
        folder = self.path(layout.TMP_DIR)
        cutoff = time.time() - older_than_s
        files = size = 0
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return 0, 0
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False) and st.st_mtime < cutoff:
                    os.unlink(entry.path)
                    files, size = files + 1, size + st.st_size
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
        if files:
            log.info("removed %d temporary file(s) (%.1f MB) under %s left by writers killed "
                     "mid-write", files, size / 1e6, redact(self.url_of(layout.TMP_DIR)))
        return files, size

    # ------------------------------------------------------------------ runs

    def write_run_summary(self, summary: RunSummary) -> str:
        """Write ``runs/<run_id>.json`` (secrets redacted); returns its URL."""
        key = layout.run_key(summary.run_id)
        rec = summary.replace(format_version=layout.FORMAT_VERSION, written_at=utc_now())
        self._put(key, rec.to_json())
        return self.url_of(key)

    def runs(self) -> list[RunSummary]:
        """Every run summary, oldest first."""
        raw = self._read_json_many([p for p in self._list(layout.RUNS_DIR) if p.endswith(".json")])
        out = self._parse_all(raw, read_run_summary, "run summary", (ValueError,))
        return sorted(out, key=lambda r: (str(r.written_at or ""), r.run_id))

    # ------------------------------------------------------------------ reading data objects

    def read_arrays(self, scene_id: str, record: SceneRecord | None = None) -> dict[str, np.ndarray]:
        """The NPZ arrays a record names (default: the scene's usual key)."""
        key = (record.arrays_path if record is not None else None) or layout.arrays_key(scene_id)
        return load_npz(self._get(key))
