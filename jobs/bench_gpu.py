"""GPU speed of token merging in the whole model (issue 14): prints Markdown tables.

    python jobs/bench_gpu.py                     # on a CUDA machine: the issue's table, < 8 min on an H200
    python jobs/bench_gpu.py --profile 100 --out "$OUT"   # + torch.profiler of one httm forward at 100 frames
    python jobs/bench_gpu.py --quick             # tiny model on CPU, a smoke run in seconds

What it measures, in ONE run so the speedups compare like with like (random VGGT-1B weights,
frames of 294x518 = 782 tokens, bf16 autocast as the model runs on CUDA):

1. The whole aggregator (its head layers kept, as in VGGT) and the whole model (aggregator and
   heads), for dense / uniform / httm / httm with plan reuse (``plan_reuse=2``) under the
   default MergeConfig (so below ``min_tokens`` merging runs dense), and ``httm always``
   (``min_tokens=0``) at its own lengths (``--always-frames``, 16-64 frames = 12.5k-50k tokens,
   next to dense there), to re-measure the ``min_tokens`` crossover (40000 by default). Time (median of 3
   after a warm-up below ``LONG_S``, else one run), speedup over dense, peak GPU memory
   (``max_memory_allocated``, weights included), and the issue's targets.
2. Per-layer phase split of the merged strategies (one extra forward with
   ``MergeConfig.profile``, which synchronises around each phase): match / aggregate /
   attention ms per layer, padded query length and kept keys as shares of N, and the share of
   heads whose outliers reached the cap. Next to it, the same attention step alone (q, k, v of
   that size, outside the model) at the largest length: the gap is issue 14's point 4.
3. The memory model (``httm_dist.pipeline.memory``) against the measured peaks, with the
   refitted ``WORK_BYTES_PER_CHANNEL`` to paste there.
4. Issue 14's point 4 at ``--point4-frames`` (300): where httm's time goes in the model. One
   aggregator forward each of dense and httm with every global attention module timed by
   CUDA events (no sync added): the modules' total and the rest of the forward (the same work
   in both: a gap there is overhead outside the attention), and the middle module run again
   alone on the very input it had in the model (a gap there is overhead of the model's context).
   On CPU (measured for issue 14 on a 16-head model, fp32 and bf16 autocast) the merged
   attention step in the model costs what it costs alone, op for op and byte for byte.

A time budget (``--budget-s``, default 400 s of measuring) skips a run whose time, predicted
quadratically from the same strategy's previous length, would exceed what is left; runs go in
priority order (``job_order``: the aggregator's dense and httm rows first, the whole model and
the extras after), so the call ends in under 8 minutes with what matters most (skips are
printed). On an H200, dense alone at 1000 frames takes ~154 s of it.
Plans are built before timing (``MergedAttention.prepare``), as a long-running worker has them
cached after its first scene of a shape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from httm_dist.merging import MergeConfig, apply_merging, merge_stats  # noqa: E402
from httm_dist.merging.patch import installed  # noqa: E402
from httm_dist.model import VGGT, VGGTConfig  # noqa: E402
from httm_dist.model.hooks import AttentionContext  # noqa: E402
from httm_dist.pipeline import memory  # noqa: E402

log = logging.getLogger("bench_gpu")

LONG_S = 5.0
"""A run predicted longer than this is timed once without warm-up (its noise is small)."""
TARGETS = {32: 0.97, 100: 2.2, 300: 3.8, 500: 5.2, 1000: 7.5}
"""Issue 14's httm-vs-dense targets for the whole aggregator (H200/H100, same run)."""
UNIFORM_TARGET = {1000: 3.5}


def strategies() -> list[tuple[str, MergeConfig]]:
    """(name, config) of every strategy the benchmark compares, in table order."""
    return [
        ("dense", MergeConfig(strategy="dense")),
        ("httm", MergeConfig()),
        ("uniform", MergeConfig(strategy="uniform")),
        ("httm+reuse", MergeConfig(plan_reuse=2)),
        ("httm always", MergeConfig(min_tokens=0)),  # the crossover: merging at every length
    ]


@dataclass
class Bench:
    device: torch.device
    budget_s: float
    reps: int = 3
    """Timed runs (after one warm-up) of a run shorter than ``LONG_S``; their median counts."""
    started: float = field(default_factory=time.perf_counter)
    last: dict = field(default_factory=dict)  # (part, strategy) -> (frames, seconds)
    skipped: list = field(default_factory=list)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def predict(self, key: tuple, frames: int) -> Optional[float]:
        if key not in self.last:
            return None
        f0, t0 = self.last[key]
        return t0 * (frames / f0) ** 2  # attention-bound: at most quadratic in frames

    def timed(self, key: tuple, frames: int, fn: Callable[[], Any]) -> Optional[float]:
        """Median wall time of ``fn`` (see ``LONG_S``), or None when the budget cannot afford it."""
        guess = self.predict(key, frames)
        long = guess is not None and guess > LONG_S
        n = 1 if long else self.reps + 1
        cost = (guess or 0.0) * n
        if guess is not None and cost > self.left():
            self.skipped.append(f"{key[0]} {key[1]} at {frames} frames (predicted {cost:.0f} s, {self.left():.0f} s left)")
            return None
        times = []
        for i in range(n):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            del out
            if long or i > 0:  # the first of reps + 1 is the warm-up
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        self.last[key] = (frames, t)
        return t


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def sequence(model: torch.nn.Module, frames: int, height: int, width: int,
             x: Optional[torch.Tensor] = None) -> AttentionContext:
    """The token layout the model's global blocks see for ``frames`` frames of ``height x
    width`` pixels (layer 0; ``x`` the block input, for strategies that match on it)."""
    agg = model.aggregator
    grid = (height // agg.patch_size, width // agg.patch_size)
    psi = agg.patch_start_idx
    return AttentionContext(frames, psi + grid[0] * grid[1], grid, psi, 0, x)


def prepare(model: torch.nn.Module, ctx: AttentionContext, device: torch.device) -> None:
    """Build every patched layer's static plans for the sequence ``ctx`` before timing."""
    for fn in installed(model):
        if fn is not None:
            fn.prepare(ctx, device)


def images_for(frames: int, height: int, width: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``[1, S, 3, H, W]`` frames panning across one smooth random image (neighbouring frames
    alike, as in a video; uniform noise would be an unrealistically easy case for nobody)."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(1, 3, height // 8, (width + frames * 4) // 8, generator=g),
                         size=(height, width + frames * 4), mode="bilinear", align_corners=False)[0]
    idx = torch.arange(width).view(1, -1) + 4 * torch.arange(frames).view(-1, 1)  # [S, W]
    out = base[:, :, idx].permute(2, 0, 1, 3)  # [S, 3, H, W]
    return out.unsqueeze(0).to(device)


def phase_split(model: torch.nn.Module, cfg: MergeConfig, run: Callable[[], Any], device: torch.device,
                ctx: AttentionContext) -> dict:
    """One forward with ``profile`` on: per-layer mean phase times and shapes."""
    apply_merging(model, MergeConfig.from_dict({**cfg.to_dict(), "profile": True}))
    prepare(model, ctx, device)
    run()
    stats = [s for s in merge_stats(model) if s["merged"]]
    apply_merging(model, cfg)
    if not stats:
        return {}
    n = len(stats)
    N = stats[0]["tokens"]
    qk = [q for s in stats for q in s["q_kept"]]
    at_cap = sum(1 for s in stats for q in s["q_kept"] if q >= s["q_len"]) / max(1, len(qk))
    return {
        "layers": n,
        "match_ms": 1e3 * sum(s["match_s"] for s in stats) / n,
        "aggregate_ms": 1e3 * sum(s["aggregate_s"] for s in stats) / n,
        "attention_ms": 1e3 * sum(s["attention_s"] for s in stats) / n,
        "q_len": stats[0]["q_len"] / N,
        "q_kept": sum(qk) / len(qk) / N,
        "kv_kept": stats[0]["kv_kept"] / N,
        "heads_at_cap": at_cap if stats[0]["strategy"] == "httm" else None,
    }


def layer_alone(model: VGGT, frames: int, height: int, width: int, cfg: MergeConfig,
                dtype: torch.dtype, bench: Bench) -> Optional[float]:
    """The attention step of one global layer alone (random q, k, v in, output out): the
    model's first patched layer's strategy called directly, seconds; None when the budget is
    spent (the inputs are made on the device, inside the budget). Leaves the model dense."""
    device, arch = bench.device, model.config
    H, d = arch.num_heads, arch.embed_dim // arch.num_heads
    if bench.left() <= 0:
        bench.skipped.append(f"alone {cfg.strategy} at {frames} frames (budget spent)")
        return None
    g = torch.Generator(device=device).manual_seed(1)
    ctx = sequence(model, frames, height, width)
    N = frames * ctx.tokens_per_frame
    q, k, v = (torch.randn(1, H, N, d, generator=g, device=device, dtype=dtype) for _ in range(3))
    ctx = sequence(model, frames, height, width, torch.randn(1, N, arch.embed_dim, generator=g, device=device))
    apply_merging(model, cfg)
    fn = next(f for f in installed(model) if f is not None)
    fn.prepare(ctx, device)
    try:
        return bench.timed(("alone", cfg.strategy), frames, lambda: fn(q, k, v, ctx))
    finally:
        apply_merging(model, MergeConfig(strategy="dense"))


@contextlib.contextmanager
def attention_spans(model: torch.nn.Module, device: torch.device, keep: Optional[int] = None) -> Iterator[dict]:
    """Times every global block's attention module (qkv, q/k norm, RoPE, the attention step,
    proj) in the forward run inside, by forward hooks on the modules (the strategies are not
    touched): CUDA events on CUDA (no sync added to the forward), else ``perf_counter``. On
    exit the yielded dict holds ``ms``, per global block in order, and with ``keep`` also
    ``inputs``: block ``keep``'s ``(args, kwargs)``, to run that module again alone."""
    marks: dict[int, list] = {}
    out: dict[str, Any] = {"ms": [], "inputs": None}

    def now() -> Any:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def pre(i: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if i == keep:
                out["inputs"] = (args, kwargs)
            marks[i] = [now()]
        return hook

    def post(i: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            marks[i].append(now())
        return hook

    handles = []
    for i, block in enumerate(model.aggregator.global_blocks):
        handles.append(block.attn.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.attn.register_forward_hook(post(i), with_kwargs=True))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["ms"] = [a.elapsed_time(b) if device.type == "cuda" else 1e3 * (b - a)
                 for a, b in (marks[i] for i in sorted(marks))]


def point4(model: VGGT, x: torch.Tensor, height: int, width: int, cfgs: dict, bench: Bench) -> dict:
    """Issue 14's point 4 (httm costs more per layer in the model than the same layer alone),
    decomposed at ``x``'s length: for dense and httm, one aggregator forward with every global
    attention module timed (:func:`attention_spans`), the rest of that forward (frame blocks,
    MLPs, patch embed: the same work in both, so a difference there is overhead outside the
    attention), and the middle global attention module run again alone on the input it had
    in the model (a difference to its in-model time is overhead the model's context adds)."""
    device = bench.device
    frames = x.shape[1]
    prepare_ctx = sequence(model, frames, height, width)
    keep = len(model.aggregator.global_blocks) // 2
    res: dict[str, Any] = {"frames": frames, "layer": keep}
    for name in ("dense", "httm"):
        apply_merging(model, cfgs[name])
        prepare(model, prepare_ctx, device)
        bench.sync()
        t0 = time.perf_counter()
        with torch.inference_mode(), attention_spans(model, device, keep) as spans:
            model.aggregator(x)
        bench.sync()
        total = time.perf_counter() - t0
        args, kwargs = spans["inputs"]
        attn = model.aggregator.global_blocks[keep].attn

        def alone() -> torch.Tensor:  # under the aggregator's autocast, as in the forward
            with torch.inference_mode(), model.aggregator.autocast(x.device):
                return attn(*args, **kwargs)

        t = bench.timed(("point4 alone", name), frames, alone)
        ms = spans["ms"]
        res[name] = {"forward_s": total, "attention_ms": ms, "rest_s": total - sum(ms) / 1e3,
                     "alone_ms": None if t is None else 1e3 * t}
        del args, kwargs, spans
    apply_merging(model, MergeConfig(strategy="dense"))
    return res


def job_order(frames: list[int], model_frames: list[int], names: list[str], always_frames: list[int],
              split: bool, point4_frames: Optional[int] = None) -> list[tuple[str, int, str]]:
    """(part, frames, strategy) in priority order, so the budget skips the least needed:
    (1) aggregator dense and httm at every length (the issue's targets), (2) aggregator
    uniform, (3) whole model dense and httm, then issue 14's point 4 at ``point4_frames``
    (part ``point4``, :func:`point4`; with the aggregator rows it needs where ``frames`` lacks
    them), (4) plan reuse and ``httm always`` at its own lengths ``always_frames``, spanning the
    ``min_tokens`` crossover (with dense there, where ``frames`` lacks it), (5) whole
    model uniform and reuse, (6) the profiled phase splits (part ``split``)."""
    has = set(names)
    jobs = [("aggregator", f, n) for f in frames for n in ("dense", "httm") if n in has]
    jobs += [("aggregator", f, "uniform") for f in frames if "uniform" in has]
    jobs += [("model", f, n) for f in model_frames for n in ("dense", "httm") if n in has]
    if point4_frames and {"dense", "httm"} <= has:
        f = point4_frames
        jobs += [("aggregator", f, n) for n in ("dense", "httm") if f not in frames]
        jobs.append(("point4", f, "httm"))
    jobs += [("aggregator", f, "httm+reuse") for f in frames if "httm+reuse" in has]
    if "httm always" in has:
        for f in always_frames:
            jobs += [("aggregator", f, "dense")] if f not in frames and "dense" in has else []
            jobs.append(("aggregator", f, "httm always"))
    jobs += [("model", f, n) for f in model_frames for n in ("uniform", "httm+reuse") if n in has]
    if split:
        jobs += [("split", f, n) for f in frames for n in ("httm", "httm+reuse", "uniform") if n in has]
    return jobs


def run_jobs(model: torch.nn.Module, jobs: list[tuple[str, int, str]], height: int, width: int,
             strats: list, bench: Bench, on_job: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """One row per (part, frames, strategy) job that ran (time None when the budget skipped
    it); ``split`` jobs add the phase split to their aggregator row. ``on_job`` gets the rows
    so far after each job (to save them, so a timeout keeps what was measured)."""
    device = bench.device
    cfgs = dict(strats)
    rows: dict[tuple[str, int, str], dict] = {}
    x, x_frames = None, None
    for part, frames, name in jobs:
        if x_frames != frames:
            x = None
            x, x_frames = images_for(frames, height, width, device), frames
        cfg = cfgs[name]
        target = model if part == "model" else model.aggregator
        ctx = sequence(model, frames, height, width)

        def run() -> Any:
            with torch.inference_mode():
                return target(x)

        if part == "point4":
            row = rows.get(("aggregator", frames, name))
            dense = rows.get(("aggregator", frames, "dense"), {}).get("seconds")
            t = None if row is None or dense is None else row["seconds"]
            if t is None or bench.left() < 1.5 * (t + dense):
                bench.skipped.append(f"point 4 at {frames} frames")
                continue
            row["point4"] = point4(model, x, height, width, cfgs, bench)
            if on_job is not None:
                on_job(_sorted_rows(rows, cfgs))
            continue
        if part == "split":
            row = rows.get(("aggregator", frames, name))
            t = None if row is None else row["seconds"]
            if t is None or bench.left() < 2 * t:
                if t is not None:
                    bench.skipped.append(f"phase split {name} at {frames} frames")
                continue
            row["split"] = phase_split(model, cfg, run, device, ctx)
            if on_job is not None:
                on_job(_sorted_rows(rows, cfgs))
            continue
        apply_merging(model, cfg)
        prepare(model, ctx, device)
        peak_reset(device)
        t = bench.timed((part, name), frames, run)
        rows[(part, frames, name)] = {
            "part": part, "frames": frames, "tokens": frames * ctx.tokens_per_frame, "strategy": name, "seconds": t,
            "peak_bytes": peak_bytes(device) if t is not None else None}
        log.info("%s %d frames %s: %s s", part, frames, name, "skipped" if t is None else f"{t:.3f}")
        if on_job is not None:
            on_job(_sorted_rows(rows, cfgs))
    apply_merging(model, MergeConfig(strategy="dense"))
    return _sorted_rows(rows, cfgs)


def _sorted_rows(rows: dict, cfgs: dict) -> list[dict]:
    order = {n: i for i, n in enumerate(cfgs)}
    return sorted(rows.values(), key=lambda r: (r["part"] != "aggregator", r["frames"], order[r["strategy"]]))


# -- reports --------------------------------------------------------------------------------
def _fmt(t: Optional[float], spec: str = ".3f") -> str:
    return "-" if t is None else format(t, spec)


def speed_table(rows: list[dict], part: str) -> str:
    names = [n for n in dict.fromkeys(r["strategy"] for r in rows if r["part"] == part)]
    by = {(r["frames"], r["strategy"]): r for r in rows if r["part"] == part}
    frames = sorted({r["frames"] for r in rows if r["part"] == part})
    head = ["frames", "tokens"] + [f"{n} s" for n in names] + [f"{n} x" for n in names if n != "dense"]
    head += [f"{n} GB" for n in names] + ["httm target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in frames:
        dense = by.get((f, "dense"), {}).get("seconds")
        cells = [str(f), str(next(r["tokens"] for k, r in by.items() if k[0] == f))]
        cells += [_fmt(by.get((f, n), {}).get("seconds")) for n in names]
        for n in names:
            if n == "dense":
                continue
            t = by.get((f, n), {}).get("seconds")
            cells.append("-" if t is None or dense is None else f"{dense / t:.2f}x")
        for n in names:
            b = by.get((f, n), {}).get("peak_bytes")
            cells.append("-" if b is None else f"{b / 1e9:.1f}")
        t, tgt = by.get((f, "httm"), {}).get("seconds"), TARGETS.get(f)
        if tgt is None or t is None or dense is None or part != "aggregator":
            cells.append("-")
        else:
            cells.append(f">= {tgt}x: {'met' if dense / t >= tgt else 'MISSED'}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_table(rows: list[dict]) -> str:
    head = ["part", "frames", "strategy", "match ms", "aggregate ms", "attention ms", "q_len/N",
            "q kept/N", "kv/N", "heads at cap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.get("split")
        if not s:
            continue
        cap = "-" if s["heads_at_cap"] is None else f"{s['heads_at_cap']:.0%}"
        lines.append(f"| {r['part']} | {r['frames']} | {r['strategy']} | {s['match_ms']:.2f} | "
                     f"{s['aggregate_ms']:.2f} | {s['attention_ms']:.2f} | {s['q_len']:.3f} | "
                     f"{s['q_kept']:.3f} | {s['kv_kept']:.3f} | {cap} |")
    return "\n".join(lines)


def point4_table(rows: list[dict]) -> str:
    """Issue 14's point 4, from :func:`point4`'s result: dense and httm side by side."""
    p = next((r["point4"] for r in rows if r.get("point4")), None)
    if p is None:
        return "Not measured (skipped or not asked for: --point4-frames)."
    d, h = p["dense"], p["httm"]
    timed = {r["strategy"]: r["seconds"] for r in rows if r["part"] == "aggregator" and r["frames"] == p["frames"]}

    def per_layer(r: dict) -> str:
        ms = r["attention_ms"]
        return f"{sum(ms) / 1e3:.3f} ({statistics.mean(ms):.1f} / {min(ms):.1f} / {max(ms):.1f})"

    lines = [
        f"At {p['frames']} frames, one aggregator forward each; the global attention modules (qkv, "
        "norms, RoPE, attention step, proj) timed in it by CUDA events (no sync added; on CPU "
        "perf_counter).", "",
        "| | dense | httm |", "|---|---|---|",
        f"| whole forward, s | {d['forward_s']:.3f} | {h['forward_s']:.3f} |",
        f"| its timed row above, s (one cold run when longer than {LONG_S:.0f} s) | {_fmt(timed.get('dense'))} | "
        f"{_fmt(timed.get('httm'))} |",
        f"| global attention modules, s (per layer mean / min / max ms) | {per_layer(d)} | {per_layer(h)} |",
        f"| rest of the forward, s (frame blocks, MLPs, embed: the same work) | {d['rest_s']:.3f} | {h['rest_s']:.3f} |",
        f"| global attention module {p['layer']} in the model, ms | {d['attention_ms'][p['layer']]:.1f} | "
        f"{h['attention_ms'][p['layer']]:.1f} |",
        f"| the same module alone, on the input it had there, ms | {_fmt(d['alone_ms'], '.1f')} | "
        f"{_fmt(h['alone_ms'], '.1f')} |",
        "",
        "Read: httm's rest above dense's is overhead outside the attention (memory, allocator); its "
        "module in the model above the same module alone is overhead the model's context adds; a "
        "timed row above this warm forward is first-run cost (new shapes: cuDNN plans, allocator growth).",
    ]
    return "\n".join(lines)


def memory_report(rows: list[dict], arch: VGGTConfig, height: int, width: int) -> str:
    """Measured peaks next to the memory model, and the refitted work constant.

    The whole VGGT sits on the GPU for every row, so an aggregator row's model adds the heads'
    weights to the aggregator's. ``WORK_BYTES_PER_CHANNEL`` is refitted from the slope between
    the two largest dense aggregator lengths (bytes per frame; the fixed terms, weights and
    allocator state, cancel), the model's other per-frame terms taken as they are."""
    lines = ["| part | frames | strategy | measured GB | model GB |", "|---|---|---|---|---|"]
    heads = (memory.parameter_count(arch, True) - memory.parameter_count(arch, False)) * 4
    dense = []
    for r in rows:
        if r["peak_bytes"] is None:
            continue
        agg = r["part"] == "aggregator"
        mm = memory.memory_model(arch, height, width, "dense" if r["strategy"] == "dense" else
                                 ("uniform" if r["strategy"] == "uniform" else "httm"),
                                 whole_model=not agg)
        lines.append(f"| {r['part']} | {r['frames']} | {r['strategy']} | {r['peak_bytes'] / 1e9:.2f} | "
                     f"{(mm.peak_bytes(r['frames']) + (heads if agg else 0)) / 1e9:.2f} |")
        if agg and r["strategy"] == "dense":
            dense.append(r)
    dense = sorted(dense, key=lambda r: r["frames"])[-2:]
    if len(dense) == 2 and dense[1]["frames"] > dense[0]["frames"]:
        (a, b), C = dense, arch.embed_dim
        slope = (b["peak_bytes"] - a["peak_bytes"]) / (b["frames"] - a["frames"])  # bytes per frame
        per_frame_tokens = b["tokens"] / b["frames"]
        base = memory.memory_model(arch, height, width, "dense", whole_model=False).per_frame_bytes
        other = base - per_frame_tokens * memory.WORK_BYTES_PER_CHANNEL * C  # pixels, kept outputs
        w = (slope - other) / (per_frame_tokens * C)
        lines.append("")
        lines.append(f"Refitted WORK_BYTES_PER_CHANNEL (aggregator, dense; slope between {a['frames']} and "
                     f"{b['frames']} frames): {w:.1f} (now {memory.WORK_BYTES_PER_CHANNEL}). The whole "
                     "model's excess over the model at the largest length refits HEAD_WORK_BYTES.")
    return "\n".join(lines)


def _table(ev: Any, sort: str) -> str:
    """The profiler's table sorted by ``sort`` (older torch names the device column cuda)."""
    for key in (sort, sort.replace("device", "cuda"), "self_cpu_time_total"):
        try:
            return ev.table(sort_by=key, row_limit=25)
        except (AttributeError, KeyError, ValueError):
            continue
    return ev.table(row_limit=25)


def run_profile(model: VGGT, frames: int, height: int, width: int, device: torch.device, out_dir: Path) -> str:
    """torch.profiler of one httm forward of the aggregator (after a warm-up): top ops by self
    CPU and device time, syncs and memcpys, and the distinct SDPA query shapes."""
    from torch.profiler import ProfilerActivity, profile

    cfg = MergeConfig()
    apply_merging(model, cfg)
    x = images_for(frames, height, width, device)
    prepare(model, sequence(model, frames, height, width), device)
    with torch.inference_mode():
        model.aggregator(x)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=acts, record_shapes=True) as prof:
        model.aggregator(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / f"profile_httm_{frames}.json"
    prof.export_chrome_trace(str(trace))
    ev = prof.key_averages()
    count = {e.key: e.count for e in ev}
    syncs = {k: v for k, v in count.items() if any(s in k for s in ("Synchronize", "Memcpy", "_local_scalar_dense", "nonzero", "item"))}
    shapes = {str(e.input_shapes[0]) for e in prof.key_averages(group_by_input_shape=True)
              if "scaled_dot_product" in e.key and e.input_shapes}
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    apply_merging(model, MergeConfig(strategy="dense"))
    return "\n".join([
        f"### torch.profiler: httm, aggregator, {frames} frames (trace: {trace})", "",
        "```", _table(ev, sort), "```", "",
        f"Sync / copy calls: {json.dumps(syncs)}", "",
        f"Distinct SDPA input shapes ({len(shapes)}): {sorted(shapes)}",
    ])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU, seconds (a smoke run)")
    ap.add_argument("--frames", default="32,100,300,500,1000", help="aggregator frame counts")
    ap.add_argument("--model-frames", default="32,100,300", help="whole-model frame counts")
    ap.add_argument("--always-frames", default="16,32,48,64",
                    help="frame counts of 'httm always' (min_tokens 0), around the min_tokens crossover "
                         "(782 tokens a frame: 12.5k-50k tokens)")
    ap.add_argument("--point4-frames", type=int, default=300, metavar="FRAMES",
                    help="issue 14's point 4 (the attention in the model vs alone) at FRAMES frames; 0: off")
    ap.add_argument("--height", type=int, default=294)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--preset", default="vggt-1b")
    ap.add_argument("--budget-s", type=float, default=400.0, help="seconds of measuring at most")
    ap.add_argument("--no-split", action="store_true", help="skip the profiled phase-split forwards")
    ap.add_argument("--profile", type=int, default=0, metavar="FRAMES",
                    help="also run torch.profiler on one httm forward at FRAMES frames")
    ap.add_argument("--out", default="bench_gpu_out", help="folder for results.json and traces")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    threads = torch.get_num_threads()
    try:
        return _run(args, argv, threads)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: Optional[list[str]], threads: int) -> int:
    if args.quick:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny tensors: threads only add contention
        args.preset, args.height, args.width = "tiny", 42, 56
        args.frames, args.model_frames, args.always_frames = "2,4", "2", "2,4"
        args.point4_frames = 4 if args.point4_frames else 0
        strats = [(n, MergeConfig.from_dict({**c.to_dict(), "min_tokens": 0, "block_spatial": 4, "block_frames": 2}))
                  for n, c in strategies()]
        if args.profile:
            args.profile = 2
    else:
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA device; run with --quick for the CPU smoke run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        strats = strategies()
    frames = [int(f) for f in args.frames.split(",") if f]
    model_frames = [int(f) for f in args.model_frames.split(",") if f]
    always_frames = [int(f) for f in args.always_frames.split(",") if f]

    torch.manual_seed(0)
    arch = VGGTConfig.preset(args.preset)
    with torch.device(device):  # initialised on the GPU: seconds instead of ~20 s on the CPU
        model = VGGT(arch)
    model = model.to(device).eval()  # random weights: speed and memory do not depend on them
    bench = Bench(device, args.budget_s, reps=1 if args.quick else 3)
    t0 = time.perf_counter()
    names = [n for n, _ in strats]
    jobs = job_order(frames, model_frames, names, always_frames, not args.no_split, args.point4_frames)
    env = (f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}, "
           f"torch {torch.__version__}, CUDA {torch.version.cuda}, preset {args.preset}, "
           f"{args.height}x{args.width} frames, random weights")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def render(rows: list[dict], alone: dict, big: Optional[int]) -> str:
        report = [
            f"## bench_gpu: {env}", "", f"Command: `{' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}`",
            f"Measured in {time.perf_counter() - t0:.0f} s.", "",
            "### Whole aggregator (the heads' layers kept)", "", speed_table(rows, "aggregator"), "",
            "### Whole model (aggregator + camera, depth and point heads)", "", speed_table(rows, "model"), "",
            "### Per-layer phase split (one profiled forward: phases synchronised)", "", split_table(rows), "",
        ]
        if alone:
            split = {r["strategy"]: r["split"] for r in rows if r["part"] == "aggregator" and r["frames"] == big and r.get("split")}
            report.append(f"One global layer's attention step alone at {big} frames (same config): " + ", ".join(
                f"{n} {_fmt(t and 1e3 * t, '.1f')} ms (in the model: "
                f"{_fmt(split.get(n) and sum(split[n][k] for k in ('match_ms', 'aggregate_ms', 'attention_ms')), '.1f')} ms)"
                for n, t in alone.items()))
            report.append("")
        report += ["### Issue 14 point 4: the attention in the model vs alone", "", point4_table(rows), ""]
        report += ["### Peak memory: measured vs the memory model", "", memory_report(rows, arch, args.height, args.width), ""]
        if bench.skipped:
            report += ["Skipped (time budget): " + "; ".join(bench.skipped), ""]
        return "\n".join(report)

    def save(rows: list[dict], alone: dict, text: str) -> None:
        """results.json and report.md as they stand (after every job: a timeout keeps them)."""
        (out / "results.json").write_text(json.dumps({"env": env, "rows": rows, "alone": alone,
                                                      "skipped": bench.skipped}, indent=1, default=str))
        (out / "report.md").write_text(text + "\n")

    rows = run_jobs(model, jobs, args.height, args.width, strats, bench,
                    on_job=lambda rows: save(rows, {}, render(rows, {}, None)))
    big = max((r["frames"] for r in rows if r["part"] == "aggregator" and r.get("split")), default=None)
    alone: dict = {}
    if big is not None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for name, cfg in strats[1:3]:
            alone[name] = layer_alone(model, big, args.height, args.width, cfg, dtype, bench)
            save(rows, alone, render(rows, alone, big))
    text = render(rows, alone, big)
    save(rows, alone, text)
    if args.profile:
        text += "\n" + run_profile(model, args.profile, args.height, args.width, device, out)
        save(rows, alone, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
