"""The merging algorithm: destination plans, block-wise cosine matching, aggregation, unmerge.

A :class:`MergePlan` is static for one sequence shape and keep ratio: which tokens are
destinations (dst, kept as tokens of the reduced sequence), and, per merging block, the padded
lists of its source (src) and destination tokens. The hot path then is, per forward, batched
over batch, heads and blocks (ToMe-style, with index ops only):

- :func:`match`: cosine similarity of every src to the dst of its block, argmax -> the slot of
  the reduced sequence each src folds into;
- :func:`assignment`: the full token -> slot map (dst and protected tokens map to their own);
- :func:`aggregate`: slot sums and sizes by ``index_add_`` / ``bincount`` (a merged token is the
  mean of its dst and every src that chose it, even across blocks, e.g. anchor frame 0);
- :func:`select_outliers`: the top fraction of query distances to their merged token across
  all heads;
- :func:`unmerge`: every original position takes the output row of its slot (a gather, which
  also undoes the temporal reordering since the map is indexed in the original order).

DECISIONS (docs/HTTM.md): dst of a block are whole frames evenly strided from its first frame
(``round(frac * frames)``, at least 1); a single-frame block uses a spatial stride inside its
tile instead. With ``anchor_first_frame`` frame 0 is entirely dst, and frame 0's tile tokens
are extra dst of every later block of that tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from httm_dist.merging.reorder import BlockLayout, round_half_up

MATCH_CHUNK_ELEMENTS = 1 << 25
"""Largest similarity tensor (elements) built at once; matching is chunked over (batch, head,
block) rows and, for one huge block (``uniform``), over its sources, so that memory stays
bounded. A bound on memory, not a loop over tokens: the chunk count is total / budget."""


@dataclass(frozen=True)
class MergePlan:
    """Static merge structure of one sequence shape for one keep fraction (tensors on a device).

    - ``kept``: sorted global indices of the tokens that stay (dst and protected); slot ``i`` of
      the reduced sequence is seeded by token ``kept[i]``.
    - ``slot_of``: ``[N]`` slot of each kept token, -1 for src tokens.
    - ``src_idx`` ``[nblk, Smax]`` / ``dst_idx`` ``[nblk, Dmax]``: global indices (pad 0) of each
      block's src and dst; ``dst_bias`` is 0 for real dst and -inf for padding; ``dst_slot`` the
      slot of each dst.
    - ``src_sel``: positions of the real src in ``src_idx.flatten()``; ``src_tokens`` their global
      indices (every src token exactly once).
    """

    num_tokens: int
    kept: torch.Tensor
    slot_of: torch.Tensor
    src_idx: torch.Tensor
    src_sel: torch.Tensor
    src_tokens: torch.Tensor
    dst_idx: torch.Tensor
    dst_bias: torch.Tensor
    dst_slot: torch.Tensor

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
    srcs, dsts = [], []
    for b in range(layout.blocks.shape[0]):
        run, tile = divmod(b, layout.num_tiles)
        frames = layout.run_frames[run][layout.run_frames[run] >= 0]
        offsets = layout.tile_offsets[tile][layout.tile_offsets[tile] >= 0]
        tokens = frames[:, None] * P + offsets[None, :]
        mask = _block_dst_mask(frames, offsets.size, frac, anchor_first_frame)
        dst = tokens[mask]
        if anchor_first_frame and frames[0] != 0:
            dst = np.concatenate([dst, offsets])  # frame 0's tokens of this tile
        srcs.append(tokens[~mask])
        dsts.append(dst)
    own_dst = np.concatenate([d for d in dsts] + [layout.protected])
    kept = np.unique(own_dst)
    slot_of = np.full(layout.num_tokens, -1, dtype=np.int64)
    slot_of[kept] = np.arange(kept.size)

    src_idx = _pad_rows0(srcs)
    dst_idx = _pad_rows0(dsts)
    src_valid = _valid(srcs, src_idx.shape[1])
    dst_valid = _valid(dsts, dst_idx.shape[1])
    src_sel = np.flatnonzero(src_valid.ravel())
    dst_slot = np.where(dst_valid, slot_of[dst_idx], 0)
    if (dst_slot[dst_valid] < 0).any():  # pragma: no cover - construction invariant
        raise AssertionError("a destination token has no slot")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device)

    return MergePlan(
        num_tokens=layout.num_tokens,
        kept=t(kept),
        slot_of=t(slot_of),
        src_idx=t(src_idx),
        src_sel=t(src_sel),
        src_tokens=t(src_idx.ravel()[src_sel]),
        dst_idx=t(dst_idx),
        dst_bias=t(np.where(dst_valid, 0.0, -np.inf).astype(np.float32)),
        dst_slot=t(dst_slot),
    )


def _pad_rows0(rows: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _valid(rows: list[np.ndarray], width: int) -> np.ndarray:
    return np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]


def _chunked_argmax(xs: torch.Tensor, xd: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``argmax_j (xs[g, i] . xd[g, j] + bias[g, j])`` for ``xs [G,S,d]``, ``xd [G,D,d]``, in chunks."""
    G, S, _ = xs.shape
    D = xd.shape[1]
    xdt = xd.transpose(1, 2)
    bias = bias.unsqueeze(1)
    if G * S * D <= MATCH_CHUNK_ELEMENTS:
        return torch.baddbmm(bias, xs, xdt).argmax(-1)
    out = torch.empty(G, S, dtype=torch.long, device=xs.device)
    g_step = max(1, MATCH_CHUNK_ELEMENTS // max(1, S * D))
    s_step = S if g_step > 1 else max(1, MATCH_CHUNK_ELEMENTS // max(1, D))
    for g0 in range(0, G, g_step):
        g1 = g0 + g_step
        for s0 in range(0, S, s_step):
            sim = torch.baddbmm(bias[g0:g1], xs[g0:g1, s0 : s0 + s_step], xdt[g0:g1])
            out[g0:g1, s0 : s0 + s_step] = sim.argmax(-1)
    return out


def match(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Slot (in the reduced sequence) of every src token: ``[B, H, n_src]``.

    ``x`` is ``[B, H, N, d]``; each head matches independently, each src to its most
    cosine-similar dst of its own block (ties to the first dst, deterministically).
    """
    B, H, N, d = x.shape
    nblk, S = plan.src_idx.shape
    D = plan.dst_idx.shape[1]
    if plan.num_src == 0:
        return torch.empty(B, H, 0, dtype=torch.long, device=x.device)
    xn = F.normalize(x, dim=-1)
    xs = xn.index_select(2, plan.src_idx.flatten()).reshape(B * H * nblk, S, d)
    xd = xn.index_select(2, plan.dst_idx.flatten()).reshape(B * H * nblk, D, d)
    bias = plan.dst_bias.to(x.dtype).repeat(B * H, 1)
    best = _chunked_argmax(xs, xd, bias).view(B, H, nblk, S)
    slots = torch.gather(plan.dst_slot.expand(B, H, nblk, D), 3, best)
    return slots.flatten(2).index_select(2, plan.src_sel)


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


def aggregate(x: torch.Tensor, assign: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and sizes of the merged tokens: ``([B, H, M, d], [B, H, M])`` for ``x [B, H, N, d]``.

    ``assign`` may have a head dimension of 1 (one plan for all heads). Empty slots (padding)
    get a zero mean and size 0. Sums accumulate in fp32 for fp16/bf16 inputs.
    """
    B, H, N, d = x.shape
    assign = assign.expand(B, H, N)
    idx = _flat(assign, num_slots)
    acc = acc_dtype(x.dtype)
    sums = torch.zeros(B * H * num_slots, d, dtype=acc, device=x.device)
    sums.index_add_(0, idx, x.reshape(-1, d).to(acc))
    sizes = torch.bincount(idx, minlength=B * H * num_slots).view(B, H, num_slots)
    means = sums.view(B, H, num_slots, d) / sizes.clamp_min(1).unsqueeze(-1).to(acc)
    return means, sizes


def select_outliers(
    q: torch.Tensor, means: torch.Tensor, plan: MergePlan, src_slots: torch.Tensor, frac: float
) -> torch.Tensor:
    """Mask ``[B, H, n_src]`` of the queries restored as their own tokens.

    Per batch element, across all heads, the ``round(frac * H * N)`` src queries farthest (L2)
    from the merged token they were folded into (dst and protected tokens have distance 0 and
    are never picked; the count is capped at the number of src).
    """
    B, H, N, d = q.shape
    n_src = plan.num_src
    count = min(round_half_up(frac * H * N), H * n_src)
    mask = torch.zeros(B, H * n_src, dtype=torch.bool, device=q.device)
    if count == 0:
        return mask.view(B, H, n_src)
    qs = q.index_select(2, plan.src_tokens).to(means.dtype)
    ms = means.reshape(-1, d).index_select(0, _flat(src_slots, means.shape[2])).view(B, H, n_src, d)
    dist = (qs - ms).norm(dim=-1).flatten(1)
    mask.scatter_(1, dist.topk(count, dim=1).indices, True)
    return mask.view(B, H, n_src)


def restore_outliers(
    plan: MergePlan, src_slots: torch.Tensor, outliers: torch.Tensor
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Give every outlier a slot of its own after the ``plan.num_kept`` shared ones.

    Returns the final assignment ``[B, H, N]``, the padded slot count (``num_kept`` plus the
    largest per-head outlier count) and the per-head query count ``[B, H]``.
    """
    rank = outliers.cumsum(-1) - 1
    n_out = outliers.sum(-1)
    slots = torch.where(outliers, plan.num_kept + rank, src_slots)
    num_slots = plan.num_kept + int(n_out.max()) if n_out.numel() else plan.num_kept
    return assignment(plan, slots), num_slots, plan.num_kept + n_out


def unmerge(out: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Every original position takes its slot's row: ``[B, H, M, d] -> [B, H, N, d]``."""
    B, H, M, d = out.shape
    N = assign.shape[-1]
    idx = _flat(assign.expand(B, H, N), M)
    return out.reshape(-1, d).index_select(0, idx).view(B, H, N, d)
