"""Where each output object lives under the output root (``format_version`` 2; readers also
accept 1, see ``docs/output-format.md``).

```
OUTPUT/frames/<id>.parquet                    one row per frame, one file per scene
OUTPUT/arrays/<id>.npz                        dense maps of the scene (compressed NPZ)
OUTPUT/scenes/<id>.json                       the scene's record; status "done" = committed
OUTPUT/runs/<run_id>.json                     run summaries
OUTPUT/_chunks/<id>/<chunk:05d>.npz|.json     intermediate chunk results of long scenes
OUTPUT/_tmp/                                  local disk only: files being written, renamed into place
```
All keys are relative to the output root and use ``/``.

``format_version`` 1 kept the frames under ``frames/scene_id=<id>/part-0.parquet``: a hive
folder name that pandas and ``pyarrow.parquet.read_table`` type-infer and then clash with the
stored ``scene_id`` column. Version 2 stores one flat file per scene, so ``frames/`` opens with
every Parquet reader by its plainest call. Records name their own ``frames_path``, so readers
accept both layouts; :func:`legacy_frames_dir` is the version 1 folder, removed when a scene
is rewritten.
"""

from __future__ import annotations

from httm_dist.storage import safe_name

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Format versions the reader accepts (records carry their own ``format_version``; 1 keeps
frames in hive folders and lacks the frame-geometry columns, which read as null)."""

FRAMES_DIR = "frames"
ARRAYS_DIR = "arrays"
SCENES_DIR = "scenes"
RUNS_DIR = "runs"
CHUNKS_DIR = "_chunks"
TMP_DIR = "_tmp"


def frames_key(scene_id: str) -> str:
    """``frames/<id>.parquet``: the scene's frame table (format_version 2)."""
    return f"{FRAMES_DIR}/{safe_name(scene_id, 'scene id')}.parquet"


def legacy_frames_dir(scene_id: str) -> str:
    """``frames/scene_id=<id>``: where format_version 1 kept the scene's frame table."""
    return f"{FRAMES_DIR}/scene_id={safe_name(scene_id, 'scene id')}"


def arrays_key(scene_id: str) -> str:
    return f"{ARRAYS_DIR}/{safe_name(scene_id, 'scene id')}.npz"


def record_key(scene_id: str) -> str:
    return f"{SCENES_DIR}/{safe_name(scene_id, 'scene id')}.json"


def run_key(run_id: str) -> str:
    return f"{RUNS_DIR}/{safe_name(run_id, 'run id')}.json"


def chunks_dir(scene_id: str) -> str:
    return f"{CHUNKS_DIR}/{safe_name(scene_id, 'scene id')}"


def chunk_key(scene_id: str, chunk_index: int, suffix: str) -> str:
    """``suffix`` is ``"npz"`` (the arrays) or ``"json"`` (the marker, written last)."""
    if isinstance(chunk_index, bool) or not isinstance(chunk_index, int) or chunk_index < 0:
        raise ValueError(f"chunk_index must be an integer >= 0, got {chunk_index!r}")
    return f"{chunks_dir(scene_id)}/{chunk_index:05d}.{suffix}"
