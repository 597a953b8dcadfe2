"""Loading VGGT weights: formats, local and s3:// sources, strict key checks, track_head drop."""

from __future__ import annotations

import logging
import sys
import types

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from httm_dist.errors import ConfigError
from httm_dist.model import PRESETS, WeightsMismatchError, load_vggt, register_preset
from httm_dist.model import weights
from httm_dist.model.config import VGGTConfig
from httm_dist.model.vggt import VGGT


@pytest.fixture(scope="module")
def reference(fixtures_dir) -> dict[str, torch.Tensor]:
    return load_file(fixtures_dir / "vggt_tiny" / "weights.safetensors")


def assert_loaded(model, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], value.float()), key
    assert not model.training


def write(path, state: dict[str, torch.Tensor]) -> str:
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_file(tmp_path, reference, suffix):
    path = write(tmp_path / f"w{suffix}", reference)
    assert_loaded(load_vggt("tiny", weights=path, device="cpu"), reference)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_s3_url(tmp_path, reference, s3_bucket, suffix):
    bucket, options = s3_bucket
    url = f"{bucket}/ckpt/weights{suffix}"
    fsspec.filesystem("s3", **options).put(write(tmp_path / f"w{suffix}", reference), url)
    assert_loaded(load_vggt("tiny", weights=url, device="cpu", storage_options=options), reference)


def test_half_precision_checkpoint_loads_as_fp32(tmp_path, reference):
    path = write(tmp_path / "bf16.safetensors", {k: v.bfloat16() for k, v in reference.items()})
    model = load_vggt("tiny", weights=path, device="cpu")
    key = "aggregator.frame_blocks.0.attn.qkv.weight"
    assert model.state_dict()[key].dtype == torch.float32
    assert torch.equal(model.state_dict()[key], reference[key].bfloat16().float())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_track_head_keys_are_dropped_with_a_log_line(tmp_path, reference, caplog, suffix):
    state = {**reference, "track_head.fnet.conv.weight": torch.ones(2, 3),
             "track_head.tracker.norm.bias": torch.zeros(4)}
    path = write(tmp_path / f"with_track{suffix}", state)
    with caplog.at_level(logging.INFO, logger="httm_dist.model.weights"):
        model = load_vggt("tiny", weights=path, device="cpu")
    assert_loaded(model, reference)
    assert any("dropping 2 track_head.* keys" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_missing_extra_and_misshaped_keys_fail_naming_them(tmp_path, reference, suffix):
    state = dict(reference)
    del state["camera_head.embed_pose.bias"]
    state["aggregator.not_a_key"] = torch.zeros(3)
    state["depth_head.norm.weight"] = torch.zeros(7)
    path = write(tmp_path / f"bad{suffix}", state)
    with pytest.raises(WeightsMismatchError) as info:
        load_vggt("tiny", weights=path, device="cpu")
    message = str(info.value)
    assert "camera_head.embed_pose.bias" in message
    assert "aggregator.not_a_key" in message
    assert "depth_head.norm.weight (7,) != (256,)" in message
    assert info.value.missing == ["camera_head.embed_pose.bias"]
    assert isinstance(info.value, ValueError)


def test_missing_file_names_the_url(tmp_path, s3_bucket):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_vggt("tiny", weights=tmp_path / "nope.safetensors", device="cpu")
    bucket, options = s3_bucket
    with pytest.raises(FileNotFoundError, match=f"{bucket}/absent.pt"):
        load_vggt("tiny", weights=f"{bucket}/absent.pt", device="cpu", storage_options=options)


def test_unknown_format_and_corrupt_file(tmp_path):
    with pytest.raises(ValueError, match=r"\.bin"):
        load_vggt("tiny", weights=tmp_path / "w.bin", device="cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_vggt("tiny", weights=tmp_path / "junk.safetensors", device="cpu")


def test_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="httm_dist.model.weights"):
        model = load_vggt({"embed_dim": 128, "num_heads": 2, "depth": 4, "img_size": 70,
                           "patch_embed": {"depth": 2, "num_heads": 2},
                           "camera_head": {"trunk_depth": 1, "num_heads": 2},
                           "dpt": {"features": 32, "out_channels": [16, 32, 64, 64],
                                   "intermediate_layer_idx": [0, 1, 2, 3]}}, device="cpu")
    assert not model.training
    assert any("random weights" in r.getMessage() for r in caplog.records)
    assert next(model.parameters()).device.type == "cpu"


def test_preset_with_shipped_weights_loads_them(fixtures_dir, reference):
    register_preset("tiny-shipped-test", PRESETS["tiny"].config,
                    weights=str(fixtures_dir / "vggt_tiny" / "weights.safetensors"))
    try:
        assert_loaded(load_vggt("tiny-shipped-test", device="cpu"), reference)
    finally:
        del PRESETS["tiny-shipped-test"]


def test_hf_url_uses_hf_hub_download(monkeypatch, fixtures_dir, reference):
    calls = []

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(fixtures_dir / "vggt_tiny" / "weights.safetensors")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    assert_loaded(load_vggt("tiny", weights="hf://org/repo@v1/sub/model.safetensors", device="cpu"), reference)
    assert calls == [("org/repo", "sub/model.safetensors", "v1")]


def test_hf_url_without_huggingface_hub_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(ImportError, match="huggingface_hub"):
        load_vggt("tiny", weights="hf://facebook/VGGT-1B/model.safetensors", device="cpu")


def test_expected_shapes_are_built_once_per_config(monkeypatch, tmp_path, reference):
    cfg = VGGTConfig.preset("tiny")
    with torch.device("meta"):
        built = {k: tuple(v.shape) for k, v in VGGT(cfg).state_dict().items()}
    weights.expected_shapes.cache_clear()
    builds = []
    real = weights.VGGT
    monkeypatch.setattr(weights, "VGGT", lambda c: builds.append(c) or real(c))
    assert dict(weights.expected_shapes(cfg)) == built
    with pytest.raises(TypeError):  # shared between callers: read-only
        weights.expected_shapes(cfg)["extra"] = (1,)
    path = write(tmp_path / "w.safetensors", reference)
    assert weights.check_weights_file("tiny", path) == len(reference)
    assert weights.check_weights_file("tiny", path) == len(reference)
    assert builds == [cfg]  # both checks used the one map built above
    # another config value is another map (e.g. a preset re-registered with another shape)
    other = VGGTConfig.from_dict({**cfg.to_dict(), "num_register_tokens": cfg.num_register_tokens + 1})
    assert weights.expected_shapes(other) != weights.expected_shapes(cfg) and builds == [cfg, other]
    bad = {k: v for k, v in reference.items() if not k.endswith("qkv.weight")}
    with pytest.raises(ConfigError, match="does not fit preset 'tiny'.*missing keys"):
        weights.check_weights_file("tiny", write(tmp_path / "bad.safetensors", bad))
