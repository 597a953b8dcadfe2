"""The Ray runtime end to end: workers, driver, resume and faults (issues 4 and 5).

Every test runs the real driver on the suite's Ray session (2 CPUs, 2 logical GPUs: two
workers) with the tiny model on tiny synthetic images, so the whole file stays well under a
few minutes on two cores. Tests that must catch a run in flight use the workers' test-only
hooks (``HTTM_DIST_TEST_UNIT_DELAY_S``, ``HTTM_DIST_TEST_KILL_SCENE``; see
``httm_dist.cluster.worker``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from httm_dist.errors import ConfigError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

H, W, SIZE = 42, 56, 56  # frames 56x42 -> model input 56x42 (4x3 patches)
FRAMES = 3
GOOD = ("a", "b", "c")  # c is a .tar archive
LONG, LONG_FRAMES = "l_long", 10  # with CHUNK: 4 overlapping chunks of 4 frames
CHUNK = {"max_frames": 4, "overlap": 2}
NUM_CHUNKS = 4
REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "tests" / "fixtures" / "vggt_tiny" / "weights.safetensors"
DELAY_ENV = "HTTM_DIST_TEST_UNIT_DELAY_S"
KILL_ENV = "HTTM_DIST_TEST_KILL_SCENE"
OOM_ENV = "HTTM_DIST_TEST_OOM_OVER_FRAMES"


# --------------------------------------------------------------------------- data


def _encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _frames(seed: int, n: int = FRAMES) -> list[bytes]:
    from httm_dist.eval.synthetic import render_scene

    return [_encode(im) for im in render_scene(n, H, W, seed=seed).images]


def _write_folder(path: Path, blobs: list[bytes], ext: str = "png") -> None:
    path.mkdir(parents=True)
    for i, blob in enumerate(blobs):
        (path / f"frame_{i:02d}.{ext}").write_bytes(blob)


def _write_tar(path: Path, blobs: list[bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"c/frame_{i:02d}.png")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Scenes a, b (folders), c (.tar), a corrupt image, an empty scene, a long scene."""
    root = tmp_path_factory.mktemp("cluster") / "scenes"
    blobs = {sid: _frames(seed) for seed, sid in enumerate(GOOD)}
    _write_folder(root / "a", blobs["a"])
    _write_folder(root / "b", blobs["b"])
    root.mkdir(exist_ok=True)
    _write_tar(root / "c.tar", blobs["c"])
    bad = _frames(7)
    bad[1] = b"\x89PNG\r\n\x1a\n this is not an image"
    _write_folder(root / "d_corrupt", bad)
    (root / "e_empty").mkdir()
    (root / "e_empty" / "notes.txt").write_text("no images here")
    _write_folder(root / LONG, _frames(11, n=LONG_FRAMES))
    return {"root": root, "blobs": blobs}


@pytest.fixture(scope="module")
def reference(dataset) -> dict:
    """The tiny model run directly (no Ray, no pipeline) on each good scene's images."""
    import torch

    from httm_dist.config import load_config
    from httm_dist.merging import apply_merging
    from httm_dist.model import load_vggt
    from httm_dist.model.geometry import pose_encoding_to_extri_intri
    from httm_dist.model.preprocess import load_and_preprocess_images

    cfg = load_config(_cfg_dict("in", "out"))
    model = apply_merging(load_vggt("tiny", weights=str(WEIGHTS), device="cpu"), cfg.merging)
    model.eval()
    out = {}
    for sid, blobs in dataset["blobs"].items():
        images = load_and_preprocess_images(blobs, mode="crop", target_size=SIZE)
        with torch.inference_mode():
            pred = model(images)
            ext, intr = pose_encoding_to_extri_intri(pred["pose_enc"], images.shape[-2:])
        out[sid] = {
            "depth": pred["depth"][0, ..., 0].numpy(),
            "depth_conf": pred["depth_conf"][0].numpy(),
            "world_points": pred["world_points"][0].numpy(),
            "world_points_conf": pred["world_points_conf"][0].numpy(),
            "extrinsic": ext[0].numpy(),
            "intrinsic": intr[0].numpy(),
        }
    return out


def _cfg_dict(input_url: str, output_url: str, storage_options: dict | None = None,
              weights: str | None = None, **top) -> dict:
    data = {
        "input": str(input_url),
        "output": str(output_url),
        "storage_options": storage_options or {},
        "model": {"preset": "tiny", "weights": weights or str(WEIGHTS), "device": "cpu"},
        "image": {"mode": "crop", "size": SIZE},
        "cpus_per_worker": 1,
        "max_attempts": 3,
    }
    data.update(top)
    return data


def _job(input_url, output_url, **kw):
    from httm_dist.config import load_config

    return load_config(_cfg_dict(input_url, output_url, **kw))


def _run(cfg, **kw) -> dict:
    from httm_dist.cluster.driver import run_job

    return run_job(cfg, progress=False, **kw)


def _open(output_url, storage_options=None):
    import httm_dist.results as results

    return results.open(str(output_url), storage_options or {})


def _records(output_url, storage_options=None) -> dict:
    recs = _open(output_url, storage_options).records()
    if isinstance(recs, dict):
        return recs
    return {r["scene_id"]: r for r in recs}


def _frame_rows(output_url, storage_options=None) -> list[tuple[str, int]]:
    """(scene_id, frame_index) of every row of the frame table."""
    table = _open(output_url, storage_options).frames(columns=["scene_id", "frame_index"])
    return list(zip(table.column("scene_id").to_pylist(), table.column("frame_index").to_pylist()))


def _frames_of(rows: list[tuple[str, int]], scene_id: str) -> list[int]:
    return sorted(i for s, i in rows if s == scene_id)


def _assert_outputs(output_url, storage_options, reference, long_scene: bool = False) -> None:
    """Right rows and shapes; arrays equal the direct model within float16 precision; the
    long (chunked) scene, if any, has every frame exactly once."""
    reader = _open(output_url, storage_options)
    assert sorted(reader.scene_ids) == sorted(GOOD + ((LONG,) if long_scene else ()))
    rows = _frame_rows(output_url, storage_options)
    assert len(rows) == FRAMES * len(GOOD) + (LONG_FRAMES if long_scene else 0)
    assert len(set(rows)) == len(rows)  # no duplicate (scene, frame)
    if long_scene:
        assert _frames_of(rows, LONG) == list(range(LONG_FRAMES))
        assert reader.arrays(LONG)["depth"].shape == (LONG_FRAMES, H, W)
    for sid in GOOD:
        assert _frames_of(rows, sid) == list(range(FRAMES)), sid
        arrays = reader.arrays(sid)
        ref = reference[sid]
        assert arrays["depth"].shape == (FRAMES, H, W)
        assert arrays["world_points"].shape == (FRAMES, H, W, 3)
        assert arrays["extrinsic"].shape == (FRAMES, 3, 4)
        assert arrays["intrinsic"].shape == (FRAMES, 3, 3)
        for key, value in ref.items():
            got = np.asarray(arrays[key], dtype=np.float32)
            # float16 storage: relative rounding <= 2**-11; allow for it plus tiny fp noise.
            # (the untrained tiny model may predict a zero fov: an infinite focal, on both
            # sides; assert_allclose requires infinities to match exactly)
            scale = float(np.abs(value[np.isfinite(value)]).max())
            np.testing.assert_allclose(got, value, rtol=2e-3, atol=1e-4 * scale + 1e-6,
                                       err_msg=f"{sid}/{key}")


# --------------------------------------------------------------------------- tests


def test_local_job_end_to_end_with_bad_scenes_on_two_parallel_workers(
        ray_session, dataset, reference, tmp_path, monkeypatch):
    # Each unit takes >= 1 s, so whichever worker starts first is still busy when the
    # second one comes up, whatever the actors' start-up jitter.
    monkeypatch.setenv(DELAY_ENV, "1.0")
    out = tmp_path / "out"
    summary = _run(_job(dataset["root"], out, chunk=CHUNK))

    assert summary["done"] == 4 and summary["failed"] == 2 and summary["skipped"] == 0
    errors = {f["scene_id"]: f["error"] for f in summary["failures"]}
    assert set(errors) == {"d_corrupt", "e_empty"}
    assert "frame_01.png" in errors["d_corrupt"] and "cannot be decoded" in errors["d_corrupt"]
    assert "e_empty" in errors["e_empty"] and "empty" in errors["e_empty"]
    assert summary["frames"] == 3 * FRAMES + LONG_FRAMES and summary["frames_per_s"] > 0
    _assert_outputs(out, {}, reference, long_scene=True)

    records = _records(out)
    assert records["d_corrupt"]["status"] == "failed"
    assert records["d_corrupt"]["error"] == errors["d_corrupt"]
    assert records["e_empty"]["status"] == "failed"
    done = [records[s] for s in GOOD]
    assert all(r["status"] == "done" and r["num_frames"] == FRAMES for r in done)

    # The long scene ran as 4 chunks spread over both workers, then one assembly.
    long_rec = records[LONG]
    assert long_rec["status"] == "done" and long_rec["chunks"] == NUM_CHUNKS
    assert long_rec["num_frames"] == LONG_FRAMES and len(long_rec["alignment"]) >= NUM_CHUNKS - 1
    per_worker = [w["units"].get("chunk", 0) for w in summary["worker_units"]]
    assert sum(per_worker) == NUM_CHUNKS and min(per_worker) >= 1, summary["worker_units"]
    assert summary["units_run"] == 5 + NUM_CHUNKS + 1

    # I/O overlapped compute: units queued behind a running one had their images prefetched.
    assert any(r["prefetched"] for r in done), done

    # Two workers (one per logical GPU, distinct processes) had units in flight at once.
    assert summary["workers"] == 2 and summary["max_parallel_units"] == 2
    assert len({w["pid"] for w in summary["worker_units"]}) == 2

    # The run summary was written, without the (fake) credentials.
    run_file = out / "runs" / f"{summary['run_id']}.json"
    assert json.loads(run_file.read_text())["done"] == 4

    # A rerun skips the committed scenes and, with retry_failed off, the failed ones too.
    again = _run(_job(dataset["root"], out, chunk=CHUNK, retry_failed=False))
    assert again["skipped"] == 4 and again["not_retried"] == 2 and again["done"] == 0
    assert again["failed"] == 0 and again["units_run"] == 0 and again["workers"] == 0
    kept = (*GOOD, LONG)
    assert {s: r["run_id"] for s, r in _records(out).items() if s in kept} == {
        s: summary["run_id"] for s in kept}


def test_s3_job_end_to_end_with_weights_on_s3(ray_session, dataset, reference, s3_bucket):
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    root = dataset["root"]
    for sid in ("a", "b"):
        fs.put(str(root / sid), f"{bucket[5:]}/in/{sid}", recursive=True)
    fs.put(str(root / "c.tar"), f"{bucket[5:]}/in/c.tar")
    fs.put(str(WEIGHTS), f"{bucket[5:]}/w/tiny.safetensors")

    cfg = _job(f"{bucket}/in", f"{bucket}/out", storage_options=opts,
               weights=f"{bucket}/w/tiny.safetensors")
    summary = _run(cfg)
    assert summary["done"] == 3 and summary["failed"] == 0, summary["failures"]
    _assert_outputs(f"{bucket}/out", opts, reference)
    text = json.dumps(summary)
    assert opts["secret"] not in text.replace('"secret": "***"', "")
    runs = fs.ls(f"{bucket[5:]}/out/runs")
    assert len(runs) == 1 and '"testing"' not in fs.cat(runs[0]).decode()


def test_killed_worker_scene_is_retried_and_every_scene_completes_once(
        ray_session, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ENV, "b")  # the worker running b SIGKILLs itself (1st attempt)
    out = tmp_path / "out"
    summary = _run(_job(dataset["root"], out, include=list(GOOD)))
    assert summary["done"] == 3 and summary["failed"] == 0, summary["failures"]
    records = _records(out)
    assert sorted(records) == sorted(GOOD)
    assert records["b"]["attempts"] == 2
    assert {records[s]["attempts"] for s in ("a", "c")} == {1}
    assert summary["workers_lost"] == 1 and summary["units_run"] == 4  # b ran twice
    rows = _frame_rows(out)
    assert len(rows) == 3 * FRAMES and len(set(rows)) == len(rows)
    assert sorted(p.name for p in (out / "arrays").iterdir()) == [f"{s}.npz" for s in GOOD]


def test_out_of_memory_re_plans_the_scene_in_smaller_chunks(ray_session, dataset, tmp_path, monkeypatch):
    """Issue 14: a unit too big for its worker's memory is re-planned in chunks of half its
    frames, not retried as it was; a scene that fits runs once."""
    monkeypatch.setenv(OOM_ENV, "5")  # any unit of more than 5 frames runs out of memory
    out = tmp_path / "out"
    # the long scene (10 frames) runs whole (max_frames null), OOMs, becomes 3 chunks of <= 5
    summary = _run(_job(dataset["root"], out, include=["a", LONG], chunk={"max_frames": None, "overlap": 2}))
    assert summary["done"] == 2 and summary["failed"] == 0, summary["failures"]
    assert summary["replanned"] == [{"scene_id": LONG, "max_frames": 5, "chunks": 3}]
    records = _records(out)
    assert records[LONG]["status"] == "done" and records[LONG]["chunks"] == 3
    assert records["a"]["attempts"] == 1
    assert summary["units_run"] == 1 + 1 + 3 + 1  # a, the whole long scene, 3 chunks, assembly
    rows = _frame_rows(out)
    assert _frames_of(rows, LONG) == list(range(LONG_FRAMES)) and len(rows) == LONG_FRAMES + FRAMES


def test_worker_dying_on_every_attempt_fails_only_its_scene(
        ray_session, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ENV, "a")
    out = tmp_path / "out"
    # max_attempts=1: the first death is final for scene a; b still completes.
    summary = _run(_job(dataset["root"], out, include=["a", "b"], max_attempts=1, workers=1))
    assert summary["done"] == 1 and summary["failed"] == 1
    (failure,) = summary["failures"]
    assert failure["scene_id"] == "a" and "died" in failure["error"]
    records = _records(out)
    assert records["a"]["status"] == "failed" and records["b"]["status"] == "done"
    # the driver's failure record names the unit, its frames and the config, like a worker's
    cfg = _job(dataset["root"], out)
    assert (records["a"]["unit"], records["a"]["num_frames"], records["a"]["attempts"]) == ("scene", FRAMES, 1)
    assert (records["a"]["model_hash"], records["a"]["merge_hash"]) == (cfg.model_hash(), cfg.merge_hash())


def test_bad_config_fails_before_any_work(dataset, tmp_path):
    from httm_dist.cluster.driver import run_job
    from httm_dist.config import load_config

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="workerz"):
        load_config(_cfg_dict(dataset["root"], out, workerz=2))
    with pytest.raises(ConfigError, match="model.weights"):
        run_job(_job(dataset["root"], out, weights=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ConfigError, match="input"):
        run_job(_job(tmp_path / "nowhere", out))
    assert not out.exists() or not any(out.rglob("*.json"))


def test_worker_that_cannot_start_stops_the_job_with_its_error(ray_session, dataset, tmp_path):
    from httm_dist.cluster.driver import run_job

    # Torch here is CPU-only, so a worker asked for CUDA fails in __init__: the driver stops
    # with that error instead of replacing workers forever.
    cfg = _job(dataset["root"], tmp_path / "out", include=["a"],
               model={"preset": "tiny", "weights": str(WEIGHTS), "device": "cuda"})
    with pytest.raises(ConfigError, match="workers cannot start: 'model.device' is 'cuda'"):
        run_job(cfg, progress=False)
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
    from httm_dist.results import ResultStore

    root = dataset["root"]
    include = ["a", "b", LONG]
    out = tmp_path / "out"
    cfg = _cfg_dict(root, out, chunk=CHUNK, include=include)
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

    summary = _run(_job(root, out, chunk=CHUNK, include=include))
    assert summary["failed"] == 0, summary["failures"]
    assert summary["skipped"] == len(first)
    assert summary["done"] == 3 - len(first)
    assert summary["reused_chunks"] == len(chunks_before)
    # Units run now: the uncommitted short scenes, the missing chunks, and the assembly.
    short_left = 2 - len(first)
    assert summary["units_run"] == short_left + (NUM_CHUNKS - len(chunks_before)) + 1

    records = _records(out)
    for sid, rec in first.items():  # committed scenes untouched by the rerun
        assert records[sid]["run_id"] == rec.run_id != summary["run_id"]
        assert records[sid]["written_at"] == rec.written_at
    long_rec = records[LONG]
    assert long_rec["status"] == "done" and long_rec["chunks"] == NUM_CHUNKS
    rows = _frame_rows(out)
    assert _frames_of(rows, LONG) == list(range(LONG_FRAMES))
    assert len(rows) == LONG_FRAMES + 2 * FRAMES
    assert not store.done_chunks(LONG)  # chunk results cleaned up after the commit
    assert _open(out).arrays(LONG)["depth"].shape == (LONG_FRAMES, H, W)


def test_config_change_is_refused_or_reprocessed_per_policy(dataset, tmp_path):
    from httm_dist.cluster.driver import run_job
    from httm_dist.cluster.plan import plan_work
    from httm_dist.results import ResultStore

    out = tmp_path / "out"
    (out / "scenes").mkdir(parents=True)
    old = {"scene_id": "a", "status": "done", "model_hash": "an-older-model", "merge_hash": "x"}
    (out / "scenes" / "a.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"1 committed scene.*on_config_change: reprocess"):
        run_job(_job(dataset["root"], out, include=list(GOOD)), progress=False)
    assert not (out / "runs").exists()  # refused before any work

    cfg = _job(dataset["root"], out, include=list(GOOD), on_config_change="reprocess")
    plan = plan_work(cfg, ResultStore(str(out), {}), "run-x")
    assert sorted(u.scene_id for u in plan.queue) == sorted(GOOD) and not plan.skipped
    same = dict(old, model_hash=cfg.model_hash(), merge_hash=cfg.merge_hash())
    (out / "scenes" / "a.json").write_text(json.dumps(same))
    plan = plan_work(cfg, ResultStore(str(out), {}), "run-y")
    assert sorted(u.scene_id for u in plan.queue) == ["b", "c"] and plan.skipped == ["a"]


def test_saved_chunks_are_reused_only_under_the_same_plan(dataset, tmp_path):
    """A chunk saved under another chunk size (an auto size on another GPU, an out-of-memory
    re-plan) covers other frames: resume redoes it instead of assembling mismatched chunks."""
    from httm_dist.cluster.plan import plan_work
    from httm_dist.results import ResultStore

    out = tmp_path / "out"
    store = ResultStore(str(out), {})
    store.write_chunk(LONG, 0, {"depth": np.zeros(1, np.float32)}, {"frame_range": [0, 4]})
    same = plan_work(_job(dataset["root"], out, include=[LONG], chunk=CHUNK), store, "r1")
    assert same.reused_chunks == 1 and 0 not in same.scenes[LONG].waiting_chunks
    other = plan_work(_job(dataset["root"], out, include=[LONG], chunk={"max_frames": 6, "overlap": 2}),
                       store, "r2")
    assert other.reused_chunks == 0 and 0 in other.scenes[LONG].waiting_chunks


def test_max_overlap_counts_units_running_at_once():
    from httm_dist.cluster.driver import max_overlap

    assert max_overlap([]) == 0
    assert max_overlap([(0.0, 1.0), (1.0, 2.0)]) == 1  # touching, not overlapping
    assert max_overlap([(0.0, 2.0), (1.0, 3.0), (1.5, 1.6), (2.5, 4.0)]) == 3


def test_progress_logs_lines_when_not_on_a_terminal(caplog):
    from httm_dist.cluster.progress import JobProgress

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
    assert "2/3 scenes done, 1 failed, 12 frames" in line
    assert (bar.done, bar.failed, bar.frames) == (2, 1, 12)


def test_worker_sorts_scene_faults_from_worker_faults(dataset, tmp_path, monkeypatch):
    """In-process (no Ray): a scene's own error becomes a failed record (and a failure record
    in the store); out of memory raises WorkerFault so the driver replaces the worker."""
    import torch

    from httm_dist.cluster.worker import ReconstructionWorker, WorkerFault
    from httm_dist.data import discover_scenes
    from httm_dist.pipeline.unit import plan_units
    from httm_dist.results import ResultStore

    out = tmp_path / "out"
    cfg = _job(dataset["root"], out)
    scenes = {s.scene_id: s for s in discover_scenes(str(dataset["root"]))}
    worker = ReconstructionWorker.__ray_actor_class__(cfg, "run-w")
    unit_a, unit_b = (plan_units(scenes[s], cfg)[0] for s in ("a", "b"))

    worker.prefetch(unit_b)  # decoded in the background while a runs
    assert worker.process(unit_a, 1).status == "done"
    rec_b = worker.process(unit_b, 1)
    assert rec_b.status == "done" and rec_b.prefetched is True

    bad = worker.process(plan_units(scenes["d_corrupt"], cfg)[0], 1)
    assert bad.status == "failed" and "frame_01.png" in bad.error
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
    import httm_dist.cluster.driver as driver

    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: dict(resources))
    cfg = _job(tmp_path, tmp_path / "out", **overrides)
    assert driver._worker_count(cfg, n_units) == expected


def test_worker_count_refuses_workers_the_cluster_cannot_place(monkeypatch, tmp_path):
    import httm_dist.cluster.driver as driver

    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"GPU": 1, "CPU": 2})
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        driver._worker_count(_job(tmp_path, tmp_path / "o", cpus_per_worker=4), 3)
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        driver._worker_count(_job(tmp_path, tmp_path / "o", gpus_per_worker=2), 3)


def test_progress_draws_a_bar_on_a_terminal(caplog):
    from httm_dist.cluster.progress import JobProgress

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
