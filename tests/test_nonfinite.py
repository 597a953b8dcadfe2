"""Non-finite predictions are never committed silently (issue 11, item 4).

fp16 overflow needs a GPU; on CPU the model is made to produce NaN by wrapping its forward."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from httm_dist.config import load_config
from httm_dist.data import discover_scenes
from httm_dist.errors import SceneError
from httm_dist.model import load_vggt
from httm_dist.pipeline import ModelRunner, ResultPublisher, failure_record, plan_units, process_unit
from httm_dist.results import ResultStore


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    rng = np.random.default_rng(0)
    (root / "in" / "s").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (42, 56, 3), dtype=np.uint8)).save(root / "in" / "s" / f"f{i}.png")
    model = load_vggt("tiny-synthetic", device="cpu")  # trained: finite cameras (random may give fov 0)
    (scene,) = discover_scenes(str(root / "in"))
    return root, model, scene


def _runner(setup, tmp_path, monkeypatch, corrupt):
    """A runner whose model output passes through ``corrupt(out, call_number, use_amp)``."""
    root, model, scene = setup
    cfg = load_config({
        "input": str(root / "in"), "output": str(tmp_path / "out"),
        "model": {"preset": "tiny-synthetic", "device": "cpu"}, "merging": {"strategy": "dense"},
        "image": {"size": 56},
    })
    runner = ModelRunner(cfg, model=model)
    original = runner.model.forward
    calls = []

    def forward(images):
        out = original(images)
        calls.append(runner.model.aggregator.use_amp)
        corrupt(out, len(calls), calls[-1])
        return out

    monkeypatch.setattr(runner.model, "forward", forward)
    store = ResultStore(cfg.output)
    publisher = ResultPublisher(cfg, store, str(runner.device))
    return runner, publisher, plan_units(scene, cfg)[0], store, calls


def test_all_nan_under_autocast_is_rerun_in_fp32_and_committed_clean(setup, tmp_path, monkeypatch):
    def corrupt(out, n, use_amp):
        if use_amp:  # what fp16 overflow does: everything NaN
            for key in ("depth", "world_points", "pose_enc"):
                out[key].fill_(float("nan"))

    runner, publisher, unit, store, calls = _runner(setup, tmp_path, monkeypatch, corrupt)
    record = process_unit(runner, publisher, unit)
    assert calls == [True, False]  # second pass with autocast off
    assert runner.model.aggregator.use_amp is True  # restored
    assert record.status == "done" and record.fp32_retry is True
    assert record.nonfinite_values == {}
    arrays = store.read_arrays("s", store.record("s"))
    assert np.isfinite(arrays["depth"]).all() and np.isfinite(arrays["world_points"]).all()


@pytest.mark.parametrize("key", ["depth", "pose_enc"])
def test_still_non_finite_in_fp32_fails_the_scene_with_a_clear_error(setup, tmp_path, monkeypatch, key):
    def corrupt(out, n, use_amp):  # a second kind: one frame's map (or a camera) NaN even in fp32
        out[key][0, 1].fill_(float("nan"))

    runner, publisher, unit, store, calls = _runner(setup, tmp_path, monkeypatch, corrupt)
    with pytest.raises(SceneError, match=rf"scene 's'.*not finite.*{key}.*frame\(s\) \[1\].*fp32") as err:
        process_unit(runner, publisher, unit)
    assert calls == [True, False]
    assert store.record("s") is None  # nothing committed
    rec = store.write_failure(failure_record(unit, err.value, runner.cfg))
    assert rec.status == "failed" and "not finite" in rec.error


def test_scattered_non_finite_pixels_are_counted_in_the_record(setup, tmp_path, monkeypatch):
    def corrupt(out, n, use_amp):
        out["depth"][0, 0, :3, 5].fill_(float("inf"))
        out["world_points_conf"][0, 1, 2, :4].fill_(float("nan"))

    runner, publisher, unit, store, calls = _runner(setup, tmp_path, monkeypatch, corrupt)
    record = process_unit(runner, publisher, unit)
    assert calls == [True, False] and record.fp32_retry is True
    assert record.status == "done"
    assert record.nonfinite_values == {"depth": 3, "world_points_conf": 4}
    assert store.record("s").nonfinite_values == {"depth": 3, "world_points_conf": 4}
    import httm_dist.results as results

    assert np.isfinite(results.open(runner.cfg.output).frames().column("depth_median").to_numpy()).all()
