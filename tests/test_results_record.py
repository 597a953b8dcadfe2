"""The scene record and run summary schema: builders, format_version 1 records, unknown keys."""

from __future__ import annotations

import json

import pytest

import httm_dist.results as results
from httm_dist.errors import SceneError
from httm_dist.results import FORMAT_VERSION, ResultStore, RunSummary, SceneRecord, read_scene_record

IDENTITY = {"unit": "scene", "num_frames": 3, "chunks": 1, "model_hash": "m", "merge_hash": "g",
            "attempts": 2}

# What format_version 1 wrote (copied from outputs of 3690418): a done record (pipeline +
# store: both "frames" and "num_frames", "attempts"), a worker's failure (also the worker's
# "attempt") and a driver's failure ("attempt" only, no unit, hashes or frame count).
V1_DONE = {
    "scene_id": "a", "status": "done", "error": None, "format_version": 1,
    "written_at": "2026-11-23T19:50:00.000+00:00", "unit": "scene", "frames": 3, "num_frames": 3,
    "seconds": 1.25, "timings": {"load": 0.25, "run": 1.0}, "worker_host": "h", "device": "cpu",
    "model_hash": "m", "merge_hash": "g", "attempts": 1, "attempt": 1, "chunks": 1,
    "alignment": [], "frames_path": "frames/scene_id=a/part-0.parquet",
    "arrays_path": "arrays/a.npz", "arrays": {}, "run_id": "r1", "prefetched": False,
}
V1_WORKER_FAILED = {
    "scene_id": "b", "status": "failed", "error": "SceneError: corrupt", "format_version": 1,
    "unit": "scene", "chunk_index": None, "frames": 4, "seconds": 0.0, "attempts": 2,
    "attempt": 2, "chunks": 1, "alignment": [], "model_hash": "m", "merge_hash": "g",
}
V1_DRIVER_FAILED = {
    "scene_id": "c", "status": "failed", "error": "worker died", "run_id": "r1", "attempt": 3,
    "finished_at": 1.0, "format_version": 1, "written_at": "2026-11-23T19:50:00.000+00:00",
}


@pytest.mark.parametrize(
    "raw, num_frames, attempts",
    [(V1_DONE, 3, 1), (V1_WORKER_FAILED, 4, 2), (V1_DRIVER_FAILED, None, 3)],
    ids=["done", "worker-failure", "driver-failure"],
)
def test_format_1_records_read_with_version_2_keys(raw, num_frames, attempts):
    rec = read_scene_record(json.dumps(raw).encode())
    assert (rec.num_frames, rec.attempts, rec.format_version) == (num_frames, attempts, 1)
    data = rec.to_dict()
    assert "frames" not in data and "attempt" not in data
    assert data["scene_id"] == raw["scene_id"] and data["status"] == raw["status"]


def test_format_1_output_is_read_resumed_and_reported(tmp_path):
    out = tmp_path / "out"
    (out / "scenes").mkdir(parents=True)
    for raw in (V1_DONE, V1_WORKER_FAILED, V1_DRIVER_FAILED):
        (out / "scenes" / f"{raw['scene_id']}.json").write_text(json.dumps(raw))
    store = ResultStore(str(out))
    assert sorted(store.committed()) == ["a"]
    assert store.config_conflicts("m", "g") == [] and store.config_conflicts("m2", None) == ["a"]
    failed = results.open(str(out)).records("failed")
    assert {s: (r["attempts"], r["error"]) for s, r in failed.items()} == {
        "b": (2, "SceneError: corrupt"), "c": (3, "worker died")}


def test_builders_carry_identity_and_version():
    done = SceneRecord.done("a", seconds=1.23456, timings={"run": 1.23456}, **IDENTITY)
    assert done.status == "done" and done.error is None and done.format_version == FORMAT_VERSION == 2
    assert done.seconds == 1.2346 and done.timings == {"run": 1.2346}
    chunk = SceneRecord.chunk_done("a", chunk_index=1, frame_range=(2, 6), seconds=0.5, timings={},
                                   num_frames=4, chunks=3, model_hash="m", merge_hash="g",
                                   attempts=1)
    assert (chunk.status, chunk.unit, chunk.frame_range) == ("chunk_done", "chunk", [2, 6])
    with pytest.raises(TypeError, match="num_frames"):
        SceneRecord.failed("a", "x", unit="scene", chunks=1, model_hash="m", merge_hash="g",
                           attempts=1)


@pytest.mark.parametrize(
    "error, text",
    [(SceneError("scene 'a': frame x.png cannot be decoded"), "scene 'a': frame x.png cannot be decoded"),
     (KeyError("depth"), "KeyError: 'depth'"),
     ("driver: worker died", "driver: worker died"),
     ("read s3://u:pw@bucket/x failed", "read s3://u:***@bucket/x failed")],
    ids=["scene-error", "other-error", "text", "secret"],
)
def test_failed_builder_words_and_redacts_the_error(error, text):
    assert SceneRecord.failed("a", error, **IDENTITY).error == text


def test_unknown_field_is_refused_by_builders_and_kept_by_readers():
    with pytest.raises(TypeError, match=r"no field\(s\) \['fingerprnt'\]"):
        SceneRecord.done("a", seconds=1, timings={}, fingerprnt="x", **IDENTITY)
    newer = dict(SceneRecord.done("a", seconds=1, timings={}, **IDENTITY).to_dict(),
                 from_a_newer_writer={"k": 1})
    rec = SceneRecord.from_dict(newer)
    assert rec.get("from_a_newer_writer") == {"k": 1} and rec.get("num_frames") == 3
    assert json.loads(rec.to_json()) == json.loads(json.dumps(newer))


def test_record_without_status_is_refused():
    with pytest.raises(ValueError, match="'status'"):
        read_scene_record({"scene_id": "a"})


def test_run_summary_round_trips_and_keeps_unknown_keys():
    summary = RunSummary("r1", done=2, failed=1, failures=[{"scene_id": "x", "error": "e", "attempts": 1}])
    back = results.read_run_summary(dict(summary.to_dict(), later="kept"))
    assert back.replace(extra={}) == summary and back.extra == {"later": "kept"}
    with pytest.raises(ValueError, match="run_id"):
        results.read_run_summary({"done": 1})


def test_output_format_doc_shows_every_key_of_a_scene_record():
    """docs/output-format.md says every key is always present: its example has exactly the
    keys a written record has."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "output-format.md").read_text()
    section = doc[doc.index("## Scene record"):]
    example = json.loads(re.search(r"```json\n(.*?)```", section, flags=re.S).group(1))
    written = SceneRecord.done("scene_a", unit="scene", num_frames=3, chunks=1, attempts=1,
                               model_hash="m", merge_hash="g", seconds=1.0, timings={}).to_dict()
    assert sorted(example) == sorted(written)
