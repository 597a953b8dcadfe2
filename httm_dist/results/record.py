"""The scene record and the run summary: one schema each, built, read and written only here.

A scene record (``scenes/<id>.json``) is the product's commit marker (``status == "done"``)
and what downstream readers query; a run summary (``runs/<run_id>.json``) is the driver's
account of one run. Both are frozen dataclasses:

- :class:`SceneRecord` has one builder per status (:meth:`SceneRecord.done`,
  :meth:`SceneRecord.failed`, :meth:`SceneRecord.chunk_done`) whose keyword-only arguments
  are the fields a record of that status must carry, so no writer can forget (or guess) one;
- :func:`read_scene_record` / :func:`read_run_summary` parse what any version wrote:
  ``format_version`` 1 records (keys ``frames`` and ``attempt``) are upgraded to the
  version-2 names (``num_frames``, ``attempts``); keys this version does not know (written by
  a newer one) are kept in ``extra`` and written back unchanged;
- :func:`to_json_bytes` is the one JSON encoding (secrets redacted, keys sorted).

Adding an optional field is one line in the dataclass (a name, a type, a default ``None``);
builders and ``**optional`` pass it through, readers of older records get the default.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Optional

import numpy as np

from httm_dist.errors import SceneError
from httm_dist.results.layout import FORMAT_VERSION
from httm_dist.storage import redact

DONE = "done"
FAILED = "failed"
CHUNK_DONE = "chunk_done"

Status = Literal["done", "failed", "chunk_done"]
UnitKind = Literal["scene", "chunk", "assemble"]

#: Keys that ``format_version`` 1 writers used for what version 2 calls otherwise.
_V1_RENAMED = {"frames": "num_frames", "attempt": "attempts"}


def utc_now() -> str:
    """ISO-8601 UTC timestamp used for ``written_at``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def to_json_bytes(obj: Any) -> bytes:
    """Secret-free, stable JSON (sorted keys, numpy values as plain numbers) for records,
    summaries and chunk markers."""
    return json.dumps(redact(obj), indent=2, sort_keys=True, default=_json_default).encode()


def error_text(error: BaseException | str) -> str:
    """A failure's one-line message: a ``SceneError`` keeps its message (it names the scene
    and the frame), any other exception is prefixed with its type, strings are kept."""
    if isinstance(error, BaseException):
        return str(error) if isinstance(error, SceneError) else f"{type(error).__name__}: {error}"
    return str(error)


class _Record:
    """``to_dict`` / ``from_dict`` shared by the record dataclasses (``extra`` = unknown keys)."""

    extra: dict
    _REQUIRED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Parse what any ``format_version`` wrote (see ``_upgrade``); unknown keys go to
        ``extra``. Raises ValueError naming a missing required key."""
        data = cls._upgrade(dict(data))
        for key in cls._REQUIRED:
            if key not in data:
                raise ValueError(f"{cls.__name__} has no {key!r}: {sorted(data)[:8]}")
        known, extra = cls._split(data)
        return cls(**known, extra=extra)

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Rename keys of older ``format_version``s to the current ones (none by default)."""
        return data

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready mapping: every field (``None`` included, so the schema is fixed)
        plus the unknown keys kept from a newer writer."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    def to_json(self) -> bytes:
        """Redacted, key-sorted JSON bytes of :meth:`to_dict`."""
        return to_json_bytes(self.to_dict())

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (field names only; TypeError for any other)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def get(self, key: str, default: Any = None) -> Any:
        """A field or a kept unknown key by name (``default`` when neither exists)."""
        if key != "extra" and key in self._field_names():
            return getattr(self, key)
        return self.extra.get(key, default)

    @classmethod
    def _field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def _split(cls, data: Mapping[str, Any]) -> tuple[dict, dict]:
        """(field values, unknown keys) of ``data``; a ``null`` where the field's default is
        not ``None`` (an older writer's gap) takes the default."""
        nullable = {f.name for f in dataclasses.fields(cls) if f.default is None}  # type: ignore[arg-type]
        names = cls._field_names() - {"extra"}
        known = {k: v for k, v in data.items() if k in names and (v is not None or k in nullable)}
        extra = {k: v for k, v in data.items() if k not in names}
        return known, extra


@dataclass(frozen=True)
class SceneRecord(_Record):
    """One scene's record (``scenes/<id>.json``), or a chunk's result sent to the driver.

    ``num_frames`` counts the frames the unit covered (a chunk: its frames; an assembly or a
    scene: the scene's). ``seconds`` is the unit's wall time up to its commit, including the
    write of its data objects (scene: Parquet + NPZ; chunk: NPZ), excluding the final
    record/marker PUT; ``timings`` splits it (``load``, ``run``, ``assemble``, ``commit``).
    """

    scene_id: str
    status: Status
    error: Optional[str] = None
    format_version: int = FORMAT_VERSION
    written_at: Optional[str] = None
    # what was run, and under which config (required by every builder)
    unit: Optional[UnitKind] = None
    num_frames: Optional[int] = None
    chunks: int = 1
    chunk_index: Optional[int] = None
    frame_range: Optional[list] = None
    model_hash: Optional[str] = None
    merge_hash: Optional[str] = None
    input_fingerprint: Optional[str] = None
    """sha256 of the scene's input frames (``httm_dist.data.scene_fingerprint``); a rerun
    reprocesses a committed scene whose inputs no longer match it. None in version 1."""
    attempts: int = 1
    # who ran it, when, how fast
    run_id: Optional[str] = None
    worker_host: Optional[str] = None
    worker: Optional[dict] = None
    device: Optional[str] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    prefetched: Optional[bool] = None
    load_wait_s: Optional[float] = None
    # the committed objects (done)
    frames_path: Optional[str] = None
    arrays_path: Optional[str] = None
    arrays: Optional[dict] = None
    # chunked scenes (assembled)
    alignment: list = field(default_factory=list)
    alignment_flagged: Optional[bool] = None
    chunk_ranges: Optional[list] = None
    frame_source_chunk: Optional[list] = None
    # trust in the numbers: rerun in fp32 after non-finite predictions; NaN/inf values
    # committed per array ({} when none)
    fp32_retry: Optional[bool] = None
    nonfinite_values: Optional[dict] = None
    # a failure whose record could not be written (reported to the driver only)
    failure_write_error: Optional[str] = None
    extra: dict = field(default_factory=dict)

    _REQUIRED: ClassVar[tuple[str, ...]] = ("scene_id", "status")

    # ------------------------------------------------------------------ builders

    @classmethod
    def done(cls, scene_id: str, *, unit: UnitKind, num_frames: int, chunks: int,
             model_hash: str, merge_hash: str, attempts: int, seconds: float,
             timings: Mapping[str, float], **optional: Any) -> "SceneRecord":
        """A committed scene (``unit`` "scene" or "assemble"). The store adds the object
        paths, ``written_at`` and the commit time when it writes it."""
        return cls._build(scene_id, DONE, unit=unit, num_frames=num_frames, chunks=chunks,
                          model_hash=model_hash, merge_hash=merge_hash, attempts=attempts,
                          seconds=seconds, timings=timings, **optional)

    @classmethod
    def chunk_done(cls, scene_id: str, *, chunk_index: int, frame_range: tuple[int, int] | list,
                   num_frames: int, chunks: int, model_hash: str, merge_hash: str,
                   attempts: int, seconds: float, timings: Mapping[str, float],
                   **optional: Any) -> "SceneRecord":
        """A chunk stored for later assembly (sent to the driver, never written to ``scenes/``)."""
        return cls._build(scene_id, CHUNK_DONE, unit="chunk", chunk_index=int(chunk_index),
                          frame_range=[int(x) for x in frame_range], num_frames=num_frames,
                          chunks=chunks, model_hash=model_hash, merge_hash=merge_hash,
                          attempts=attempts, seconds=seconds, timings=timings, **optional)

    @classmethod
    def failed(cls, scene_id: str, error: BaseException | str, *, unit: UnitKind,
               num_frames: int, chunks: int, model_hash: str, merge_hash: str, attempts: int,
               **optional: Any) -> "SceneRecord":
        """A failed unit: ``error`` as :func:`error_text` words it (secrets redacted)."""
        return cls._build(scene_id, FAILED, error=redact(error_text(error)), unit=unit,
                          num_frames=num_frames, chunks=chunks, model_hash=model_hash,
                          merge_hash=merge_hash, attempts=attempts, **optional)

    @classmethod
    def _build(cls, scene_id: str, status: Status, **values: Any) -> "SceneRecord":
        unknown = set(values) - (cls._field_names() - {"extra"})
        if unknown:
            raise TypeError(f"SceneRecord has no field(s) {sorted(unknown)}: add them to the "
                            "dataclass in httm_dist/results/record.py")
        if "timings" in values:
            values["timings"] = {k: round(float(v), 4) for k, v in values["timings"].items()}
        if "seconds" in values:
            values["seconds"] = round(float(values["seconds"]), 4)
        for key in ("num_frames", "chunks", "attempts"):
            if key in values:
                values[key] = int(values[key])
        return cls(scene_id=scene_id, status=status, **values)

    @property
    def is_done(self) -> bool:
        return self.status == DONE

    @property
    def is_failed(self) -> bool:
        return self.status == FAILED

    # ------------------------------------------------------------------ reading

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``format_version`` 1 -> 2: ``frames`` -> ``num_frames``, ``attempt`` -> ``attempts``."""
        if int(data.get("format_version") or 1) < 2:
            for old, new in _V1_RENAMED.items():
                if old in data:
                    value = data.pop(old)
                    data.setdefault(new, len(value) if isinstance(value, list) else value)
        return data


def read_scene_record(raw: bytes | str | Mapping[str, Any]) -> SceneRecord:
    """A :class:`SceneRecord` of any ``format_version`` from JSON bytes/text or a parsed
    mapping; ValueError naming the missing key when ``scene_id`` or ``status`` is absent."""
    return SceneRecord.from_dict(_parsed(raw))


@dataclass(frozen=True)
class RunSummary(_Record):
    """The driver's account of one run (``runs/<run_id>.json``). ``frames`` counts the frames
    of the scenes committed by this run; ``seconds`` is the driver's wall time."""

    run_id: str
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    seconds: float = 0.0
    startup_seconds: Optional[float] = None  # until the first worker had its model loaded
    scenes: int = 0
    skipped: int = 0
    not_retried: int = 0
    done: int = 0
    failed: int = 0
    failures: list = field(default_factory=list)  # [{scene_id, error, attempts}]
    frames: int = 0
    frames_per_s: float = 0.0
    units_run: int = 0
    reused_chunks: int = 0
    workers: int = 0
    workers_lost: int = 0
    max_parallel_units: int = 0  # most units running at once (worker clocks)
    worker_hosts: list = field(default_factory=list)
    worker_units: list = field(default_factory=list)
    model_hash: Optional[str] = None
    merge_hash: Optional[str] = None
    input: Optional[str] = None
    output: Optional[str] = None
    config: Optional[dict] = None
    format_version: int = FORMAT_VERSION
    written_at: Optional[str] = None
    extra: dict = field(default_factory=dict)

    _REQUIRED: ClassVar[tuple[str, ...]] = ("run_id",)



def read_run_summary(raw: bytes | str | Mapping[str, Any]) -> RunSummary:
    """A :class:`RunSummary` of any ``format_version`` from JSON bytes/text or a parsed
    mapping; ValueError when ``run_id`` is absent."""
    return RunSummary.from_dict(_parsed(raw))


def _parsed(raw: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    return json.loads(raw) if isinstance(raw, (bytes, str)) else raw
