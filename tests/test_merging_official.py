"""HTTM as a patch over the official ``vggt`` package (facebookresearch/vggt, commit 44b3afb).

A tiny official VGGT is built here from the official classes with the shape of
``tests/fixtures/vggt_tiny`` and loaded with that fixture's state dict (the official key
layout, which httm-dist's ``load_vggt`` reads unchanged), so both models hold the same
weights. Skipped when ``vggt`` is not importable (an optional dependency; ``.ci/run``
installs it).

Tolerance: httm-dist's VGGT reproduces the official fp32 CPU computation operation for
operation, so merged outputs agree to ``TOL = 1e-5`` relative error (measured 0.0 on this
project's CPU); a different merge decision anywhere would show up orders of magnitude larger,
and in the per-layer stats, which are compared exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

pytest.importorskip("vggt.models.vggt", reason="the official vggt package is not importable (an optional dependency)")

from vggt.heads.camera_head import CameraHead  # noqa: E402
from vggt.heads.dpt_head import DPTHead  # noqa: E402
from vggt.layers.attention import Attention as OfficialAttention  # noqa: E402
from vggt.layers.attention import MemEffAttention  # noqa: E402
from vggt.layers.block import Block as OfficialBlock  # noqa: E402
from vggt.layers.vision_transformer import DinoVisionTransformer  # noqa: E402
from vggt.models.aggregator import Aggregator as OfficialAggregator  # noqa: E402
from vggt.models.vggt import VGGT as OfficialVGGT  # noqa: E402

from httm_dist.merging import MergeConfig, apply_merging, merge_stats  # noqa: E402
from httm_dist.merging.httm import HttmAttention  # noqa: E402
from httm_dist.model import load_vggt  # noqa: E402

TOL = 1e-5
OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast:FutureWarning")


def official_tiny(fixtures_dir) -> OfficialVGGT:
    """The official VGGT with the tiny fixture's shape (its __init__ only builds the 1B one)."""
    cfg = json.loads((fixtures_dir / "vggt_tiny" / "config.json").read_text())
    C, pe, dpt = cfg["embed_dim"], cfg["patch_embed"], cfg["dpt"]
    model = OfficialVGGT.__new__(OfficialVGGT)
    nn.Module.__init__(model)
    agg = OfficialAggregator(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=C, depth=cfg["depth"],
        num_heads=cfg["num_heads"], num_register_tokens=cfg["num_register_tokens"], patch_embed="conv",
    )
    agg.patch_embed = DinoVisionTransformer(  # as the official vit_large, at the fixture's size
        img_size=pe["img_size"], patch_size=cfg["patch_size"], embed_dim=pe["embed_dim"], depth=pe["depth"],
        num_heads=pe["num_heads"], mlp_ratio=pe["mlp_ratio"], block_fn=partial(OfficialBlock, attn_class=MemEffAttention),
        num_register_tokens=pe["num_register_tokens"], interpolate_antialias=True, interpolate_offset=0.0,
        block_chunks=0, init_values=1.0,
    )
    model.aggregator = agg
    model.camera_head = CameraHead(dim_in=2 * C, trunk_depth=cfg["camera_head"]["trunk_depth"], num_heads=cfg["camera_head"]["num_heads"])
    dense = dict(dim_in=2 * C, features=dpt["features"], out_channels=dpt["out_channels"], intermediate_layer_idx=dpt["intermediate_layer_idx"])
    model.point_head = DPTHead(output_dim=4, activation="inv_log", conf_activation="expp1", **dense)
    model.depth_head = DPTHead(output_dim=2, activation="exp", conf_activation="expp1", **dense)
    model.track_head = None
    model.load_state_dict(load_file(fixtures_dir / "vggt_tiny" / "weights.safetensors"), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def official(fixtures_dir) -> OfficialVGGT:
    return official_tiny(fixtures_dir)


@pytest.fixture(scope="module")
def ours(fixtures_dir):
    return load_vggt("tiny", weights=fixtures_dir / "vggt_tiny" / "weights.safetensors", device="cpu")


@pytest.fixture(autouse=True)
def unpatched(official, ours):
    yield
    apply_merging(official, {"strategy": "dense"})
    apply_merging(ours, {"strategy": "dense"})


def images(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(model, x):
    with torch.inference_mode():
        return model(x)


def decisions(stats):
    """Stats without the timings: what was merged, per layer."""
    return [{k: v for k, v in s.items() if not k.endswith("_s")} for s in stats]


def snapshot(model: OfficialVGGT):
    """Everything patching may touch: classes, attribute names and hooks of the aggregator and
    its global attentions."""
    agg = model.aggregator
    return (
        type(agg), sorted(agg.__dict__), dict(agg._forward_pre_hooks), dict(agg._forward_hooks),
        [(type(b.attn), sorted(b.attn.__dict__), dict(b.attn._forward_hooks)) for b in agg.global_blocks],
    )


def test_dense_patch_and_unpatch_leave_outputs_bit_identical(official):
    x = images((3, 3, 42, 56), seed=1)
    before = snapshot(official)
    plain = run(official, x)
    apply_merging(official, MergeConfig(strategy="dense"))
    assert snapshot(official) == before
    assert all(torch.equal(run(official, x)[k], plain[k]) for k in OUTPUTS)

    apply_merging(official, MergeConfig(block_spatial=4, block_frames=2, min_tokens=0))
    assert all(type(b.attn) is not OfficialAttention for b in official.aggregator.global_blocks)
    merged = run(official, x)
    assert rel_err(merged["depth"], plain["depth"]) > 1e-3  # the patch is live
    assert [s["layer"] for s in merge_stats(official)] == [0, 1, 2, 3]

    apply_merging(official, MergeConfig(strategy="dense"))
    assert snapshot(official) == before
    assert merge_stats(official) == []
    again = run(official, x)
    for key in OUTPUTS:
        assert torch.equal(again[key], plain[key]), key


def test_merging_the_official_model_equals_merging_ours(official, ours):
    """Same weights, same config: the same merge decisions in every layer and the same
    outputs, for two sequence shapes in a row on one patch (the layout is re-read per forward)."""
    cfg = MergeConfig(block_spatial=4, block_frames=2, min_tokens=0)
    first = images((4, 3, 42, 56), seed=2)
    dense = run(ours, first)
    for model in (official, ours):
        apply_merging(model, cfg)
    for x in (first, images((2, 3, 3, 70, 42), seed=3)):
        a, b = run(official, x), run(ours, x)
        assert decisions(merge_stats(official)) == decisions(merge_stats(ours))
        for key in OUTPUTS:
            assert rel_err(a[key], b[key]) < TOL, key
    S, P = 3, 5 + 5 * 3
    assert all(s["tokens"] == S * P and max(s["q_kept"]) < S * P and s["kv_kept"] < S * P for s in merge_stats(official))
    assert rel_err(run(official, first)["depth"], dense["depth"]) > 1e-3  # merging changed the result


OPTIONS = {
    "keeps": dict(q_keep=0.5, kv_keep=0.6, outlier_frac=0.2, block_spatial=6, block_frames=3, min_tokens=0),
    "layers": dict(layers=[1, 3], block_spatial=4, block_frames=2, min_tokens=0),
    "plan-reuse": dict(plan_reuse=2, block_spatial=4, block_frames=2, proportional_attention=True, min_tokens=0),
    "uniform": dict(strategy="uniform", kv_keep=0.4, min_tokens=0),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_behave_the_same_on_both(official, ours, name):
    """Each option gives the same per-layer decisions (layers patched, plan reuse, query and
    key/value counts) and the same tokens in every aggregator layer on both models."""
    cfg = MergeConfig(**OPTIONS[name])
    x = images((1, 5, 3, 42, 56), seed=5)
    tokens = {}
    for label, model in (("official", official), ("ours", ours)):
        apply_merging(model, cfg)
        with torch.inference_mode():
            tokens[label] = model.aggregator(x)[0]
    stats = merge_stats(official)
    assert decisions(stats) == decisions(merge_stats(ours))
    assert [s["layer"] for s in stats] == cfg.layer_indices(4)
    assert [s["plan_reused"] for s in stats] == [p % cfg.plan_reuse != 0 for p in range(len(stats))]
    assert all(s["kv_kept"] < 5 * 17 for s in stats)
    assert all(max(s["q_kept"]) < 5 * 17 for s in stats)
    for i, (a, b) in enumerate(zip(tokens["official"], tokens["ours"])):
        assert rel_err(a, b) < TOL, f"layer {i}"


def test_official_aggregator_under_bf16_autocast(official, ours, monkeypatch):
    """The official Aggregator patched alone, run under CPU bf16 autocast (as the official
    inference runs under CUDA autocast): the strategy gets q, k, v in the autocast dtype and the
    tokens match httm-dist's aggregator under the same autocast."""
    seen = []
    plan = HttmAttention.plan

    def spy(self, q, k, v, ctx, timer):
        seen.append((q.dtype, k.dtype, v.dtype))
        return plan(self, q, k, v, ctx, timer)

    monkeypatch.setattr(HttmAttention, "plan", spy)
    x = images((1, 4, 3, 42, 56), seed=4)
    cfg = MergeConfig(block_spatial=4, block_frames=2, min_tokens=0)
    out = {}
    for name, model in (("official", official.aggregator), ("ours", ours.aggregator)):
        apply_merging(model, cfg)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out[name] = [t for t in model(x)[0] if t is not None]
        assert merge_stats(model)[0]["kv_kept"] < 4 * 17
    assert set(seen) == {(torch.bfloat16,) * 3}
    last = len(out["ours"]) - 1
    assert out["official"][-1].dtype == out["ours"][-1].dtype
    assert torch.isfinite(out["official"][-1]).all()
    assert rel_err(out["official"][-1], out["ours"][last]) < 1e-3  # bf16 kernels, same ops


def test_refuses_official_models_it_cannot_patch(official, fixtures_dir):
    fork = official_tiny(fixtures_dir).aggregator
    fork.global_blocks[2].attn = nn.Identity()  # a fork that replaced the attention class
    with pytest.raises(TypeError, match=r"global_blocks\[2\]\.attn is torch\.nn\.modules\.linear\.Identity.*vggt\.layers\.attention\.Attention"):
        apply_merging(fork, MergeConfig())
    apply_merging(official, MergeConfig())
    attn = official.aggregator.global_blocks[0].attn
    with pytest.raises(RuntimeError, match="before its aggregator"):
        with torch.inference_mode():
            attn(torch.zeros(1, 10, 128), pos=None)


def test_httm_dist_imports_vggt_only_for_an_official_model():
    code = (
        "import sys, torch\n"
        "from httm_dist.merging import apply_merging, merge_stats\n"
        "from httm_dist.model import VGGT, VGGTConfig\n"
        "m = apply_merging(VGGT(VGGTConfig.preset('tiny')).eval(), {'strategy': 'httm'})\n"
        "with torch.inference_mode(): m(torch.rand(2, 3, 28, 28))\n"
        "assert merge_stats(m)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] == 'vggt'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
