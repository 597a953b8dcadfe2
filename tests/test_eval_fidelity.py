"""The fidelity benchmark runs every strategy on the same scenes and weights and measures
deviation from dense correctly (tiny model, tiny scenes)."""

from __future__ import annotations

import numpy as np
import pytest

from httm_dist.eval.fidelity import format_table, prediction_deviation, run_fidelity


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from threads; on a shared 2-core box they only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows(one_thread):
    strategies = [
        ("uniform 0.5", {"strategy": "uniform", "kv_keep": 0.5}),
        ("httm full", {"strategy": "httm", "q_keep": 1.0, "kv_keep": 1.0, "outlier_frac": 0.0}),
        ("httm 0.2/0.3", {"strategy": "httm", "q_keep": 0.2, "kv_keep": 0.3, "outlier_frac": 0.1}),
    ]
    return run_fidelity(num_scenes=2, num_frames=3, height=28, width=42, preset="tiny", strategies=strategies, seed=1, device="cpu")


def test_rows_have_dense_baseline_and_metrics(rows):
    assert [r["strategy"] for r in rows] == ["dense", "uniform 0.5", "httm full", "httm 0.2/0.3"]
    dense = rows[0]
    for key in ("abs_rel", "delta_1.25", "accuracy", "completeness", "rot_err_mean", "auc@30", "ate", "seconds"):
        assert np.isfinite(dense[key]), key
    assert dense["depth_dev"] == 0 and dense["points_dev"] == 0 and dense["pose_dev_deg"] < 1e-6
    assert dense["delta_abs_rel"] == 0 and dense["speedup"] == 1.0
    assert dense["q_kept"] == 1.0 and dense["kv_kept"] == 1.0


def test_merging_deviates_and_keep_one_does_not(rows):
    full, merged = rows[2], rows[3]
    assert full["depth_dev"] < 1e-5 and full["points_dev"] < 1e-5
    assert full["kv_kept"] == pytest.approx(1.0)
    assert merged["points_dev"] > 1e-6 and merged["pose_dev_deg"] > 0
    assert merged["kv_kept"] < 0.8 and merged["q_kept"] < 0.8
    # Deltas are against dense.
    assert merged["delta_abs_rel"] == pytest.approx(merged["abs_rel"] - rows[0]["abs_rel"])


def test_prediction_deviation_hand_case():
    rng = np.random.default_rng(0)
    base = {
        "depth": rng.uniform(1, 2, (2, 4, 5)),
        "world_points": rng.normal(size=(2, 4, 5, 3)),
        "extrinsic": np.concatenate([np.stack([np.eye(3)] * 2), np.zeros((2, 3, 1))], -1),
    }
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    moved = {
        "depth": base["depth"] * 1.1,
        "world_points": base["world_points"] + [0.0, 0.0, 0.5],
        "extrinsic": base["extrinsic"].copy(),
    }
    moved["extrinsic"][1, :, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    dev = prediction_deviation(moved, base)
    p = base["world_points"].reshape(-1, 3)
    extent = np.sqrt(np.mean(np.sum((p - p.mean(0)) ** 2, 1)))
    assert dev["depth_dev"] == pytest.approx(0.1)
    assert dev["points_dev"] == pytest.approx(0.5 / extent)
    assert dev["pose_dev_deg"] == pytest.approx(6.0)  # frames 0 and 12 degrees: mean 6


def test_format_table(rows):
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| strategy |") and "AbsRel" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| httm 0.2/0.3 | 0.20/0.30 |" in table


def test_eval_merging_job_prints_table(tmp_path, capsys, one_thread):
    import json
    import runpy
    from pathlib import Path

    job = runpy.run_path(str(Path(__file__).parents[1] / "jobs" / "eval_merging.py"))
    out_json = tmp_path / "rows.json"
    argv = ["--scenes", "1", "--frames", "2", "--height", "28", "--width", "42", "--device", "cpu"]
    assert job["main"](argv + ["--strategy", "httm:strategy=httm,q_keep=0.5,kv_keep=0.5", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| dense |" in text and "| httm |" in text
    assert [r["strategy"] for r in json.loads(out_json.read_text())] == ["dense", "httm"]
    # Bad options are the CLI's config errors: exit status 2, one line naming the option.
    assert job["main"](["--height", "30"]) == 2
    assert job["main"](["--strategy", "bad:q_keep=7"]) == 2
    err = capsys.readouterr().err
    assert "--height" in err and "q_keep" in err, err


def test_ground_truth_folders_feed_the_benchmark(tmp_path, capsys, one_thread):
    """A GT scene folder at twice the model size is preprocessed and its GT resized to match
    a direct render at the model size; the job evaluates it end to end."""
    import json
    import runpy
    from pathlib import Path

    from httm_dist.eval.fidelity import load_eval_scene
    from httm_dist.eval.synthetic import render_scene, write_scene_folder

    big = render_scene(3, 56, 84, seed=4)
    small = render_scene(3, 28, 42, seed=4)
    url = write_scene_folder(big, str(tmp_path / "gt"))
    sc = load_eval_scene(url, width=42, max_frames=2)
    assert sc.images.shape == (2, 3, 28, 42) and sc.images.dtype == np.float32
    np.testing.assert_allclose(sc.depth, small.depth[:2], rtol=1e-6)
    np.testing.assert_allclose(sc.intrinsic, small.intrinsic[:2], rtol=1e-6)
    np.testing.assert_allclose(sc.extrinsic, small.extrinsic[:2], atol=1e-6)
    # The preprocessed images are the downsampled render: close to the direct render on average.
    assert np.abs(sc.images - small.model_input()[:2]).mean() < 0.1

    job = runpy.run_path(str(Path(__file__).parents[1] / "jobs" / "eval_merging.py"))
    out_json = tmp_path / "rows.json"
    argv = ["--gt-scene", url, "--frames", "2", "--width", "42", "--device", "cpu", "--strategy", "uniform:strategy=uniform,kv_keep=0.5"]
    assert job["main"](argv + ["--json", str(out_json)]) == 0
    assert "1 ground-truth scenes" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())
    assert [r["strategy"] for r in rows] == ["dense", "uniform"] and np.isfinite(rows[0]["abs_rel"])


def test_a_ground_truth_frame_that_cannot_be_read_fails_its_scene(tmp_path):
    """A frame the server refuses (or that is gone) is a SceneError naming the frame once, not
    a raw PermissionError / FileNotFoundError."""
    import json

    from http_files import serve

    from httm_dist.errors import SceneError
    from httm_dist.eval.fidelity import load_eval_scene
    from httm_dist.eval.synthetic import render_scene, write_scene_folder

    write_scene_folder(render_scene(2, 28, 42, seed=5), str(tmp_path / "gt"))
    image = json.loads((tmp_path / "gt" / "cameras.json").read_text())["frames"][1]["image"]
    with serve(str(tmp_path)) as (base, server):
        assert load_eval_scene(f"{base}/gt", width=42).images.shape == (2, 3, 28, 42)
        server.forbidden = {f"/gt/{image}"}
        with pytest.raises(SceneError) as info:
            load_eval_scene(f"{base}/gt", width=42)
    assert str(info.value) == (f"ground-truth scene {base}/gt: cannot read frame {base}/gt/{image}: "
                               "PermissionError: HTTP 403 Forbidden")
    (tmp_path / "gt" / image).unlink()
    with pytest.raises(SceneError, match=f"cannot read frame {tmp_path}/gt/{image}: FileNotFoundError"):
        load_eval_scene(str(tmp_path / "gt"), width=42)


def test_ground_truth_cameras_and_depth_over_http_retry_a_busy_server_and_name_a_refusal(tmp_path):
    """cameras.json behind one busy info() (503 to its HEAD and GET) is retried, not reported
    as missing; a depth map the server refuses is a SceneError naming it once."""
    import json

    from http_files import serve

    from httm_dist.errors import SceneError
    from httm_dist.eval.fidelity import load_eval_scene
    from httm_dist.eval.synthetic import render_scene, write_scene_folder

    write_scene_folder(render_scene(2, 28, 42, seed=5), str(tmp_path / "gt"))
    depth = json.loads((tmp_path / "gt" / "cameras.json").read_text())["frames"][0]["depth"]
    with serve(str(tmp_path)) as (base, server):
        server.unavailable = {"/gt/cameras.json": 2}
        assert load_eval_scene(f"{base}/gt", width=42).images.shape == (2, 3, 28, 42)
        assert server.unavailable["/gt/cameras.json"] == 0
        server.forbidden = {f"/gt/{depth}"}
        with pytest.raises(SceneError) as info:
            load_eval_scene(f"{base}/gt", width=42)
    assert str(info.value).endswith(f"ground truth {base}/gt/{depth} cannot be read: PermissionError: HTTP 403 Forbidden")
