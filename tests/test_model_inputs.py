"""Model input handling (shapes, bad input) and the global-attention hook contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from httm_dist.model import VGGT, AttentionContext, VGGTConfig

S, H, W = 2, 28, 42  # grid 2 x 3, P = 5 + 6 = 11 tokens per frame


@pytest.fixture(scope="module")
def model() -> VGGT:
    torch.manual_seed(0)
    return VGGT(VGGTConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(S, 3, H, W, generator=torch.Generator().manual_seed(1))


def test_output_shapes_with_and_without_batch_axis(model, images):
    with torch.inference_mode():
        single = model(images)
        batched = model(torch.stack([images, images.flip(-1)]))
    for out, B in ((single, 1), (batched, 2)):
        assert out["pose_enc"].shape == (B, S, 9)
        assert [p.shape for p in out["pose_enc_list"]] == [(B, S, 9)] * 4
        assert out["depth"].shape == (B, S, H, W, 1)
        assert out["depth_conf"].shape == (B, S, H, W)
        assert out["world_points"].shape == (B, S, H, W, 3)
        assert out["world_points_conf"].shape == (B, S, H, W)
        assert all(torch.isfinite(v).all() for k, v in out.items() if k != "pose_enc_list")
    torch.testing.assert_close(batched["depth"][0], single["depth"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((S, 3, 30, W), "multiples of the patch size 14.*H=30"),
        ((S, 3, H, 40), "multiples of the patch size 14.*W=40"),
        ((S, 4, H, W), "3 \\(RGB\\) channels, got 4"),
        ((S, 1, H, W), "3 \\(RGB\\) channels, got 1"),
        ((0, 3, H, W), "zero frames"),
        ((1, 0, 3, H, W), "zero frames"),
        ((3, H, W), "\\[S,3,H,W\\] or \\[B,S,3,H,W\\]"),
    ],
)
def test_bad_shapes_raise_value_error(model, shape, match):
    with pytest.raises(ValueError, match=match):
        model(torch.rand(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_raise(model, images, bad):
    x = images.clone()
    x[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.aggregator(x)


def test_integer_images_raise(model, images):
    with pytest.raises(ValueError, match="floating point"):
        model((images * 255).to(torch.uint8))


def test_hook_calling_sdpa_is_bit_identical_and_sees_the_layout(model, images):
    calls: list[tuple] = []

    def dense(q, k, v, ctx: AttentionContext):
        calls.append((q.shape, k.shape, v.shape, ctx))
        return F.scaled_dot_product_attention(q, k, v)

    batch = torch.stack([images, images.roll(5, dims=-1)])  # B = 2
    with torch.inference_mode():
        reference = model(batch)
        for block in model.aggregator.global_blocks:
            block.attn.attn_fn = dense
        try:
            hooked = model(batch)
        finally:
            for block in model.aggregator.global_blocks:
                block.attn.attn_fn = None

    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert torch.equal(hooked[key], reference[key]), key
    depth = len(model.aggregator.global_blocks)
    assert len(calls) == depth  # global blocks only: frame blocks never call the hook
    P, heads = 5 + (H // 14) * (W // 14), model.config.num_heads
    d = model.config.embed_dim // heads
    for i, (qs, ks, vs, ctx) in enumerate(calls):
        assert qs == ks == vs == (2, heads, S * P, d)
        assert (ctx.num_frames, ctx.tokens_per_frame, ctx.patch_grid, ctx.patch_start_idx, ctx.layer_idx) == (
            S, P, (H // 14, W // 14), 5, i)
        assert ctx.x.shape == (2, S * P, model.config.embed_dim)


def test_hook_output_is_used(model, images):
    """A hook that changes attention changes the outputs: the seam is really in the path."""
    block = model.aggregator.global_blocks[0]
    with torch.inference_mode():
        reference = model(images)
        block.attn.attn_fn = lambda q, k, v, ctx: v  # attention to self only
        try:
            changed = model(images)
        finally:
            block.attn.attn_fn = None
    assert not torch.allclose(changed["depth"], reference["depth"])


def test_hook_misuse_is_reported(model, images):
    frame_attn = model.aggregator.frame_blocks[0].attn
    frame_attn.attn_fn = lambda q, k, v, ctx: F.scaled_dot_product_attention(q, k, v)
    try:
        with pytest.raises(RuntimeError, match="not an aggregator global block"):
            model(images)
    finally:
        frame_attn.attn_fn = None
    global_attn = model.aggregator.global_blocks[1].attn
    global_attn.attn_fn = lambda q, k, v, ctx: v[:, :, :-1]
    try:
        with pytest.raises(RuntimeError, match="global layer 1"):
            model(images)
    finally:
        global_attn.attn_fn = None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_aggregator_under_autocast_and_heads_in_fp32(model, images):
    gpu = VGGT(model.config).eval()
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda()
    seen = []
    gpu.aggregator.global_blocks[0].attn.attn_fn = lambda q, k, v, ctx: (
        seen.append(q.dtype) or F.scaled_dot_product_attention(q, k, v))
    with torch.inference_mode():
        out = gpu(images.cuda())
        reference = model(images)
    major = torch.cuda.get_device_capability()[0]
    assert seen == [torch.bfloat16 if major >= 8 else torch.float16]
    for key in ("pose_enc", "depth", "world_points"):
        assert out[key].dtype == torch.float32
        err = (out[key].cpu() - reference[key]).norm() / reference[key].norm()
        assert err < 5e-2, key  # bf16 attention/MLP on a random model
