"""What a run must do: scenes to units, honouring resume, ``retry_failed`` and
``on_config_change``. Reads the output's records and chunk markers; knows nothing of Ray."""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

from httm_dist.cluster.schedule import SceneState
from httm_dist.config import JobConfig
from httm_dist.data import discover_scenes, scene_fingerprint
from httm_dist.errors import ConfigError, SceneError
from httm_dist.pipeline.unit import (WorkUnit, assemble_unit, chunk_is_current, failure_line, failure_record,
                                     plan_units)
from httm_dist.results import ResultStore
from httm_dist.results.record import DONE, FAILED, SceneRecord
from httm_dist.storage import redact

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """The units still to run and what was decided before any ran."""

    queue: collections.deque  # runnable units, in order
    scenes: dict[str, SceneState]
    skipped: list[str]
    failures: list[dict]
    reused_chunks: int = 0
    kept_failed: list[str] = field(default_factory=list)


def plan_work(cfg: JobConfig, store: ResultStore, run_id: str) -> Plan:
    """Scenes -> units still to run, honouring resume and ``on_config_change``."""
    scenes = discover_scenes(cfg.input, cfg.storage_options, frame_stride=cfg.frame_stride,
                             max_frames=cfg.max_frames, include=cfg.include,
                             exclude=cfg.exclude, ignore=[store.url_of("")])
    if not scenes:
        filters = " that match include/exclude" if (cfg.include or cfg.exclude) else ""
        raise ConfigError(
            f"input {redact(cfg.input)!r} holds no scene{filters}: point input at a folder of "
            "scene folders or .tar/.tar.gz/.zip archives, one folder of images, or a manifest "
            "(.parquet/.csv/.jsonl)"
        )
    existing = store.records()  # done and failed
    model_hash, merge_hash = cfg.model_hash(), cfg.merge_hash()
    ids = {s.scene_id for s in scenes}
    conflicts = sorted(set(store.config_conflicts(model_hash, merge_hash, existing)) & ids)
    if conflicts and cfg.on_config_change == "refuse":
        shown = ", ".join(repr(c) for c in conflicts[:5]) + (" ..." if len(conflicts) > 5 else "")
        raise ConfigError(
            f"{len(conflicts)} committed scene(s) in the output ({shown}) were made with a "
            "different model or merge config than this job's. Set on_config_change: reprocess "
            "(e.g. --set on_config_change=reprocess) to redo them, or write to another output."
        )
    redo = set(conflicts)
    if redo:
        log.warning("%d committed scenes were made under another model/merge config: "
                    "reprocessing them (on_config_change: reprocess)", len(redo))
    fingerprints = {s.scene_id: scene_fingerprint(s) for s in scenes}
    for scene in scenes:
        rec = existing.get(scene.scene_id)
        before = rec.get("input_fingerprint") if rec is not None else None  # None in version 1
        if rec is not None and rec.is_done and before and before != fingerprints[scene.scene_id]:
            log.warning("scene %r: its inputs changed since it was committed (%s frames then, "
                        "%d now, or files rewritten): reprocessing it", scene.scene_id,
                        rec.get("num_frames", "?"), len(scene.frames))
            redo.add(scene.scene_id)

    queue: collections.deque = collections.deque()
    states: dict[str, SceneState] = {}
    skipped: list[str] = []
    kept_failed: list[str] = []
    failures: list[dict] = []
    reused_chunks = 0
    for scene in scenes:
        sid = scene.scene_id
        status = existing[sid].status if sid in existing else None
        if status == DONE and sid not in redo:
            skipped.append(sid)
            continue
        if status == FAILED and not cfg.retry_failed:
            kept_failed.append(sid)
            continue
        try:
            units = plan_units(scene, cfg)
        except SceneError as exc:
            record = failure_record(WorkUnit(scene), exc, cfg, attempts=0, run_id=run_id)
            failures.append(record_failure(store, record))
            continue
        state = SceneState(scene)
        chunks = [u for u in units if u.kind == "chunk"]
        if chunks:
            done = _reusable_chunks(store, sid, model_hash, merge_hash, fingerprints[sid])
            for u in chunks:
                meta = done.get(u.chunk_index) or {}
                # a chunk saved under another plan (another chunk.max_frames, an auto size on
                # another GPU, an out-of-memory re-plan) covers other frames: redo it
                if list(meta.get("frame_range") or ()) != list(u.frame_range):
                    state.waiting_chunks.add(u.chunk_index)
                    queue.append(u)
            reused = len(chunks) - len(state.waiting_chunks)
            if reused:
                log.info("scene %r: reusing %d finished chunks of %d", sid, reused, len(chunks))
            reused_chunks += reused
            state.assemble = assemble_unit(scene, len(chunks))
            if not state.waiting_chunks:
                queue.append(state.assemble)
        else:
            queue.extend(units)
        states[sid] = state
    if kept_failed:
        log.info("%d scenes recorded as failed by earlier runs are not retried "
                 "(retry_failed: false)", len(kept_failed))
    return Plan(queue, states, skipped, failures, reused_chunks, kept_failed)


def record_failure(store: ResultStore, record: SceneRecord) -> dict:
    """Writes a failure decided by the driver (bad plan, worker died too often); returns the
    summary's entry for it. A write error is logged: the summary still carries the failure."""
    record = record.replace(finished_at=time.time())
    try:
        store.write_failure(record)
    except Exception as exc:  # noqa: BLE001 - the summary still carries the failure
        log.error("could not write the failure record of scene %r: %s", record.scene_id,
                  redact(str(exc)))
    log.warning("%s", failure_line(f"scene {record.scene_id!r}", record.scene_id, record.error))
    return {"scene_id": record.scene_id, "error": record.error, "attempts": record.attempts}


def _reusable_chunks(store: ResultStore, scene_id: str, model_hash: str, merge_hash: str,
                     fingerprint: str) -> dict:
    """Saved chunks of ``scene_id`` made under this job's model/merge config from the same
    input frames (markers without a fingerprint, from older runs, count as the same)."""
    return {i: m for i, m in store.done_chunks(scene_id).items()
            if chunk_is_current(m, model_hash, merge_hash, fingerprint)}
