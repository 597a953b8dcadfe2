"""Where each output object lives under the output root (``format_version`` 2; readers also
accept 1, see ``docs/output-format.md``).

```
OUTPUT/frames/scene_id=<id>/part-0.parquet   one row per frame (hive-partitioned)
OUTPUT/arrays/<id>.npz                        dense maps of the scene (compressed NPZ)
OUTPUT/scenes/<id>.json                       the scene's record; status "done" = committed
OUTPUT/runs/<run_id>.json                     run summaries
OUTPUT/_chunks/<id>/<chunk:05d>.npz|.json     intermediate chunk results of long scenes
```
All keys are relative to the output root and use ``/``.
"""

from __future__ import annotations

from httm_dist.storage import safe_name

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Format versions the reader accepts (1 lacks the frame-geometry columns; they read as null)."""

FRAMES_DIR = "frames"
ARRAYS_DIR = "arrays"
SCENES_DIR = "scenes"
RUNS_DIR = "runs"
CHUNKS_DIR = "_chunks"


def frames_dir(scene_id: str) -> str:
    return f"{FRAMES_DIR}/scene_id={safe_name(scene_id, 'scene id')}"


def frames_key(scene_id: str) -> str:
    return f"{frames_dir(scene_id)}/part-0.parquet"


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
