"""Issue 14 point 4 on CPU: does the model add work around the merged attention?

Runs a random aggregator (VGGT-1B's width: 1024 channels, 16 heads of 64; ``--depth`` blocks of
each kind) with merging on every global layer, and compares each merged attention call *in
the model* with the same call *alone* on the q/k/v the model passed it:

- time per call (median of ``--reps``), in the model and alone (strided v as in the model,
  contiguous q/k/v, and without autocast);
- aten ops and bytes written inside the hook, in the model and alone (x layers), counted with a
  ``TorchDispatchMode``;
- ops and bytes of the forward *outside* the hooks, merged minus dense (what merging adds or
  removes around the attention), and the forward's largest copy-like writers.

Equal op counts and bytes mean the model adds no work around the hook on this device; the GPU
side of the same question is ``jobs/bench_gpu.py``'s point-4 table (CUDA events per module).

    .venv/bin/python jobs/profile_in_model.py --frames 16 --reps 5 [--bf16] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from httm_dist.merging import MergeConfig, apply_merging  # noqa: E402
from httm_dist.merging.patch import installed  # noqa: E402
from httm_dist.model import VGGTConfig  # noqa: E402
from httm_dist.model.aggregator import Aggregator  # noqa: E402

log = logging.getLogger("profile_in_model")

COPY_LIKE = ("copy", "clone", "contiguous", "_to_copy", "cat", "stack", "index_select", "gather", "neg")


class OpCounter(TorchDispatchMode):
    """Counts aten ops and the bytes of the fresh tensors they return, split by whether a
    merged attention hook is running (``where``)."""

    def __init__(self) -> None:
        super().__init__()
        self.where = "model"
        self.ops: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            u.untyped_storage().data_ptr()
            for t in list(args) + list((kwargs or {}).values())
            for u in (t if isinstance(t, (tuple, list)) else (t,))
            if isinstance(u, torch.Tensor)
        }
        outs = out if isinstance(out, (tuple, list)) else (out,)
        key = (self.where, func.__name__)
        self.ops[key] += 1
        self.bytes[key] += sum(
            o.numel() * o.element_size() for o in outs
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs
        )
        return out

    def total(self, where: str) -> tuple[int, float]:
        """(ops, MB written) counted ``where`` ("model" or "hook")."""
        ops = sum(v for k, v in self.ops.items() if k[0] == where)
        return ops, sum(v for k, v in self.bytes.items() if k[0] == where) / 1e6


def build(depth: int) -> Aggregator:
    """A random aggregator of VGGT-1B's width with ``depth`` (>= 1) frame and global blocks."""
    C, heads = 1024, 16
    cfg = VGGTConfig.from_dict({
        "img_size": 70, "embed_dim": C, "num_heads": heads, "depth": depth, "num_register_tokens": 4,
        "patch_embed": {"embed_dim": C, "depth": 1, "num_heads": heads, "img_size": 70, "num_register_tokens": 4},
        "dpt": {"dim_in": 2 * C, "features": 32, "out_channels": [16, 32, 64, 64],
                "intermediate_layer_idx": [min(i, depth - 1) for i in range(4)]},
        "camera_head": {"dim_in": 2 * C, "trunk_depth": 1, "num_heads": heads}, "track_head": None,
    })
    torch.manual_seed(0)
    return Aggregator(cfg, output_layers=list(range(depth))).eval()


def wrap_hooks(agg: Aggregator, on_call: Callable) -> None:
    """Wrap every installed strategy so ``on_call(i, fn, q, k, v, ctx)`` runs it."""
    for i, fn in enumerate(installed(agg)):
        if fn is not None:
            agg.global_blocks[i].attn.attn_fn = lambda q, k, v, ctx, fn=fn, i=i: on_call(i, fn, q, k, v, ctx)


def median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--hw", default="112,154", help="frame height,width in pixels (multiples of 14)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--strategy", default="httm", choices=["httm", "uniform"])
    ap.add_argument("--bf16", action="store_true", help="run under CPU bf16 autocast")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    for name in ("frames", "depth", "reps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    h, w = map(int, args.hw.split(","))
    agg = build(args.depth)
    x = torch.rand(1, args.frames, 3, h, w, generator=torch.Generator().manual_seed(1))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    cfg = MergeConfig(strategy=args.strategy, min_tokens=0)

    def forward() -> None:
        with torch.inference_mode(), autocast():
            agg(x)

    res: dict = {"frames": args.frames, "hw": [h, w], "depth": args.depth, "strategy": args.strategy,
                 "bf16": args.bf16, "threads": args.threads, "probe_layer": min(1, args.depth - 1)}
    apply_merging(agg, {"strategy": "dense"})
    res["dense_forward_s"] = median_time(forward, args.reps)
    apply_merging(agg, cfg)
    res["merged_forward_s"] = median_time(forward, args.reps)

    # each hook's time in the model, and one layer's q/k/v to rerun it alone
    times: dict[int, list[float]] = collections.defaultdict(list)
    captured: list = []
    probe = min(1, args.depth - 1)

    def timed(i, fn, q, k, v, ctx):
        if i == probe:
            captured[:] = [fn, q, k, v, ctx]
        t0 = time.perf_counter()
        out = fn(q, k, v, ctx)
        times[i].append(time.perf_counter() - t0)
        return out

    wrap_hooks(agg, timed)
    for _ in range(args.reps + 1):
        forward()
    fn, q, k, v, ctx = captured
    res["N"] = q.shape[2]
    res["hook_in_model_ms"] = statistics.median(1e3 * statistics.median(t[1:]) for t in times.values())

    def alone(q, k, v, amp=True) -> Callable[[], object]:
        def call():
            with torch.inference_mode(), (autocast() if amp else contextlib.nullcontext()):
                return fn(q, k, v, ctx)
        return call

    res["hook_alone_ms"] = 1e3 * median_time(alone(q, k, v), args.reps)
    res["hook_alone_contiguous_ms"] = 1e3 * median_time(alone(*(t.contiguous() for t in (q, k, v))), args.reps)
    res["hook_alone_no_autocast_ms"] = 1e3 * median_time(alone(q, k, v, amp=False), args.reps)
    res["dense_kernel_alone_ms"] = 1e3 * median_time(lambda: F.scaled_dot_product_attention(q, k, v), args.reps)

    # op counts: the hooks in the model vs one hook alone x layers; outside the hooks vs dense
    merged = OpCounter()

    def counted(i, fn, q, k, v, ctx):
        merged.where = "hook"
        try:
            return fn(q, k, v, ctx)
        finally:
            merged.where = "model"

    apply_merging(agg, cfg)  # fresh strategies, not the timing wrappers
    wrap_hooks(agg, counted)
    forward()  # builds the fresh strategies' plans (counted neither way)
    with merged:
        forward()
    one = OpCounter()
    one.where = "hook"
    with one:
        alone(q, k, v)()
    apply_merging(agg, {"strategy": "dense"})
    dense = OpCounter()
    with dense:
        forward()
    layers = len(times)
    (hook_ops, hook_mb), (one_ops, one_mb) = merged.total("hook"), one.total("hook")
    res.update(hook_ops_in_model=hook_ops, hook_ops_alone_x_layers=one_ops * layers,
               hook_MB_in_model=round(hook_mb, 2), hook_MB_alone_x_layers=round(one_mb * layers, 2))
    res["outside_hooks_merged_minus_dense"] = {
        name: [merged.ops[("model", name)] - dense.ops[("model", name)],
               round((merged.bytes[("model", name)] - dense.bytes[("model", name)]) / 1e6, 2)]
        for name in sorted({k[1] for k in merged.ops} | {k[1] for k in dense.ops})
        if merged.ops[("model", name)] != dense.ops[("model", name)]
        or merged.bytes[("model", name)] != dense.bytes[("model", name)]
    }
    res["dense_copy_like_MB"] = {
        k[1]: round(v / 1e6, 2) for k, v in dense.bytes.most_common() if any(s in k[1] for s in COPY_LIKE) and v
    }
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
