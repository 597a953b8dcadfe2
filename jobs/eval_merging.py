"""Merging fidelity benchmark: dense vs uniform vs httm on the same scenes and weights.

Locally:    python jobs/eval_merging.py --scenes 2 --frames 8
On Ray:     ray job submit --working-dir . -- python jobs/eval_merging.py --ray --frames 32
Real data:  python jobs/eval_merging.py --gt-scene s3://bucket/scene --width 518 --preset vggt-1b --weights ...

The options are those of ``httm-dist eval`` plus ``--gt-scene``, ``--storage-options``,
``--point-source`` and ``--ray``. Prints a markdown table (columns: docs/evaluation.md). With
``--ray`` the benchmark runs inside one Ray task that asks for a GPU when the cluster has one,
so the timings are the GPU's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from httm_dist.cli import add_eval_arguments, parse_strategy
    from httm_dist.errors import ConfigError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_eval_arguments(p)
    p.add_argument(
        "--gt-scene", action="append", default=None, metavar="URL",
        help="a ground-truth scene folder (docs/evaluation.md) to use instead of synthetic scenes "
        "(repeatable; its first --frames frames, preprocessed to --width)",
    )
    p.add_argument("--storage-options", default=None, help="JSON fsspec options for --gt-scene URLs")
    p.add_argument("--point-source", choices=("world_points", "depth"), default="world_points")
    p.add_argument("--ray", action="store_true", help="run inside a Ray task (a GPU when the cluster has one)")
    args = p.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) % 14:
            p.error(f"--{name} must be a multiple of 14 (the patch size), got {getattr(args, name)}")
    try:
        args.strategies = [parse_strategy(s) for s in args.strategy] if args.strategy else None
    except ConfigError as exc:
        p.error(str(exc))
    if args.storage_options is not None:
        try:
            args.storage_options = dict(json.loads(args.storage_options))
        except (ValueError, TypeError) as exc:
            p.error(f"--storage-options must be a JSON object: {exc}")
    return args


def _run(kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    from httm_dist.eval.fidelity import run_fidelity

    return run_fidelity(**kwargs)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    kwargs = dict(
        num_scenes=args.scenes,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        preset=args.preset,
        weights=args.weights,
        strategies=args.strategies,
        seed=args.seed,
        device=args.device,
        point_source=args.point_source,
        gt_scenes=args.gt_scene,
        storage_options=args.storage_options,
    )
    if args.ray:
        import ray

        ray.init(ignore_reinit_error=True)  # joins the cluster under `ray job submit`, else starts one
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        rows = ray.get(ray.remote(num_gpus=gpus)(_run).remote(kwargs))
    else:
        rows = _run(kwargs)

    from httm_dist.eval.fidelity import format_table

    weights = args.weights or "preset default (random if the preset ships none)"
    source = f"{len(args.gt_scene)} ground-truth scenes" if args.gt_scene else f"{args.scenes} synthetic scenes"
    print(f"\nfidelity: {source} x {args.frames} frames, width {args.width}, preset {args.preset}, weights {weights}\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
