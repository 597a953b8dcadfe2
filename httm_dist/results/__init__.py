"""Output layout, writers (Parquet, NPZ), commit records and the reader.

``httm_dist.results.open(url)`` returns a :class:`ResultsReader`; note that inside this
module ``open`` is that function, not the builtin (nothing here needs the builtin).
"""

from httm_dist.results.frames import (
    FRAME_SCHEMA,
    build_frame_table,
    column_matrices,
    load_npz,
    npz_bytes,
    scene_arrays,
    validity_mask,
)
from httm_dist.results.layout import FORMAT_VERSION
from httm_dist.results.record import RunSummary, SceneRecord, read_run_summary, read_scene_record
from httm_dist.results.reader import ResultsReader, open_results
from httm_dist.results.store import ResultStore

open = open_results  # noqa: A001 - the public name is httm_dist.results.open

__all__ = [
    "FORMAT_VERSION",
    "FRAME_SCHEMA",
    "ResultStore",
    "ResultsReader",
    "RunSummary",
    "SceneRecord",
    "build_frame_table",
    "column_matrices",
    "load_npz",
    "npz_bytes",
    "open_results",
    "read_run_summary",
    "read_scene_record",
    "scene_arrays",
    "validity_mask",
]
