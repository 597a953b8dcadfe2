"""The ``httm-dist`` command and ``jobs/reconstruct.py``: exit statuses, messages, the demo."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import httm_dist.cluster.driver as driver
import httm_dist.cluster.jobenv as jobenv
from httm_dist.cli import main, parse_strategy
from httm_dist.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def job(tmp_path) -> Path:
    """A valid config file whose input exists."""
    (tmp_path / "scenes" / "s0").mkdir(parents=True)
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "input": str(tmp_path / "scenes"),
                "output": str(tmp_path / "out"),
                "model": {"preset": "tiny", "device": "cpu", "allow_random_weights": True},
                "gpus_per_worker": 0,
            }
        )
    )
    return path


def _one_clear_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("httm-dist: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--set", "wokers=2"], ["'wokers'", "did you mean 'workers'"]),
        (["--set", "image.size=500"], ["'image.size'", "multiple of 14"]),
        (["--set", "merging.q_keep=3"], ["merging", "q_keep"]),
        (["--set", "chunk.max_frames=8", "--set", "chunk.overlap=2",
          "--set", "chunk.align_options.iters=0"],
         ["'chunk.align_options.iters'", "must be >= 1, got 0"]),
        (["--set", "chunk.align_options.los=huber"],
         ["'chunk.align_options.los'", "did you mean 'chunk.align_options.loss'"]),
        (["--set", "nonsense"], ["override 'nonsense'", "key=value"]),
        (["--set", "input=/definitely/not/here"], ["/definitely/not/here", "does not exist"]),
        (["--set", "model.weights=/no/such/weights.safetensors"], ["'model.weights'", "does not exist"]),
    ],
)
def test_bad_config_exits_2_with_one_clear_line(job, capsys, extra, needles):
    assert main(["run", str(job), *extra]) == 2
    _one_clear_line(capsys.readouterr().err, *needles)
    out = job.parent / "out"  # rejected before any work: no records, no run summary
    assert not (out / "scenes").exists() and not (out / "runs").exists()


def test_missing_or_broken_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    _one_clear_line(capsys.readouterr().err, "nope.yaml", "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: /x\nunknown_section:\n  a: 1\n")
    assert main(["run", str(bad)]) == 2
    _one_clear_line(capsys.readouterr().err, "'unknown_section'")


def test_run_line_names_failed_scenes_it_did_not_retry(job, capsys, monkeypatch):
    """With retry_failed: false a rerun skips scenes that failed before: its line must not
    read as if the output held no failure."""
    monkeypatch.setattr(driver, "run_job", lambda cfg, progress=True: {
        "run_id": "r2", "done": 0, "failed": 0, "skipped": 3, "not_retried": 2, "frames": 0,
        "seconds": 0.5, "failures": []})
    assert main(["run", str(job), "--set", "retry_failed=false"]) == 0
    assert ("0 done, 0 failed, 3 already committed, 2 failed in earlier runs and not retried "
            "(retry_failed: false); 0 frames") in capsys.readouterr().out


@pytest.mark.parametrize("failed, status", [(0, 0), (2, 1)])
def test_run_exit_status_follows_the_summary(job, capsys, monkeypatch, failed, status):
    seen = {}

    def fake_run_job(cfg, progress=True):
        seen["cfg"], seen["progress"] = cfg, progress
        failures = [{"scene_id": f"s{i}", "error": "corrupt image x.png"} for i in range(failed)]
        return {"run_id": "r1", "done": 3, "failed": failed, "skipped": 1, "frames": 24,
                "seconds": 2.0, "failures": failures, "summary_url": "/out/runs/r1.json"}

    monkeypatch.setattr(driver, "run_job", fake_run_job)
    rc = main(["run", str(job), "--set", "merging.q_keep=0.4", "--set", "workers=2", "--no-progress"])
    assert rc == status
    assert seen["cfg"].workers == 2 and seen["cfg"].merging.q_keep == pytest.approx(0.4)
    assert seen["progress"] is False
    out = capsys.readouterr().out
    assert f"3 done, {failed} failed, 1 already committed" in out and "/out/runs/r1.json" in out
    assert out.count("corrupt image x.png") == failed


def test_sigterm_stops_the_run_like_ctrl_c_and_says_how_to_resume(job, capsys, monkeypatch):
    """``ray job stop`` and batch schedulers send SIGTERM: the run unwinds (its workers and Ray
    stopped by the ``finally`` blocks) and the CLI exits 143, also when the signal lands in a
    Ray call, which re-raises a bare KeyboardInterrupt; a second SIGTERM does not cut the
    unwind short; the handler the process had before the run is back afterwards."""
    import signal
    import time

    def own_handler(signum, frame):  # the embedding application's handler
        raise AssertionError("the run's handler should have been in place")

    previous = signal.signal(signal.SIGTERM, own_handler)
    unwound = []

    def fake_run(cfg, progress, run_id):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init does to the handler
        jobenv.reinstall_after_ray_init()
        try:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler raises at the next bytecode
            except KeyboardInterrupt:
                raise KeyboardInterrupt() from None  # as ray.wait / ray.get do
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one during the cleanup: ignored
            time.sleep(0.05)
            unwound.append(True)

    monkeypatch.setattr(driver, "_run_job", fake_run)
    try:
        assert main(["run", str(job)]) == 128 + signal.SIGTERM
        assert unwound and signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    _one_clear_line(capsys.readouterr().err, "stopped (SIGTERM)", "rerun the same command to resume")


def test_storage_refusal_outside_any_scene_is_one_redacted_line(monkeypatch, capsys, tmp_path):
    """An OSError outside any scene (a server's 403 on a signed URL while exporting) is one
    line, exit 2, with the signature redacted: never a traceback carrying it."""
    import httm_dist.export as export

    def refused(*args, **kwargs):
        raise PermissionError("HTTP 403 Forbidden: https://h/f.png?X-Amz-Signature=0123456789abcdef")

    monkeypatch.setattr(export, "export_scenes", refused)
    assert main(["export", str(tmp_path), "--format", "colmap", "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    _one_clear_line(err, "storage error", "403 Forbidden")
    assert "0123456789abcdef" not in err


def test_ctrl_c_outside_a_run_says_interrupted_without_a_resume_hint(monkeypatch, capsys, tmp_path):
    """Only ``run`` resumes; Ctrl-C in another command is exit 130 and 'interrupted'."""
    import httm_dist.export as export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(export, "export_scenes", interrupted)
    assert main(["export", str(tmp_path), "--format", "colmap", "--to", str(tmp_path / "x")]) == 130
    err = capsys.readouterr().err
    _one_clear_line(err, "interrupted")
    assert "resume" not in err


def test_per_archive_library_chatter_is_off_unless_debugging_libraries():
    """fsspec's tar logger says 'Inferred compression None from file name' at INFO for every
    archive scene: thousands of lines in an overnight log."""
    from httm_dist.cli import setup_logging

    tar = logging.getLogger("tar")
    try:
        setup_logging()
        assert not tar.isEnabledFor(logging.INFO) and tar.isEnabledFor(logging.WARNING)
        assert logging.getLogger("httm_dist").isEnabledFor(logging.INFO)
        setup_logging(debug_libraries=True)
        assert tar.isEnabledFor(logging.DEBUG)
    finally:
        tar.setLevel(logging.NOTSET)
        setup_logging()
        tar.setLevel(logging.NOTSET)


def test_job_entry_point_in_a_subprocess(job, tmp_path):
    """``jobs/reconstruct.py`` (what ``ray job submit`` runs) takes the options of
    ``httm-dist run`` (the README's logging flags too) and reports config errors the same way."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "reconstruct.py"), "--config", str(job),
         "--set", "chunk.overlap=0", "--no-progress", "-q", "--debug-libraries"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    _one_clear_line(proc.stderr, "'chunk.overlap'")


def test_eval_and_preview_argument_errors(capsys, tmp_path):
    assert main(["eval", "--height", "100"]) == 2
    _one_clear_line(capsys.readouterr().err, "--height", "multiple of 14")
    assert main(["eval", "--strategy", "h:strategy=magic"]) == 2
    _one_clear_line(capsys.readouterr().err, "magic")
    assert parse_strategy("h q.3:strategy=httm, q_keep=0.3,kv_keep=0.5") == (
        "h q.3", {"strategy": "httm", "q_keep": 0.3, "kv_keep": 0.5}
    )
    for bad in ("no-colon", ":strategy=httm", "h:q_keep"):
        with pytest.raises(ConfigError):
            parse_strategy(bad)
    (tmp_path / "out").mkdir()
    assert main(["eval", "--storage-options", "[1, 2]"]) == 2
    _one_clear_line(capsys.readouterr().err, "--storage-options must be a mapping")
    assert main(["preview", str(tmp_path / "out"), "missing"]) == 2
    _one_clear_line(capsys.readouterr().err, "'missing'", "not committed")


def test_eval_prints_a_table(capsys):
    rc = main(["-q", "eval", "--scenes", "1", "--frames", "2", "--height", "42", "--width", "56",
               "--strategy", "h5:strategy=httm,q_keep=0.5,kv_keep=0.5"])
    assert rc == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, rule, dense, h5
    assert table[2].split("|")[1].strip() == "dense" and table[3].split("|")[1].strip() == "h5"


@pytest.mark.ray
def test_demo_runs_the_whole_pipeline(ray_session, tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING)
    root = tmp_path / "demo"
    rc = main(["demo", "--root", str(root), "--no-progress"])  # its defaults: 3 scenes x 8 frames
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 done, 0 failed" in out and str(root / "output") in out and "httm-dist preview" in out

    from httm_dist.config import demo_preset
    from httm_dist.eval.gt_loader import load_gt_scene
    import httm_dist.results as results

    # The demo runs the shipped trained model, so it does not warn of meaningless geometry...
    assert demo_preset() == "tiny-synthetic"
    assert "MEANINGLESS" not in caplog.text
    res = results.open(str(root / "output"))
    assert res.scene_ids == ["scene_000", "scene_001", "scene_002"]
    assert res.frames().num_rows == 24
    assert res.arrays("scene_000")["depth"].shape[0] == 8
    # ...and its depth follows the renderer's ground truth. Over the demo's scenes: the mean
    # rank correlation, and the mean AbsRel (median-scaled) against a constant-depth
    # prediction's. Measured: trained Spearman 0.46/0.84/0.88, AbsRel 0.37 vs constant 0.63;
    # random weights Spearman -0.09/0.36/0.13 with AbsRel equal to the constant's.
    from scipy.stats import spearmanr

    from httm_dist.eval.metrics import depth_metrics

    rank_corr, abs_rel, constant = [], [], []
    for scene_id in res.scene_ids:
        pred = res.arrays(scene_id)["depth"].astype(np.float64)
        _, gt = load_gt_scene(str(root / "scenes" / scene_id))
        gt_depth = gt.resized(*pred.shape[1:3], mode="crop").depth[: len(pred)]
        rank_corr.append(spearmanr(pred.ravel(), gt_depth.ravel())[0])
        abs_rel.append(depth_metrics(pred, gt_depth)["abs_rel"])
        constant.append(depth_metrics(np.ones_like(gt_depth), gt_depth)["abs_rel"])
    assert np.mean(rank_corr) > 0.6, rank_corr
    assert np.mean(abs_rel) < 0.7 * np.mean(constant), (abs_rel, constant)

    # Rerun: nothing left to do, still success.
    assert main(["demo", "--root", str(root), "--no-progress"]) == 0
    assert "3 already committed" in capsys.readouterr().out

    assert main(["preview", str(root / "output"), "scene_000"]) == 0
    printed = capsys.readouterr().out
    assert "png:" in printed and "ply:" in printed
    assert (root / "output" / "previews" / "scene_000.png").stat().st_size > 0


def test_run_lists_each_failed_scene_naming_it_once(job, capsys, monkeypatch):
    """A record's error names its scene (``scene 'b': ...``): the run's list says it once."""
    failures = [{"scene_id": "b", "error": "scene 'b': image /in/b/f.png cannot be decoded"},
                {"scene_id": "c", "error": "RuntimeError: boom"}]
    monkeypatch.setattr(driver, "run_job", lambda cfg, progress=True: {
        "run_id": "r1", "done": 0, "failed": 2, "skipped": 0, "frames": 0, "seconds": 1.0, "failures": failures})
    assert main(["run", str(job), "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["  scene 'b' failed: image /in/b/f.png cannot be decoded",
                         "  scene 'c' failed: RuntimeError: boom"]


def test_ctrl_c_in_the_demo_says_how_to_resume(monkeypatch, capsys):
    """The demo runs a job too, and its rerun resumes."""
    import httm_dist.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt()

    monkeypatch.setattr(cli, "_cmd_demo", interrupted)
    assert main(["demo"]) == 130
    _one_clear_line(capsys.readouterr().err, "interrupted", "rerun the same command to resume")
