"""Issue 14 on CPU: static shapes, no host syncs, the dense rule under min_tokens, uniform's
compute dtype, and the output layout of unmerge."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import httm_dist.merging.matching as matching
from httm_dist.merging import MergeConfig, apply_merging, merge_stats
from httm_dist.merging.base import PhaseTimer, SharedState
from httm_dist.merging.httm import HttmAttention
from httm_dist.merging.uniform import UniformAttention
from httm_dist.model import VGGT, VGGTConfig
from httm_dist.model.hooks import AttentionContext
from httm_dist.model.rope import RopeTable


def make(S=6, grid=(4, 6), psi=5, B=2, H=4, d=16, C=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = psi + grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, S * P, d, generator=g).to(dtype) for _ in range(3))
    x = torch.randn(B, S * P, C, generator=g)
    return q, k, v, AttentionContext(S, P, grid, psi, 0, x)


def layers(cfg, n=4):
    """``n`` patched layers of one apply_merging call (shared state, positions 0..n-1)."""
    cls = {"httm": HttmAttention, "uniform": UniformAttention}[cfg.strategy]
    shared = SharedState(cfg)
    return [cls(cfg, i, i, shared) for i in range(n)]


class _RaiseOnSync(TorchDispatchMode):
    """Raises on the aten ops that read a device value on the host (a CUDA sync)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select", "item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(name.startswith(s) or name.lstrip("_").startswith(s) for s in self.SYNCING):
            raise AssertionError(f"host sync in the merged forward: aten.{func.__name__}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Tensor.item / tolist / nonzero / int() / float() / bool() raise, and so do the syncing
    aten ops underneath (the Python patches alone would miss e.g. bincount's internal sync)."""
    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"host sync in the merged forward: Tensor.{name}")
        return f

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "nonzero", "__int__", "__float__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, name, boom(name))
        with _RaiseOnSync():
            yield


def test_the_sync_guard_catches_what_it_should(monkeypatch):
    t = torch.tensor([1, 0, 2])
    for fn in (lambda: t.max().item(), lambda: int(t.max()), lambda: t.nonzero(), lambda: t.tolist(),
               lambda: torch.bincount(t), lambda: bool(t.any())):
        with pytest.raises(AssertionError, match="host sync"):
            with no_host_sync(monkeypatch):
                fn()


@pytest.mark.parametrize(
    "cfg",
    [
        MergeConfig(min_tokens=0, block_spatial=8, block_frames=3),
        MergeConfig(min_tokens=0, block_spatial=8, block_frames=3, plan_reuse=2, proportional_attention=True),
        MergeConfig(min_tokens=0, strategy="uniform"),
        MergeConfig(min_tokens=10**6),  # the dense rule
    ],
    ids=["httm", "httm-reuse-proportional", "uniform", "dense-rule"],
)
def test_merged_forward_makes_no_host_sync(monkeypatch, cfg):
    fns = layers(cfg)
    for seed in (0, 1):  # the first call builds and caches the static plans; both must be clean
        q, k, v, ctx = make(seed=seed)
        with no_host_sync(monkeypatch):
            outs = [f(q, k, v, ctx) for f in fns]
        assert all(o.shape == q.shape and torch.isfinite(o).all() for o in outs)
    assert fns[0].last_stats["tokens"] == q.shape[2]  # reading stats (a sync) works after


class _AtenOps(TorchDispatchMode):
    """Records the aten ops dispatched (names without overload)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strategy", ["httm", "uniform"])
def test_the_dense_rule_dispatches_exactly_the_unpatched_kernel(strategy):
    """Under ``min_tokens`` a layer runs the dense kernel and nothing else: no tensor is made
    for its stats (they hold plain counts), yet they read as for a merged layer."""
    q, k, v, ctx = make()
    fn = layers(MergeConfig(strategy=strategy), 1)[0]
    with _AtenOps() as patched:
        out = fn(q, k, v, ctx)
    with _AtenOps() as unpatched:
        ref = F.scaled_dot_product_attention(q, k, v)
    assert patched.ops == unpatched.ops and torch.equal(out, ref)
    B, H, N, _ = q.shape
    st = fn.last_stats
    assert not st["merged"] and st["q_kept"] == [float(N)] * H and st["q_len"] == st["kv_kept"] == N


def test_query_length_is_static_across_layers_and_inputs():
    cfg = MergeConfig(min_tokens=0, block_spatial=8, block_frames=3)
    fns = layers(cfg, 3)
    lens, kept = set(), []
    for seed in range(4):
        q, k, v, ctx = make(seed=seed)
        if seed == 3:  # one head far off its merged tokens: it would want most outliers
            q[:, 0] *= torch.linspace(0.1, 8.0, q.shape[2]).view(1, -1, 1)
        for f in fns:
            f(q, k, v, ctx)
            lens.add(f.last_stats["q_len"])
            kept.append(f.last_stats["q_kept"])
    B, H, N, _ = q.shape
    plan_q, _ = fns[0].layout_plans(ctx, q.device, 8, 3, (cfg.q_keep - cfg.outlier_frac, cfg.kv_keep))
    count, cap = matching.outlier_budget(cfg.outlier_frac, H, N, plan_q.num_src, cfg.outlier_cap)
    assert lens == {plan_q.num_kept + cap} and cap < plan_q.num_src
    assert len({tuple(k) for k in kept}) > 1  # the per-head counts do vary with the data
    assert max(max(k) for k in kept) == plan_q.num_kept + cap  # seed 3's head 0 hits the cap


def test_capped_outliers_are_the_greedy_global_choice_and_padding_is_dropped():
    q, k, v, ctx = make(S=6, H=4, seed=2)
    q[:, 1] *= 5.0  # head 1 deviates most: uncapped, it would take nearly all outliers
    cfg = MergeConfig(min_tokens=0, block_spatial=8, block_frames=3, outlier_frac=0.1, outlier_cap=1.5)
    f = layers(cfg, 1)[0]
    a = f.plan(q, k, v, ctx, PhaseTimer(False))
    plan_q, _ = f.layout_plans(ctx, q.device, 8, 3, (cfg.q_keep - cfg.outlier_frac, cfg.kv_keep))
    B, H, N, _ = q.shape
    count, cap = matching.outlier_budget(0.1, H, N, plan_q.num_src, 1.5)
    src = matching.match(q, plan_q)
    (sums,), sizes = matching.aggregate_sums([q], matching.assignment(plan_q, src), plan_q.num_kept)
    means = matching.slot_means(sums, sizes, (B, H, plan_q.num_kept))
    dist = matching._src_distances(q, means, plan_q, src).view(B, H, -1)
    for b in range(B):  # reference: walk the distances in decreasing order, skip full heads
        taken, per_head = set(), [0] * H
        for i in dist[b].flatten().argsort(descending=True).tolist():
            h = i // plan_q.num_src
            if per_head[h] < cap:
                taken.add(i)
                per_head[h] += 1
            if len(taken) == count:
                break
        restored = (a.q_assign[b][:, plan_q.src_tokens] >= plan_q.num_kept).flatten()
        assert set(restored.nonzero().flatten().tolist()) == taken
        assert per_head[1] == cap and sum(per_head) == count
    assert a.q_slots == plan_q.num_kept + cap
    # padding slots (past each head's count) are never read back by unmerge
    assert (a.q_assign < a.q_kept.unsqueeze(-1)).all()
    # and the output equals attention over the real merged queries only
    out = f(q, k, v, ctx)
    (qm,), _ = matching.aggregate([q], a.q_assign, a.q_slots)
    (km, vm), _ = matching.aggregate([k, v], a.kv_assign, a.kv_slots)
    for b, h in [(0, 1), (1, 2)]:
        n = int(a.q_kept[b, h])
        ref = F.scaled_dot_product_attention(qm[b, h, :n], km[b, h], vm[b, h])
        torch.testing.assert_close(out[b, h], ref[a.q_assign[b, h]], rtol=1e-5, atol=1e-6)


def test_outliers_are_numbered_once_per_plan():
    """restore_outliers numbers the outliers (a cumsum over [B, H, n_src]); split_outliers
    reads its slots instead of numbering them again; without filtering nothing is numbered."""
    q, k, v, ctx = make(seed=4)
    for frac, cumsums in ((0.1, 1), (0.0, 0)):
        f = layers(MergeConfig(min_tokens=0, block_spatial=8, block_frames=3, outlier_frac=frac), 1)[0]
        with _AtenOps() as rec:
            a = f.plan(q, k, v, ctx, PhaseTimer(False))
        assert rec.ops.count("cumsum") == cumsums
        # and the merged queries it hands over are the means over its final assignment
        if a.q_means is not None:
            (ref,), _ = matching.aggregate([q], a.q_assign, a.q_slots)
            torch.testing.assert_close(a.q_means, ref, rtol=1e-5, atol=1e-6)
        else:
            assert a.q_slots == a.q_kept == int(a.q_assign.max()) + 1


def test_unmerge_writes_the_layout_the_block_reads_without_a_copy():
    out = torch.randn(2, 3, 5, 4)
    assign = torch.randint(0, 5, (2, 3, 7))
    got = matching.unmerge(out, assign)
    ref = torch.stack([torch.stack([out[b, h, assign[b, h]] for h in range(3)]) for b in range(2)])
    assert torch.equal(got, ref)
    assert got.transpose(1, 2).is_contiguous()  # layers.py: out.transpose(1, 2).reshape(B, N, C)
    shared = matching.unmerge(out, assign[:, :1])  # one plan for all heads
    assert torch.equal(shared, torch.stack([torch.stack([out[b, h, assign[b, 0]] for h in range(3)]) for b in range(2)]))


class _MatmulDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("bmm", "mm", "matmul"):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_uniform_matches_in_the_compute_dtype_under_autocast():
    q, k, v, ctx = make(dtype=torch.bfloat16)
    assert ctx.x.dtype == torch.float32  # as the model passes it under autocast (norm1 output)
    f = layers(MergeConfig(min_tokens=0, strategy="uniform"), 1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulDtypes() as rec:
        f.plan(q, k, v, ctx, PhaseTimer(False))
    assert rec.dtypes and set(rec.dtypes) == {torch.bfloat16}
    # and it is the plan of matching on the bf16-rounded input
    (plan,) = f.layout_plans(ctx, q.device, 24, ctx.num_frames, (0.3,))
    ref = matching.match(ctx.x.to(torch.bfloat16).unsqueeze(1), plan)
    a = f.plan(q, k, v, ctx, PhaseTimer(False))
    assert torch.equal(a.q_assign, matching.assignment(plan, ref))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VGGT(VGGTConfig.preset("tiny")).eval()


def test_tiny_input_under_the_default_config_is_exactly_dense(model):
    x = torch.rand(4, 3, 42, 56, generator=torch.Generator().manual_seed(1))
    apply_merging(model, MergeConfig(strategy="dense"))
    with torch.inference_mode():
        dense = model(x)
    for strategy in ("httm", "uniform"):
        apply_merging(model, MergeConfig(strategy=strategy))  # default min_tokens
        with torch.inference_mode():
            out = model(x)
        stats = merge_stats(model)
        assert len(stats) == 4 and not any(s["merged"] for s in stats)
        for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
            assert torch.equal(out[key], dense[key]), (strategy, key)
    apply_merging(model, MergeConfig(strategy="httm", min_tokens=0))
    with torch.inference_mode():
        assert not torch.equal(model(x)["depth"], dense["depth"])  # the same input, merged
    assert all(s["merged"] for s in merge_stats(model))
    apply_merging(model, MergeConfig(strategy="dense"))


def test_model_forward_merges_without_host_sync_and_one_query_length(model, monkeypatch):
    """The merged attention of every layer inside the model, guarded (the model's own input
    check outside the hooks may sync once per forward; that is not the merging's)."""
    apply_merging(model, MergeConfig(strategy="httm", min_tokens=0, block_spatial=4, block_frames=2))
    x = torch.rand(5, 3, 42, 56, generator=torch.Generator().manual_seed(2))
    guarded = []
    for block in model.aggregator.global_blocks:
        fn = block.attn.attn_fn

        def wrapped(q, k, v, ctx, fn=fn):
            with no_host_sync(monkeypatch):
                out = fn(q, k, v, ctx)
            guarded.append(ctx.layer_idx)
            return out

        block.attn.attn_fn = wrapped
    try:
        with torch.inference_mode():
            model.aggregator(x)
    finally:
        for block in model.aggregator.global_blocks:
            block.attn.attn_fn = block.attn.attn_fn.__defaults__[0]
    assert guarded == [0, 1, 2, 3]
    stats = merge_stats(model)
    assert len({s["q_len"] for s in stats}) == 1 and stats[0]["q_len"] < stats[0]["tokens"]
    apply_merging(model, MergeConfig(strategy="dense"))


@pytest.mark.parametrize("strategy", ["httm", "uniform"])
def test_whole_model_forward_syncs_only_in_its_input_check(model, monkeypatch, strategy):
    """Issue 14: no host sync anywhere in a merged forward (patch embed, both block kinds,
    RoPE, the merging, the heads), not only inside the hooks. The one read left is the
    input check (images finite), made once per forward: VGGT.forward checks the shape only
    and leaves the values to its aggregator."""
    import httm_dist.model.aggregator as aggregator_module
    import httm_dist.model.vggt as vggt_module

    x = torch.rand(1, 5, 3, 42, 56, generator=torch.Generator().manual_seed(3))
    checked = []

    def check_images(images, patch_size, check_finite=True):  # validated outside the guard
        checked.append(check_finite)
        return images if images.ndim == 5 else images.unsqueeze(0)

    apply_merging(model, MergeConfig(strategy=strategy, min_tokens=0, block_spatial=4, block_frames=2, plan_reuse=2))
    with torch.inference_mode():
        model(x)  # plans built
        aggregator_module.check_images(x, 14)
        for module in (aggregator_module, vggt_module):
            monkeypatch.setattr(module, "check_images", check_images)
        with no_host_sync(monkeypatch):
            out = model(x)
    assert sorted(checked) == [False, True] and torch.isfinite(out["depth"]).all()
    assert all(s["merged"] for s in merge_stats(model))
    apply_merging(model, MergeConfig(strategy="dense"))


def test_plans_for_cuda_without_index_are_the_ones_cuda_0_finds(monkeypatch):
    """bench_gpu prepares plans for ``torch.device("cuda")``; the forward's tensors are on
    ``cuda:0``: both must hit one cache entry (CPU keys unchanged)."""
    import httm_dist.merging.base as base

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    built = []
    monkeypatch.setattr(base, "build_plan", lambda layout, f, anchor, device: built.append(device) or device)
    fn = layers(MergeConfig(strategy="uniform"), 1)[0]
    _, _, _, ctx = make()
    first = fn.plans(ctx, torch.device("cuda"))
    assert fn.plans(ctx, torch.device("cuda:0")) is first and fn.plans(ctx, "cuda") is first
    assert built == [torch.device("cuda", 0)]
    assert base.plan_device(torch.device("cpu")) == torch.device("cpu")
    assert str(base.plan_device("cuda:1")) == "cuda:1"


class _FreshBytes(TorchDispatchMode):
    """Bytes of the tensors the dispatched ops write that share storage with none of their inputs."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ins:
                self.bytes += o.numel() * o.element_size()
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_the_official_formula_bit_for_bit_in_two_writes_for_fp32(dtype):
    """Found profiling issue 14's point 4 (the whole forward, not one layer): RoPE on q and k
    of every block was the largest copy of the forward (-t2 and the rotated halves stacked:
    five writes of q's size). It now writes twice and stays bit-identical to the official
    ``t * cos + rotate_half(t) * sin`` (halves: ``rotate_half(t) = cat(-t2, t1)``). Only fp32
    takes the two-write path (bf16's strided writes were slower on CPU); every dtype is exact."""
    rope = RopeTable((3, 5), 5, 16, 100.0, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    t = (10 * torch.randn(2, 4, 6 * rope.tokens, 16, generator=g)).to(dtype)
    for x in (t, t.transpose(1, 2).contiguous().transpose(1, 2)):  # contiguous, and a strided view
        cos, sin = rope._cos_sin(dtype)
        f = x.unflatten(-2, (6, rope.tokens))
        halves = [h.chunk(2, dim=-1) for h in f.chunk(2, dim=-1)]  # (y, x) halves, each (t1, t2)
        rotated = torch.cat([torch.cat([-t2, t1], dim=-1) for t1, t2 in halves], dim=-1)
        ref = (f * cos + rotated * sin).flatten(-3, -2)
        with _FreshBytes() as rec:
            out = rope.apply(x)
        assert torch.equal(out, ref) and out.dtype == dtype
        if dtype == torch.float32:
            assert rec.bytes <= 2 * x.numel() * x.element_size()
        # under autograd (training): the same values, and gradients flow
        y = x.detach().requires_grad_(True)
        out = rope.apply(y)
        assert torch.equal(out.detach(), ref) and out.requires_grad
        out.sum().backward()
        assert y.grad is not None and torch.isfinite(y.grad).all()
