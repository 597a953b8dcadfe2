"""Merging strategies installed on the tiny VGGT (random weights): the model-level contract."""

import pytest
import torch

from httm_dist.merging import MergeConfig, apply_merging, merge_stats
from httm_dist.merging.patch import installed
from httm_dist.model import VGGT, VGGTConfig


def MC(**kw):
    """A MergeConfig that merges at any length (min_tokens 0): these tests check the method on
    tiny inputs, far below the default min_tokens."""
    kw.setdefault("min_tokens", 0)
    return MergeConfig(**kw)


@pytest.fixture(scope="module")
def _tiny():
    torch.manual_seed(0)
    return VGGT(VGGTConfig.preset("tiny")).eval()


@pytest.fixture
def model(_tiny):
    """The shared tiny model, unpatched at the start and reset after every test, pass or fail
    (building it per test would cost more than the tests)."""
    apply_merging(_tiny, MC(strategy="dense"))
    yield _tiny
    apply_merging(_tiny, MC(strategy="dense"))


KEYS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


def images(S, H=42, W=56, B=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (S, 3, H, W) if B is None else (B, S, 3, H, W)
    return torch.rand(shape, generator=g)


def run(model, x):
    with torch.inference_mode():
        return model(x)


def aggregate_tokens(model, x):
    with torch.inference_mode():
        return [t for t in model.aggregator(x)[0] if t is not None]


def test_dense_is_bit_identical_to_the_unpatched_model(model):
    x = images(2)
    plain = run(model, x)
    apply_merging(model, MC(strategy="httm"))
    merged = run(model, x)
    assert not torch.equal(merged["depth"], plain["depth"])
    apply_merging(model, MC(strategy="dense"))
    assert all(b.attn.attn_fn is None for b in model.aggregator.global_blocks)
    assert merge_stats(model) == []
    again = run(model, x)
    assert [key for key in KEYS if not torch.equal(again[key], plain[key])] == []


def test_httm_keeping_everything_equals_dense(model):
    x = images(3, 70, 70)
    dense = run(model, x)
    apply_merging(model, {"strategy": "httm", "q_keep": 1.0, "kv_keep": 1.0, "outlier_frac": 0.0, "block_spatial": 8, "block_frames": 3, "min_tokens": 0})
    full = run(model, x)
    errors = {key: float((full[key] - dense[key]).norm() / dense[key].norm())
              for key in ("pose_enc", "depth", "world_points")}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("S", [1, 2, 5])
@pytest.mark.parametrize("strategy", ["httm", "uniform"])
def test_shapes_stats_and_ratios_for_any_frame_count(model, S, strategy):
    x = images(S, B=2)
    dense = aggregate_tokens(model, x)
    apply_merging(model, MC(strategy=strategy, block_spatial=4, block_frames=2))
    merged = aggregate_tokens(model, x)
    assert [t.shape for t in merged] == [t.shape for t in dense]
    assert all(torch.isfinite(t).all() for t in merged)
    stats = merge_stats(model)
    P = 5 + 3 * 4
    assert [s["layer"] for s in stats] == [0, 1, 2, 3]
    assert {(s["tokens"], s["strategy"]) for s in stats} == {(S * P, strategy)}
    assert all(s["kv_kept"] <= S * P and min(s["q_kept"]) <= s["q_len"] <= S * P for s in stats)
    if S == 1:  # frame 0 is the anchor: nothing merges (anchor_first_frame)
        assert {(s["kv_kept"], tuple(s["q_kept"])) for s in stats} == {(P, (P, P))}
    if S == 5:
        assert all(s["kv_kept"] < S * P and max(s["q_kept"]) < S * P for s in stats)


@pytest.mark.parametrize("strategy", ["httm", "uniform"])
def test_every_layer_records_its_phase_times(model, strategy):
    apply_merging(model, MC(strategy=strategy, block_spatial=4, block_frames=2))
    aggregate_tokens(model, images(3))
    times = [(s["match_s"], s["aggregate_s"], s["attention_s"]) for s in merge_stats(model)]
    assert len(times) == 4 and all(min(t) > 0 for t in times), times


def test_layers_subset_replacement_and_validation(model):
    apply_merging(model, MC(strategy="httm", layers=[1, 3]))
    fns = [b.attn.attn_fn for b in model.aggregator.global_blocks]
    assert fns[0] is None and fns[2] is None and fns[1] is not None
    aggregate_tokens(model, images(3))
    assert [s["layer"] for s in merge_stats(model)] == [1, 3]
    apply_merging(model, MC(strategy="uniform"))
    assert all(type(b.attn.attn_fn).__name__ == "UniformAttention" for b in model.aggregator.global_blocks)
    with pytest.raises(ValueError, match="layers"):
        apply_merging(model, MC(layers=[4]))
    with pytest.raises(ValueError, match="unknown"):
        apply_merging(model, {"strategy": "httm", "ratio": 0.5})


def test_deterministic_and_batch_independent(model):
    x = images(4, B=2)
    apply_merging(model, MC(block_spatial=4, block_frames=2))
    a, b = run(model, x), run(model, x)
    single = run(model, x[1])
    assert torch.equal(a["depth"], b["depth"]) and torch.equal(a["pose_enc"], b["pose_enc"])
    torch.testing.assert_close(single["depth"][0], a["depth"][1], rtol=1e-4, atol=1e-5)


def test_plan_reuse_across_layers(model):
    x = images(4)
    apply_merging(model, MC(block_spatial=4, block_frames=2, plan_reuse=2))
    tokens = aggregate_tokens(model, x)
    assert [s["plan_reused"] for s in merge_stats(model)] == [False, True, False, True]
    apply_merging(model, MC(block_spatial=4, block_frames=2))
    fresh = aggregate_tokens(model, x)
    assert not any(s["plan_reused"] for s in merge_stats(model))
    assert not torch.equal(tokens[-1], fresh[-1])


@pytest.mark.parametrize("strategy", ["httm", "uniform"])
def test_bf16_aggregator(strategy):
    torch.manual_seed(0)
    agg = VGGT(VGGTConfig.preset("tiny")).aggregator.to(torch.bfloat16).eval()
    x = images(3, B=2).to(torch.bfloat16)
    apply_merging(agg, MC(strategy=strategy, block_spatial=4, block_frames=2))
    with torch.inference_mode():
        out = [t for t in agg(x)[0] if t is not None]
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in out)
    assert merge_stats(agg)[0]["kv_kept"] < 3 * 17


def _look_alike() -> torch.nn.Module:
    """Shaped like a VGGT (``aggregator.global_blocks``) but no model an adapter knows."""
    module = torch.nn.Module()
    module.aggregator = torch.nn.Module()
    module.aggregator.global_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    return module


@pytest.mark.parametrize("call", [lambda m: apply_merging(m, MC()), merge_stats, installed],
                         ids=["apply_merging", "merge_stats", "installed"])
@pytest.mark.parametrize("unknown", [lambda model: torch.nn.Linear(2, 2), lambda model: _look_alike(),
                                     lambda model: model.camera_head],
                         ids=["linear", "look-alike", "camera-head"])
def test_unknown_models_are_refused_naming_what_is_expected(model, unknown, call):
    """Not a silent no-op: a model no adapter knows is a TypeError listing the supported classes."""
    with pytest.raises(TypeError, match=r"cannot patch a .*; expected one of httm_dist\.model\.vggt\.VGGT, "
                                        r"httm_dist\.model\.aggregator\.Aggregator, vggt\.models\.vggt\.VGGT"):
        call(unknown(model))


def test_installed_lists_each_global_blocks_strategy(model):
    apply_merging(model, MC(strategy="uniform", layers=(0, 2)))
    fns = installed(model)
    assert [None if f is None else (f.name, f.layer_idx) for f in fns] == [("uniform", 0), None, ("uniform", 2), None]
    assert installed(model.aggregator) == fns  # the aggregator alone is the same blocks
    apply_merging(model, MC(strategy="dense"))
    assert installed(model) == [None] * 4
