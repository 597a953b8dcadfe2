"""The merging algorithm: destination plans, block-wise cosine matching, aggregation, unmerge.

A :class:`MergePlan` is static for one sequence shape and keep ratio: which tokens are
destinations (dst, kept as tokens of the reduced sequence), and, per merging block, the padded
lists of its source (src) and destination tokens. The hot path then is, per forward, batched
over batch, heads and blocks (ToMe-style, with index ops only):

- :func:`match`: cosine similarity of every src to the dst of its block, argmax -> the slot of
  the reduced sequence each src folds into;
- :func:`assignment`: the full token -> slot map (dst and protected tokens map to their own);
- :func:`aggregate`: slot means and sizes by ``index_add_`` (a merged token is the
  mean of its dst and every src that chose it, even across blocks, e.g. anchor frame 0);
- :func:`select_outliers`: the top fraction of query distances to their merged token across
  all heads, at most :func:`outlier_budget`'s cap per head; :func:`restore_outliers` /
  :func:`split_outliers` give them slots of their own;
- :func:`unmerge`: every original position takes the output row of its slot (a gather, which
  also undoes the temporal reordering since the map is indexed in the original order).

DECISIONS (docs/HTTM.md): dst of a block are whole frames evenly strided from its first frame
(``round(frac * frames)``, at least 1); a single-frame block uses a spatial stride inside its
tile instead. With ``anchor_first_frame`` frame 0 is entirely dst, and frame 0's tile tokens
are extra dst of every later block of that tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from httm_dist.merging.reorder import BlockLayout, pad_rows, round_half_up

MATCH_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}
"""Largest similarity tensor (elements) built at once, per device type (others use "cuda");
on CPU per thread. Matching is chunked over (batch, head, block) rows and, for one huge block
(``uniform``), over its sources, into one reused buffer: memory stays bounded and, on CPU, the
chunk stays in cache (measured on this project's CPU, 1 thread: 4 MB chunks 45 GFLOP/s, 128 MB
chunks 27 GFLOP/s, a fresh tensor per call less still). A bound on memory, not a loop over
tokens: the chunk count is total elements / budget."""


@dataclass(frozen=True)
class BlockGroup:
    """Merging blocks of one shape, padded to one size and matched in one batched call.

    - ``src_idx`` ``[nblk, Smax]`` / ``dst_idx`` ``[nblk, Dmax]``: global indices of each block's
      src and dst, ``dst_valid`` marks the real dst; ``dst_slot`` is the slot of each dst. Src
      padding is token 0 (its result is dropped); dst padding repeats the block's first dst, so
      it can never win the argmax over the real one (ties go to the first) and has its slot.
    - ``src_sel``: positions of the real src in ``src_idx.flatten()``.
    """

    src_idx: torch.Tensor
    src_sel: torch.Tensor
    dst_idx: torch.Tensor
    dst_valid: torch.Tensor
    dst_slot: torch.Tensor


@dataclass(frozen=True)
class MergePlan:
    """Static merge structure of one sequence shape for one keep fraction (tensors on a device).

    - ``kept``: sorted global indices of the tokens that stay (dst and protected); slot ``i`` of
      the reduced sequence is seeded by token ``kept[i]``.
    - ``slot_of``: ``[N]`` slot of each kept token, -1 for src tokens.
    - ``groups``: the blocks, grouped by run length (the full runs, and the last, shorter run:
      at most two groups) so that a short run is not padded to the size of a full one.
    - ``src_tokens``: global index of every src token exactly once, in group then block order,
      the order in which :func:`match` returns their slots.
    """

    num_tokens: int
    kept: torch.Tensor
    slot_of: torch.Tensor
    src_tokens: torch.Tensor
    groups: tuple[BlockGroup, ...]

    @property
    def num_kept(self) -> int:
        return int(self.kept.numel())

    @property
    def num_src(self) -> int:
        return int(self.src_tokens.numel())


def _strided(n: int, k: int) -> np.ndarray:
    """``k`` of ``n`` positions evenly strided from the first."""
    return (np.arange(k) * n) // k


def _block_dst_mask(frames: np.ndarray, n_tile: int, frac: float, anchor: bool) -> np.ndarray:
    """``[frames, n_tile]`` dst mask of one block (its own dst, anchors excluded)."""
    n_frames = frames.size
    mask = np.zeros((n_frames, n_tile), dtype=bool)
    if anchor and frames[0] == 0:
        mask[0] = True
    if n_frames > 1:
        k = min(n_frames, max(1, round_half_up(frac * n_frames)))
        mask[_strided(n_frames, k)] = True
    elif not mask.any():
        k = min(n_tile, max(1, round_half_up(frac * n_tile)))
        mask[0, _strided(n_tile, k)] = True
    return mask


def build_plan(layout: BlockLayout, frac: float, anchor_first_frame: bool, device: torch.device) -> MergePlan:
    """The :class:`MergePlan` keeping about ``frac`` of every block as dst (plan time, cached)."""
    P = layout.tokens_per_frame
    by_length: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for b in range(layout.blocks.shape[0]):
        run, tile = divmod(b, layout.num_tiles)
        frames = layout.run_frames[run][layout.run_frames[run] >= 0]
        offsets = layout.tile_offsets[tile][layout.tile_offsets[tile] >= 0]
        tokens = frames[:, None] * P + offsets[None, :]
        mask = _block_dst_mask(frames, offsets.size, frac, anchor_first_frame)
        dst = tokens[mask]
        if anchor_first_frame and frames[0] != 0:
            dst = np.concatenate([dst, offsets])  # frame 0's tokens of this tile
        srcs, dsts = by_length.setdefault(frames.size, ([], []))
        srcs.append(tokens[~mask])
        dsts.append(dst)
    all_dst = [d for _, dsts in by_length.values() for d in dsts]
    kept = np.unique(np.concatenate([*all_dst, layout.protected]))  # a dst of several blocks once
    slot_of = np.full(layout.num_tokens, -1, dtype=np.int64)
    slot_of[kept] = np.arange(kept.size)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device)

    groups, src_tokens = [], []
    for srcs, dsts in by_length.values():
        src_idx, dst_idx = pad_rows(srcs), pad_rows(dsts)
        src_sel = np.flatnonzero(src_idx.ravel() >= 0)
        dst_valid = dst_idx >= 0
        src_idx[src_idx < 0] = 0  # src padding: token 0, its result is dropped
        dst_idx = np.where(dst_valid, dst_idx, dst_idx[:, :1])  # dst padding: the first dst
        dst_slot = slot_of[dst_idx]
        if (dst_slot < 0).any():  # pragma: no cover - construction invariant
            raise AssertionError("a destination token has no slot")
        if src_sel.size:
            groups.append(BlockGroup(t(src_idx), t(src_sel), t(dst_idx), t(dst_valid), t(dst_slot)))
            src_tokens.append(src_idx.ravel()[src_sel])
    return MergePlan(
        num_tokens=layout.num_tokens,
        kept=t(kept),
        slot_of=t(slot_of),
        src_tokens=t(np.concatenate(src_tokens) if src_tokens else np.zeros(0, dtype=np.int64)),
        groups=tuple(groups),
    )


def _chunk_budget(device: torch.device) -> int:
    """Elements of one chunk buffer on ``device`` (see ``MATCH_CHUNK_ELEMENTS``)."""
    if device.type == "cpu":
        return MATCH_CHUNK_ELEMENTS["cpu"] * torch.get_num_threads()
    return MATCH_CHUNK_ELEMENTS.get(device.type, MATCH_CHUNK_ELEMENTS["cuda"])


def _chunked_argmax(xs: torch.Tensor, xd: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``argmax_j xs[g, i] . xd[g, j]`` for ``xs [G,S,d]``, ``xd [G,D,d]``: ``[G, S]``, chunked.

    With ``rows`` (``[G, S]`` indices), ``xs`` is a ``[R, d]`` table and source ``i`` of row
    ``g`` is ``xs[rows[g, i]]``: each chunk gathers its own sources into a reused, cache-sized
    buffer right before its matmul, instead of one gather of all sources up front (on CPU a
    fresh tensor that large costs about as much in page faults as the copy itself, and the
    chunk's sources are then still in cache for the matmul).
    """
    d = xs.shape[-1]
    G, S = xs.shape[:2] if rows is None else rows.shape
    D = xd.shape[1]
    xdt = xd.transpose(1, 2)
    budget = _chunk_budget(xs.device)
    if G * S * D <= budget:
        src = xs if rows is None else xs.index_select(0, rows.flatten()).view(G, S, d)
        return torch.bmm(src, xdt).argmax(-1)
    out = torch.empty(G, S, dtype=torch.long, device=xs.device)
    g_step = max(1, budget // max(1, S * D))
    # rows of one block per chunk: each chunk re-reads the block's [D, d] dst, so take at least
    # 2d rows (uniform: d = 1024, one block of all dst) to keep that re-reading cheap
    s_step = S if g_step > 1 else max(2 * d, budget // max(1, D))
    n_g, n_s = min(g_step, G), min(s_step, S)
    buf = xs.new_empty(n_g * n_s * D)
    src_buf = None if rows is None else xs.new_empty(n_g * n_s * d)
    for g0 in range(0, G, g_step):
        g1 = min(g0 + g_step, G)
        for s0 in range(0, S, s_step):
            s1 = min(s0 + s_step, S)
            n = (g1 - g0) * (s1 - s0)
            if rows is None:
                src = xs[g0:g1, s0:s1]
            else:
                src = src_buf[: n * d].view(n, d)
                torch.index_select(xs, 0, rows[g0:g1, s0:s1].reshape(-1), out=src)
                src = src.view(g1 - g0, s1 - s0, d)
            sim = buf[: n * D].view(g1 - g0, s1 - s0, D)
            torch.bmm(src, xdt[g0:g1], out=sim)
            out[g0:g1, s0:s1] = sim.argmax(-1)
    return out


def match(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Slot (in the reduced sequence) of every src token: ``[B, H, n_src]``.

    ``x`` is ``[B, H, N, d]``; each head matches independently, each src to its most
    cosine-similar dst of its own block (ties to the first dst, deterministically). All blocks
    of a group in one batched matmul; at most two groups (full runs, last run). The sources are
    gathered chunk by chunk inside :func:`_chunked_argmax` from the rows of ``x``.
    """
    B, H, N, d = x.shape
    x_rows = x.reshape(B * H * N, d)  # a view when x is contiguous
    head_base = torch.arange(B * H, device=x.device).view(B * H, 1, 1) * N
    out = [torch.empty(B, H, 0, dtype=torch.long, device=x.device)]
    for g in plan.groups:
        nblk, S = g.src_idx.shape
        D = g.dst_idx.shape[1]
        rows = (head_base + g.src_idx.unsqueeze(0)).view(B * H * nblk, S)
        # argmax_j cos(s, d_j) = argmax_j s . (d_j / |d_j|): only the dst need normalising
        xd = F.normalize(x.index_select(2, g.dst_idx.flatten()), dim=-1).to(x.dtype)  # autocast: fp32
        best = _chunked_argmax(x_rows, xd.reshape(B * H * nblk, D, d), rows).view(B, H, nblk, S)
        slots = torch.gather(g.dst_slot.expand(B, H, nblk, D), 3, best)
        out.append(slots.flatten(2).index_select(2, g.src_sel))
    return torch.cat(out, dim=2) if len(out) > 2 else out[-1]


def assignment(plan: MergePlan, src_slots: torch.Tensor) -> torch.Tensor:
    """Full token -> slot map ``[B, H, N]`` from the src slots of :func:`match`."""
    B, H, _ = src_slots.shape
    assign = plan.slot_of.expand(B, H, plan.num_tokens).clone()
    return assign.index_copy_(2, plan.src_tokens, src_slots)


def _flat(assign: torch.Tensor, num_slots: int) -> torch.Tensor:
    B, H, N = assign.shape
    offsets = torch.arange(B * H, device=assign.device).view(B, H, 1) * num_slots
    return (assign + offsets).flatten()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of low-precision tokens accumulate in fp32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def aggregate_sums(
    xs: Sequence[torch.Tensor], assign: torch.Tensor, num_slots: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Slot sums ``[B*H*M, d]`` of each ``x [B, H, N, d]`` in ``xs`` and slot sizes ``[B*H*M]``.

    All tensors share the map ``assign`` (``[B, H or 1, N]``; 1: one plan for all heads) and one
    flat index, so sharing a plan costs one index computation. Sums accumulate in fp32 for
    fp16/bf16 inputs.
    """
    B, H, N, d = xs[0].shape
    idx = _flat(assign.expand(B, H, N), num_slots)
    acc = acc_dtype(xs[0].dtype)
    sums = []
    for x in xs:  # q, k, v: at most three tensors
        s = torch.zeros(B * H * num_slots, x.shape[-1], dtype=acc, device=x.device)
        # one copy at most: v arrives as a strided view of the qkv projection, and reshape
        # then .to(acc) would copy it twice under autocast
        if x.dtype != acc:
            x = x.to(acc, memory_format=torch.contiguous_format)
        rows = x.reshape(-1, x.shape[-1])
        sums.append(s.index_add_(0, idx, rows))
    # sizes by index_add_ into a known length: bincount reads max(idx) on the host on CUDA
    ones = torch.ones(1, dtype=torch.long, device=idx.device).expand(idx.numel())
    sizes = torch.zeros(B * H * num_slots, dtype=torch.long, device=idx.device).index_add_(0, idx, ones)
    return sums, sizes


def slot_means(
    sums: torch.Tensor, sizes: torch.Tensor, shape: tuple[int, int, int], inplace: bool = False
) -> torch.Tensor:
    """``[B, H, M, d]`` means from the flat sums and sizes of :func:`aggregate_sums`.

    ``inplace`` divides ``sums`` itself (for callers that own it and no longer need the sums:
    on CPU a fresh tensor of that size costs about as much in page faults as the division).
    """
    div = sizes.clamp_min(1).unsqueeze(-1).to(sums.dtype)
    means = sums.div_(div) if inplace else sums / div
    return means.view(*shape, sums.shape[-1])


def aggregate(
    xs: Sequence[torch.Tensor], assign: torch.Tensor, num_slots: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Means ``[B, H, M, d]`` of the merged tokens of each tensor in ``xs``, and sizes ``[B, H, M]``.

    A merged token is the mean of the tokens mapped to its slot; empty slots (padding) get a
    zero mean and size 0.
    """
    B, H = xs[0].shape[:2]
    sums, sizes = aggregate_sums(xs, assign, num_slots)
    return [slot_means(s, sizes, (B, H, num_slots), inplace=True) for s in sums], sizes.view(B, H, num_slots)


def _src_distances(q: torch.Tensor, means: torch.Tensor, plan: MergePlan, src_slots: torch.Tensor) -> torch.Tensor:
    """L2 distance ``[B*H*n_src]`` of every src query to its merged token, in chunks.

    Each chunk gathers its queries and their means into two reused cache-sized buffers
    (``MATCH_CHUNK_ELEMENTS`` each), subtracts in place and takes the norm: no ``[B, H, n_src,
    d]`` gathers (on CPU a fresh tensor that large costs about as much in page faults as the
    copy). A bound on memory, not a loop over tokens: the chunk count is total / budget.
    """
    B, H, N, d = q.shape
    n_src = plan.num_src
    q_rows = q.reshape(B * H * N, d)
    q_idx = (torch.arange(B * H, device=q.device).view(B * H, 1) * N + plan.src_tokens).flatten()
    m_idx = _flat(src_slots, means.shape[2])
    m_rows = means.reshape(-1, d)
    total = B * H * n_src
    budget = _chunk_budget(q.device)
    step = max(1, min(total, budget // d))
    q_buf = q.new_empty(step, d)
    m_buf = means.new_empty(step, d)
    dist = means.new_empty(total)
    for r0 in range(0, total, step):
        r1 = min(r0 + step, total)
        qc = torch.index_select(q_rows, 0, q_idx[r0:r1], out=q_buf[: r1 - r0])
        mc = torch.index_select(m_rows, 0, m_idx[r0:r1], out=m_buf[: r1 - r0])
        # |m - q| = |q - m| exactly; in place in the means dtype (fp32 for low-precision q)
        torch.linalg.vector_norm(mc.sub_(qc), dim=-1, out=dist[r0:r1])
    return dist


def outlier_budget(frac: float, heads: int, num_tokens: int, num_src: int, cap_factor: float) -> tuple[int, int]:
    """``(count, cap)``: outliers restored per batch element, and the most one head may restore.

    ``count = round(frac * heads * num_tokens)`` (at most ``heads * num_src``), chosen across
    all heads; ``cap = ceil(cap_factor * count / heads)`` (at least the mean ``ceil(count /
    heads)``, at most ``num_src``). The kernel's padded query length is ``num_kept + cap``: it
    depends on the shape and the config only, never on the data (issue 14: a data-dependent
    length was a new cuDNN plan and a host sync in every layer). ``cap_factor >= 1``.
    """
    count = min(round_half_up(frac * heads * num_tokens), heads * num_src)
    if count == 0:
        return 0, 0
    mean = math.ceil(count / heads)
    return count, min(num_src, max(mean, math.ceil(cap_factor * count / heads)))


def select_outliers(
    q: torch.Tensor, means: torch.Tensor, plan: MergePlan, src_slots: torch.Tensor, count: int, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries restored as their own tokens: mask ``[B, H, n_src]`` and flat index ``[B, count]``.

    Per batch element, across all heads, the ``count`` src queries farthest (L2) from the merged
    token they were folded into, with at most ``cap`` per head (:func:`outlier_budget`): the
    ``count`` largest among each head's ``cap`` largest, which is the greedy global choice with
    a per-head cap (a head past its cap leaves its budget to the next-farthest queries of the
    other heads). With ``cap >= n_src`` it is the plain global top ``count``. The index is
    ``h * n_src + j`` for src ``j`` of head ``h``, so callers never need ``nonzero``.
    """
    B, H, N, d = q.shape
    n_src = plan.num_src
    mask = torch.zeros(B, H * n_src, dtype=torch.bool, device=q.device)
    if count == 0:
        return mask.view(B, H, n_src), torch.zeros(B, 0, dtype=torch.long, device=q.device)
    if count > H * min(cap, n_src):
        raise ValueError(f"select_outliers: {count} outliers cannot fit {H} heads x cap {cap}")
    dist = _src_distances(q, means, plan, src_slots).view(B, H, n_src)
    if cap >= n_src:
        sel = dist.view(B, H * n_src).topk(count, dim=1).indices
    else:
        cand_d, cand_j = dist.topk(cap, dim=2)  # [B, H, cap]: each head's farthest
        pick = cand_d.view(B, H * cap).topk(count, dim=1).indices
        head = torch.div(pick, cap, rounding_mode="floor")
        sel = head * n_src + cand_j.view(B, H * cap).gather(1, pick)
    mask.scatter_(1, sel, True)
    return mask.view(B, H, n_src), sel


def restore_outliers(
    plan: MergePlan, src_slots: torch.Tensor, outliers: torch.Tensor, cap: int
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Give every outlier a slot of its own after the ``plan.num_kept`` shared ones.

    Returns the final assignment ``[B, H, N]``, the padded slot count ``num_kept + cap`` (static:
    ``cap`` bounds every head's outlier count, :func:`outlier_budget`), the per-head query
    count ``[B, H]`` (a device tensor; slots past it are empty padding) and the final slot of
    every src ``[B, H, n_src]`` (outliers numbered in token order after the shared slots), which
    :func:`split_outliers` reads instead of numbering them again.
    """
    rank = outliers.cumsum(-1) - 1
    n_out = outliers.sum(-1)
    slots = torch.where(outliers, plan.num_kept + rank, src_slots)
    return assignment(plan, slots), plan.num_kept + cap, plan.num_kept + n_out, slots


def split_outliers(
    q: torch.Tensor,
    sums: torch.Tensor,
    sizes: torch.Tensor,
    plan: MergePlan,
    src_slots: torch.Tensor,
    slots: torch.Tensor,
    sel: torch.Tensor,
    num_slots: int,
) -> torch.Tensor:
    """Query means ``[B, H, num_slots, d]`` after taking the outliers out of their merged tokens.

    ``sums`` / ``sizes`` are the first aggregation (``plan.num_kept`` slots per head): each
    outlier's contribution is subtracted there and it becomes its own slot, the one
    :func:`restore_outliers` gave it (``slots``, ``[B, H, n_src]``, its last output). Cheaper
    than aggregating again. ``sel`` is :func:`select_outliers`' ``[B, count]`` index.
    """
    B, H, N, d = q.shape
    M, n_src = plan.num_kept, plan.num_src
    b = torch.arange(B, device=q.device).view(B, 1)
    bh = (b * H + torch.div(sel, n_src, rounding_mode="floor")).flatten()
    j = (sel % n_src).flatten()
    flat = (b * (H * n_src) + sel).flatten()  # index into [B, H, n_src].flatten()
    rows = q.reshape(B * H, N, d)[bh, plan.src_tokens[j]].to(sums.dtype)
    new = slots.flatten()[flat]
    # one fresh buffer: the shared slots copied in, outliers subtracted there in place
    out_sums = sums.new_empty(B * H, num_slots, d)
    out_sizes = sizes.new_empty(B * H, num_slots)
    out_sums[:, :M] = sums.view(B * H, M, d)
    out_sums[:, M:] = 0
    out_sizes[:, :M] = sizes.view(B * H, M)
    out_sizes[:, M:] = 0
    old = bh * num_slots + src_slots.flatten()[flat]
    out_sums.view(-1, d).index_add_(0, old, rows, alpha=-1)
    out_sizes.view(-1).index_add_(0, old, torch.ones_like(old), alpha=-1)
    out_sums[bh, new] = rows
    out_sizes[bh, new] = 1
    return slot_means(out_sums.view(-1, d), out_sizes.flatten(), (B, H, num_slots), inplace=True)


def unmerge(out: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Every original position takes its slot's row: ``[B, H, M, d] -> [B, H, N, d]``.

    The result is a ``[B, N, H, d]``-contiguous tensor seen as ``[B, H, N, d]`` (a transposed
    view): the attention block's next step, ``out.transpose(1, 2).reshape(B, N, C)``, is then
    a view instead of a copy of the whole output. Values are the same either way.
    """
    B, H, M, d = out.shape
    N = assign.shape[-1]
    offsets = torch.arange(B * H, device=out.device).view(B, 1, H) * M
    idx = (assign.expand(B, H, N).transpose(1, 2) + offsets).flatten()  # [B, N, H] order
    return out.reshape(-1, d).index_select(0, idx).view(B, N, H, d).transpose(1, 2)
