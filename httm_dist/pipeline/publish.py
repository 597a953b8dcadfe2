"""The results side of a unit of work: :class:`ResultPublisher` commits what the model made.

- :meth:`ResultPublisher.commit` writes a unit's predictions through the
  :class:`~httm_dist.results.ResultStore` (scene: frame table + NPZ + record; chunk: chunk
  arrays kept until the scene is assembled) and returns its
  :class:`~httm_dist.results.SceneRecord`;
- :meth:`ResultPublisher.assemble` aligns a chunked scene's stored chunks into one
  reconstruction, commits it and removes the chunks.

:func:`process_unit` runs a whole unit: :class:`~httm_dist.pipeline.runner.ModelRunner` load
and run, then commit (or assemble). Knows nothing of Ray.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Mapping, Optional

import numpy as np

from httm_dist.config import JobConfig
from httm_dist.data import scene_fingerprint
from httm_dist.errors import SceneError
from httm_dist.model.preprocess import FrameGeometry
from httm_dist.pipeline.chunks import PRED_KEYS, ChunkPrediction, assemble_chunks
from httm_dist.pipeline.preview import write_preview_files
from httm_dist.pipeline.runner import ModelRunner, nonfinite_counts
from httm_dist.pipeline.unit import LoadedUnit, WorkUnit, chunk_is_current
from httm_dist.results import ResultStore, SceneRecord, build_frame_table, scene_arrays
from httm_dist.storage import redact

log = logging.getLogger(__name__)


class ResultPublisher:
    """Writes units' results to one store under one config (see the module doc)."""

    def __init__(self, cfg: JobConfig, store: ResultStore, device: str = "unknown") -> None:
        """``device``: the model's device, written in records (the worker's ``ModelRunner``)."""
        self.cfg = cfg
        self.store = store
        self.device = device
        self.model_hash = cfg.model_hash()
        self.merge_hash = cfg.merge_hash()
        self.host = socket.gethostname()

    def commit(
        self,
        unit: WorkUnit,
        loaded: LoadedUnit,
        preds: dict[str, np.ndarray],
        record_extra: Optional[Mapping[str, Any]] = None,
    ) -> SceneRecord:
        """Write the unit's results and return its record.

        A scene unit writes its frame table, its arrays and (last) its record, which commits
        it. A chunk unit stores its arrays and metadata until the scene is assembled. The
        record's ``seconds`` is load + run + the commit's data writes, for both kinds (see
        :meth:`ResultStore.write_scene` and :meth:`ResultStore.write_chunk`). ``record_extra`` (from the worker: ``attempts``,
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
                "input_fingerprint": scene_fingerprint(unit.scene),
                "worker_host": self.host,
                "fp32_retry": loaded.fp32_retry,
            }
            arrays = {k: np.asarray(v) for k, v in preds.items()}
            loaded.timings["commit"] = self.store.write_chunk(scene_id, unit.chunk_index, arrays, meta)
            extra = self._extra(record_extra)
            return SceneRecord.chunk_done(
                scene_id, chunk_index=unit.chunk_index, frame_range=meta["frame_range"],
                num_frames=len(loaded.frame_uris), chunks=unit.num_chunks,
                model_hash=self.model_hash, merge_hash=self.merge_hash,
                seconds=sum(loaded.timings.values()), timings=loaded.timings,
                fp32_retry=loaded.fp32_retry, **extra,
            )

        record = self._record(unit, len(loaded.frame_uris), loaded.timings, record_extra)
        record = record.replace(fp32_retry=loaded.fp32_retry)
        return self._write_scene(
            scene_id, preds, loaded.frame_uris, loaded.frame_indices, loaded.original_hw,
            loaded.input_hw, record, loaded.geometry or None,
        )

    def assemble(self, unit: WorkUnit,
                 record_extra: Optional[Mapping[str, Any]] = None) -> SceneRecord:
        """Align the scene's stored chunks into one reconstruction (Sim(3) on the overlaps),
        commit it with the alignment residuals in its record, then delete the chunks.

        Raises RuntimeError if a chunk is missing (the driver must only assemble a scene whose
        chunks are all done) and SceneError if the chunks cannot be aligned.
        """
        t0 = time.perf_counter()
        scene_id = unit.scene_id
        done = self.store.done_chunks(scene_id)
        missing = [i for i in range(unit.num_chunks) if i not in done]
        if missing:
            raise RuntimeError(
                f"scene '{scene_id}': cannot assemble, chunk(s) {missing} of {unit.num_chunks} "
                "are not done"
            )
        chunk_preds, ranges = [], []
        metas = [done[i] for i in range(unit.num_chunks)]  # the markers done_chunks read
        for i, meta in enumerate(metas):
            arrays = self.store.read_chunk_arrays(scene_id, i)
            chunk_preds.append(ChunkPrediction(**{k: arrays[k] for k in PRED_KEYS}))
            ranges.append((int(meta["frame_range"][0]), int(meta["frame_range"][1])))
        fingerprint = scene_fingerprint(unit.scene)
        if not all(chunk_is_current(m, self.model_hash, self.merge_hash, fingerprint) for m in metas):
            self.store.clear_chunks(scene_id)  # useless now; the next attempt recomputes them
            raise SceneError(
                f"scene '{scene_id}': its stored chunks were made with another model/merge "
                "config or from other input frames; they were removed, rerun to recompute them"
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
        record = self._record(unit, n, timings, record_extra, fingerprint).replace(
            alignment=alignment,
            alignment_flagged=bool(flagged),
            chunk_ranges=summary["chunk_ranges"],
            frame_source_chunk=assembled.source_chunk.tolist(),
            fp32_retry=any(bool(m.get("fp32_retry")) for m in metas),
        )
        written = self._write_scene(
            scene_id, preds, uris, indices, original_hw, input_hw, record,
            geometry if len(geometry) == n else None,
        )
        self.store.clear_chunks(scene_id)
        return written

    # ------------------------------------------------------------------ helpers

    def _extra(self, record_extra: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """The worker's record fields, with this host and the model's device as defaults."""
        extra = dict(record_extra or {})
        extra.setdefault("attempts", 1)
        extra.setdefault("worker_host", (extra.get("worker") or {}).get("host", self.host))
        extra.setdefault("device", str(self.device))
        return extra

    def _record(self, unit: WorkUnit, num_frames: int, timings: Mapping[str, float],
                record_extra: Optional[Mapping[str, Any]], fingerprint: Optional[str] = None) -> SceneRecord:
        return SceneRecord.done(
            unit.scene_id, unit=unit.kind, num_frames=num_frames,
            chunks=unit.chunks,
            model_hash=self.model_hash, merge_hash=self.merge_hash,
            input_fingerprint=fingerprint or scene_fingerprint(unit.scene),
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
        record: SceneRecord,
        geometry: Optional[list] = None,
    ) -> SceneRecord:
        nonfinite = nonfinite_counts({k: preds[k] for k in PRED_KEYS})
        record = record.replace(nonfinite_values=nonfinite)
        if nonfinite:
            log.warning(
                "scene '%s': committed with non-finite values %s (see 'nonfinite_values' in its "
                "record; statistics ignore them)", scene_id, nonfinite,
            )
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
        written = self.store.write_scene(scene_id, table, arrays, record)
        if self.cfg.preview:
            self._write_preview(scene_id, arrays)
        return written

    def _write_preview(self, scene_id: str, arrays: dict[str, np.ndarray]) -> None:
        """PNG contact sheet + PLY next to the NPZ, from the ``arrays`` just written (reading
        them back would list every record of the output); a preview failure never fails the
        scene."""
        try:
            write_preview_files(self.cfg.output, scene_id, arrays, None, self.cfg.storage_options)
        except Exception as exc:  # noqa: BLE001 - the scene is committed; the preview is extra
            log.warning("scene '%s': preview not written: %s", scene_id, redact(str(exc)))


def process_unit(runner: ModelRunner, publisher: ResultPublisher, unit: WorkUnit,
                 record_extra: Optional[Mapping[str, Any]] = None) -> SceneRecord:
    """Load, run and commit one unit (or assemble it); returns its record. Raises what the
    steps raise (SceneError for the scene's own faults)."""
    if unit.kind == "assemble":
        return publisher.assemble(unit, record_extra)
    loaded = runner.load(unit)
    preds = runner.run(loaded)
    return publisher.commit(unit, loaded, preds, record_extra)
