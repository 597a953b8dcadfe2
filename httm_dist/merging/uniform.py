"""``uniform``: the FastVGGT / ToMe-style baseline.

One merge plan for all heads, computed on the block input ``ctx.x`` (the attention module's
input) in the attention's compute dtype (``q``'s: bf16 under autocast, as FastVGGT matches;
``ctx.x`` itself is fp32 there, and fp32 similarity matmuls cost as much as merging saved,
issue 14), global rather than block-wise: every source token is compared with every destination
of the whole sequence. Destinations are frame 0 (with ``anchor_first_frame``) and whole frames
strided over the sequence to keep ``kv_keep`` of the tokens; special tokens stay their own
tokens (with ``protect_special_tokens``). q, k and v are merged by that one plan and the output
is unmerged by copy, so tokens merged together get identical output rows in every head.
"""

from __future__ import annotations

import torch

from httm_dist.merging.base import Assignment, MergedAttention, PhaseTimer
from httm_dist.merging.matching import MergePlan, assignment, match
from httm_dist.model.hooks import AttentionContext


class UniformAttention(MergedAttention):
    """The ``attn_fn`` of one global block under ``strategy="uniform"``."""

    name = "uniform"

    def plans(self, ctx: AttentionContext, device: torch.device) -> tuple[MergePlan, ...]:
        """One global plan (a single block of all frames and patches) keeping ``kv_keep``."""
        rows, cols = ctx.patch_grid
        return self.layout_plans(ctx, device, rows * cols, ctx.num_frames, (self.cfg.kv_keep,))

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, timer: PhaseTimer) -> Assignment:
        if ctx.x is None:
            raise ValueError(
                f"merging (uniform, layer {ctx.layer_idx}): the attention context carries no block "
                "input x; the model must pass AttentionContext.x for the uniform strategy"
            )
        (plan,) = self.plans(ctx, q.device)
        with timer("match"):
            src = match(ctx.x.to(q.dtype).unsqueeze(1), plan)
        with timer("aggregate"):
            assign = assignment(plan, src)
        return Assignment(assign, plan.num_kept, plan.num_kept, assign, plan.num_kept)
