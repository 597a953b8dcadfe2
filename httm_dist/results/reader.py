"""Reading a finished (or running) job's output: only committed scenes are ever returned.

The reader lists ``scenes/`` first and trusts only what a ``done`` record names, so objects of
a scene that was being written when a worker died are never seen.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from httm_dist.results.frames import FRAME_SCHEMA
from httm_dist.results.layout import READABLE_VERSIONS
from httm_dist.results.store import ResultStore
from httm_dist.storage import redact, retry


class ResultsReader:
    """Committed results at an output URL. Create with :func:`httm_dist.results.open`."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.store = ResultStore(url, storage_options)
        root = self.store.root
        self.store.fs.invalidate_cache(root)
        if not retry(lambda: self.store.fs.exists(root), what=f"check {redact(url)}"):
            raise FileNotFoundError(
                f"no results at {redact(url)!r}: the path does not exist (check it, and the "
                "storage_options of the store it is on)"
            )
        self.refresh()

    def __repr__(self) -> str:
        return f"ResultsReader({redact(self.store.url)!r}, {len(self.scene_ids)} committed scenes)"

    def refresh(self) -> None:
        """Re-list the records (the job may still be writing). Raises ``ValueError`` for a
        committed scene written in a format this version cannot read."""
        self._records = self.store.records()
        self._committed = {s: r for s, r in self._records.items() if r.is_done}
        newer = {s: r.get("format_version") for s, r in self._committed.items()
                 if r.get("format_version", 1) not in READABLE_VERSIONS}
        if newer:
            raise ValueError(
                f"{redact(self.store.url)}: scene(s) {sorted(newer)[:5]} have format_version "
                f"{sorted(set(map(str, newer.values())))}, this httm-dist reads {list(READABLE_VERSIONS)}: "
                "upgrade httm-dist"
            )

    @property
    def scene_ids(self) -> list[str]:
        """Committed scene ids, sorted."""
        return sorted(self._committed)

    def records(self, status: str | None = None) -> dict[str, dict]:
        """Scene records keyed by id, as plain dicts in the ``format_version`` 2 schema (older
        records upgraded): all of them, or those with ``status`` (``"done"``/``"failed"``)."""
        return {s: r.to_dict() for s, r in self._records.items() if status is None or r.status == status}

    def frames(self, scene_ids: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """The frame table of committed scenes (all, or ``scene_ids``), one row per frame.

        Built with ``pyarrow.dataset`` over exactly the Parquet objects the records name,
        filtered to those scene ids. Rows are ordered by scene id, then frame order.
        Scenes written in ``format_version`` 1 have null frame-geometry columns
        (``input_to_original``, ``intrinsic_original``, ``valid_box``, ...).
        """
        wanted = None if scene_ids is None else set(scene_ids)
        ids = self.scene_ids if wanted is None else [s for s in self.scene_ids if s in wanted]
        if wanted is not None and (missing := sorted(wanted - set(ids))):
            raise KeyError(f"scene(s) {missing} are not committed in {redact(self.store.url)}")
        schema = FRAME_SCHEMA if columns is None else pa.schema([FRAME_SCHEMA.field(c) for c in columns])
        if not ids:
            return schema.empty_table()
        paths = [self.store.path(self._committed[s].frames_path) for s in ids]
        dataset = ds.dataset(paths, schema=FRAME_SCHEMA, format="parquet", filesystem=self.store.fs)
        keys = ["scene_id", "frame_index"]
        read = keys + [c for c in schema.names if c not in keys]
        table = dataset.to_table(columns=read, filter=ds.field("scene_id").isin(ids))
        table = table.sort_by([(k, "ascending") for k in keys])
        return table.select(schema.names)

    def arrays(self, scene_id: str) -> dict[str, np.ndarray]:
        """The NPZ arrays of a committed scene (``KeyError`` if it is not committed)."""
        if scene_id not in self._committed:
            raise KeyError(f"scene {scene_id!r} is not committed in {redact(self.store.url)}")
        return self.store.read_arrays(scene_id, self._committed[scene_id])

    def runs(self) -> list[dict]:
        """Run summaries (plain dicts), oldest first."""
        return [run.to_dict() for run in self.store.runs()]


def open_results(url: str, storage_options: dict | None = None) -> ResultsReader:
    """Open the results at ``url`` for reading (exported as ``httm_dist.results.open``).

    Raises ``FileNotFoundError`` when nothing exists at ``url`` (a mistyped path), rather
    than returning an empty table."""
    return ResultsReader(url, storage_options)
