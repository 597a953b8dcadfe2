"""jobs/profile_in_model.py: issue 14 point 4 on CPU (the model adds no work around the hook)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("profile_in_model", ROOT / "jobs" / "profile_in_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["profile_in_model"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_merged_hooks_do_the_same_work_in_the_model_as_alone(tmp_path):
    """Inside the model each merged attention call runs the ops and writes the bytes it does
    alone on the same q/k/v, and outside the hooks the merged forward only drops the dense
    kernels (and their outputs): what issue 14's point 4 asked to find and remove."""
    threads = torch.get_num_threads()
    res = _job().main(["--frames", "4", "--hw", "42,56", "--depth", "2", "--reps", "1",
                       "--json", str(tmp_path / "p4.json")])
    assert torch.get_num_threads() == threads
    assert json.loads((tmp_path / "p4.json").read_text()) == res
    assert res["hook_ops_in_model"] == res["hook_ops_alone_x_layers"] > 0
    assert res["hook_MB_in_model"] == res["hook_MB_alone_x_layers"] > 0
    extra = res["outside_hooks_merged_minus_dense"]
    assert extra["scaled_dot_product_attention.default"][0] == -2  # one dense kernel per global layer
    assert all(ops <= 0 and mb <= 0 for ops, mb in extra.values())  # nothing added around the hooks
    assert min(res[k] for k in ("hook_in_model_ms", "hook_alone_ms", "dense_forward_s", "merged_forward_s")) > 0
