"""What the merging strategies share: the attention call around a merge plan, timing, stats,
plan caching and plan reuse across layers.

A strategy instance is installed as one global block's ``attn.attn_fn``. Per call it
(1) plans: decides which token folds into which slot of the reduced sequences (or reuses the
plan of an earlier patched layer, ``MergeConfig.plan_reuse``), (2) aggregates q, k, v into the
slot means, (3) runs ``scaled_dot_product_attention`` on the reduced tensors, (4) unmerges the
output by copy. ``merge_stats`` reads what the last call recorded.

A layer whose sequence is shorter than ``MergeConfig.min_tokens`` calls the dense kernel
exactly as the unpatched block does (merging would cost more than it saves there).

No host syncs when ``profile`` is off: shapes follow from the sequence shape and config, and
the stats are kept as device tensors until ``last_stats`` is read.

Timing uses ``time.perf_counter``. On CUDA the kernels are asynchronous, so the phases are only
synchronised (``torch.cuda.synchronize``) when ``MergeConfig.profile`` is on; otherwise the CUDA
times are launch times and no sync is added to the forward pass.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from httm_dist.merging.config import MergeConfig
from httm_dist.merging.matching import MergePlan, aggregate, build_plan, unmerge
from httm_dist.merging.reorder import build_layout
from httm_dist.model.hooks import AttentionContext


@dataclass
class Assignment:
    """A merge plan for one forward: token -> slot maps of queries and of keys/values.

    ``q_assign`` / ``kv_assign`` are ``[B, H or 1, N]`` (1: one plan for all heads);
    ``kv_assign is q_assign`` when q, k and v share the plan. ``q_kept`` ``[B, H]`` counts the
    real query slots per head, or is one int for every head (``uniform``); ``q_slots`` is the
    padded count fed to the kernel.
    """

    q_assign: torch.Tensor
    q_slots: int
    q_kept: torch.Tensor | int
    kv_assign: torch.Tensor
    kv_slots: int
    q_means: Optional[torch.Tensor] = None
    """The merged queries of the layer that planned, when planning computed them already."""

    def fits(self, q: torch.Tensor) -> bool:
        B, H, N, _ = q.shape
        a = self.q_assign
        return a.device == q.device and a.shape[0] == B and a.shape[-1] == N and a.shape[1] in (1, H)


def plan_device(device: torch.device | str) -> torch.device:
    """The device plans are built on and cached under: ``cuda`` without an index is the current
    CUDA device (``cuda:0``), as the tensors it makes report, so a plan prepared for
    ``torch.device("cuda")`` is the one a forward on ``cuda:0`` finds (other devices unchanged)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class SharedState:
    """State shared by the strategies of one ``apply_merging`` call (all patched layers)."""

    cfg: MergeConfig
    plans: dict[tuple, tuple[MergePlan, ...]] = field(default_factory=dict)
    last: Optional[Assignment] = None

    def plans_for(self, key: tuple, build) -> tuple[MergePlan, ...]:
        if key not in self.plans:
            if len(self.plans) >= 16:
                self.plans.clear()
            self.plans[key] = build()
        return self.plans[key]


class PhaseTimer:
    """Accumulates wall time per phase; synchronises CUDA around phases only if ``sync``."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.times: dict[str, float] = {"match": 0.0, "aggregate": 0.0, "attention": 0.0}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.times[name] += time.perf_counter() - t0


class MergedAttention:
    """Base of the merging strategies (``attn_fn`` of one global block)."""

    name = "base"

    def __init__(self, cfg: MergeConfig, layer_idx: int, position: int, shared: SharedState) -> None:
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.position = position  # rank among the patched layers, for plan reuse
        self.shared = shared
        self._last: Optional[dict[str, Any]] = None

    @property
    def last_stats(self) -> Optional[dict[str, Any]]:
        """What the last call recorded (see ``merge_stats``), or None before any call.

        Device values (``q_kept``) are read here, not in the forward: reading them is a host sync.
        """
        if self._last is None:
            return None
        out = dict(self._last)
        kept, heads = out["q_kept"], out.pop("heads")
        if isinstance(kept, torch.Tensor):  # [B, H] or [B, 1] (one plan for all heads)
            out["q_kept"] = kept.float().mean(0).expand(heads).tolist()
        else:  # one static count for every head
            out["q_kept"] = [float(kept)] * heads
        return out

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, timer: PhaseTimer) -> Assignment:
        raise NotImplementedError

    def plans(self, ctx: AttentionContext, device: torch.device) -> tuple[MergePlan, ...]:
        """The static plans of the sequence ``ctx`` describes (built once, then cached)."""
        raise NotImplementedError

    def prepare(self, ctx: AttentionContext, device: torch.device) -> None:
        """Build and cache the static plans for the sequence shape ``ctx`` describes, so the
        first forward of that shape does not pay for them (benchmarks; a no-op for shapes
        under ``min_tokens``, which run dense)."""
        if ctx.num_frames * ctx.tokens_per_frame >= self.cfg.min_tokens:
            self.plans(ctx, device)

    def layout_plans(self, ctx: AttentionContext, device: torch.device, block_spatial: int, block_frames: int, fracs: tuple[float, ...]) -> tuple[MergePlan, ...]:
        """Cached dst plans (one per keep fraction) for the sequence ``ctx`` describes."""
        cfg = self.cfg
        device = plan_device(device)
        key = (self.name, ctx.num_frames, ctx.tokens_per_frame, tuple(ctx.patch_grid), ctx.patch_start_idx, block_spatial, block_frames, fracs, str(device))

        def build() -> tuple[MergePlan, ...]:
            layout = build_layout(
                ctx.num_frames, ctx.tokens_per_frame, tuple(ctx.patch_grid), ctx.patch_start_idx,
                block_spatial, block_frames, cfg.protect_special_tokens,
            )
            return tuple(build_plan(layout, f, cfg.anchor_first_frame, device) for f in fracs)

        return self.shared.plans_for(key, build)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, H, N, d = q.shape
        if N != ctx.num_frames * ctx.tokens_per_frame:
            raise ValueError(
                f"merging ({self.name}, layer {self.layer_idx}): q has {N} tokens but the context "
                f"describes {ctx.num_frames} frames x {ctx.tokens_per_frame} tokens"
            )
        if N < self.cfg.min_tokens:  # merging does not pay: the unpatched block's exact call
            self._record(N, H, N, N, N, False, None, merged=False)
            return F.scaled_dot_product_attention(q, k, v)
        timer = PhaseTimer(self.cfg.profile and q.is_cuda)
        last = self.shared.last
        reused = self.position % self.cfg.plan_reuse != 0 and last is not None and last.fits(q)
        if reused:
            a = last
        else:
            a = self.plan(q, k, v, ctx, timer)
            # kept only for the layers that reuse it: at 1000 frames it holds ~2 [B, H, N] maps
            self.shared.last = a if self.cfg.plan_reuse > 1 else None
        with timer("aggregate"):
            if a.kv_assign is a.q_assign:
                (qm, km, vm), kv_sizes = aggregate([q, k, v], a.q_assign, a.q_slots)
            else:
                if a.q_means is not None and not reused:
                    qm = a.q_means
                else:
                    qm = aggregate([q], a.q_assign, a.q_slots)[0][0]
                (km, vm), kv_sizes = aggregate([k, v], a.kv_assign, a.kv_slots)
            qm, km, vm = qm.to(q.dtype), km.to(q.dtype), vm.to(q.dtype)
        with timer("attention"):
            bias = None
            if self.cfg.proportional_attention:
                bias = kv_sizes.clamp_min(1).to(q.dtype).log().unsqueeze(2)
            out = F.scaled_dot_product_attention(qm, km, vm, attn_mask=bias)
        with timer("aggregate"):
            out = unmerge(out, a.q_assign)
        a.q_means = None  # only valid for the tensors it was computed from
        self._record(N, H, a.q_kept, a.q_slots, a.kv_slots, reused, timer)
        return out

    def _record(
        self, N: int, heads: int, q_kept: torch.Tensor | int, q_len: int, kv_kept: int, reused: bool,
        timer: Optional[PhaseTimer], merged: bool = True,
    ) -> None:
        """Keep this call's stats. ``q_kept`` is a device tensor ``[B, H or 1]`` (read in
        ``last_stats``, where reading it is a sync) or one count for every head (an int: the
        dense rule and ``uniform`` need no tensor for it)."""
        times = timer.times if timer is not None else {"match": 0.0, "aggregate": 0.0, "attention": 0.0}
        self._last = {
            "layer": self.layer_idx,
            "strategy": self.name,
            "merged": merged,
            "tokens": N,
            "heads": heads,
            "q_kept": q_kept,
            "q_len": q_len,
            "kv_kept": kv_kept,
            "plan_reused": reused,
            "match_s": times["match"],
            "aggregate_s": times["aggregate"],
            "attention_s": times["attention"],
        }
