"""The merging strategies at the attention level: random q/k/v and a stand-in context."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import httm_dist.merging.matching as matching
from httm_dist.merging import MergeConfig
from httm_dist.merging.base import PhaseTimer, SharedState
from httm_dist.merging.httm import HttmAttention
from httm_dist.merging.matching import aggregate, build_plan, match
from httm_dist.merging.reorder import build_layout
from httm_dist.merging.uniform import UniformAttention
from httm_dist.model.hooks import AttentionContext


def make(S=4, grid=(4, 6), psi=5, B=2, H=4, d=16, C=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = psi + grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, S * P, d, generator=g).to(dtype) for _ in range(3))
    x = torch.randn(B, S * P, C, generator=g).to(dtype)
    return q, k, v, AttentionContext(S, P, grid, psi, 0, x)


def strategy(cfg, position=0, shared=None):
    cls = {"httm": HttmAttention, "uniform": UniformAttention}[cfg.strategy]
    return cls(cfg, 0, position, shared or SharedState(cfg))


def with_plan(a, q, k, v, proportional=False):
    """Reference attention under a given Assignment: mean-merge, dense kernel, copy back."""
    (qm,), _ = aggregate([q], a.q_assign, a.q_slots)
    (km, vm), sizes = aggregate([k, v], a.kv_assign, a.kv_slots)
    bias = sizes.clamp_min(1).float().log().unsqueeze(2) if proportional else None
    out = F.scaled_dot_product_attention(qm, km, vm, attn_mask=bias)
    return matching.unmerge(out, a.q_assign)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("S,bs,bf", [(1, 128, 30), (5, 7, 2), (3, 4, 30)])
def test_keep_all_equals_dense(S, bs, bf):
    q, k, v, ctx = make(S=S)
    cfg = MergeConfig(q_keep=1.0, kv_keep=1.0, outlier_frac=0.0, block_spatial=bs, block_frames=bf)
    out = strategy(cfg)(q, k, v, ctx)
    assert rel(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5


def test_effective_lengths_meet_the_ratios():
    S, grid, psi, H = 10, (4, 8), 5, 4
    q, k, v, ctx = make(S=S, grid=grid, psi=psi, H=H)
    cfg = MergeConfig(block_spatial=32, block_frames=10)  # one block per 10 frames
    f = strategy(cfg)
    f(q, k, v, ctx)
    st = f.last_stats
    N = S * (psi + 32)
    assert st["tokens"] == N
    assert st["kv_kept"] == S * psi + round(0.3 * S) * 32  # 3 dst frames + protected
    shared = S * psi + round(0.1 * S) * 32  # 1 dst frame (frame 0)
    restored = np.array(st["q_kept"]) - shared  # per head, different across heads
    assert restored.sum() == pytest.approx(round(0.1 * H * N))  # the global outlier budget
    assert (restored > 0).all() and len(set(restored)) > 1 and st["q_len"] >= max(st["q_kept"])
    assert 0.2 <= np.mean(st["q_kept"]) / N <= 0.2 + S * psi / N  # q_keep, up to protected


def _reference_slots(x, plan):
    """Slow reference of match(): per head, per block, per src, loops."""
    B, H, N, d = x.shape
    out = torch.full((B, H, N), -1, dtype=torch.long)
    for g in plan.groups:
        valid_s = np.zeros(g.src_idx.numel(), bool)
        valid_s[g.src_sel.numpy()] = True
        valid_s = valid_s.reshape(g.src_idx.shape)
        for srow, vs, drow, vd in zip(g.src_idx.numpy(), valid_s, g.dst_idx.numpy(), g.dst_valid.numpy()):
            for b in range(B):
                for h in range(H):
                    for s in srow[vs]:
                        sims = [float(F.cosine_similarity(x[b, h, s], x[b, h, t], dim=0)) for t in drow[vd]]
                        out[b, h, s] = plan.slot_of[drow[vd][int(np.argmax(sims))]]
    return out


def _small_plan(dtype=torch.float32):
    q, _, _, ctx = make(S=5, grid=(3, 5), H=2, B=2, dtype=dtype)
    lay = build_layout(5, ctx.tokens_per_frame, (3, 5), 5, 6, 2)
    return q, build_plan(lay, 0.3, True, torch.device("cpu"))


def test_matching_agrees_with_a_loop_reference():
    q, plan = _small_plan()
    assert len(plan.groups) == 2  # runs of 2 frames and the last run of 1
    ref = _reference_slots(q, plan)
    assert torch.equal(match(q, plan), ref[:, :, plan.src_tokens])


@pytest.mark.parametrize("budget", [7, 200], ids=["rows-of-one-block", "several-blocks"])
def test_matching_is_the_same_in_chunks(budget, monkeypatch):
    q, plan = _small_plan()
    slots = match(q, plan)
    monkeypatch.setattr(matching, "MATCH_CHUNK_ELEMENTS", {"cpu": budget, "cuda": budget})
    assert torch.equal(match(q, plan), slots)


def test_chunked_argmax_equals_one_argmax(monkeypatch):
    monkeypatch.setattr(matching, "MATCH_CHUNK_ELEMENTS", {"cpu": 7, "cuda": 7})
    g = torch.Generator().manual_seed(5)
    xs, xd = torch.randn(3, 100, 4, generator=g), torch.randn(3, 7, 4, generator=g)
    full = torch.bmm(xs, xd.transpose(1, 2)).argmax(-1)
    assert torch.equal(matching._chunked_argmax(xs, xd), full)  # 1-row chunks of 100


@pytest.mark.parametrize("budget", [7, 40, 200, 1500])  # 1500: two blocks of 100 x 7 per chunk
def test_chunked_source_gathers_agree_with_gathering_everything_first(budget, monkeypatch):
    # sources gathered chunk by chunk (match) and outlier distances computed chunk by chunk
    # must equal the unchunked computation, for chunks inside one block and across blocks
    g = torch.Generator().manual_seed(3)
    table, xd = torch.randn(50, 4, generator=g), torch.randn(3, 7, 4, generator=g)
    rows = torch.randint(0, 50, (3, 100), generator=g)
    full = torch.bmm(table[rows], xd.transpose(1, 2)).argmax(-1)
    q, plan = _small_plan(torch.bfloat16)
    slots = match(q, plan)
    (sums,), sizes = matching.aggregate_sums([q], matching.assignment(plan, slots), plan.num_kept)
    means = matching.slot_means(sums, sizes, (2, 2, plan.num_kept))
    ms = means.reshape(-1, means.shape[-1])[matching._flat(slots, plan.num_kept)]
    ref = (q[:, :, plan.src_tokens].float().reshape(-1, q.shape[-1]) - ms).norm(dim=-1)
    mask = matching.select_outliers(q, means, plan, slots, 0.2)
    assert 0 < int(mask.sum()) < mask.numel()
    monkeypatch.setattr(matching, "MATCH_CHUNK_ELEMENTS", {"cpu": budget, "cuda": budget})
    assert torch.equal(matching._chunked_argmax(table, xd, rows), full)
    assert torch.allclose(matching._src_distances(q, means, plan, slots), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(matching.select_outliers(q, means, plan, slots, 0.2), mask)


def test_outlier_filtering_restores_the_top_deviations_and_recomputes_means():
    q, k, v, ctx = make(S=6, grid=(4, 4), H=4, B=2)
    cfg = MergeConfig(block_spatial=8, block_frames=3, q_keep=0.3, outlier_frac=0.15)
    f = strategy(cfg)
    a = f.plan(q, k, v, ctx, PhaseTimer(False))
    (plan_q, _) = f.layout_plans(ctx, q.device, 8, 3, (cfg.q_keep - cfg.outlier_frac, cfg.kv_keep))
    B, H, N, d = q.shape
    slots = match(q, plan_q)
    first = matching.assignment(plan_q, slots)
    for b in range(B):
        dist = torch.zeros(H, N)
        for h in range(H):  # reference: distance of each src to its merged token (mean)
            for t in plan_q.src_tokens.tolist():
                members = (first[b, h] == first[b, h, t]).nonzero().flatten()
                dist[h, t] = (q[b, h, t] - q[b, h, members].mean(0)).norm()
        count = round(cfg.outlier_frac * H * N)
        expected = set(dist.flatten().topk(count).indices.tolist())
        restored = (a.q_assign[b] >= plan_q.num_kept).flatten().nonzero().flatten().tolist()
        assert set(restored) == expected
        assert a.q_kept[b].sum() == H * plan_q.num_kept + count
    means = a.q_means  # what the kernel gets: outliers subtracted from the first aggregation
    for b, h in [(0, 0), (1, 3)]:
        for s in range(a.q_slots):
            members = (a.q_assign[b, h] == s).nonzero().flatten()
            if len(members):  # recomputed without the outliers; outliers alone
                torch.testing.assert_close(means[b, h, s], q[b, h, members].mean(0))
            else:  # only padding slots are empty
                assert s >= a.q_kept[b, h] and not means[b, h, s].any()


def _unique_rows(out):
    B, H, N, d = out.shape
    rows = out.transpose(1, 2).reshape(B, N, H * d)
    return [len(torch.unique(rows[b], dim=0)) for b in range(B)]


def test_uniform_duplicates_rows_and_httm_does_not():
    q, k, v, ctx = make(S=6, grid=(4, 6), H=8, B=2)
    N = q.shape[2]
    uni = strategy(MergeConfig(strategy="uniform", kv_keep=0.3))
    out_u = uni(q, k, v, ctx)
    assert _unique_rows(out_u) == [uni.last_stats["kv_kept"]] * 2 and uni.last_stats["kv_kept"] < N
    out_h = strategy(MergeConfig(q_keep=0.2, kv_keep=0.3, outlier_frac=0.0))(q, k, v, ctx)
    assert _unique_rows(out_h) == [N, N]


@pytest.mark.parametrize("name", ["httm", "uniform"])
def test_bf16_batch_and_determinism(name):
    q, k, v, ctx = make(S=4, B=3, dtype=torch.bfloat16)
    cfg = MergeConfig(strategy=name, block_spatial=8, block_frames=2)
    f = strategy(cfg)
    a, b = f(q, k, v, ctx), strategy(cfg)(q, k, v, ctx)
    assert a.dtype == torch.bfloat16 and a.shape == q.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    # the bf16 numerics (aggregation in fp32, kernel in bf16) against fp32 on the same plan
    ref = with_plan(f.plan(q, k, v, ctx, PhaseTimer(False)), q.float(), k.float(), v.float())
    torch.testing.assert_close(a.float(), ref, atol=3e-2, rtol=3e-2)
    # batch elements are independent: each one alone gives its row of the batched call
    ctxs = [AttentionContext(ctx.num_frames, ctx.tokens_per_frame, ctx.patch_grid, ctx.patch_start_idx, 0, ctx.x[i : i + 1]) for i in range(3)]
    alone = torch.cat([strategy(cfg)(q[i : i + 1], k[i : i + 1], v[i : i + 1], c) for i, c in enumerate(ctxs)])
    torch.testing.assert_close(alone.float(), a.float(), atol=2e-2, rtol=2e-2)


def test_proportional_attention_equals_attention_over_duplicated_keys():
    q, k, v, ctx = make(S=4, H=2, B=1)
    cfg = MergeConfig(block_spatial=8, block_frames=4, proportional_attention=True, outlier_frac=0.0)
    f = strategy(cfg)
    out = f(q, k, v, ctx)
    a = f.plan(q, k, v, ctx, PhaseTimer(False))  # deterministic: the plan the call used
    torch.testing.assert_close(out, with_plan(a, q, k, v, proportional=True))
    (km, vm), _ = aggregate([k, v], a.kv_assign, a.kv_slots)
    dup = [matching.unmerge(t, a.kv_assign) for t in (km, vm)]  # every key -> its cluster mean
    (qm,), _ = aggregate([q], a.q_assign, a.q_slots)
    ref = matching.unmerge(F.scaled_dot_product_attention(qm, *dup), a.q_assign)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    plain = strategy(MergeConfig(block_spatial=8, block_frames=4, outlier_frac=0.0))(q, k, v, ctx)
    assert rel(plain, out) > 1e-3


def test_plan_reuse_shares_the_assignment_but_recomputes_means():
    q, k, v, ctx = make(S=4)
    cfg = MergeConfig(block_spatial=8, block_frames=2, plan_reuse=2)
    shared = SharedState(cfg)
    first, second = strategy(cfg, 0, shared), strategy(cfg, 1, shared)
    first(q, k, v, ctx)
    a = shared.last
    q2, k2, v2, _ = make(S=4, seed=1)
    out = second(q2, k2, v2, ctx)
    assert second.last_stats["plan_reused"] and not first.last_stats["plan_reused"]
    assert shared.last is a and second.last_stats["match_s"] == 0.0
    fresh = strategy(cfg)(q2, k2, v2, ctx)
    assert rel(out, fresh) > 1e-3  # a different (reused) plan, on the new tensors
    torch.testing.assert_close(out, with_plan(a, q2, k2, v2))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["httm", "uniform"])
def test_hot_path_op_count_does_not_grow_with_tokens_heads_or_blocks(name):
    counts = []
    for S, H in [(2, 2), (8, 6)]:  # 4x the blocks, 3x the heads, 4x the tokens
        q, k, v, ctx = make(S=S, H=H, grid=(6, 8))
        f = strategy(MergeConfig(strategy=name, block_spatial=12, block_frames=2))
        f(q, k, v, ctx)  # builds and caches the static plan
        with _CountOps() as c:
            f(q, k, v, ctx)
        counts.append(c.n)
    assert counts[0] == counts[1]


def test_a_context_of_the_wrong_length_is_named():
    q, k, v, ctx = make(S=2)
    bad = AttentionContext(3, ctx.tokens_per_frame, ctx.patch_grid, ctx.patch_start_idx, 0, ctx.x)
    with pytest.raises(ValueError, match=r"q has 58 tokens but the context describes 3 frames x 29 tokens"):
        strategy(MergeConfig())(q, k, v, bad)


def test_uniform_without_the_block_input_is_named():
    q, k, v, ctx = make(S=2)
    nox = AttentionContext(2, ctx.tokens_per_frame, ctx.patch_grid, ctx.patch_start_idx, 0, None)
    with pytest.raises(ValueError, match=r"uniform.*carries no block input x.*AttentionContext\.x"):
        strategy(MergeConfig(strategy="uniform"))(q, k, v, nox)
