"""jobs/bench_gpu.py --quick: the GPU benchmark's CPU smoke run (issue 14)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

from httm_dist.merging import MergeConfig
from httm_dist.model import VGGT, VGGTConfig

ROOT = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "jobs" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_prints_every_table_and_saves_its_rows(tmp_path, capsys):
    job = _job()
    threads = torch.get_num_threads()
    assert job.main(["--quick", "--profile", "2", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the quick run's thread setting is undone
    text = capsys.readouterr().out
    for title in ("Whole aggregator", "Whole model", "Per-layer phase split", "Peak memory", "torch.profiler"):
        assert title in text
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    names = ["dense", "httm", "uniform", "httm+reuse", "httm always"]
    agg = {(r["frames"], r["strategy"]): r for r in rows if r["part"] == "aggregator"}
    assert set(agg) == {(f, n) for f in (2, 4) for n in names}
    assert all(r["seconds"] > 0 for r in rows)
    assert {r["strategy"] for r in rows if r["part"] == "model"} == set(names) - {"httm always"}
    split = agg[(4, "httm")]["split"]  # the profiled forward's per-layer phases
    assert split["layers"] == 4 and split["q_len"] <= 1.0 and split["kv_kept"] < 1.0
    assert "| 4 | 68 |" in text and (tmp_path / "report.md").read_text().strip() == text.strip()
    assert (tmp_path / "profile_httm_2.json").exists()
    # issue 14's point 4: both strategies' forwards with their 4 global attention modules timed
    p4 = agg[(4, "httm")]["point4"]
    assert p4["frames"] == 4 and p4["layer"] == 2 and "Issue 14 point 4" in text
    assert f"| its timed row above, s (one cold run when longer than 5 s) | {agg[(4, 'dense')]['seconds']:.3f} |" in text
    for name in ("dense", "httm"):
        r = p4[name]
        assert len(r["attention_ms"]) == 4 and min(r["attention_ms"]) > 0 and r["alone_ms"] > 0
        assert 0 < r["rest_s"] < r["forward_s"]


def test_full_run_needs_cuda(capsys):
    if torch.cuda.is_available():  # pragma: no cover - the CI has no GPU
        return
    assert _job().main(["--out", "/nonexistent"]) == 2
    assert "--quick" in capsys.readouterr().err


def test_priority_order_and_the_time_budget(tmp_path, capsys):
    job = _job()
    jobs = job.job_order([32, 1000], [32], ["dense", "httm", "uniform", "httm+reuse", "httm always"],
                         [16, 32, 64], True)
    assert jobs[:4] == [("aggregator", 32, "dense"), ("aggregator", 32, "httm"),
                        ("aggregator", 1000, "dense"), ("aggregator", 1000, "httm")]
    assert jobs.index(("aggregator", 1000, "uniform")) < jobs.index(("model", 32, "dense"))
    assert ("aggregator", 1000, "httm always") not in jobs and jobs[-1][0] == "split"
    # "httm always" at its own lengths around the crossover, with dense where the main list lacks it
    always = [j for j in jobs if j[2] == "httm always"]
    assert always == [("aggregator", f, "httm always") for f in (16, 32, 64)]
    assert jobs.index(("aggregator", 16, "dense")) == jobs.index(always[0]) - 1
    assert jobs.count(("aggregator", 32, "dense")) == 1 and ("aggregator", 64, "dense") in jobs
    # point 4 after the whole model's dense and httm rows, with the aggregator rows it compares
    with_p4 = job.job_order([32, 1000], [32], ["dense", "httm"], [], False, 300)
    assert with_p4[-3:] == [("aggregator", 300, "dense"), ("aggregator", 300, "httm"), ("point4", 300, "httm")]
    assert job.job_order([32, 1000], [32], ["dense", "httm"], [], False, 1000)[-1] == ("point4", 1000, "httm")
    assert not any(j[0] == "point4" for j in jobs)  # off unless asked for
    # no budget: a strategy's first length still runs (nothing to predict from), the next is skipped
    assert job.main(["--quick", "--budget-s", "0", "--no-split", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())
    agg = {(r["frames"], r["strategy"]): r["seconds"] for r in rows["rows"] if r["part"] == "aggregator"}
    assert agg[(2, "dense")] > 0 and agg[(4, "dense")] is None
    assert "Skipped (time budget)" in out and any("dense at 4 frames" in s for s in rows["skipped"])


def test_memory_refit_is_the_slope_of_the_two_largest_dense_lengths():
    """Fixed bytes (the heads' weights, allocator state) cancel; only the slope refits the
    work constant. The aggregator rows' model counts the heads' weights (all of VGGT is on the GPU)."""
    from httm_dist.pipeline import memory

    job = _job()
    arch = job.VGGTConfig.preset("tiny")
    h, w = 42, 56
    base = memory.memory_model(arch, h, w, "dense", whole_model=False)
    P = 1 + arch.num_register_tokens + (h // arch.patch_size) * (w // arch.patch_size)
    extra = 7.0  # true constant = current + 7 bytes per channel
    per_frame = base.per_frame_bytes + P * extra * arch.embed_dim
    rows = [{"part": "aggregator", "frames": f, "tokens": f * P, "strategy": "dense",
             "peak_bytes": int(5e9 + f * per_frame)} for f in (2, 8, 16)]
    text = job.memory_report(rows, arch, h, w)
    want = memory.WORK_BYTES_PER_CHANNEL + extra
    assert f"slope between 8 and 16 frames): {want:.1f}" in text
    heads = (memory.parameter_count(arch, True) - memory.parameter_count(arch, False)) * 4
    assert heads > 0 and f"{(base.peak_bytes(16) + heads) / 1e9:.2f} |" in text
    assert "Refitted" not in job.memory_report(rows[:1], arch, h, w)


def test_results_are_saved_after_every_job(tmp_path, monkeypatch):
    """A run cut short (a timeout) keeps results.json and report.md of the jobs that ran."""
    job = _job()

    def cut(*a, **k):
        raise KeyboardInterrupt  # as if the call's time ran out after the jobs

    monkeypatch.setattr(job, "layer_alone", cut)
    try:
        job.main(["--quick", "--out", str(tmp_path)])
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("layer_alone was not reached")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["frames"], r["strategy"]) for r in rows if r["part"] == "aggregator"} >= {(4, "dense"), (4, "httm always")}
    assert any(r.get("split") for r in rows)
    assert "Whole aggregator" in (tmp_path / "report.md").read_text()


def test_point4_runs_the_module_alone_under_the_models_autocast(monkeypatch):
    """The 'alone' rerun must compute as the module did inside the forward: under the
    aggregator's autocast (CUDA bf16 there; CPU bf16 stands in for it here), or the comparison
    is fp32 against bf16 and hides what the model adds."""
    job = _job()
    model = VGGT(VGGTConfig.preset("tiny")).eval()
    monkeypatch.setattr(model.aggregator, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    keep = len(model.aggregator.global_blocks) // 2
    dtypes = []
    model.aggregator.global_blocks[keep].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = torch.rand(1, 3, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    cfgs = {"dense": MergeConfig(strategy="dense"), "httm": MergeConfig(strategy="httm", min_tokens=0)}
    res = job.point4(model, x, 42, 56, cfgs, job.Bench(torch.device("cpu"), 60.0, reps=1))
    assert res["httm"]["alone_ms"] > 0 and dtypes and set(dtypes) == {torch.bfloat16}
