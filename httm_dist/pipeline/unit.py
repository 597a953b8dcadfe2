"""One unit of work, from frame URIs to committed results. Knows nothing of Ray.

A *unit* is a whole scene, one chunk of a long scene, or the final assembly of a chunked
scene (see :func:`plan_units`). :class:`UnitRunner` owns one model for its life and runs a unit
in three steps, so a Ray worker can overlap them across units:

- :meth:`UnitRunner.load` fetches the unit's image bytes and preprocesses them (I/O + decode;
  the worker runs this in a prefetch thread for the next unit);
- :meth:`UnitRunner.run` is the model forward pass (compute);
- :meth:`UnitRunner.commit` writes the results through the
  :class:`~httm_dist.results.ResultStore` (scene: frame table + NPZ + record; chunk: chunk
  arrays kept until the scene is assembled).

:meth:`UnitRunner.assemble` aligns a chunked scene's chunks into one reconstruction, commits it
and removes the chunks. :meth:`UnitRunner.process` does a whole unit in one call.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import numpy as np
import torch

from httm_dist.config import JobConfig
from httm_dist.data import SceneSpec, read_scene_frames
from httm_dist.errors import ConfigError, SceneError
from httm_dist.pipeline.chunks import PRED_KEYS, ChunkPrediction, assemble_chunks, plan_chunks
from httm_dist.results.record import SceneRecord

log = logging.getLogger(__name__)

UnitKind = Literal["scene", "chunk", "assemble"]


@dataclass(frozen=True)
class WorkUnit:
    """What a worker is asked to do.

    ``kind="scene"``: the whole scene in one forward pass. ``kind="chunk"``: frames
    ``frame_range = (start, end)`` (end exclusive) of the scene, chunk ``chunk_index`` of
    ``num_chunks``. ``kind="assemble"``: align the scene's ``num_chunks`` stored chunks into
    one reconstruction and commit it.
    """

    scene: SceneSpec
    kind: UnitKind = "scene"
    chunk_index: Optional[int] = None
    frame_range: Optional[tuple[int, int]] = None
    num_chunks: int = 1

    @property
    def scene_id(self) -> str:
        return self.scene.scene_id

    @property
    def unit_id(self) -> str:
        """Stable, readable id: ``scene``, ``scene#chunk-002`` or ``scene#assemble``."""
        if self.kind == "chunk":
            return f"{self.scene_id}#chunk-{self.chunk_index:03d}"
        if self.kind == "assemble":
            return f"{self.scene_id}#assemble"
        return self.scene_id

    def describe(self) -> str:
        """Human-readable name for logs and errors, e.g. ``scene 'a' chunk 2/5``."""
        text = f"scene {self.scene_id!r}"
        if self.kind == "chunk":
            text += f" chunk {self.chunk_index + 1}/{self.num_chunks}"
        elif self.kind == "assemble":
            text += " (assembling chunks)"
        return text

    def frames(self) -> tuple:
        """The FrameRefs this unit reads (all of the scene's unless it is a chunk)."""
        if self.frame_range is None:
            return tuple(self.scene.frames)
        start, end = self.frame_range
        return tuple(self.scene.frames[start:end])


def plan_units(scene: SceneSpec, cfg: JobConfig) -> list[WorkUnit]:
    """The units that process ``scene``: one ``scene`` unit, or, when ``chunk.max_frames`` is
    set and the scene is longer, one ``chunk`` unit per overlapping chunk (run them anywhere,
    then :func:`assemble_unit`). ``auto`` not yet resolved by the driver is resolved here for
    this process's device (``pipeline.memory``)."""
    n = len(scene.frames)
    max_frames = cfg.chunk.max_frames
    if max_frames == "auto":
        from httm_dist.pipeline.memory import local_free_bytes, resolve_max_frames

        max_frames = resolve_max_frames(cfg, local_free_bytes(cfg.model.device))
    if max_frames is None or n <= max_frames:
        return [WorkUnit(scene, "scene")]
    ranges = plan_chunks(n, max_frames, cfg.chunk.overlap)
    return [
        WorkUnit(scene, "chunk", i, (int(a), int(b)), len(ranges)) for i, (a, b) in enumerate(ranges)
    ]


def assemble_unit(scene: SceneSpec, num_chunks: int) -> WorkUnit:
    """The unit that assembles ``scene`` once its ``num_chunks`` chunk units are done."""
    return WorkUnit(scene, "assemble", None, None, num_chunks)


@dataclass
class LoadedUnit:
    """A unit's preprocessed input, ready for the model."""

    unit: WorkUnit
    images: torch.Tensor
    """[S, 3, H, W] float32 in [0, 1], on the CPU."""
    original_hw: list[tuple[int, int]]
    frame_uris: list[str]
    frame_indices: list[int]
    geometry: list = field(default_factory=list)
    """Per frame, its :class:`~httm_dist.model.preprocess.FrameGeometry` (input -> original
    pixels, valid box, EXIF orientation)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per step (``load``, ``run``, ``commit``)."""

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])


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


class UnitRunner:
    """Holds one merged model for its life and runs units with it (see the module doc)."""

    def __init__(
        self, cfg: JobConfig, device: Optional[str] = None, model: Optional[torch.nn.Module] = None
    ) -> None:
        """Load ``cfg.model`` on ``device`` (default ``cfg.model.device``; ``auto`` = CUDA if
        visible) and apply ``cfg.merging``. ``model``: reuse an already loaded VGGT of that
        preset and weights instead of loading it again (merging is re-applied to it)."""
        from httm_dist.merging import apply_merging
        from httm_dist.model import load_vggt

        self.cfg = cfg
        self.device = resolve_device(device or cfg.model.device)
        self.model_hash = cfg.model_hash()
        self.merge_hash = cfg.merge_hash()
        self.host = socket.gethostname()
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
        from httm_dist.model.config import preset_weights

        weights = cfg.model.weights or preset_weights(cfg.model.preset)
        log.info(
            "model %s (weights %s, merging %s) ready on %s in %.1f s",
            cfg.model.preset,
            weights or "NONE: random initialisation, outputs are meaningless",
            cfg.merging.strategy,
            self.device,
            time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ the three steps

    def load(self, unit: WorkUnit) -> LoadedUnit:
        """Fetch and preprocess the unit's images. Raises SceneError for an empty scene, too
        few frames, or an unreadable/corrupt image (naming the scene and the image)."""
        if unit.kind == "assemble":
            raise ValueError("an assemble unit has no images to load; call assemble()")
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
        from httm_dist.model.preprocess import load_and_preprocess_frames

        from httm_dist.storage import redact

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
        from httm_dist.model.geometry import pose_encoding_to_extri_intri

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

    def commit(
        self,
        unit: WorkUnit,
        loaded: LoadedUnit,
        preds: dict[str, np.ndarray],
        store: Any,
        record_extra: Optional[Mapping[str, Any]] = None,
    ) -> SceneRecord:
        """Write the unit's results and return its record.

        A scene unit writes its frame table, its arrays and (last) its record, which commits
        it. A chunk unit stores its arrays and metadata until the scene is assembled. The
        record's ``seconds`` is load + run + the commit's data writes (see
        :meth:`ResultStore.write_scene`). ``record_extra`` (from the worker: ``attempts``,
        ``worker`` {host, ...}, ``run_id``...) holds further :class:`SceneRecord` fields.
        """
        scene_id = unit.scene_id
        if unit.kind == "chunk":
            meta = {
                "chunk_index": unit.chunk_index,
                "num_chunks": unit.num_chunks,
                "frame_range": list(unit.frame_range or (0, len(loaded.frame_uris))),
                "frame_uris": list(loaded.frame_uris),
                "frame_indices": list(loaded.frame_indices),
                "original_hw": [list(hw) for hw in loaded.original_hw],
                "geometry": [g.as_dict() for g in loaded.geometry],
                "input_hw": list(loaded.input_hw),
                "model_hash": self.model_hash,
                "merge_hash": self.merge_hash,
                "worker_host": self.host,
            }
            arrays = {k: np.asarray(v) for k, v in preds.items()}
            loaded.timings["commit"] = store.write_chunk(scene_id, unit.chunk_index, arrays, meta)
            extra = self._extra(record_extra)
            return SceneRecord.chunk_done(
                scene_id, chunk_index=unit.chunk_index, frame_range=meta["frame_range"],
                num_frames=len(loaded.frame_uris), chunks=unit.num_chunks,
                model_hash=self.model_hash, merge_hash=self.merge_hash,
                seconds=sum(loaded.timings.values()), timings=loaded.timings, **extra,
            )

        record = self._record(unit, len(loaded.frame_uris), loaded.timings, record_extra)
        return self._write_scene(
            scene_id, preds, loaded.frame_uris, loaded.frame_indices, loaded.original_hw,
            loaded.input_hw, store, record, loaded.geometry or None,
        )

    # ------------------------------------------------------------------ whole units

    def process(self, unit: WorkUnit, store: Any,
                record_extra: Optional[Mapping[str, Any]] = None) -> SceneRecord:
        """Load, run and commit one unit (or assemble it); returns its record."""
        if unit.kind == "assemble":
            return self.assemble(unit, store, record_extra)
        loaded = self.load(unit)
        preds = self.run(loaded)
        return self.commit(unit, loaded, preds, store, record_extra)

    def assemble(self, unit: WorkUnit, store: Any,
                 record_extra: Optional[Mapping[str, Any]] = None) -> SceneRecord:
        """Align the scene's stored chunks into one reconstruction (Sim(3) on the overlaps),
        commit it with the alignment residuals in its record, then delete the chunks.

        Raises RuntimeError if a chunk is missing (the driver must only assemble a scene whose
        chunks are all done) and SceneError if the chunks cannot be aligned.
        """
        t0 = time.perf_counter()
        scene_id = unit.scene_id
        done = store.done_chunks(scene_id)
        missing = [i for i in range(unit.num_chunks) if i not in done]
        if missing:
            raise RuntimeError(
                f"scene '{scene_id}': cannot assemble, chunk(s) {missing} of {unit.num_chunks} "
                "are not done"
            )
        chunk_preds, ranges, metas = [], [], []
        for i in range(unit.num_chunks):
            arrays, meta = store.read_chunk(scene_id, i)
            chunk_preds.append(ChunkPrediction(**{k: arrays[k] for k in PRED_KEYS}))
            ranges.append((int(meta["frame_range"][0]), int(meta["frame_range"][1])))
            metas.append(meta)
        stale = {(m.get("model_hash"), m.get("merge_hash")) for m in metas} - {
            (self.model_hash, self.merge_hash)
        }
        if stale:
            store.clear_chunks(scene_id)  # useless now; the next attempt recomputes them
            raise SceneError(
                f"scene '{scene_id}': its stored chunks were made with another model/merge "
                "config (model_hash/merge_hash differ); they were removed, rerun to recompute them"
            )
        ch = self.cfg.chunk
        assembled = assemble_chunks(
            chunk_preds,
            ranges,
            points_source=ch.points_source,
            residual_threshold=ch.residual_threshold,
            min_inlier_fraction=ch.min_inlier_fraction,
            max_points=ch.max_points,
            align_options=ch.align_options,
        )
        preds = {k: getattr(assembled, k) for k in PRED_KEYS}

        # Frame metadata of the whole scene, from the chunk each frame's geometry came from.
        n = ranges[-1][1]
        from httm_dist.model.preprocess import FrameGeometry

        uris, indices, original_hw, geometry = [], [], [], []
        for g, c in enumerate(assembled.source_chunk.tolist()):
            j = g - ranges[c][0]
            uris.append(metas[c]["frame_uris"][j])
            indices.append(int(metas[c]["frame_indices"][j]))
            original_hw.append(tuple(int(x) for x in metas[c]["original_hw"][j]))
            if "geometry" in metas[c]:  # chunks stored before format_version 2 lack it
                geometry.append(FrameGeometry.from_dict(metas[c]["geometry"][j]))
        input_hw = tuple(int(x) for x in metas[0]["input_hw"])
        summary = assembled.record()
        alignment = summary["alignments"]
        flagged = [a["chunks"] for a in alignment if a["flagged"]]
        if flagged:
            log.warning(
                "scene '%s': chunk pair(s) %s aligned poorly (residual > %.3g or inliers < %.2f);"
                " see 'alignment' in its record", scene_id, flagged, ch.residual_threshold,
                ch.min_inlier_fraction,
            )
        timings = {"assemble": time.perf_counter() - t0}
        record = self._record(unit, n, timings, record_extra).replace(
            alignment=alignment,
            alignment_flagged=bool(flagged),
            chunk_ranges=summary["chunk_ranges"],
            frame_source_chunk=assembled.source_chunk.tolist(),
        )
        written = self._write_scene(
            scene_id, preds, uris, indices, original_hw, input_hw, store, record,
            geometry if len(geometry) == n else None,
        )
        store.clear_chunks(scene_id)
        return written

    # ------------------------------------------------------------------ helpers

    def _extra(self, record_extra: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """The worker's record fields, with this runner's host and device as defaults."""
        extra = dict(record_extra or {})
        extra.setdefault("attempts", 1)
        extra.setdefault("worker_host", (extra.get("worker") or {}).get("host", self.host))
        extra.setdefault("device", str(self.device))
        return extra

    def _record(self, unit: WorkUnit, num_frames: int, timings: Mapping[str, float],
                record_extra: Optional[Mapping[str, Any]]) -> SceneRecord:
        return SceneRecord.done(
            unit.scene_id, unit=unit.kind, num_frames=num_frames,
            chunks=unit.num_chunks if unit.kind != "scene" else 1,
            model_hash=self.model_hash, merge_hash=self.merge_hash,
            seconds=sum(timings.values()), timings=timings, **self._extra(record_extra),
        )

    def _write_scene(
        self,
        scene_id: str,
        preds: dict[str, np.ndarray],
        frame_uris: list,
        frame_indices: list[int],
        original_hw: list,
        input_hw: tuple[int, int],
        store: Any,
        record: SceneRecord,
        geometry: Optional[list] = None,
    ) -> SceneRecord:
        from httm_dist.results import build_frame_table, scene_arrays

        table = build_frame_table(
            scene_id,
            list(frame_uris),
            [tuple(hw) for hw in original_hw],
            tuple(input_hw),
            preds["extrinsic"],
            preds["intrinsic"],
            preds["depth"],
            preds["depth_conf"],
            frame_indices=list(frame_indices),
            geometry=geometry,
        )
        arrays = scene_arrays({k: preds[k] for k in PRED_KEYS}, dense_dtype=self.cfg.output_dtype)
        arrays["frame_uris"] = np.asarray(frame_uris, dtype=str)
        arrays["frame_indices"] = np.asarray(frame_indices, dtype=np.int64)
        written = store.write_scene(scene_id, table, arrays, record)
        if self.cfg.preview:
            self._write_preview(scene_id, arrays)
        return written

    def _write_preview(self, scene_id: str, arrays: dict[str, np.ndarray]) -> None:
        """PNG contact sheet + PLY next to the NPZ, from the ``arrays`` just written (reading
        them back would list every record of the output); a preview failure never fails the
        scene."""
        from httm_dist.pipeline.preview import write_preview_files
        from httm_dist.storage import redact

        try:
            write_preview_files(self.cfg.output, scene_id, arrays, None, self.cfg.storage_options)
        except Exception as exc:  # noqa: BLE001 - the scene is committed; the preview is extra
            log.warning("scene '%s': preview not written: %s", scene_id, redact(str(exc)))


def failure_record(
    unit: WorkUnit, error: BaseException | str, cfg: JobConfig, attempts: int = 1,
    **optional: Any,
) -> SceneRecord:
    """The record of a unit that failed (see :meth:`SceneRecord.failed`), for
    ``ResultStore.write_failure``: the unit's identity, the config's hashes and ``attempts``.
    ``optional``: further :class:`SceneRecord` fields (``run_id``, ``worker``, ...)."""
    optional.setdefault("worker_host", socket.gethostname())
    return SceneRecord.failed(
        unit.scene_id, error, unit=unit.kind,
        chunk_index=unit.chunk_index,
        num_frames=len(unit.frames()) if unit.kind != "assemble" else len(unit.scene.frames),
        chunks=unit.num_chunks if unit.kind != "scene" else 1,
        model_hash=cfg.model_hash(), merge_hash=cfg.merge_hash(), attempts=attempts,
        **optional,
    )
