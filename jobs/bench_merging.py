"""Speed benchmark of token merging (dense / uniform / httm): prints Markdown tables.

    .venv/bin/python jobs/bench_merging.py                 # the full run (docs/benchmarks.md)
    .venv/bin/python jobs/bench_merging.py --quick         # a smoke run in seconds

Three parts (issue 3):

1. One global-attention layer at VGGT-1B width (1024 = 16 heads x 64) over growing token
   counts (S frames at 294x518, 782 tokens per frame): the attention step only (q, k, v in,
   output out: the qkv/out projections are the same for every strategy and excluded). Time,
   speedup over dense, matching + aggregation share of the layer, the FLOP-model limit
   (attention FLOPs dense / merged) and the FLOP-model prediction that also counts each
   strategy's own matching and aggregation work; the "efficiency" column is measured speedup /
   that prediction. A row "httm reused" times a layer that reuses an earlier layer's plan
   (``plan_reuse``): no matching.
2. The whole aggregator at a narrow width (the ``tiny`` preset, 128 = 2 heads x 64, 4 + 4
   blocks, random weights) over growing S, so global attention dominates as it does for
   VGGT-1B at 1000 frames on a GPU: time and speedup next to the FLOP-model prediction, and
   fidelity (relative error of the last layer's tokens against dense) for plan reuse.
   Frames pan across one image, so neighbouring frames are alike, as in a video.
3. Peak memory of one layer, dense vs httm (CPU: max RSS of a fresh subprocess over its
   baseline after building the inputs; CUDA: ``max_memory_allocated``).

Times are wall-clock medians (``time.perf_counter``; CUDA is synchronised). The CPU of this
project is shared: expect run-to-run noise of tens of percent.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from httm_dist.merging import MergeConfig, apply_merging, merge_stats
from httm_dist.merging.base import MergedAttention, SharedState
from httm_dist.merging.httm import HttmAttention
from httm_dist.merging.uniform import UniformAttention
from httm_dist.model import VGGT, VGGTConfig
from httm_dist.model.config import PATCH_SIZE
from httm_dist.model.hooks import AttentionContext

H_IMG, W_IMG, PSI = 294, 518, 5
PATCH = PATCH_SIZE
GRID = (H_IMG // PATCH, W_IMG // PATCH)  # 21 x 37
P = PSI + GRID[0] * GRID[1]  # 782


def timed(fn: Callable[[], object], reps: int, device: torch.device, warmup: bool = True) -> float:
    """Median wall time of ``reps`` calls, after one warm-up call if ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- FLOP model ---------------------------------------------------------------------------
def attention_flops(m_q: float, m_k: float, width: int) -> float:
    """softmax(q k^T) v over all heads: two matmuls of m_q x m_k x head_dim MACs per head."""
    return 4.0 * m_q * m_k * width


def merge_overhead_flops(fn: MergedAttention, n: int, width: int) -> tuple[float, float]:
    """(matching, aggregation) FLOPs of one call of ``fn`` (batch 1): the similarity matmuls as
    run (padded blocks; httm: head_dim x heads = width per pair, uniform: the block input's
    width), and ~2 FLOPs per element touched by normalising, merging and unmerging."""
    match = 0.0
    for plans in fn.shared.plans.values():
        for plan in plans:
            for g in plan.groups:
                nblk, s = g.src_idx.shape
                match += 2.0 * nblk * s * g.dst_idx.shape[1] * width
    passes = 8 if fn.name == "httm" else 5  # httm: q twice, k, v, outliers, unmerge, 2 norms
    return match, 2.0 * passes * n * width


# -- part 1: one layer ----------------------------------------------------------------------
def layer_part(frames: list[int], reps: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    width, heads = 1024, 16
    d = width // heads
    rows = []
    for S in frames:
        N = S * P
        g = torch.Generator(device="cpu").manual_seed(S)
        q, k, v = (torch.randn(1, heads, N, d, generator=g).to(device, dtype) for _ in range(3))
        x = torch.randn(1, N, width, generator=g).to(device, dtype)
        ctx = AttentionContext(S, P, GRID, PSI, 0, x)
        small = N <= 8000  # large sizes: one timed call, no warm-up (keeps the run < 15 min)
        r = reps if small else 1
        t_dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), r, device, warmup=small)
        f_dense = attention_flops(N, N, width)
        rows.append(dict(S=S, N=N, strategy="dense", time=t_dense, speedup=1.0, share=0.0, limit=1.0, pred=1.0))
        cfgs = [("uniform", MergeConfig(strategy="uniform")), ("httm", MergeConfig())]
        for name, cfg in cfgs:
            shared = SharedState(cfg)
            fn = (UniformAttention if name == "uniform" else HttmAttention)(cfg, 0, 0, shared)
            t = timed(lambda: fn(q, k, v, ctx), r, device, warmup=small)
            st = fn.last_stats
            over = st["match_s"] + st["aggregate_s"]
            f_attn = attention_flops(st["q_len"], st["kv_kept"], width)
            f_match, f_agg = merge_overhead_flops(fn, N, width)
            pred = f_dense / (f_attn + f_match + f_agg)
            rows.append(dict(
                S=S, N=N, strategy=name, time=t, speedup=t_dense / t, share=over / (over + st["attention_s"]),
                limit=f_dense / f_attn, pred=pred, match_s=st["match_s"], agg_s=st["aggregate_s"],
                attn_s=st["attention_s"], q_len=st["q_len"], q_kept=float(np.mean(st["q_kept"])),
                kv_kept=st["kv_kept"], match_gflop=f_match / 1e9,
            ))
            if name == "httm":  # a layer reusing an earlier layer's plan: no matching
                reuse_cfg = MergeConfig(plan_reuse=2)
                shared_r = SharedState(reuse_cfg)
                HttmAttention(reuse_cfg, 0, 0, shared_r)(q, k, v, ctx)
                second = HttmAttention(reuse_cfg, 1, 1, shared_r)
                t_r = timed(lambda: second(q, k, v, ctx), r, device, warmup=small)
                st = second.last_stats
                over = st["match_s"] + st["aggregate_s"]
                rows.append(dict(
                    S=S, N=N, strategy="httm reused", time=t_r, speedup=t_dense / t_r,
                    share=over / (over + st["attention_s"]), limit=f_dense / f_attn,
                    pred=f_dense / (f_attn + f_agg), match_s=0.0, agg_s=st["aggregate_s"], attn_s=st["attention_s"],
                ))
        print(f"  layer S={S} N={N} done ({t_dense:.2f}s dense)", file=sys.stderr, flush=True)
    return rows


# -- part 2: whole aggregator ---------------------------------------------------------------
def pan_frames(S: int) -> torch.Tensor:
    """S frames panning across one smooth image (video-like temporal coherence)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 24, 40, generator=g)
    big = F.interpolate(base, size=(H_IMG + 40, W_IMG + 8 * S), mode="bicubic", align_corners=False)
    big = big.clamp(0, 1)[0]
    return torch.stack([big[:, (i * 3) % 40 : (i * 3) % 40 + H_IMG, 8 * i : 8 * i + W_IMG] for i in range(S)])


def aggregator_flops(cfg: VGGTConfig, S: int, global_attn: float) -> float:
    """Whole-aggregator FLOPs with ``global_attn`` FLOPs per global block (all else dense)."""
    C, pe = cfg.embed_dim, cfg.patch_embed
    n_patch = GRID[0] * GRID[1]
    per_token_linear = 2.0 * (4 + 2 * cfg.mlp_ratio)  # qkv + proj + mlp, MACs per C^2 x2
    dino = S * (pe.depth * (per_token_linear * (n_patch + 5) * pe.embed_dim**2 + attention_flops(n_patch + 5, n_patch + 5, pe.embed_dim)) + 2.0 * n_patch * 3 * PATCH * PATCH * pe.embed_dim)
    frame = cfg.depth * S * (per_token_linear * P * C * C + attention_flops(P, P, C))
    glob = cfg.depth * (per_token_linear * S * P * C * C + global_attn)
    return dino + frame + glob


def aggregator_part(frames: list[int], reps: int, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    cfg_model = VGGTConfig.preset("tiny")
    agg = VGGT(cfg_model).aggregator.to(device).eval()
    agg.output_layers = (cfg_model.depth - 1,)
    C = cfg_model.embed_dim
    variants = [
        ("dense", MergeConfig(strategy="dense")),
        ("uniform", MergeConfig(strategy="uniform")),
        ("httm", MergeConfig()),
        ("httm reuse 2", MergeConfig(plan_reuse=2)),
        ("httm reuse 4", MergeConfig(plan_reuse=4)),
    ]
    rows = []
    for S in frames:
        imgs = pan_frames(S).to(device)
        N = S * P
        ref = None
        t_dense = 1.0
        for name, mcfg in variants:
            apply_merging(agg, mcfg)
            out: dict = {}

            def run() -> None:
                with torch.inference_mode():
                    out["tok"] = agg(imgs)[0][-1]

            t = timed(run, reps if N <= 4000 else 1, device, warmup=name != "dense" or N <= 4000)
            stats = merge_stats(agg)
            if name == "dense":
                ref, t_dense = out["tok"].float(), t
                g_attn, over = attention_flops(N, N, C), 0.0
            else:
                over = 0.0
                g_attn = float(np.mean([attention_flops(s["q_len"], s["kv_kept"], C) for s in stats]))
                fns = [b.attn.attn_fn for b in agg.global_blocks]
                for fn, s in zip(fns, stats):
                    f_match, f_agg = merge_overhead_flops(fn, N, C)
                    over += (0.0 if s["plan_reused"] else f_match) + f_agg
                g_attn += over / len(stats)
            err = float((out["tok"].float() - ref).norm() / ref.norm())
            cam = float((out["tok"][..., 0, C:].float() - ref[..., 0, C:]).norm() / ref[..., 0, C:].norm())
            pred = aggregator_flops(cfg_model, S, attention_flops(N, N, C)) / aggregator_flops(cfg_model, S, g_attn)
            share = sum(s["match_s"] + s["aggregate_s"] for s in stats) / t if stats else 0.0
            rows.append(dict(S=S, N=N, strategy=name, time=t, speedup=t_dense / t, pred=pred, err=err, cam_err=cam, share=share))
        print(f"  aggregator S={S} done ({t_dense:.2f}s dense)", file=sys.stderr, flush=True)
    apply_merging(agg, MergeConfig(strategy="dense"))
    return rows


# -- part 3: peak memory ----------------------------------------------------------------------
def memory_child(strategy: str, S: int, device: str) -> None:
    """Subprocess body: print peak bytes of one layer call over the inputs' baseline."""
    dev = torch.device(device)
    N, width, heads = S * P, 1024, 16
    q, k, v = (torch.randn(1, heads, N, width // heads, device=dev) for _ in range(3))
    x = torch.randn(1, N, width, device=dev)
    ctx = AttentionContext(S, P, GRID, PSI, 0, x)
    if strategy == "dense":
        fn: Callable = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    else:
        cfg = MergeConfig(strategy=strategy)
        fn = (HttmAttention if strategy == "httm" else UniformAttention)(cfg, 0, 0, SharedState(cfg))
        fn = (lambda f=fn: f(q, k, v, ctx))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _reset_rss_peak()
        fn()
        peak = _rss_peak() - base
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    print(json.dumps({"peak": peak, "qkv": inputs}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> int:
    """Reset the RSS high-water mark to the current RSS (Linux ``clear_refs`` 5) and return it
    in bytes. Needed because a child process inherits its parent's ``ru_maxrss`` through
    fork/exec, which would hide the child's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_peak() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_part(S: int, device: torch.device) -> list[dict]:
    rows = []
    for strategy in ("dense", "uniform", "httm"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", strategy, "--frames", str(S), "--device", str(device),
             "--threads", str(torch.get_num_threads())],
            capture_output=True, text=True, check=True,
        )
        rows.append(dict(strategy=strategy, S=S, N=S * P, **json.loads(out.stdout.strip().splitlines()[-1])))
    return rows


# -- output ---------------------------------------------------------------------------------
def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    except OSError:
        lscpu = []
    return "\n".join(
        [f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}", *lscpu]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer-frames", default="1,2,4,8,16,21,42", help="frames of 782 tokens, part 1")
    ap.add_argument("--agg-frames", default="2,4,8,16", help="frames, part 2 (empty: skip)")
    ap.add_argument("--memory-frames", type=int, default=21, help="frames for part 3 (0: skip)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.frames, args.device)
        return
    if args.quick:
        args.layer_frames, args.agg_frames, args.memory_frames, args.reps = "1,2", "2", 2, 1
    device = torch.device(args.device)
    t0 = time.perf_counter()
    print(f"## Machine\n\n```\n{machine()}\ndevice: {device}\n```\n")

    rows = layer_part([int(s) for s in args.layer_frames.split(",")], args.reps, device, torch.float32)
    print("## One global-attention layer (width 1024, 16 heads, fp32)\n")
    print(table(rows, [
        ("S", "frames", "d"), ("N", "tokens", "d"), ("strategy", "strategy", "s"), ("time", "time s", ".3f"),
        ("speedup", "speedup", ".2f"), ("limit", "FLOP limit (attn)", ".1f"), ("pred", "FLOP pred (+merge)", ".2f"),
        ("match_s", "match s", ".3f"), ("agg_s", "aggregate s", ".3f"), ("attn_s", "kernel s", ".3f"),
        ("share", "merge share", ".0%"), ("q_kept", "q kept/head", ".0f"), ("q_len", "q len", "d"),
        ("kv_kept", "kv kept", "d"), ("match_gflop", "match GFLOP", ".1f"),
    ]))
    top = max(r["N"] for r in rows)
    at = {r["strategy"]: r for r in rows if r["N"] == top}
    if "httm" in at and "uniform" in at:
        h, u = at["httm"], at["uniform"]
        eff = h["speedup"] / h["pred"]
        ratio = (h["match_s"] + h["agg_s"]) / (u["match_s"] + u["agg_s"])
        print(f"\nTargets at N={top}: httm speedup / FLOP prediction = {eff:.2f} (target >= 0.8: "
              f"{'met' if eff >= 0.8 else 'NOT met'}); httm merge time / uniform merge time = {ratio:.2f} "
              f"(target <= 0.25: {'met' if ratio <= 0.25 else 'NOT met'})\n")

    if args.agg_frames:
        rows = aggregator_part([int(s) for s in args.agg_frames.split(",")], args.reps, device)
        print("## Whole aggregator, tiny preset (width 128, 2 heads, 4 frame + 4 global blocks), fp32\n")
        print(table(rows, [
            ("S", "frames", "d"), ("N", "tokens", "d"), ("strategy", "strategy", "s"), ("time", "time s", ".3f"),
            ("speedup", "speedup", ".2f"), ("pred", "FLOP pred", ".2f"), ("share", "merge share", ".0%"),
            ("err", "rel. err vs dense", ".3f"), ("cam_err", "camera-token err", ".3f"),
        ]))
    if args.memory_frames:
        rows = memory_part(args.memory_frames, device)
        print(f"\n## Peak memory of one layer (N={args.memory_frames * P}, width 1024, fp32)\n")
        for r in rows:
            r["peak_mb"], r["qkv_mb"] = r["peak"] / 2**20, r["qkv"] / 2**20
        print(table(rows, [("strategy", "strategy", "s"), ("N", "tokens", "d"), ("peak_mb", "peak over inputs MiB", ".0f"), ("qkv_mb", "q+k+v MiB", ".0f")]))
    print(f"\n(total benchmark time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
