"""How local is the global attention of a VGGT? Trained ``tiny-synthetic`` vs random weights.

HTTM merges tokens that are close in space and time, which is cheap in accuracy only if each
query's attention mass sits near it: in its own frame around its own position, and at the same
position in the neighbouring frames. This measures, for every global-attention layer, the share
of each patch query's attention mass on patch keys within ``radius`` patches of its position
(Chebyshev distance) in (a) its own frame and (b) the frames just before and after, and (c)
on the special (camera and register) tokens of all frames, averaged
over queries, heads and scenes, next to the share that uniform attention would give (the
fraction of keys in that region). Usage:

    .venv/bin/python jobs/attention_locality.py --weights-dir httm_dist/weights --frames 8

prints a markdown table (used in docs/training.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from httm_dist.model.hooks import AttentionContext
from httm_dist.train.data import held_out_scenes
from httm_dist.train.loop import build_model, load_checkpoint


def region_masks(ctx: AttentionContext, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [N, N] masks (query, key) of patch-to-patch pairs within ``radius`` patches,
    in the same frame and in an adjacent frame (|frame difference| == 1)."""
    S, P, start = ctx.num_frames, ctx.tokens_per_frame, ctx.patch_start_idx
    rows, cols = ctx.patch_grid
    t = torch.arange(S * P)
    frame, local = t // P, t % P
    is_patch = local >= start
    patch = (local - start).clamp(min=0)
    r, c = patch // cols, patch % cols
    near = ((r[:, None] - r[None]).abs() <= radius) & ((c[:, None] - c[None]).abs() <= radius)
    near &= is_patch[:, None] & is_patch[None]
    df = (frame[:, None] - frame[None]).abs()
    return near & (df == 0), near & (df == 1)


class LocalityProbe:
    """An ``attn_fn`` that computes attention explicitly and accumulates locality shares."""

    def __init__(self, radius: int) -> None:
        self.radius = radius
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        attn = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)  # [B,h,N,N]
        same, adjacent = region_masks(ctx, self.radius)
        queries = (torch.arange(q.shape[-2]) % ctx.tokens_per_frame) >= ctx.patch_start_idx
        n_keys = q.shape[-2]
        shares = torch.stack([
            (attn * same).sum(-1)[..., queries].mean(),
            (attn * adjacent).sum(-1)[..., queries].mean(),
            attn[..., ~queries].sum(-1)[..., queries].mean(),
            same.sum(-1)[queries].float().mean() / n_keys,
            adjacent.sum(-1)[queries].float().mean() / n_keys,
            (~queries).sum().float() / n_keys,
        ])
        self.sums[ctx.layer_idx] = self.sums.get(ctx.layer_idx, 0) + shares
        self.counts[ctx.layer_idx] = self.counts.get(ctx.layer_idx, 0) + 1
        return attn @ v

    def table(self) -> list[dict[str, float]]:
        keys = ("own_frame", "adjacent_frames", "special", "own_frame_uniform", "adjacent_frames_uniform", "special_uniform")
        return [
            {"layer": layer, **{k: float(v) for k, v in zip(keys, self.sums[layer] / self.counts[layer])}}
            for layer in sorted(self.sums)
        ]


@torch.no_grad()
def measure(model: torch.nn.Module, images: list[torch.Tensor], radius: int) -> list[dict[str, float]]:
    probe = LocalityProbe(radius)
    blocks = model.aggregator.global_blocks
    for block in blocks:
        block.attn.attn_fn = probe
    try:
        for x in images:
            model(x)
    finally:
        for block in blocks:
            block.attn.attn_fn = None
    return probe.table()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights-dir", default=str(Path(__file__).resolve().parents[1] / "httm_dist" / "weights"))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--scenes", type=int, default=2)
    p.add_argument("--radius", type=int, default=1)
    args = p.parse_args(argv)
    trained, meta = load_checkpoint(args.weights_dir)
    h, w = meta["training"]["height"], meta["training"]["width"]
    scenes = held_out_scenes(args.scenes, args.frames, h, w, first_seed_offset=200)
    images = [s.images for s in scenes]
    models: dict[str, Any] = {
        "trained": trained,
        "random": build_model(meta["config"], seed=0).eval(),
    }
    print(f"attention locality, radius {args.radius} patches, {args.scenes} held-out scenes of "
          f"{args.frames} frames at {h}x{w} (share of a patch query's attention mass)\n")
    print("| weights | layer | own frame, near | adjacent frames, near | special tokens | "
          "uniform: own | uniform: adjacent | uniform: special |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        for row in measure(model, images, args.radius):
            print(f"| {name} | {row['layer']} | {row['own_frame']:.3f} | {row['adjacent_frames']:.3f} | "
                  f"{row['special']:.3f} | {row['own_frame_uniform']:.3f} | "
                  f"{row['adjacent_frames_uniform']:.3f} | {row['special_uniform']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
