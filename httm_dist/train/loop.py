"""The training loop: optimiser, schedule, held-out evaluation, curve and checkpoints.

``train(config, out_dir)`` trains a VGGT from scratch on a :class:`~httm_dist.train.data.ScenePool`
with AdamW, linear warm-up then cosine decay, and gradient clipping. Every ``eval_every`` steps
it measures the model on fixed held-out scenes (depth AbsRel and delta<1.25 after median
scaling, relative camera rotation error) and appends a row to ``curve.csv``/``curve.json``;
every ``ckpt_every`` steps (and at the end, also when the time cap stops the run early) it
writes the weights as float16 safetensors plus a JSON with the model config, the training
config and the last metrics, so a partial run still yields a usable checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from httm_dist.errors import ConfigError
from httm_dist.eval.metrics import camera_metrics, depth_metrics
from httm_dist.model.config import PATCH_SIZE, VGGTConfig
from httm_dist.model.geometry import pose_encoding_to_extri_intri
from httm_dist.model.vggt import VGGT
from httm_dist.model.weights import load_vggt
from httm_dist.train.data import SceneBatch, ScenePool, held_out_scenes
from httm_dist.train.losses import LossWeights, vggt_loss

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "tiny_synthetic"

TRAIN_RENDER_OPTIONS: dict[str, Any] = {"step_deg": [2.0, 10.0], "step_m": [0.05, 0.25]}
"""Training scenes move the camera up to ~2x further between frames than the evaluation
defaults (2-6 degrees, 0.05-0.15 m), so that frames can differ by more than a 14-pixel patch
at the tiny model's 7x9 token grid. (Meant to make relative pose learnable; in the shipped run
it was not learned anyway: docs/training.md.)"""


def _tiny_model_config(height: int) -> dict[str, Any]:
    """The default small VGGT: width 128, head dim 64, 4 aggregator and 2 DINO layers, one
    camera trunk block, DPT features 16 (3.3M parameters, sized for training on 2 shared
    CPU cores: about 0.35 CPU-seconds per step of 8 frames at 98x126)."""
    embed, heads = 128, 2
    return {
        "img_size": height,
        "patch_size": PATCH_SIZE,
        "embed_dim": embed,
        "num_heads": heads,
        "mlp_ratio": 4.0,
        "depth": 4,
        "num_register_tokens": 4,
        "patch_embed": {
            "kind": "dinov2", "embed_dim": embed, "depth": 2, "num_heads": heads, "mlp_ratio": 4.0,
            "img_size": height, "num_register_tokens": 4, "layerscale_init": 1.0,
            "interpolate_antialias": True, "interpolate_offset": 0.0,
        },
        "camera_head": {"dim_in": 2 * embed, "trunk_depth": 1, "num_heads": heads, "mlp_ratio": 4, "init_values": 0.01},
        "dpt": {"dim_in": 2 * embed, "features": 16, "out_channels": [16, 32, 48, 48], "intermediate_layer_idx": [0, 1, 2, 3]},
        "depth_head": {"output_dim": 2, "activation": "exp", "conf_activation": "expp1"},
        "point_head": {"output_dim": 4, "activation": "inv_log", "conf_activation": "expp1"},
        "track_head": None,
    }


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved next to the checkpoint).

    The defaults are the run that produced the shipped ``tiny-synthetic`` weights.

    Each step draws a frame count in ``min_frames..max_frames`` and as many samples as fit in
    ``frames_per_batch`` frames, so a step costs about the same whatever the frame count.
    """

    height: int = 98
    width: int = 126
    model: dict[str, Any] = field(default_factory=dict)
    steps: int = 11000
    max_minutes: float | None = None
    frames_per_batch: int = 8
    min_frames: int = 2
    max_frames: int = 6
    lr: float = 8e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    pool_size: int = 64
    frames_per_scene: int = 8
    refresh_every: int = 1
    max_stride: int = 2
    render_options: dict[str, Any] = field(default_factory=lambda: dict(TRAIN_RENDER_OPTIONS))
    eval_every: int = 100
    eval_scenes: int = 6
    eval_frames: int = 4
    ckpt_every: int = 100
    seed: int = 0
    threads: int | None = None
    loss: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if not self.model:
            self.model = _tiny_model_config(max(self.height, self.width))
        if self.height % PATCH_SIZE or self.width % PATCH_SIZE:
            raise ConfigError(f"TrainConfig: height and width must be multiples of {PATCH_SIZE}, got {self.height}x{self.width}")
        if not 1 <= self.min_frames <= self.max_frames <= self.frames_per_scene:
            raise ConfigError(
                "TrainConfig: need 1 <= min_frames <= max_frames <= frames_per_scene, got "
                f"{self.min_frames}, {self.max_frames}, {self.frames_per_scene}"
            )
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ConfigError(f"TrainConfig: max_minutes must be >= 0 (or None: no cap), got {self.max_minutes}")
        if self.max_stride < 1:
            raise ConfigError(f"TrainConfig: max_stride must be >= 1, got {self.max_stride}")
        if self.steps < 1 or self.frames_per_batch < self.max_frames:
            raise ConfigError(
                "TrainConfig: need steps >= 1 and frames_per_batch >= max_frames, got "
                f"{self.steps}, {self.frames_per_batch}, {self.max_frames}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss"] = self.loss.to_dict()
        return d


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(
    model: torch.nn.Module,
    batch: SceneBatch,
    optimizer: torch.optim.Optimizer,
    weights: LossWeights = LossWeights(),
    grad_clip: float | None = 1.0,
) -> dict[str, float]:
    """One optimisation step on ``batch``; returns the loss parts, ``loss`` and ``grad_norm``."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    outputs = model(batch.images)
    loss, parts = vggt_loss(outputs, batch, weights)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"train_step: non-finite loss {float(loss)} (parts {parts}); lower the learning rate")
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    optimizer.step()
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **parts}


@torch.no_grad()
def evaluate(model: torch.nn.Module, scenes: Sequence[SceneBatch]) -> dict[str, float]:
    """Held-out metrics averaged over ``scenes`` (each a batch of one), with the project's
    evaluation metrics: depth AbsRel and delta<1.25 after per-scene median scaling, and the
    mean relative camera rotation / translation-direction errors (degrees) and AUC@30."""
    model.eval()
    rows = []
    for batch in scenes:
        out = model(batch.images)
        row = depth_metrics(out["depth"][0].double().numpy(), batch.depth[0].double().numpy(), batch.valid[0].numpy())
        row.pop("depth_scale", None)
        if batch.images.shape[1] > 1:
            extr, _ = pose_encoding_to_extri_intri(out["pose_enc"][0].double(), batch.image_size)
            cam = camera_metrics(extr.numpy(), batch.extrinsic[0].double().numpy())
            row.update(rot_err_deg=cam["rot_err_mean"], trans_err_deg=cam["trans_err_mean"], auc30=cam["auc@30"])
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def save_checkpoint(model: torch.nn.Module, out_dir: Path, metadata: dict[str, Any], name: str = CHECKPOINT_NAME) -> Path:
    """Write ``<name>.safetensors`` (float16) and ``<name>.json`` (metadata) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    path = out_dir / f"{name}.safetensors"
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    (out_dir / f"{name}.json").write_text(json.dumps(metadata, indent=1, sort_keys=True))
    return path


def load_checkpoint(
    out_dir: str | Path, name: str = CHECKPOINT_NAME, device: str = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The eval-mode model and metadata that :func:`save_checkpoint` wrote into ``out_dir``
    (strict key matching, as every load)."""
    out = Path(out_dir)
    metadata = json.loads((out / f"{name}.json").read_text())
    return load_vggt(metadata["config"], str(out / f"{name}.safetensors"), device=device), metadata


def _write_curve(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(out_dir / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "curve.json").write_text(json.dumps(rows, indent=1))


def build_model(model_config: dict[str, Any], seed: int) -> torch.nn.Module:
    """A freshly initialised VGGT for ``model_config`` (seeded)."""
    torch.manual_seed(seed)
    return VGGT(VGGTConfig.from_dict(model_config))


def train(config: TrainConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train a VGGT per ``config``; write checkpoint, metadata and curve into ``out_dir``.

    Returns a summary: steps done, wall seconds, the untrained and final held-out metrics and
    the checkpoint path. Stops early (still checkpointing) when ``max_minutes`` runs out.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)

    model = build_model(config.model, config.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    t0 = time.perf_counter()
    pool = ScenePool(
        config.pool_size, config.frames_per_scene, config.height, config.width, seed=config.seed,
        render_options=config.render_options,
    )
    held = held_out_scenes(config.eval_scenes, config.eval_frames, config.height, config.width)
    log.info("rendered pool and held-out scenes in %.1fs", time.perf_counter() - t0)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )

    untrained = evaluate(model, held)
    rows: list[dict[str, Any]] = [{"step": 0, "seconds": 0.0, "loss": float("nan"), **untrained}]
    _write_curve(out, rows)
    metadata: dict[str, Any] = {
        "name": "tiny-synthetic",
        "config": config.model,
        "training": config.to_dict(),
        "parameters": n_params,
        "untrained_metrics": untrained,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }

    start = time.perf_counter()
    deadline = start + 60.0 * config.max_minutes if config.max_minutes is not None else None
    window: list[float] = []
    step = 0
    bar = tqdm(total=config.steps, disable=not progress, desc="train", dynamic_ncols=True)
    metrics = untrained
    for step in range(1, config.steps + 1):
        factor = lr_factor(step - 1, config.steps, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor
        frames = int(rng.integers(config.min_frames, config.max_frames + 1))
        batch = pool.sample(rng, config.frames_per_batch // frames, frames, config.max_stride)
        stats = train_step(model, batch, optimizer, config.loss, config.grad_clip)
        window.append(stats["loss"])
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{config.lr * factor:.1e}")
        if config.refresh_every and step % config.refresh_every == 0:
            pool.refresh(rng)
        out_of_time = deadline is not None and time.perf_counter() > deadline
        last = step == config.steps or out_of_time
        if step % config.eval_every == 0 or last:
            metrics = evaluate(model, held)
            row = {"step": step, "seconds": round(time.perf_counter() - start, 1),
                   "loss": float(np.mean(window)), **{k: v for k, v in stats.items() if k != "loss"}, **metrics}
            rows.append(row)
            window = []
            _write_curve(out, rows)
            log.info("step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        if step % config.ckpt_every == 0 or last:
            metadata.update({"steps_done": step, "seconds": round(time.perf_counter() - start, 1), "metrics": metrics})
            save_checkpoint(model, out, metadata)
        if out_of_time:
            log.warning("stopping at step %d: the %.1f-minute cap ran out", step, config.max_minutes)
            break
    bar.close()
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "untrained": untrained,
        "final": metrics,
        "checkpoint": str(out / f"{CHECKPOINT_NAME}.safetensors"),
    }
