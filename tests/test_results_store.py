"""Result store and reader: commit protocol, reruns, failures, chunks, runs; local and S3."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from test_results_frames import random_prediction, table_of

import httm_dist.results as results
from httm_dist.errors import ConfigError
from httm_dist.results import ResultStore, RunSummary, SceneRecord, column_matrices, scene_arrays
from httm_dist.results.frames import npz_bytes
from httm_dist.results.store import table_bytes
from httm_dist.storage import get_fs

HASHES = {"model_hash": "m1", "merge_hash": "g1"}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def out(request, tmp_path):
    """``(output_url, storage_options)``."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    bucket, opts = request.getfixturevalue("s3_bucket")
    return f"{bucket}/out", opts


def done_record(scene_id: str, num_frames: int = 3, **fields) -> SceneRecord:
    """A done record with the identity every writer must give, plus ``fields``."""
    return SceneRecord.done(scene_id, **{
        "unit": "scene", "num_frames": num_frames, "chunks": 1, "attempts": 1, "seconds": 1.5,
        "timings": {"run": 1.5}, **HASHES, **fields})


def failed_record(scene_id: str, error: str, **fields) -> SceneRecord:
    return SceneRecord.failed(scene_id, error, **{
        "unit": "scene", "num_frames": 3, "chunks": 1, "attempts": 1, **HASHES, **fields})


def commit(store: ResultStore, scene_id: str, s: int = 3, seed: int = 0, **fields) -> SceneRecord:
    pred = random_prediction(s=s, seed=seed)
    return store.write_scene(
        scene_id, table_of(pred, scene_id), scene_arrays(pred), done_record(scene_id, s, **fields)
    )


def raw_frames(url: str, opts) -> pa.Table:
    """What a user gets with plain pyarrow.dataset over the frames folder."""
    fs, path = get_fs(url, opts)
    fs.invalidate_cache()
    return ds.dataset(f"{path}/frames", filesystem=fs, format="parquet").to_table()


def test_round_trip_through_reader(out):
    url, opts = out
    store = ResultStore(url, opts)
    preds = {sid: random_prediction(s=s, seed=i) for i, (sid, s) in enumerate([("0001", 2), ("b", 3)])}
    for sid, pred in preds.items():
        rec = store.write_scene(sid, table_of(pred, sid), scene_arrays(pred),
                                done_record(sid, num_frames=99, worker_host="h"))
        assert rec.status == "done" and rec.format_version == 2
        assert rec.num_frames == len(pred["frame_uris"])  # the table's rows, not the caller's
        assert rec.frames_path == f"frames/{sid}.parquet" and rec.written_at
        assert rec.timings["commit"] > 0 and rec.seconds == pytest.approx(1.5 + rec.timings["commit"], abs=1e-3)
    reader = results.open(url, opts)
    assert reader.scene_ids == ["0001", "b"]
    table = reader.frames()
    assert table.column("scene_id").to_pylist() == ["0001"] * 2 + ["b"] * 3
    np.testing.assert_array_equal(column_matrices(table, "extrinsic")[2:], preds["b"]["extrinsic"])
    arrays = reader.arrays("b")
    assert arrays["depth"].dtype == np.float16 and arrays["depth"].shape == (3, 6, 8, 1)
    np.testing.assert_allclose(arrays["depth"], preds["b"]["depth"], rtol=1e-3)
    assert arrays["frame_uris"].tolist() == preds["b"]["frame_uris"]
    assert reader.frames(scene_ids=["b"], columns=["scene_id", "depth_mean"]).num_rows == 3
    # a numeric-looking scene id stays a string for plain pyarrow.dataset readers too
    assert sorted(set(raw_frames(url, opts).column("scene_id").to_pylist())) == ["0001", "b"]
    with pytest.raises(KeyError, match="nope"):
        reader.arrays("nope")


def test_no_record_means_not_committed(out):
    url, opts = out
    store = ResultStore(url, opts)
    commit(store, "good")
    # a worker died after writing the data objects of "half" but before its record
    pred = random_prediction(seed=3)
    store._put("frames/half.parquet", table_bytes(table_of(pred, "half")))
    store._put("arrays/half.npz", b"partial")
    assert set(store.records()) == {"good"}
    reader = results.open(url, opts)
    assert reader.scene_ids == ["good"]
    assert set(reader.frames().column("scene_id").to_pylist()) == {"good"}
    with pytest.raises(KeyError):
        reader.arrays("half")
    # the rerun then fails on that scene: its leftovers go, a failed record is written
    rec = store.write_failure(failed_record("half", "SceneError: corrupt image x.jpg", attempts=2))
    assert rec.status == "failed" and rec.error.startswith("SceneError")
    assert set(raw_frames(url, opts).column("scene_id").to_pylist()) == {"good"}
    assert set(store.committed()) == {"good"} and store.records()["half"].attempts == 2
    # a failure never overwrites a committed scene
    assert store.write_failure(failed_record("good", "late duplicate")) is None
    assert store.records()["good"].status == "done"


def test_rerun_leaves_no_duplicates(out):
    url, opts = out
    store = ResultStore(url, opts)
    commit(store, "a", s=4, seed=1)
    commit(store, "b", s=2)
    # a stale format_version 1 table of "a" (frames/scene_id=a/), then a rerun with fewer frames
    store._put("frames/scene_id=a/part-0.parquet", table_bytes(table_of(random_prediction(seed=9), "a")))
    rec = commit(store, "a", s=3, seed=2, model_hash="m2")
    assert rec.model_hash == "m2"
    raw = raw_frames(url, opts)
    assert raw.num_rows == 5
    fs, path = get_fs(url, opts)
    assert not fs.exists(f"{path}/frames/scene_id=a/part-0.parquet")
    assert sorted(raw.column("scene_id").to_pylist()) == ["a"] * 3 + ["b"] * 2
    reader = results.open(url, opts)
    assert reader.frames().num_rows == 5
    np.testing.assert_allclose(reader.arrays("a")["depth"], random_prediction(s=3, seed=2)["depth"], rtol=1e-3)
    assert store.config_conflicts("m1", "g1") == ["a"]
    assert store.config_conflicts("m2", None) == ["b"]
    assert store.config_conflicts(None, "g1") == []
    # Given the records it already read, it reads nothing more (the driver's resume start),
    # and failed records never conflict.
    records = store.records()
    records["c"] = failed_record("c", "boom", model_hash="other")
    store.records = lambda: pytest.fail("config_conflicts re-read the records")
    assert store.config_conflicts("m1", "g1", records) == ["a"]


def test_rewrite_uncommits_before_touching_data(tmp_path, monkeypatch):
    url = str(tmp_path / "out")
    store = ResultStore(url)
    commit(store, "a")

    def crash(key, data):
        if key.startswith("arrays/"):
            raise RuntimeError("worker killed")
        return real_put(key, data)

    real_put = store._put
    monkeypatch.setattr(store, "_put", crash)
    with pytest.raises(RuntimeError):
        commit(store, "a", seed=5)
    # new parquet with old npz would be a mixed scene: it must not look committed
    assert store.committed() == {}
    assert results.open(url).frames().num_rows == 0


def test_records_and_summaries_hold_no_secrets(out):
    url, opts = out
    store = ResultStore(url, opts)
    commit(store, "a", worker={"storage_options": {"key": "AKIA123", "secret": "hunter2"}})
    store.write_failure(failed_record("f", "cannot read s3://me:hunter2@bucket/x.png"))
    summary_url = store.write_run_summary(
        RunSummary("run-1", config={"storage_options": {"secret": "hunter2"}}, done=1)
    )
    fs, path = get_fs(summary_url, opts)
    text = fs.cat_file(path).decode() + json.dumps(results.open(url, opts).records())
    text += "".join(fs.cat_file(f"{store.root}/scenes/{s}.json").decode() for s in ("a", "f"))
    assert "hunter2" not in text and "AKIA123" not in text
    runs = results.open(url, opts).runs()
    assert [r["run_id"] for r in runs] == ["run-1"] and runs[0]["done"] == 1
    with pytest.raises(ConfigError):
        store.write_run_summary(RunSummary("../evil"))


def test_chunks(out):
    url, opts = out
    store = ResultStore(url, opts)
    assert store.done_chunks("long") == {}
    a0 = {"depth": np.arange(12, dtype=np.float32).reshape(3, 4)}
    store.write_chunk("long", 0, a0, {"frames": [0, 1, 2]})
    store.write_chunk("long", 12, {"depth": np.ones((2, 2), np.float32)}, {"frames": [3, 4]})
    store._put("_chunks/long/00007.npz", b"no marker: not done")
    done = store.done_chunks("long")
    assert sorted(done) == [0, 12] and done[12]["frames"] == [3, 4]
    arrays, meta = store.read_chunk("long", 0)
    np.testing.assert_array_equal(arrays["depth"], a0["depth"])
    assert meta["chunk_index"] == 0 and meta["frames"] == [0, 1, 2]
    with pytest.raises(FileNotFoundError):
        store.read_chunk("long", 7)
    store.clear_chunks("long")
    assert store.done_chunks("long") == {}
    with pytest.raises(ValueError):
        store.write_chunk("long", -1, a0, {})


def test_cleared_chunks_leave_no_empty_folders_on_local_disk(tmp_path):
    store = ResultStore(str(tmp_path / "out"))
    for sid in ("long", "other"):
        store.write_chunk(sid, 0, {"depth": np.ones((2, 2), np.float32)}, {})
    store.clear_chunks("long")
    assert sorted(p.name for p in (tmp_path / "out" / "_chunks").iterdir()) == ["other"]
    store.clear_chunks("other")
    # _chunks/ itself stays: another worker's first chunk write may have just seen it
    assert list((tmp_path / "out" / "_chunks").iterdir()) == []
    store.clear_chunks("never-chunked")  # nothing to remove is no error


def test_stale_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    import os
    import time

    store = ResultStore(str(tmp_path / "out"))
    commit(store, "a")  # creates _tmp/ and renames its files out of it
    tmp = tmp_path / "out" / "_tmp"
    stale, live = tmp / ".a.npz.dead.tmp", tmp / ".b.npz.live.tmp"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y" * 10)
    old = time.time() - 601
    os.utime(stale, (old, old))
    assert store.remove_stale_temp_files() == (1, 1000)
    assert sorted(p.name for p in tmp.iterdir()) == [live.name]
    assert store.remove_stale_temp_files(older_than_s=0) == (1, 10)
    assert ResultStore(str(tmp_path / "nothing-yet")).remove_stale_temp_files() == (0, 0)
    assert results.open(str(tmp_path / "out")).scene_ids == ["a"]


def test_bad_scene_ids_and_tables(tmp_path):
    store = ResultStore(str(tmp_path))
    pred = random_prediction()
    with pytest.raises(ConfigError, match="a/b"):
        store.write_scene("a/b", table_of(pred, "a/b"), {}, done_record("a/b"))
    with pytest.raises(ValueError, match="other"):
        store.write_scene("x", table_of(pred, "other"), {}, done_record("x"))
    with pytest.raises(ValueError, match="needs a done record"):
        store.write_scene("x", table_of(pred, "x"), {}, done_record("y"))
    with pytest.raises(ValueError, match="needs a failed record"):
        store.write_failure(done_record("x"))
    assert results.open(str(tmp_path)).frames().num_rows == 0


def test_record_read_retries_a_path_the_batched_read_failed(tmp_path, monkeypatch):
    """A transient error on one record in the batched read is retried for that path alone,
    so a flaky object store does not make a committed scene look missing on resume."""
    store = ResultStore(str(tmp_path / "out"))
    commit(store, "a")
    commit(store, "b", seed=1)
    fs = store.fs
    real_cat_file = fs.cat_file
    failures = {"left": 2}

    def flaky_cat(paths, on_error="raise", **kw):
        return {p: (ConnectionError("reset by peer") if p.endswith("b.json") else real_cat_file(p)) for p in paths}

    def flaky_cat_file(path, *a, **kw):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("reset by peer")
        return real_cat_file(path, *a, **kw)

    monkeypatch.setattr(fs, "cat", flaky_cat)
    monkeypatch.setattr(fs, "cat_file", flaky_cat_file)
    monkeypatch.setattr("httm_dist.storage.time.sleep", lambda s: None)
    records = store.records()
    assert sorted(records) == ["a", "b"] and records["b"].status == "done"
    assert failures["left"] == 0


def test_frames_folder_opens_with_every_reader_by_its_plainest_call(tmp_path):
    """pandas, pyarrow (table and dataset), DuckDB and Polars read ``OUTPUT/frames`` as given,
    ids like ``0001`` stay strings with their zeros, and a write in progress (its temporary
    file) is not in the folder."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    store = ResultStore(str(out))
    commit(store, "0001", s=2)
    commit(store, "007", s=3, seed=1)
    commit(store, "b", s=1, seed=2)
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / ".b.parquet.x.tmp").write_bytes(b"half-written")
    frames = str(out / "frames")
    want = ["0001"] * 2 + ["007"] * 3 + ["b"]
    seen = {
        "pandas": pd.read_parquet(frames)["scene_id"].tolist(),
        "pq.read_table": pq.read_table(frames).column("scene_id").to_pylist(),
        "ds.dataset": ds.dataset(frames).to_table().column("scene_id").to_pylist(),
        "duckdb": [r[0] for r in duckdb.sql(f"SELECT scene_id FROM '{frames}/*.parquet'").fetchall()],
        "duckdb.read_parquet": duckdb.read_parquet(frames).df()["scene_id"].tolist(),
        "polars": pl.read_parquet(frames)["scene_id"].to_list(),
    }
    for reader, ids in seen.items():
        assert sorted(ids) == sorted(want), reader
    assert pd.api.types.is_string_dtype(pd.read_parquet(frames)["scene_id"])
    assert pl.read_parquet(frames).schema["scene_id"] == pl.String


def test_reader_accepts_format_version_1_outputs(tmp_path):
    """An output written by format_version 1 (frames under ``frames/scene_id=<id>/``) still
    reads, and a scene rewritten by this version moves to ``frames/<id>.parquet``."""
    out = tmp_path / "out"
    store = ResultStore(str(out))
    pred = random_prediction(s=2, seed=4)
    store._put("frames/scene_id=old/part-0.parquet", table_bytes(table_of(pred, "old")))
    store._put("arrays/old.npz", npz_bytes(scene_arrays(pred)))
    v1 = {"scene_id": "old", "status": "done", "format_version": 1, "num_frames": 2,
          "frames_path": "frames/scene_id=old/part-0.parquet", "arrays_path": "arrays/old.npz", **HASHES}
    store._put("scenes/old.json", json.dumps(v1).encode())
    commit(store, "new", s=3)
    reader = results.open(str(out))
    assert reader.scene_ids == ["new", "old"]
    assert reader.frames().column("scene_id").to_pylist() == ["new"] * 3 + ["old"] * 2
    np.testing.assert_allclose(reader.arrays("old")["depth"], pred["depth"], rtol=1e-3)
    commit(store, "old", s=2)
    assert not (out / "frames" / "scene_id=old").exists() and (out / "frames" / "old.parquet").exists()
