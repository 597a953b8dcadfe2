"""Train the project's small VGGT (the ``tiny-synthetic`` preset) on synthetic scenes.

Reproduces the shipped weights (see docs/training.md for the exact command and machine):

    OMP_WAIT_POLICY=PASSIVE nice -n 5 .venv/bin/python jobs/train_tiny.py --out runs/tiny --minutes 115

writes ``tiny_synthetic.safetensors`` (float16), ``tiny_synthetic.json`` (model config, training
config, metrics) and ``curve.csv``/``curve.json`` into ``--out``. ``--minutes`` caps the wall
time: the run then stops early and still checkpoints. Copy the two ``tiny_synthetic.*`` files to
``httm_dist/weights/`` to ship them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from httm_dist.train.loop import TRAIN_RENDER_OPTIONS, TrainConfig, train
from httm_dist.train.losses import LossWeights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder for checkpoint, metadata and curve")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimisation steps (sets the cosine schedule)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap; stops early and checkpoints")
    p.add_argument("--frames-per-batch", type=int, default=TrainConfig.frames_per_batch, help="frames per step (samples = this // frames)")
    p.add_argument("--min-frames", type=int, default=TrainConfig.min_frames)
    p.add_argument("--max-frames", type=int, default=TrainConfig.max_frames)
    p.add_argument("--height", type=int, default=TrainConfig.height)
    p.add_argument("--width", type=int, default=TrainConfig.width)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--pool-size", type=int, default=TrainConfig.pool_size)
    p.add_argument("--max-stride", type=int, default=TrainConfig.max_stride, help="largest frame stride of a sample")
    p.add_argument("--render-options", default=None, help="JSON dict of synthetic-scene options for training scenes")
    p.add_argument("--camera-weight", type=float, default=LossWeights.camera)
    p.add_argument("--camera-loss", choices=("l1", "huber"), default=LossWeights.camera_kind)
    p.add_argument("--refresh-every", type=int, default=TrainConfig.refresh_every)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--eval-scenes", type=int, default=TrainConfig.eval_scenes)
    p.add_argument("--ckpt-every", type=int, default=TrainConfig.ckpt_every)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--model-config", default=None, help="JSON file with a VGGT config dict (default: the tiny preset)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = json.loads(Path(args.model_config).read_text()) if args.model_config else {}
    config = TrainConfig(
        height=args.height, width=args.width, model=model, steps=args.steps, max_minutes=args.minutes,
        frames_per_batch=args.frames_per_batch, min_frames=args.min_frames, max_frames=args.max_frames, lr=args.lr,
        warmup_steps=args.warmup, pool_size=args.pool_size, refresh_every=args.refresh_every,
        eval_every=args.eval_every, eval_scenes=args.eval_scenes, ckpt_every=args.ckpt_every,
        seed=args.seed, threads=args.threads, max_stride=args.max_stride,
        render_options=json.loads(args.render_options) if args.render_options else dict(TRAIN_RENDER_OPTIONS),
        loss=LossWeights(camera=args.camera_weight, camera_kind=args.camera_loss),
    )
    summary = train(config, args.out, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
