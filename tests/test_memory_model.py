"""The peak-memory model and ``chunk.max_frames: auto`` (issue 14), on CPU."""

from pathlib import Path

import pytest
import torch

import httm_dist.pipeline.memory as memory
import httm_dist.pipeline.unit as unit_module
from httm_dist.config import load_config
from httm_dist.data import FrameRef, SceneSpec
from httm_dist.errors import ConfigError
from httm_dist.model import VGGT, VGGTConfig, count_parameters
from httm_dist.pipeline.chunks import plan_chunks
from httm_dist.pipeline.unit import plan_units
from httm_dist.cluster.worker import probe_worker_free_bytes

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "configs" / "vggt1b-httm-gpu.yaml"
VGGT_1B = VGGTConfig.preset("vggt-1b")


def test_the_model_reproduces_its_calibration_point():
    # issue 14, H200: the whole VGGT-1B aggregator, 1000 frames of 294x518, 57 GB (dense, httm)
    for strategy in ("dense", "httm"):
        mm = memory.memory_model(VGGT_1B, 294, 518, strategy, whole_model=False)
        assert mm.peak_bytes(1000) == pytest.approx(57e9, rel=0.01)
    # weights are part of it: the aggregator's 909M fp32 parameters
    assert memory.memory_model(VGGT_1B, 294, 518, "dense", whole_model=False).fixed_bytes == 909_112_320 * 4


def test_max_frames_is_the_largest_count_that_fits_with_the_margin():
    mm = memory.memory_model(VGGT_1B, 294, 518, "httm")
    for free in (24e9, 80e9, 141e9):
        n = mm.max_frames(free)
        budget = free * (1 - memory.SAFETY_FRACTION) - memory.RESERVE_BYTES
        assert mm.peak_bytes(n) <= budget < mm.peak_bytes(n + 1)
    assert mm.max_frames(24e9) < mm.max_frames(80e9) < mm.max_frames(141e9)
    assert mm.max_frames(1e9) == 0  # not even the weights fit
    # larger frames and the whole model (heads, output maps) need more per frame
    assert memory.memory_model(VGGT_1B, 518, 518).per_frame_bytes > mm.per_frame_bytes
    assert memory.memory_model(VGGT_1B, 294, 518, "httm", whole_model=False).per_frame_bytes < mm.per_frame_bytes
    with pytest.raises(ValueError, match="patch size"):
        memory.memory_model(VGGT_1B, 300, 518)


def _cfg(**chunk):
    cfg = load_config(GPU_CONFIG, ["input=/tmp/in", "output=/tmp/out"])
    return cfg.model_copy(update={"chunk": type(cfg.chunk)(**{**cfg.chunk.to_dict(), **chunk})})


def test_auto_follows_the_memory_model_and_keeps_a_cpu_default():
    cfg = load_config(GPU_CONFIG, ["input=/tmp/in", "output=/tmp/out"])
    assert cfg.chunk.max_frames == "auto"  # the shipped GPU config
    assert memory.resolve_max_frames(cfg, None) == memory.CPU_MAX_FRAMES
    mm = memory.memory_model(VGGT_1B, 518, 518, "httm")  # auto plans for the largest frame
    for free in (40e9, 80e9, 141e9):
        assert memory.resolve_max_frames(cfg, free) == mm.max_frames(free)
    assert memory.resolve_max_frames(cfg, 141e9) > 1000  # an H200 runs 1000 frames in one pass
    with pytest.raises(ConfigError, match="chunk.overlap"):
        memory.resolve_max_frames(cfg, 8e9)


def _scene(n):
    return SceneSpec("s", "/tmp/s", "folder", tuple(FrameRef(f"/tmp/s/{i:04d}.png", i, f"{i:04d}.png") for i in range(n)))


def test_plan_units_resolves_auto_for_its_device(monkeypatch):
    cfg = _cfg(max_frames="auto", overlap=16)
    units = plan_units(_scene(150), cfg)  # this machine: CPU
    assert [u.frame_range for u in units] == [tuple(r) for r in plan_chunks(150, memory.CPU_MAX_FRAMES, 16)]
    monkeypatch.setattr(unit_module, "local_free_bytes", lambda device: 80e9)  # as on an 80 GB GPU
    fit = memory.memory_model(VGGT_1B, 518, 518, "httm").max_frames(80e9)
    assert [u.kind for u in plan_units(_scene(fit), cfg)] == ["scene"]
    units = plan_units(_scene(fit + 1), cfg)
    assert len(units) == 2 and max(u.frame_range[1] - u.frame_range[0] for u in units) <= fit


def test_config_accepts_auto_and_names_bad_values():
    assert load_config(GPU_CONFIG, ["input=a", "output=b", "chunk.max_frames=80"]).chunk.max_frames == 80
    for bad in ("chunk.max_frames=fast", "chunk.max_frames=1"):
        with pytest.raises(ConfigError, match="chunk.max_frames"):
            load_config(GPU_CONFIG, ["input=a", "output=b", bad])


@pytest.mark.ray
def test_workers_on_a_cpu_cluster_get_the_cpu_default(ray_session):
    cfg = load_config(GPU_CONFIG, ["input=a", "output=b"])
    assert probe_worker_free_bytes(cfg) is None  # no GPU in this Ray cluster
    assert memory.resolve_max_frames(cfg, probe_worker_free_bytes(cfg)) == memory.CPU_MAX_FRAMES


def test_local_free_bytes_reads_the_device_it_is_given(monkeypatch):
    """``cuda:1`` reads GPU 1's free memory, not the current device's; ``cuda`` the current one."""
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (7, 9))
    assert memory.local_free_bytes("cuda:1") == 7 and asked[-1] == torch.device("cuda", 1)
    assert memory.local_free_bytes("cuda") == 7 and asked[-1] is None
    assert memory.local_free_bytes("cpu") is None and len(asked) == 2


@pytest.mark.parametrize("preset", ["tiny", "vggt-1b"])
def test_parameter_count_is_the_models_own(preset):
    """Counted from the weights check's shape map: equal to the parameters of a model built
    on the meta device (VGGT registers no buffers; one would show here)."""
    arch = VGGTConfig.preset(preset)
    with torch.device("meta"):
        model = VGGT(arch)
    assert memory.parameter_count(arch, True) == count_parameters(model)
    assert memory.parameter_count(arch, False) == count_parameters(model.aggregator)
