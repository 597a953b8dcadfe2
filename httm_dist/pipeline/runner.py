"""The model side of a unit of work: :class:`ModelRunner` owns one merged VGGT for its life.

- :meth:`ModelRunner.load` fetches a unit's image bytes and preprocesses them (I/O + decode;
  a Ray worker runs it in a prefetch thread for its next unit);
- :meth:`ModelRunner.run` is the model forward pass (compute).

What happens to the predictions is :mod:`httm_dist.pipeline.publish`'s job. Knows nothing of
Ray.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from typing import Optional

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
from httm_dist.pipeline.unit import LoadedUnit, WorkUnit
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
        if scene.error:  # discovery already found it unreadable (e.g. a corrupt archive)
            raise SceneError(scene.error)
        if n_scene == 0:
            raise SceneError(f"scene '{scene.scene_id}' is empty: no image frames found at {scene.source}")
        if n_scene < self.cfg.min_frames:
            raise SceneError(
                f"scene '{scene.scene_id}' has {n_scene} frame(s), fewer than min_frames="
                f"{self.cfg.min_frames}"
            )
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
        [S,H,W], extrinsic [S,3,4] (world-to-camera), intrinsic [S,3,3], pose_enc [S,9]."""
        t0 = time.perf_counter()
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
        arrays = {k: v.detach().float().cpu().numpy() for k, v in preds.items()}
        loaded.timings["run"] = time.perf_counter() - t0
        return arrays
