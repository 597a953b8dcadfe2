"""The Ray runtime end to end: workers, driver, resume and faults (issues 4 and 5).

Every test runs the real driver on the suite's Ray session (2 CPUs, 2 logical GPUs: two
workers) with the tiny model on tiny synthetic images. The main local job runs once per
module (``local_run``) and each of its behaviours is its own test. Tests that must catch a
run in flight use the workers' test-only hooks (``HTTM_DIST_TEST_UNIT_DELAY_S``,
``HTTM_DIST_TEST_KILL_SCENE``; see ``httm_dist.cluster.worker``). The Ray-free parts of the
cluster room are in ``test_cluster_local.py`` and ``test_cluster_schedule.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
from cluster_data import (CHUNK, DELAY_ENV, FRAMES, GOOD, H, KILL_ENV, LONG, LONG_FRAMES,
                          NUM_CHUNKS, REPO, WEIGHTS, W, assert_outputs, cfg_dict, dataset,
                          frame_rows, frames_of, job, open_output, records, reference, run)

from httm_dist.errors import ConfigError
from httm_dist.results import ResultStore

__all__ = ["dataset", "reference"]  # fixtures used here

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


# --------------------------------------------------------------------------- one local job


@pytest.fixture(scope="module")
def local_run(ray_session, dataset, tmp_path_factory) -> dict:
    """The main local job, run once: good scenes, a corrupt and an empty one, and a long
    scene in 4 chunks, on two workers. Each unit takes >= 1 s, so whichever worker starts
    first is still busy when the second one comes up, whatever the actors' start-up jitter.
    Returns ``{"out", "summary", "records"}``."""
    out = tmp_path_factory.mktemp("local-run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DELAY_ENV, "1.0")
        summary = run(job(dataset["root"], out, chunk=CHUNK))
    return {"out": out, "summary": summary, "records": records(out)}


@pytest.fixture(scope="module")
def rerun(local_run, dataset) -> dict:
    """The same job run again over ``local_run``'s output with ``retry_failed: false``."""
    return run(job(dataset["root"], local_run["out"], chunk=CHUNK, retry_failed=False))


def test_local_run_counts_done_and_failed_scenes(local_run):
    s = local_run["summary"]
    assert (s["done"], s["failed"], s["skipped"]) == (4, 2, 0)
    assert s["frames"] == 3 * FRAMES + LONG_FRAMES and s["frames_per_s"] > 0


@pytest.mark.parametrize(
    "scene_id, words",
    [("d_corrupt", ("frame_01.png", "cannot be decoded")), ("e_empty", ("e_empty", "empty"))],
)
def test_local_run_records_each_bad_scene_with_its_error(local_run, scene_id, words):
    errors = {f["scene_id"]: f["error"] for f in local_run["summary"]["failures"]}
    assert set(errors) == {"d_corrupt", "e_empty"}
    assert all(w in errors[scene_id] for w in words), errors[scene_id]
    rec = local_run["records"][scene_id]
    assert rec["status"] == "failed" and rec["error"] == errors[scene_id]


def test_local_run_outputs_equal_the_model_run_directly(local_run, reference):
    assert_outputs(local_run["out"], {}, reference, long_scene=True)


@pytest.mark.parametrize("scene_id", GOOD)
def test_local_run_commits_each_good_scene_with_its_frame_count(local_run, scene_id):
    rec = local_run["records"][scene_id]
    assert rec["status"] == "done" and rec["num_frames"] == FRAMES and rec["attempts"] == 1


def test_local_run_assembles_the_long_scene_from_chunks_on_both_workers(local_run):
    rec, summary = local_run["records"][LONG], local_run["summary"]
    assert rec["status"] == "done" and rec["chunks"] == NUM_CHUNKS
    assert rec["num_frames"] == LONG_FRAMES and len(rec["alignment"]) >= NUM_CHUNKS - 1
    per_worker = [w["units"].get("chunk", 0) for w in summary["worker_units"]]
    assert sum(per_worker) == NUM_CHUNKS and min(per_worker) >= 1, summary["worker_units"]
    # 4 short scenes (3 good, the corrupt one; the empty one fails in the driver), the
    # chunks, one assembly
    assert summary["units_run"] == 4 + NUM_CHUNKS + 1


def test_local_run_prefetches_queued_units(local_run):
    done = [local_run["records"][s] for s in GOOD]
    assert any(r["prefetched"] for r in done), done


def test_local_run_two_workers_ran_units_at_once(local_run):
    summary = local_run["summary"]
    assert summary["workers"] == 2 and summary["max_parallel_units"] == 2
    assert len({w["pid"] for w in summary["worker_units"]}) == 2


def test_local_run_writes_its_run_summary(local_run):
    summary = local_run["summary"]
    run_file = local_run["out"] / "runs" / f"{summary['run_id']}.json"
    written = json.loads(run_file.read_text())
    assert written["done"] == 4 and written["format_version"] == 2
    assert summary["summary_url"] == str(run_file)


def test_rerun_skips_committed_and_kept_failed_scenes(rerun):
    assert (rerun["skipped"], rerun["not_retried"], rerun["done"], rerun["failed"]) == (4, 2, 0, 0)
    assert rerun["units_run"] == 0 and rerun["workers"] == 0


def test_rerun_leaves_committed_records_untouched(local_run, rerun):
    kept = (*GOOD, LONG)
    assert {s: r["run_id"] for s, r in records(local_run["out"]).items() if s in kept} == {
        s: local_run["summary"]["run_id"] for s in kept}


# --------------------------------------------------------------------------- other jobs


def test_s3_job_end_to_end_with_weights_on_s3(ray_session, dataset, reference, s3_bucket):
    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    root = dataset["root"]
    for sid in ("a", "b"):
        fs.put(str(root / sid), f"{bucket[5:]}/in/{sid}", recursive=True)
    fs.put(str(root / "c.tar"), f"{bucket[5:]}/in/c.tar")
    fs.put(str(WEIGHTS), f"{bucket[5:]}/w/tiny.safetensors")

    cfg = job(f"{bucket}/in", f"{bucket}/out", storage_options=opts,
               weights=f"{bucket}/w/tiny.safetensors")
    summary = run(cfg)
    assert summary["done"] == 3 and summary["failed"] == 0, summary["failures"]
    assert_outputs(f"{bucket}/out", opts, reference)
    text = json.dumps(summary)
    assert opts["secret"] not in text.replace('"secret": "***"', "")
    runs = fs.ls(f"{bucket[5:]}/out/runs")
    assert len(runs) == 1 and '"testing"' not in fs.cat(runs[0]).decode()


def test_killed_worker_scene_is_retried_and_every_scene_completes_once(
        ray_session, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ENV, "b")  # the worker running b SIGKILLs itself (1st attempt)
    out = tmp_path / "out"
    summary = run(job(dataset["root"], out, include=list(GOOD)))
    assert summary["done"] == 3 and summary["failed"] == 0, summary["failures"]
    recs = records(out)
    assert sorted(recs) == sorted(GOOD)
    assert recs["b"]["attempts"] == 2
    assert {recs[s]["attempts"] for s in ("a", "c")} == {1}
    assert summary["workers_lost"] == 1 and summary["units_run"] == 4  # b ran twice
    rows = frame_rows(out)
    assert len(rows) == 3 * FRAMES and len(set(rows)) == len(rows)
    assert sorted(p.name for p in (out / "arrays").iterdir()) == [f"{s}.npz" for s in GOOD]


def test_worker_dying_on_every_attempt_fails_only_its_scene(
        ray_session, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ENV, "a")
    out = tmp_path / "out"
    # max_attempts=1: the first death is final for scene a; b still completes.
    summary = run(job(dataset["root"], out, include=["a", "b"], max_attempts=1, workers=1))
    assert summary["done"] == 1 and summary["failed"] == 1
    (failure,) = summary["failures"]
    assert failure["scene_id"] == "a" and "died" in failure["error"]
    recs = records(out)
    assert recs["a"]["status"] == "failed" and recs["b"]["status"] == "done"
    # the driver's failure record names the unit, its frames and the config, like a worker's
    cfg = job(dataset["root"], out)
    assert (recs["a"]["unit"], recs["a"]["num_frames"], recs["a"]["attempts"]) == ("scene", FRAMES, 1)
    assert (recs["a"]["model_hash"], recs["a"]["merge_hash"]) == (cfg.model_hash(), cfg.merge_hash())


def test_worker_that_cannot_start_stops_the_job_with_its_error(ray_session, dataset, tmp_path):
    # Torch here is CPU-only, so a worker asked for CUDA fails in __init__: the driver stops
    # with that error instead of replacing workers forever.
    cfg = job(dataset["root"], tmp_path / "out", include=["a"],
               model={"preset": "tiny", "weights": str(WEIGHTS), "device": "cuda"})
    with pytest.raises(ConfigError, match="workers cannot start: 'model.device' is 'cuda'"):
        run(cfg)
    assert not (tmp_path / "out" / "scenes").exists()


def _driver_subprocess(cfg_path: Path, env: dict, log_path: Path) -> subprocess.Popen:
    """``httm-dist run CONFIG`` in its own process (the command users run), logging to a file
    (a pipe nobody reads could fill up and stall it)."""
    cmd = [sys.executable, "-m", "httm_dist.cli", "run", str(cfg_path), "--no-progress"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def test_killed_driver_resumes_scenes_and_chunks_without_recomputing(
        ray_session, dataset, tmp_path, monkeypatch):
    """Issue 4 (driver killed mid-run) and issue 5 (killed between chunks), in one run."""
    root = dataset["root"]
    include = ["a", "b", LONG]
    out = tmp_path / "out"
    cfg = cfg_dict(root, out, chunk=CHUNK, include=include)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML

    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    env[DELAY_ENV] = "1.0"
    log_path = tmp_path / "driver.log"
    proc = _driver_subprocess(cfg_path, env, log_path)
    store = ResultStore(str(out), {})
    deadline = time.monotonic() + 90
    try:
        # Kill the driver once a scene is committed and a chunk of the long one is done.
        while time.monotonic() < deadline and proc.poll() is None:
            if store.committed() and store.done_chunks(LONG):
                break
            time.sleep(0.05)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {s: r for s, r in store.committed().items()}
    chunks_before = store.done_chunks(LONG)
    assert first and LONG not in first
    assert 1 <= len(chunks_before) < NUM_CHUNKS

    summary = run(job(root, out, chunk=CHUNK, include=include))
    assert summary["failed"] == 0, summary["failures"]
    assert summary["skipped"] == len(first)
    assert summary["done"] == 3 - len(first)
    assert summary["reused_chunks"] == len(chunks_before)
    # Units run now: the uncommitted short scenes, the missing chunks, and the assembly.
    short_left = 2 - len(first)
    assert summary["units_run"] == short_left + (NUM_CHUNKS - len(chunks_before)) + 1

    recs = records(out)
    for sid, rec in first.items():  # committed scenes untouched by the rerun
        assert recs[sid]["run_id"] == rec.run_id != summary["run_id"]
        assert recs[sid]["written_at"] == rec.written_at
    long_rec = recs[LONG]
    assert long_rec["status"] == "done" and long_rec["chunks"] == NUM_CHUNKS
    rows = frame_rows(out)
    assert frames_of(rows, LONG) == list(range(LONG_FRAMES))
    assert len(rows) == LONG_FRAMES + 2 * FRAMES
    assert not store.done_chunks(LONG)  # chunk results cleaned up after the commit
    assert open_output(out).arrays(LONG)["depth"].shape == (LONG_FRAMES, H, W)




OOM_ENV = "HTTM_DIST_TEST_OOM_OVER_FRAMES"


def test_out_of_memory_re_plans_the_scene_in_smaller_chunks(ray_session, dataset, tmp_path, monkeypatch):
    """Issue 14: a unit too big for its worker's memory is re-planned in chunks of half its
    frames, not retried as it was; a scene that fits runs once."""
    monkeypatch.setenv(OOM_ENV, "5")  # any unit of more than 5 frames runs out of memory
    out = tmp_path / "out"
    # the long scene (10 frames) runs whole (max_frames null), OOMs, becomes 3 chunks of <= 5
    summary = run(job(dataset["root"], out, include=["a", LONG], chunk={"max_frames": None, "overlap": 2}))
    assert summary["done"] == 2 and summary["failed"] == 0, summary["failures"]
    assert summary["replanned"] == [{"scene_id": LONG, "max_frames": 5, "chunks": 3}]
    recs = records(out)
    assert recs[LONG]["status"] == "done" and recs[LONG]["chunks"] == 3
    assert recs["a"]["attempts"] == 1
    assert summary["units_run"] == 1 + 1 + 3 + 1  # a, the whole long scene, 3 chunks, assembly
    rows = frame_rows(out)
    assert frames_of(rows, LONG) == list(range(LONG_FRAMES)) and len(rows) == LONG_FRAMES + FRAMES
