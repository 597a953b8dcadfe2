"""The cluster room without Ray: planning, progress, worker sizing, and the worker actor's
fault sorting run in-process. (The dispatch policy is in ``test_cluster_schedule.py``; jobs
on Ray are in ``test_cluster_jobs.py``.)"""

from __future__ import annotations

import io
import json
import logging
import os
import time

import pytest
import torch
from cluster_data import FRAMES, GOOD, cfg_dict, dataset, job

import httm_dist.cluster.driver as driver
import httm_dist.cluster.jobenv as jobenv
from httm_dist.cluster.driver import max_overlap, run_job
from httm_dist.cluster.plan import plan_work
from httm_dist.cluster.progress import JobProgress
from httm_dist.cluster.worker import ReconstructionWorker, WorkerFault
from httm_dist.config import load_config
from httm_dist.data import discover_scenes
from httm_dist.errors import ConfigError
from httm_dist.pipeline.unit import WorkUnit, plan_units
from httm_dist.results import ResultStore

__all__ = ["dataset"]  # fixtures used here

pytestmark = pytest.mark.timeout(240)


def test_bad_config_fails_before_any_work(dataset, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="workerz"):
        load_config(cfg_dict(dataset["root"], out, workerz=2))
    with pytest.raises(ConfigError, match="model.weights"):
        run_job(job(dataset["root"], out, weights=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ConfigError, match="input"):
        run_job(job(tmp_path / "nowhere", out))
    assert not out.exists() or not any(out.rglob("*.json"))


def test_config_change_is_refused_or_reprocessed_per_policy(dataset, tmp_path):
    out = tmp_path / "out"
    (out / "scenes").mkdir(parents=True)
    old = {"scene_id": "a", "status": "done", "model_hash": "an-older-model", "merge_hash": "x"}
    (out / "scenes" / "a.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"1 committed scene.*on_config_change: reprocess"):
        run_job(job(dataset["root"], out, include=list(GOOD)), progress=False)
    assert not (out / "runs").exists()  # refused before any work

    cfg = job(dataset["root"], out, include=list(GOOD), on_config_change="reprocess")
    plan = plan_work(cfg, ResultStore(str(out), {}), "run-x")
    assert sorted(u.scene_id for u in plan.queue) == sorted(GOOD) and not plan.skipped
    same = dict(old, model_hash=cfg.model_hash(), merge_hash=cfg.merge_hash())
    (out / "scenes" / "a.json").write_text(json.dumps(same))
    plan = plan_work(cfg, ResultStore(str(out), {}), "run-y")
    assert sorted(u.scene_id for u in plan.queue) == ["b", "c"] and plan.skipped == ["a"]


def test_scenes_that_no_worker_can_process_fail_in_the_driver_without_ray(dataset, tmp_path,
                                                                        monkeypatch, caplog):
    """An empty scene, or one below min_frames, is known at discovery: the driver records
    its failure and, when nothing else is left, never connects to Ray (no worker start-up
    just to fail it). Its log lines name the scene once."""
    out = tmp_path / "out"

    def no_ray(cfg):
        raise AssertionError("the driver connected to Ray for scenes no worker can process")

    monkeypatch.setattr(driver, "_connect", no_ray)
    with caplog.at_level("WARNING", logger="httm_dist.cluster"):
        summary = run_job(job(dataset["root"], out, include=["e_empty", "a"], min_frames=FRAMES + 1),
                          progress=False)
    lines = [r.getMessage() for r in caplog.records if "'e_empty'" in r.getMessage()]
    assert len(lines) == 2 and all(line.count("'e_empty'") == 1 for line in lines), lines
    errors = {f["scene_id"]: f["error"] for f in summary["failures"]}
    assert summary["failed"] == 2 and summary["done"] == 0 and summary["units_run"] == 0
    assert "'e_empty' is empty" in errors["e_empty"]
    assert f"fewer than min_frames={FRAMES + 1}" in errors["a"]
    recs = ResultStore(str(out), {}).records()
    assert {sid: (r.status, r.error) for sid, r in recs.items()} == {
        sid: ("failed", err) for sid, err in errors.items()}


def test_a_run_removes_temporary_files_that_killed_writers_left(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    stale = out / "_tmp" / ".x.npz.0123.tmp"
    stale.write_bytes(b"half an npz")
    os.utime(stale, (time.time() - 3600,) * 2)
    monkeypatch.setattr(driver, "_connect", lambda cfg: pytest.fail("no unit needs Ray here"))
    run_job(job(dataset["root"], out, include=["e_empty"]), progress=False)
    assert list((out / "_tmp").iterdir()) == []


@pytest.mark.parametrize("output, refused", [
    ("./my-out", True), ("file://my-out", True), ("{tmp}/out", False), ("s3://bucket/out", False)])
def test_relative_output_is_refused_inside_a_ray_job_working_dir(dataset, tmp_path, monkeypatch,
                                                                output, refused):
    """Under ``ray job submit --working-dir .`` the job runs in Ray's temporary copy of the
    folder: a relative output would be written there and deleted with the session."""
    monkeypatch.chdir(tmp_path)
    cfg = job(dataset["root"], output.format(tmp=tmp_path), include=["e_empty"])
    jobenv.check_paths_in_job_working_dir(cfg)  # not in a Ray job: any output goes
    monkeypatch.setenv(jobenv.RAY_JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}))
    if refused:
        with pytest.raises(ConfigError, match=r"output .*relative path.*--working-dir.*absolute path"):
            run_job(cfg, progress=False)
        assert not (tmp_path / "my-out").exists()  # refused before the output is probed
    else:
        jobenv.check_paths_in_job_working_dir(cfg)
    monkeypatch.setenv(jobenv.RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))
    jobenv.check_paths_in_job_working_dir(cfg)  # a job without --working-dir


def test_relative_input_missing_from_a_ray_job_working_dir_says_why(dataset, tmp_path, monkeypatch):
    """Ray leaves what git ignores (the README's ./my-scenes, the demo's ./httm-demo) out of the
    working dir's copy: the error says so instead of only 'does not exist'."""
    monkeypatch.chdir(dataset["root"].parent)
    monkeypatch.setenv(jobenv.RAY_JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
    jobenv.check_paths_in_job_working_dir(job("./scenes", tmp_path / "out"))  # copied: fine
    with pytest.raises(ConfigError, match=r"input './my-scenes' is a relative path missing.*git ignores"):
        jobenv.check_paths_in_job_working_dir(job("./my-scenes", tmp_path / "out"))


def test_max_overlap_counts_units_running_at_once():
    assert max_overlap([]) == 0
    assert max_overlap([(0.0, 1.0), (1.0, 2.0)]) == 1  # touching, not overlapping
    assert max_overlap([(0.0, 2.0), (1.0, 3.0), (1.5, 1.6), (2.5, 4.0)]) == 3


def test_progress_logs_lines_when_not_on_a_terminal(caplog):
    stream = io.StringIO()  # not a TTY: no bar, log lines
    bar = JobProgress(3, interval_s=3600, stream=stream)
    with caplog.at_level("INFO", logger="httm_dist.cluster.progress"):
        bar.scene_finished(True, frames=5)
        bar.scene_finished(False)
        assert not caplog.records  # the interval has not passed
        bar.scene_finished(True, frames=7)  # the last scene forces a line
    bar.close()
    assert stream.getvalue() == ""
    (line,) = [r.getMessage() for r in caplog.records]
    assert "2/3 scenes done, 1 failed, 12 frames" in line and "left" not in line
    assert (bar.done, bar.failed, bar.frames) == (2, 1, 12)


@pytest.mark.parametrize("elapsed, left", [(40.0, "about 80 s left"), (600.0, "about 20 min left"),
                                           (3600.0, "about 2.0 h left")])
def test_progress_lines_estimate_the_time_left_for_overnight_logs(caplog, elapsed, left):
    bar = JobProgress(3, interval_s=0, stream=io.StringIO())
    bar.started -= elapsed  # one scene of three took `elapsed`: two more take twice as long
    with caplog.at_level("INFO", logger="httm_dist.cluster.progress"):
        bar.scene_finished(True, frames=4)
    assert caplog.records[-1].getMessage().endswith(f" s, {left}")


def test_scenes_failed_at_planning_do_not_speed_up_the_estimate(caplog):
    """100 scenes failed at planning (t = 0) then one took 10 min: 99 more take 16.5 h, not
    the 10 min a pace over 101 'finished' scenes would say."""
    bar = JobProgress(200, failed_at_start=100, interval_s=0, stream=io.StringIO())
    bar.started -= 600
    with caplog.at_level("INFO", logger="httm_dist.cluster.progress"):
        bar.scene_finished(True, frames=4)
    assert caplog.records[-1].getMessage().endswith("1/200 scenes done, 100 failed, 4 frames, "
                                                     f"{4 / bar.elapsed:.2f} frames/s, 600 s, about 16.5 h left")


def test_worker_sorts_scene_faults_from_worker_faults(dataset, tmp_path, monkeypatch, caplog):
    """In-process (no Ray): a scene's own error becomes a failed record (and a failure record
    in the store), logged naming the scene once; out of memory raises WorkerFault so the driver
    replaces the worker."""
    out = tmp_path / "out"
    cfg = job(dataset["root"], out)
    scenes = {s.scene_id: s for s in discover_scenes(str(dataset["root"]))}
    worker = ReconstructionWorker.__ray_actor_class__(cfg, "run-w")
    unit_a, unit_b = (plan_units(scenes[s], cfg)[0] for s in ("a", "b"))

    worker.prefetch(unit_b)  # decoded in the background while a runs
    assert worker.process(unit_a, 1).status == "done"
    rec_b = worker.process(unit_b, 1)
    assert rec_b.status == "done" and rec_b.prefetched is True

    caplog.set_level(logging.WARNING, logger="httm_dist.cluster.worker")
    bad = worker.process(plan_units(scenes["d_corrupt"], cfg)[0], 1)
    assert bad.status == "failed" and "frame_01.png" in bad.error
    assert bad.error.startswith("scene 'd_corrupt': image ")  # the record alone names the scene
    (line,) = [r.getMessage() for r in caplog.records
               if r.name == "httm_dist.cluster.worker" and r.levelno >= logging.WARNING]
    assert line == "scene 'd_corrupt' failed: " + bad.error[len("scene 'd_corrupt': "):]
    written = ResultStore(str(out), {}).record("d_corrupt")
    assert written.status == "failed" and written.run_id == "run-w"
    assert (written.unit, written.num_frames, written.model_hash) == ("scene", FRAMES, cfg.model_hash())

    def boom(loaded):
        raise ValueError("a bug in the model")

    monkeypatch.setattr(worker.runner, "run", boom)
    rec = worker.process(unit_a, 2)
    assert rec.status == "failed" and rec.error == "ValueError: a bug in the model"
    assert rec.attempts == 2

    def oom(loaded):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(worker.runner, "run", oom)
    with pytest.raises(WorkerFault, match="out of memory on scene 'a'"):
        worker.process(unit_a, 3)


@pytest.mark.parametrize(
    "resources, overrides, n_units, expected",
    [
        ({"GPU": 2, "CPU": 2}, {}, 10, (2, 1.0)),  # default: one worker per GPU
        ({"CPU": 8}, {}, 10, (1, 0.0)),  # no GPU: one CPU worker
        ({"GPU": 2, "CPU": 8}, {"workers": 5}, 10, (2, 1.0)),  # capped at what fits
        ({"GPU": 2, "CPU": 8}, {"gpus_per_worker": 0.5}, 10, (4, 0.5)),  # fractional GPUs
        ({"GPU": 2, "CPU": 8}, {}, 1, (1, 1.0)),  # never more workers than units
        ({"GPU": 8, "CPU": 4}, {"cpus_per_worker": 2}, 10, (2, 1.0)),  # CPUs limit too
    ],
)
def test_worker_count_follows_config_and_cluster(monkeypatch, tmp_path, resources, overrides,
                                                 n_units, expected):
    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: dict(resources))
    cfg = job(tmp_path, tmp_path / "out", **overrides)
    assert driver._worker_count(cfg, n_units) == expected


def test_worker_count_refuses_workers_the_cluster_cannot_place(monkeypatch, tmp_path):
    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"GPU": 1, "CPU": 2})
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        driver._worker_count(job(tmp_path, tmp_path / "o", cpus_per_worker=4), 3)
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        driver._worker_count(job(tmp_path, tmp_path / "o", gpus_per_worker=2), 3)


def test_progress_draws_a_bar_on_a_terminal(caplog):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    bar = JobProgress(2, stream=stream)
    with caplog.at_level("INFO", logger="httm_dist.cluster.progress"):
        bar.scene_finished(True, frames=4)
        bar.scene_finished(True, frames=4)
    bar.close()
    assert "2/2" in stream.getvalue() and "frames=8" in stream.getvalue()
    assert not caplog.records  # the bar replaces the log lines


def test_saved_chunks_are_reused_only_under_the_same_plan(dataset, tmp_path):
    """A chunk saved under another chunk size (an auto size on another GPU, an out-of-memory
    re-plan) covers other frames: resume redoes it instead of assembling mismatched chunks."""
    import numpy as np
    from cluster_data import CHUNK, LONG

    out = tmp_path / "out"
    store = ResultStore(str(out), {})
    cfg = job(dataset["root"], out, include=[LONG], chunk=CHUNK)
    store.write_chunk(LONG, 0, {"depth": np.zeros(1, np.float32)},
                      {"frame_range": [0, 4], "model_hash": cfg.model_hash(), "merge_hash": cfg.merge_hash()})
    same = plan_work(cfg, store, "r1")
    assert same.reused_chunks == 1 and 0 not in same.scenes[LONG].waiting_chunks
    other = plan_work(job(dataset["root"], out, include=[LONG], chunk={"max_frames": 6, "overlap": 2}),
                      store, "r2")
    assert other.reused_chunks == 0 and 0 in other.scenes[LONG].waiting_chunks


def test_worker_prefetch_of_a_replaced_chunk_is_not_used_for_its_re_plan(dataset, tmp_path):
    """After an out-of-memory re-plan a chunk keeps its unit_id (``l_long#chunk-001``) but
    covers other frames: the worker must run the new unit's frames, not the old prefetch."""
    from cluster_data import LONG, LONG_FRAMES

    cfg = job(dataset["root"], tmp_path / "out", include=[LONG])
    scene = {s.scene_id: s for s in discover_scenes(str(dataset["root"]))}[LONG]
    worker = ReconstructionWorker.__ray_actor_class__(cfg, "run-p")
    old = WorkUnit(scene, "chunk", 1, (4, LONG_FRAMES), 2)
    new = WorkUnit(scene, "chunk", 1, (2, 5), 4)
    assert old.unit_id == new.unit_id and old != new
    worker.prefetch(old)
    worker.prefetch(new)
    loaded = worker._take_loaded(new, {})
    assert list(loaded.frame_indices) == [2, 3, 4]


def test_worker_records_a_failed_commit_with_its_own_error(dataset, tmp_path, monkeypatch):
    """A commit that raises (storage gone, a bad table) is a failed record naming that error,
    not a crash of the worker's failure path."""
    cfg = job(dataset["root"], tmp_path / "out")
    scene = {s.scene_id: s for s in discover_scenes(str(dataset["root"]))}["a"]
    worker = ReconstructionWorker.__ray_actor_class__(cfg, "run-c")

    def broken_commit(*args, **kwargs):
        raise OSError("the bucket went away")

    monkeypatch.setattr(worker.publisher, "commit", broken_commit)
    rec = worker.process(plan_units(scene, cfg)[0], 1)
    assert rec.status == "failed" and rec.error == "OSError: the bucket went away"
    assert rec.finished_at is not None and rec.finished_at >= rec.started_at
