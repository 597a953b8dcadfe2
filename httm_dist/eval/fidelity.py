"""Merging fidelity: the same scenes through dense, uniform and httm on the same weights.

Why: a user choosing a merge ratio needs to see what it costs. For each strategy this reports
accuracy against the synthetic ground truth (depth, points, cameras), how far its predictions
move from the dense model's (the direct cost of merging, meaningful even when the weights are
poor), and the forward time.

Row keys (one row per strategy, means over scenes):
``strategy``, ``config`` (the MergeConfig dict), ``q_keep`` / ``kv_keep`` (configured),
``q_kept`` / ``kv_kept`` (measured share of tokens the kernel saw, from ``merge_stats``),
every metric of :func:`httm_dist.eval.metrics.evaluate_scene`, ``delta_<metric>`` (minus the
dense row's), ``depth_dev`` (mean |d - d_dense| / d_dense), ``points_dev`` (mean point
distance to the dense points over the dense cloud's RMS extent), ``pose_dev_deg`` (mean
rotation angle between each camera and the dense one), ``seconds`` (forward time per scene)
and ``speedup`` (dense seconds / seconds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from httm_dist.errors import SceneError, StorageError
from httm_dist.merging import MergeConfig, apply_merging, merge_stats
from httm_dist.model import load_vggt
from httm_dist.model.geometry import pose_encoding_to_extri_intri
from httm_dist.model.preprocess import load_and_preprocess_images
from httm_dist.storage import error_text, read_bytes, redact

from .gt_loader import GroundTruth, load_gt_scene
from .metrics import evaluate_scene, rotation_angle_deg
from .synthetic import render_scene

logger = logging.getLogger(__name__)

StrategySpec = tuple[str, Union[Mapping[str, Any], Any]]

DEFAULT_STRATEGIES: list[StrategySpec] = [
    ("dense", {"strategy": "dense"}),
    ("uniform kv0.5", {"strategy": "uniform", "kv_keep": 0.5}),
    ("uniform kv0.3", {"strategy": "uniform", "kv_keep": 0.3}),
    ("httm q0.5 kv0.5", {"strategy": "httm", "q_keep": 0.5, "kv_keep": 0.5, "outlier_frac": 0.1}),
    ("httm q0.2 kv0.3", {"strategy": "httm", "q_keep": 0.2, "kv_keep": 0.3, "outlier_frac": 0.1}),
]

METRIC_KEYS = (
    "abs_rel",
    "delta_1.25",
    "accuracy",
    "completeness",
    "accuracy_median",
    "completeness_median",
    "rot_err_mean",
    "trans_err_mean",
    "auc@30",
    "ate",
)


@dataclass
class EvalScene:
    """One scene ready for the model: ``images`` float32 [S,3,H,W] in [0,1] and ground truth
    at that size (``depth`` [S,H,W], 0 = invalid; ``extrinsic`` [S,3,4]; ``intrinsic`` [S,3,3])."""

    name: str
    images: np.ndarray
    depth: np.ndarray
    extrinsic: np.ndarray
    intrinsic: np.ndarray

    def model_input(self) -> np.ndarray:
        return self.images


def load_eval_scene(
    url: str,
    width: int,
    storage_options: Mapping[str, Any] | None = None,
    max_frames: int | None = None,
) -> EvalScene:
    """A ground-truth scene folder (docs/evaluation.md) prepared as the model sees it: images
    through the project's ``crop`` preprocessing at ``width`` (a multiple of 14), ground truth
    resized and cropped alike (:meth:`GroundTruth.resized`). ``max_frames`` keeps the first
    frames (consecutive, so they overlap as in the video).

    Raises ``SceneError`` naming a frame that is missing or cannot be read (e.g. an HTTP 403),
    and ``StorageError`` when the storage stays unreachable after retries."""
    uris, gt = load_gt_scene(url, dict(storage_options or {}))
    if max_frames is not None:
        uris = uris[:max_frames]
        gt = GroundTruth(gt.depth[:max_frames], gt.extrinsic[:max_frames], gt.intrinsic[:max_frames])
    data = []
    for uri in uris:  # one read per frame
        try:
            data.append(read_bytes(uri, storage_options))
        except StorageError:  # unreachable after retries
            raise
        except OSError as exc:  # gone, forbidden (an HTTP 403 too), unreadable
            raise SceneError(f"ground-truth scene {redact(str(url))}: cannot read frame {redact(uri)}: "
                             f"{error_text(exc)}") from exc
    images = load_and_preprocess_images(data, mode="crop", target_size=width).numpy()
    H, W = images.shape[-2:]
    small = gt.resized(H, W, mode="crop")
    return EvalScene(str(url).rstrip("/").rsplit("/", 1)[-1], images, small.depth, small.extrinsic, small.intrinsic)


def _predict(model: Any, scene: EvalScene, device: Any) -> tuple[dict[str, np.ndarray], float]:
    """One forward pass: numpy predictions (cameras decoded) and its wall time in seconds."""
    x = torch.from_numpy(scene.model_input()).to(device)
    H, W = x.shape[-2:]
    with torch.inference_mode():
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        extrinsic, intrinsic = pose_encoding_to_extri_intri(out["pose_enc"], (H, W))
    pred = {
        "depth": out["depth"][0, ..., 0].float().cpu().numpy(),
        "depth_conf": out["depth_conf"][0].float().cpu().numpy(),
        "world_points": out["world_points"][0].float().cpu().numpy(),
        "world_points_conf": out["world_points_conf"][0].float().cpu().numpy(),
        "extrinsic": extrinsic[0].float().cpu().numpy(),
        "intrinsic": intrinsic[0].float().cpu().numpy(),
    }
    return pred, seconds


def prediction_deviation(pred: Mapping[str, np.ndarray], dense: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How far a prediction is from the dense model's on the same input (no ground truth):
    ``depth_dev`` mean relative depth difference, ``points_dev`` mean point distance over the
    dense cloud's RMS extent, ``pose_dev_deg`` mean per-frame rotation difference."""
    d, dd = np.asarray(pred["depth"], np.float64), np.asarray(dense["depth"], np.float64)
    depth_dev = float(np.mean(np.abs(d - dd) / np.maximum(np.abs(dd), 1e-8)))
    p, pd = np.asarray(pred["world_points"], np.float64), np.asarray(dense["world_points"], np.float64)
    pd_flat = pd.reshape(-1, 3)
    extent = float(np.sqrt(np.mean(np.sum((pd_flat - pd_flat.mean(0)) ** 2, axis=1))))
    points_dev = float(np.mean(np.linalg.norm(p - pd, axis=-1)) / max(extent, 1e-12))
    R, Rd = np.asarray(pred["extrinsic"], np.float64)[:, :, :3], np.asarray(dense["extrinsic"], np.float64)[:, :, :3]
    return {"depth_dev": depth_dev, "points_dev": points_dev, "pose_dev_deg": float(rotation_angle_deg(R, Rd).mean())}


def _measured_ratios(model: Any) -> dict[str, float]:
    """Share of tokens the attention kernel saw, averaged over the patched layers."""
    stats = merge_stats(model)
    if not stats:
        return {"q_kept": 1.0, "kv_kept": 1.0}
    q = [float(np.mean(np.asarray(s["q_kept"], dtype=np.float64))) / s["tokens"] for s in stats]
    kv = [float(np.mean(np.asarray(s["kv_kept"], dtype=np.float64))) / s["tokens"] for s in stats]
    return {"q_kept": float(np.mean(q)), "kv_kept": float(np.mean(kv))}


def run_fidelity(
    num_scenes: int = 2,
    num_frames: int = 8,
    height: int = 98,
    width: int = 126,
    preset: str = "tiny-synthetic",
    weights: str | None = None,
    strategies: Sequence[StrategySpec] | None = None,
    seed: int = 0,
    device: Any = None,
    scene_options: Mapping[str, Any] | None = None,
    point_source: str = "world_points",
    gt_scenes: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every strategy on the same scenes and weights; one row per strategy.

    Scenes: ``num_scenes`` synthetic ones (seeds ``seed, seed+1, ...``; ``scene_options`` go to
    :func:`render_scene`) or, with ``gt_scenes``, ground-truth scene folders (URLs, read with
    ``storage_options``; the first ``num_frames`` frames of each, preprocessed to ``width``;
    ``height`` then follows the images' aspect). ``strategies``: (name, MergeConfig dict or
    MergeConfig) pairs; a dense baseline is added first when none is given. A dict without
    ``min_tokens`` gets ``min_tokens: 0``: fidelity measures the merging method itself, and the
    speed rule would run the short evaluation scenes dense. The model is seeded
    with ``seed`` before loading so random weights are reproducible; one untimed warm-up pass
    precedes the timed ones.
    """
    if num_scenes < 1 or num_frames < 2:
        raise ValueError(f"need num_scenes >= 1 and num_frames >= 2, got {num_scenes}, {num_frames}")
    specs = []
    for name, cfg in strategies if strategies is not None else DEFAULT_STRATEGIES:
        mc = cfg if isinstance(cfg, MergeConfig) else MergeConfig.from_dict({"min_tokens": 0, **dict(cfg)})
        specs.append((str(name), mc))
    if not any(mc.strategy == "dense" for _, mc in specs):
        specs.insert(0, ("dense", MergeConfig.from_dict({"strategy": "dense"})))
    dense_name = next(name for name, mc in specs if mc.strategy == "dense")

    torch.manual_seed(seed)
    model = load_vggt(preset, weights=weights, device=device)
    dev = next(model.parameters()).device
    if gt_scenes:
        scenes = [load_eval_scene(url, width, storage_options, max_frames=num_frames) for url in gt_scenes]
    else:
        scenes = []
        for i in range(num_scenes):
            sc = render_scene(num_frames, height, width, seed=seed + i, **dict(scene_options or {}))
            scenes.append(EvalScene(f"synthetic-{seed + i}", sc.model_input(), sc.depth, sc.extrinsic, sc.intrinsic))
    logger.info(
        "fidelity: %d scenes (%s) of %s frames at %sx%s, preset %s, weights %s",
        len(scenes), "ground-truth folders" if gt_scenes else "synthetic", [sc.images.shape[0] for sc in scenes],
        width, scenes[0].images.shape[-2], preset, weights or "(preset default / random)",
    )

    apply_merging(model, specs[0][1])
    _predict(model, scenes[0], dev)  # warm-up: allocator, kernels, caches

    per_strategy: dict[str, dict[str, Any]] = {}
    dense_preds: list[dict[str, np.ndarray]] = []
    order = sorted(range(len(specs)), key=lambda i: specs[i][0] != dense_name)  # dense first
    for i in order:
        name, mc = specs[i]
        apply_merging(model, mc)
        metrics, devs, seconds, ratios = [], [], [], []
        for k, scene in enumerate(scenes):
            pred, sec = _predict(model, scene, dev)
            ratios.append(_measured_ratios(model))
            metrics.append(evaluate_scene(pred, scene.depth, scene.extrinsic, scene.intrinsic, point_source=point_source))
            if name == dense_name:
                dense_preds.append(pred)
            devs.append(prediction_deviation(pred, dense_preds[k]))
            seconds.append(sec)
        row: dict[str, Any] = {"strategy": name, "config": mc.to_dict(), "q_keep": mc.q_keep, "kv_keep": mc.kv_keep}
        if mc.strategy == "dense":
            row["q_keep"] = row["kv_keep"] = 1.0
        elif mc.strategy == "uniform":
            row["q_keep"] = mc.kv_keep  # one shared plan merges q, k and v alike
        for key in ("q_kept", "kv_kept"):
            row[key] = float(np.mean([r[key] for r in ratios]))
        for key in metrics[0]:
            row[key] = float(np.mean([m[key] for m in metrics]))
        for key in devs[0]:
            row[key] = float(np.mean([d[key] for d in devs]))
        row["seconds"] = float(np.mean(seconds))
        per_strategy[name] = row
        logger.info("fidelity: %s done (%.3f s per scene)", name, row["seconds"])
    apply_merging(model, MergeConfig.from_dict({"strategy": "dense"}))

    dense_row = per_strategy[dense_name]
    rows = [per_strategy[name] for name, _ in specs]
    for row in rows:
        for key in METRIC_KEYS:
            if key in row:
                row[f"delta_{key}"] = row[key] - dense_row[key]
        row["speedup"] = dense_row["seconds"] / row["seconds"] if row["seconds"] > 0 else float("nan")
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.1e}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`run_fidelity` rows: ratios, metrics with their change from
    dense in parentheses, deviation from the dense predictions, time and speedup."""
    cols = [
        ("strategy", "strategy", False),
        ("q/kv keep", None, False),
        ("q/kv kept", None, False),
        ("AbsRel", "abs_rel", True),
        ("δ<1.25", "delta_1.25", True),
        ("Acc", "accuracy", True),
        ("Comp", "completeness", True),
        ("RotErr°", "rot_err_mean", True),
        ("TransErr°", "trans_err_mean", True),
        ("AUC@30", "auc@30", True),
        ("ATE", "ate", True),
        ("depth dev", "depth_dev", False),
        ("points dev", "points_dev", False),
        ("pose dev°", "pose_dev_deg", False),
        ("s/scene", "seconds", False),
        ("speedup", "speedup", False),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for title, key, with_delta in cols:
            if title == "q/kv keep":
                cells.append(f"{r.get('q_keep', 1.0):.2f}/{r.get('kv_keep', 1.0):.2f}")
            elif title == "q/kv kept":
                cells.append(f"{r.get('q_kept', 1.0):.2f}/{r.get('kv_kept', 1.0):.2f}")
            elif key not in r:
                cells.append("")
            else:
                text = _fmt(r[key])
                delta = r.get(f"delta_{key}")
                if with_delta and delta is not None and r.get("config", {}).get("strategy") != "dense":
                    text += f" ({delta:+.3f})"
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
