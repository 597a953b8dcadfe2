"""Held-out metrics of the shipped ``tiny-synthetic`` weights vs untrained weights and trivial
baselines (the table in docs/training.md).

Scenes: ``--scenes`` held-out synthetic scenes (seeds ``HELD_OUT_SEED_BASE + 100 + i``, never
used in training nor in its monitoring), at each ``--sizes`` HxW and ``--frames`` count.
Baselines: ``constant`` predicts one depth everywhere and every camera equal to the first
(identity pose) - what a model that learned nothing scene-specific would score after median
scaling; ``untrained`` is the same architecture with seeded random weights. Usage:

    .venv/bin/python jobs/eval_tiny.py --sizes 98x126 126x168 --frames 4 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from httm_dist.train.data import held_out_scenes
from httm_dist.train.loop import build_model, evaluate, load_checkpoint


class ConstantBaseline(torch.nn.Module):
    """Depth 1 everywhere; every camera the identity rotation with a 60 degree field of view
    (centres 1 mm apart along x, only so that ATE is defined: its translation errors mean
    nothing and are not reported)."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        B, S, _, H, W = images.shape
        pose = torch.zeros(B, S, 9)
        pose[..., 6] = 1.0
        pose[..., 0] = 1e-3 * torch.arange(S)
        pose[..., 8] = torch.deg2rad(torch.tensor(60.0))
        pose[..., 7] = 2 * torch.atan(torch.tan(pose[..., 8] / 2) * H / W)
        return {"pose_enc": pose, "depth": torch.ones(B, S, H, W, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights-dir", default=str(Path(__file__).resolve().parents[1] / "httm_dist" / "weights"))
    p.add_argument("--sizes", nargs="+", default=["98x126", "126x168"])
    p.add_argument("--frames", nargs="+", type=int, default=[4, 8])
    p.add_argument("--scenes", type=int, default=8)
    args = p.parse_args(argv)
    trained, meta = load_checkpoint(args.weights_dir)
    models = {
        "tiny-synthetic": trained,
        "untrained": build_model(meta["config"], seed=0).eval(),
        "constant": ConstantBaseline(),
    }
    print(f"{args.scenes} held-out scenes per row; weights trained for {meta['steps_done']} steps\n")
    print("| size | frames | weights | AbsRel | δ<1.25 | rot err° | trans err° | AUC@30 |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for frames in args.frames:
            scenes = held_out_scenes(args.scenes, frames, h, w, first_seed_offset=100)
            for name, model in models.items():
                m = evaluate(model, scenes)
                trans = "– | –" if name == "constant" else f"{m['trans_err_deg']:.1f} | {m['auc30']:.3f}"
                print(f"| {h}x{w} | {frames} | {name} | {m['abs_rel']:.3f} | {m['delta_1.25']:.3f} | "
                      f"{m['rot_err_deg']:.1f} | {trans} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
