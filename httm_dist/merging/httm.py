"""``httm``: head-wise temporal token merging (docs/HTTM.md).

Per head and per merging block (one spatial tile x one run of frames, see ``reorder``), queries
and keys are matched independently by cosine similarity to their block's destinations; values
follow the key matches. The queries farthest from their merged token, across all heads, are
restored as their own tokens (outlier filtering) and the merged queries are recomputed without
them; heads then have different query counts, padded for one ``scaled_dot_product_attention``
call to a static length, ``num_kept + cap`` (``MergeConfig.outlier_cap``): the same for every
layer and input of one shape, with no host sync (issue 14). Padding slots are empty and their
output rows are never copied back. Unmerging copies each merged query's output row back to
every position that folded into it, per head, so the heads of one token stay distinct.
"""

from __future__ import annotations

import torch

from httm_dist.merging.base import Assignment, MergedAttention, PhaseTimer
from httm_dist.merging.matching import (
    MergePlan,
    aggregate_sums,
    assignment,
    match,
    outlier_budget,
    restore_outliers,
    select_outliers,
    slot_means,
    split_outliers,
)
from httm_dist.model.hooks import AttentionContext


class HttmAttention(MergedAttention):
    """The ``attn_fn`` of one global block under ``strategy="httm"``."""

    name = "httm"

    def plans(self, ctx: AttentionContext, device: torch.device) -> tuple[MergePlan, ...]:
        """The query plan (``q_keep - outlier_frac`` dst) and the key/value plan (``kv_keep``)."""
        cfg = self.cfg
        return self.layout_plans(
            ctx, device, cfg.block_spatial, cfg.block_frames, (cfg.q_keep - cfg.outlier_frac, cfg.kv_keep)
        )

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, timer: PhaseTimer) -> Assignment:
        cfg = self.cfg
        plan_q, plan_kv = self.plans(ctx, q.device)
        with timer("match"):
            q_src = match(q, plan_q)
            k_src = match(k, plan_kv)
        B, H, N, _ = q.shape
        count, cap = outlier_budget(cfg.outlier_frac, H, N, plan_q.num_src, cfg.outlier_cap)  # (0, 0): none
        with timer("aggregate"):
            if count:
                (sums,), sizes = aggregate_sums([q], assignment(plan_q, q_src), plan_q.num_kept)
                means = slot_means(sums, sizes, (B, H, plan_q.num_kept))
                outliers, sel = select_outliers(q, means, plan_q, q_src, count, cap)
                q_assign, q_slots, q_kept, slots = restore_outliers(plan_q, q_src, outliers, cap)
                q_means = split_outliers(q, sums, sizes, plan_q, q_src, slots, sel, q_slots)
            else:  # no filtering: every head keeps the plan's slots, merged in __call__
                q_assign, q_slots, q_kept, q_means = assignment(plan_q, q_src), plan_q.num_kept, plan_q.num_kept, None
            kv_assign = assignment(plan_kv, k_src)
        return Assignment(q_assign, q_slots, q_kept, kv_assign, plan_kv.num_kept, q_means)
