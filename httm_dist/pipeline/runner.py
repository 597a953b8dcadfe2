"""The model side of a unit of work: :class:`ModelRunner` owns one merged VGGT for its life.

- :meth:`ModelRunner.load` fetches a unit's image bytes and preprocesses them (I/O + decode;
  a Ray worker runs it in a prefetch thread for its next unit);
- :meth:`ModelRunner.run` is the model forward pass (compute).

What happens to the predictions is :mod:`httm_dist.pipeline.publish`'s job. Knows nothing of
Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
from typing import Iterator, Mapping, Optional

import numpy as np
import torch

from httm_dist.config import JobConfig
from httm_dist.data import read_scene_frames
from httm_dist.errors import ConfigError, SceneError
from httm_dist.merging import apply_merging
from httm_dist.model import load_vggt
from httm_dist.model.config import preset_weights
from httm_dist.model.geometry import pose_encoding_to_extri_intri
from httm_dist.model.preprocess import load_and_preprocess_frames
from httm_dist.pipeline.unit import LoadedUnit, WorkUnit, check_scene
from httm_dist.storage import redact

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when this process sees a GPU, else CPU. ``cuda`` without a visible GPU
    is a configuration error (a worker got ``gpus_per_worker: 0``, or no GPU on the node)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "'model.device' is 'cuda' but this worker sees no CUDA device: set model.device "
            "to auto or cpu, or give workers GPUs (gpus_per_worker > 0)"
        )
    return torch.device(requested)


class ModelRunner:
    """Owns one merged model for its life: loads a unit's images and runs the model on them."""

    def __init__(
        self, cfg: JobConfig, device: Optional[str] = None, model: Optional[torch.nn.Module] = None
    ) -> None:
        """Load ``cfg.model`` on ``device`` (default ``cfg.model.device``; ``auto`` = CUDA if
        visible) and apply ``cfg.merging``. ``model``: reuse an already loaded VGGT of that
        preset and weights instead of loading it again (merging is re-applied to it)."""
        self.cfg = cfg
        self.device = resolve_device(device or cfg.model.device)
        t0 = time.perf_counter()
        if model is None:
            model = load_vggt(
                cfg.model.preset,
                weights=cfg.model.weights,
                device=self.device,
                storage_options=cfg.storage_options,
            )
        else:
            model = model.to(self.device)
        self.model = apply_merging(model, cfg.merging)
        self.model.eval()
        weights = cfg.model.weights or preset_weights(cfg.model.preset)
        log.info(
            "model %s (weights %s, merging %s) ready on %s in %.1f s",
            cfg.model.preset,
            weights or "NONE: random initialisation, outputs are meaningless",
            cfg.merging.strategy,
            self.device,
            time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ the two steps

    def load(self, unit: WorkUnit) -> LoadedUnit:
        """Fetch and preprocess the unit's images. Raises SceneError for an empty scene, too
        few frames, or an unreadable/corrupt image (naming the scene and the image)."""
        if unit.kind == "assemble":
            raise ValueError("an assemble unit has no images to load; publish it with ResultPublisher.assemble()")
        t0 = time.perf_counter()
        scene = unit.scene
        n_scene = len(scene.frames)
        check_scene(scene, self.cfg)  # the driver checked too; in-process callers may not have
        frames = unit.frames()
        if not frames:
            raise SceneError(
                f"scene '{scene.scene_id}': chunk {unit.chunk_index} range {unit.frame_range} "
                f"selects no frames of the scene's {n_scene}"
            )
        sub = scene if unit.frame_range is None else dataclasses.replace(scene, frames=frames)
        blobs = read_scene_frames(sub, self.cfg.storage_options)
        if len(blobs) != len(frames):
            raise SceneError(
                f"scene '{scene.scene_id}': read {len(blobs)} images for {len(frames)} frames"
            )
        # Named streams, so a decode error names the frame's URI rather than "<N bytes>".
        sources = []
        for frame, blob in zip(frames, blobs):
            stream = io.BytesIO(blob)
            stream.name = redact(frame.uri)
            sources.append(stream)
        try:
            images, geometry = load_and_preprocess_frames(
                sources, mode=self.cfg.image.mode, target_size=self.cfg.image.size,
                exif_orientation=self.cfg.image.exif_orientation,
                max_pixels=self.cfg.image.max_pixels,
            )
        except SceneError as exc:
            raise SceneError(f"scene '{scene.scene_id}': {exc}") from exc
        loaded = LoadedUnit(
            unit=unit,
            images=images,
            original_hw=[tuple(int(x) for x in g.orig_hw) for g in geometry],
            frame_uris=[f.uri for f in frames],
            frame_indices=[int(f.frame_index) for f in frames],
            geometry=list(geometry),
        )
        loaded.timings["load"] = time.perf_counter() - t0
        return loaded

    def run(self, loaded: LoadedUnit) -> dict[str, np.ndarray]:
        """The model on the unit's frames. Returns float32 numpy arrays with the frame axis
        first: depth [S,H,W], depth_conf [S,H,W], world_points [S,H,W,3], world_points_conf
        [S,H,W], extrinsic [S,3,4] (world-to-camera), intrinsic [S,3,3], pose_enc [S,9].

        Non-finite values (fp16 autocast can overflow on GPUs below compute capability 8) are
        never passed on silently: the unit is rerun once with autocast off (fp32; bf16 has
        fp32's range but is already what capability-8 GPUs use), which sets
        ``loaded.fp32_retry``. If a camera, or a whole frame's depth or points, is still
        non-finite, raises :class:`SceneError`; scattered non-finite pixels are kept (the
        publisher counts them in the scene's record, see :func:`nonfinite_counts`).
        """
        t0 = time.perf_counter()
        arrays = self._forward(loaded)
        model_outputs = {k: arrays[k] for k in _MODEL_OUTPUTS}
        counts = nonfinite_counts(model_outputs)
        if counts:
            log.warning(
                "unit %s: non-finite predictions (%s); rerunning it in fp32",
                loaded.unit.unit_id, counts,
            )
            with self._full_precision():
                arrays = self._forward(loaded)
            loaded.fp32_retry = True
        fatal = _fatal_nonfinite(arrays)
        if fatal:
            raise SceneError(
                f"scene '{loaded.unit.scene_id}': the model's predictions are not finite ({fatal}) "
                f"even in fp32{'' if loaded.fp32_retry else ' (no reduced precision was used)'}: "
                "check the weights, the images and model.preset; nothing was committed"
            )
        loaded.timings["run"] = time.perf_counter() - t0
        return arrays

    def _forward(self, loaded: LoadedUnit) -> dict[str, np.ndarray]:
        images = loaded.images.to(self.device)
        with torch.inference_mode():
            out = self.model(images)
            extrinsic, intrinsic = pose_encoding_to_extri_intri(out["pose_enc"], loaded.input_hw)
        preds = {
            "depth": out["depth"][0, ..., 0],
            "depth_conf": out["depth_conf"][0],
            "world_points": out["world_points"][0],
            "world_points_conf": out["world_points_conf"][0],
            "extrinsic": extrinsic[0],
            "intrinsic": intrinsic[0],
            "pose_enc": out["pose_enc"][0],
        }
        return {k: v.detach().float().cpu().numpy() for k, v in preds.items()}

    @contextlib.contextmanager
    def _full_precision(self) -> Iterator[None]:
        """Autocast off in the model's aggregator (the heads always run in fp32)."""
        aggregator = getattr(self.model, "aggregator", None)
        previous = getattr(aggregator, "use_amp", None)
        if previous is not None:
            aggregator.use_amp = False
        try:
            yield
        finally:
            if previous is not None:
                aggregator.use_amp = previous


#: Dense maps that are fatal for the unit when non-finite over a whole frame. An infinite
#: focal from a zero predicted field of view is counted, not fatal.
_DENSE_CHECKED = ("depth", "world_points")
#: What the network itself outputs (cameras are derived from ``pose_enc``): a non-finite
#: value here triggers the fp32 retry.
_MODEL_OUTPUTS = ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc")


def nonfinite_counts(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """``{key: number of NaN/inf values}`` of the prediction arrays that have any."""
    counts = {k: int(np.size(v) - np.count_nonzero(np.isfinite(v))) for k, v in arrays.items()
              if np.issubdtype(np.asarray(v).dtype, np.floating)}
    return {k: c for k, c in counts.items() if c}


def _fatal_nonfinite(arrays: Mapping[str, np.ndarray]) -> str:
    """What makes the predictions unusable ("" if nothing): a non-finite camera encoding
    (or extrinsic), or a frame whose depth or points are non-finite everywhere."""
    problems = []
    for key in ("pose_enc", "extrinsic"):
        if key in arrays and not np.isfinite(arrays[key]).all():
            bad = np.nonzero(~np.isfinite(arrays[key]).reshape(len(arrays[key]), -1).all(axis=1))[0]
            problems.append(f"{key} of frame(s) {bad.tolist()[:10]}")
    for key in _DENSE_CHECKED:
        if key in arrays:
            a = arrays[key]
            empty = np.nonzero(~np.isfinite(a).reshape(a.shape[0], -1).any(axis=1))[0]
            if len(empty):
                problems.append(f"all of {key} in frame(s) {empty.tolist()[:10]}")
    return "; ".join(problems)
