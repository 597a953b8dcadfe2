"""The driver: lists the work, keeps every worker busy, retries, resumes, reports.

``run_job(cfg)`` is the whole job:

1. validate the config's outside world (weights, input, output) before anything else;
2. list scenes, skip those already committed (resume), apply ``on_config_change`` to scenes
   committed under another model/merge config, and split the rest into units (a whole
   scene, or the chunks of a long one plus its "assemble" step); chunks already saved by an
   earlier run are not redone;
3. connect to Ray (``ray.address``, else ``RAY_ADDRESS``, else a local Ray) and start the
   worker actors, one per GPU by default;
4. dispatch: each worker has one unit running and one reserved whose images it prefetches;
   a worker that dies gives its units back to the queue (the running one counts an attempt,
   up to ``max_attempts``) and is replaced; a scene's own failure is recorded and the job goes
   on; a chunked scene's "assemble" unit is queued once all its chunks are done; a unit that
   runs out of memory re-plans its scene in chunks of half its frames (once none of the
   scene's units is running, its old chunks discarded) instead of retrying the same unit;
5. write and return the run summary (counts, failures with their errors, seconds, frames/s).

Workers write results themselves; the driver only sees small records. Scheduling is Ray's
actors plus ``ray.wait``; the only state the driver keeps is which unit each actor holds.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
from ray import exceptions as rex

from httm_dist.cluster.progress import JobProgress
from httm_dist.cluster.worker import (OutOfMemoryFault, ReconstructionWorker, WorkerFault, describe_unit,
                                      test_hooks_from_env, unit_key)
from httm_dist.errors import ConfigError, HttmDistError, SceneError

log = logging.getLogger(__name__)

#: Errors meaning "the worker (process, node) is gone", not "the unit is bad".
_WORKER_LOST = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError,
                rex.OutOfMemoryError, rex.ObjectLostError)

#: How long the driver waits with no live worker before giving up (e.g. the cluster can never
#: fit one worker's GPU/CPU request).
WORKER_START_TIMEOUT_S = 900.0


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclass
class _SceneState:
    scene: Any
    waiting_chunks: set = field(default_factory=set)  # chunk indices not yet done
    assemble: Any = None  # the "assemble" unit, queued when waiting_chunks empties
    failed: bool = False
    finished: bool = False
    replan: int | None = None  # out of memory: re-plan in chunks of this many frames when idle
    replans: int = 0


@dataclass
class _Slot:
    """One worker actor and the units it holds."""

    actor: Any
    ready: bool = False  # the actor answered info(): its model is loaded
    info: dict = field(default_factory=dict)  # host, pid, device, units run by kind
    current: tuple | None = None  # (unit, attempt, ObjectRef)
    reserved: tuple | None = None  # (unit, attempt): prefetching, runs next


@dataclass
class _Plan:
    queue: collections.deque
    scenes: dict[str, _SceneState]
    skipped: list[str]
    failures: list[dict]
    reused_chunks: int = 0
    kept_failed: list[str] = field(default_factory=list)


def run_job(cfg: Any, *, progress: bool = True, run_id: str | None = None) -> dict:
    """Runs (or resumes) the job described by ``cfg``; returns the run summary.

    Raises ConfigError/StorageError before any work when the config or its storage is wrong,
    ConfigError when committed scenes were made under another config and
    ``on_config_change`` is ``refuse``. Scene failures do not raise: the summary's
    ``failed`` count and ``failures`` list report them (the CLI turns them into its exit
    status).
    """
    from httm_dist.config import validate_resources
    from httm_dist.results import ResultStore
    from httm_dist.storage import redact

    validate_resources(cfg)
    run_id = run_id or new_run_id()
    started_wall = datetime.now(timezone.utc)
    store = ResultStore(cfg.output, cfg.storage_options)
    started_ray = False
    try:
        if cfg.chunk.max_frames == "auto":  # sized from a worker's GPU: ask one (needs Ray)
            from httm_dist.pipeline.memory import probe_worker_free_bytes, resolve_max_frames, with_max_frames

            started_ray = _connect(cfg)
            cfg = with_max_frames(cfg, resolve_max_frames(cfg, probe_worker_free_bytes(cfg)))
            log.info("chunk.max_frames auto: %d frames per forward pass", cfg.chunk.max_frames)
        plan = _plan_work(cfg, store, run_id)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    total = len(plan.scenes) + len(plan.failures)
    log.info("run %s: %d scenes to process (%d units), %d already committed, output %s",
             run_id, total, len(plan.queue), len(plan.skipped), redact(cfg.output))

    bar = JobProgress(total, enabled=progress)
    for _ in plan.failures:
        bar.scene_finished(False)
    records: dict[str, dict] = {}
    worker_info: list[dict] = []
    units_run = workers_lost = max_parallel = 0
    replanned: list[dict] = []
    startup_s = None
    if plan.queue:
        started_ray = _connect(cfg) or started_ray
        try:
            dispatcher = _Dispatcher(cfg, store, run_id, plan, bar)
            records = dispatcher.run()
            worker_info, units_run = dispatcher.worker_info, dispatcher.units_run
            workers_lost = dispatcher.workers_lost
            replanned = dispatcher.replanned
            max_parallel = max_overlap(dispatcher.spans)
            if dispatcher.first_up is not None:
                startup_s = round(dispatcher.first_up - bar.started, 3)
        finally:
            bar.close()
            if started_ray:
                ray.shutdown()
    elif started_ray:
        ray.shutdown()
    bar.close()

    failures = plan.failures + [
        {"scene_id": sid, "error": rec.get("error", "unknown error"),
         "attempts": rec.get("attempts")}
        for sid, rec in records.items() if rec.get("status") != "done"
    ]
    done = [rec for rec in records.values() if rec.get("status") == "done"]
    seconds = bar.elapsed
    summary = {
        "run_id": run_id,
        "started_at": started_wall.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "seconds": round(seconds, 3),
        "startup_seconds": startup_s,  # until the first worker had its model loaded
        "scenes": total + len(plan.skipped) + len(plan.kept_failed),
        "skipped": len(plan.skipped),
        "not_retried": len(plan.kept_failed),
        "done": len(done),
        "failed": len(failures),
        "failures": failures,
        "frames": bar.frames,
        "frames_per_s": round(bar.frames / max(seconds, 1e-9), 4),
        "units_run": units_run,
        "reused_chunks": plan.reused_chunks,
        "workers": len(worker_info),
        "workers_lost": workers_lost,
        "replanned": replanned,  # scenes re-planned in smaller chunks after running out of memory
        "max_parallel_units": max_parallel,  # most units running at once (worker clocks)
        "worker_hosts": sorted({w.get("host", "?") for w in worker_info}),
        "worker_units": worker_info,
        "model_hash": cfg.model_hash(),
        "merge_hash": cfg.merge_hash(),
        "input": cfg.input,
        "output": cfg.output,
        "config": cfg.to_dict(redacted=True),
    }
    summary = redact(summary)
    summary["summary_url"] = redact(store.write_run_summary(run_id, summary))
    log.info("run %s finished: %d done, %d failed, %d skipped, %d frames in %.1f s "
             "(%.2f frames/s)", run_id, summary["done"], summary["failed"], summary["skipped"],
             summary["frames"], seconds, summary["frames_per_s"])
    for f in failures:
        log.warning("failed scene %r: %s", f["scene_id"], f["error"])
    return summary


# --------------------------------------------------------------------------- planning


def _plan_work(cfg: Any, store: Any, run_id: str) -> _Plan:
    """Scenes -> units still to run, honouring resume and ``on_config_change``."""
    from httm_dist.data import discover_scenes
    from httm_dist.pipeline.unit import assemble_unit, plan_units

    scenes = discover_scenes(cfg.input, cfg.storage_options, frame_stride=cfg.frame_stride,
                             max_frames=cfg.max_frames, include=cfg.include,
                             exclude=cfg.exclude)
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

    queue: collections.deque = collections.deque()
    states: dict[str, _SceneState] = {}
    skipped: list[str] = []
    kept_failed: list[str] = []
    failures: list[dict] = []
    reused_chunks = 0
    for scene in scenes:
        sid = scene.scene_id
        status = (existing.get(sid) or {}).get("status")
        if status == "done" and sid not in redo:
            skipped.append(sid)
            continue
        if status == "failed" and not cfg.retry_failed:
            kept_failed.append(sid)
            continue
        try:
            units = plan_units(scene, cfg)
        except SceneError as exc:
            failures.append(_driver_failure(store, run_id, sid, str(exc), attempt=0))
            continue
        state = _SceneState(scene)
        chunks = [u for u in units if u.kind == "chunk"]
        if chunks:
            done = _reusable_chunks(store, sid, model_hash, merge_hash, sid in redo)
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
    return _Plan(queue, states, skipped, failures, reused_chunks, kept_failed)


def _reusable_chunks(store: Any, scene_id: str, model_hash: str, merge_hash: str,
                     redo: bool) -> dict:
    done = store.done_chunks(scene_id)
    if redo:  # keep only chunks made under this job's config
        done = {i: m for i, m in done.items()
                if (m or {}).get("model_hash") == model_hash
                and (m or {}).get("merge_hash") == merge_hash}
    return done


def _driver_failure(store: Any, run_id: str, scene_id: str, error: str, attempt: int) -> dict:
    """Records a failure decided by the driver (bad plan, worker died too often)."""
    from httm_dist.storage import redact

    error = redact(error)
    record = {"scene_id": scene_id, "status": "failed", "error": error, "run_id": run_id,
              "attempt": attempt, "finished_at": time.time()}
    try:
        store.write_failure(scene_id, record)
    except Exception as exc:  # noqa: BLE001 - the summary still carries the failure
        log.error("could not write the failure record of scene %r: %s", scene_id,
                  redact(str(exc)))
    log.warning("scene %r failed: %s", scene_id, error)
    return {"scene_id": scene_id, "error": error, "attempts": attempt}


# --------------------------------------------------------------------------- Ray


def _connect(cfg: Any) -> bool:
    """Connects to Ray; returns True when this call started it (so the job shuts it down)."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("no Ray address (ray.address / RAY_ADDRESS): starting a local Ray")
        ray.init(include_dashboard=False)
    return True


def _worker_count(cfg: Any, n_units: int) -> tuple[int, float]:
    """(number of workers, GPUs per worker) for this cluster and config."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    gpw = float(cfg.gpus_per_worker)
    if gpw > 0 and gpus == 0:
        log.info("the Ray cluster has no GPU: running the model on CPU")
        gpw = 0.0
    if gpw > gpus:
        raise ConfigError(f"'gpus_per_worker' is {cfg.gpus_per_worker} but the Ray cluster has "
                          f"{gpus:g} GPUs: lower gpus_per_worker or add GPUs")
    if cfg.cpus_per_worker > cpus:
        raise ConfigError(f"'cpus_per_worker' is {cfg.cpus_per_worker} but the Ray cluster has "
                          f"{cpus:g} CPUs: lower cpus_per_worker or add CPUs")
    fits = []
    if gpw > 0:
        fits.append(int(gpus // gpw + 1e-9))
    if cfg.cpus_per_worker > 0:
        fits.append(int(cpus // cfg.cpus_per_worker + 1e-9))
    fit = max(1, min(fits)) if fits else 1
    n = cfg.workers or (fits[0] if gpw > 0 else 1)
    if n > fit:
        log.warning("%d workers requested but the cluster fits %d (GPU %g, CPU %g): using %d",
                    n, fit, gpus, cpus, fit)
        n = fit
    return max(1, min(n, n_units)), gpw


class _Dispatcher:
    """Keeps each live worker busy with one unit and one prefetched; retries and replaces.

    A worker gets units only once it is up (its model loaded): a slow-starting or pending
    actor (e.g. waiting for an autoscaled node) never holds work that a live one could do.
    """

    def __init__(self, cfg: Any, store: Any, run_id: str, plan: _Plan, bar: JobProgress):
        self.cfg, self.store, self.run_id, self.bar = cfg, store, run_id, bar
        self.queue: collections.deque = plan.queue
        self.scenes = plan.scenes
        self.attempts: collections.Counter = collections.Counter()
        self.records: dict[str, dict] = {}
        self.units_run = 0
        self.workers_lost = 0
        self.first_up: float | None = None  # time.monotonic() when the first worker was up
        self.spans: list[tuple[float, float]] = []  # (started_at, finished_at) of each unit
        self.worker_info: list[dict] = []
        self.hooks = test_hooks_from_env()
        self.init_failures = 0
        self.replanned: list[dict] = []  # scenes re-planned smaller after running out of memory
        self.by_ref: dict[Any, tuple[_Slot, str]] = {}  # ref -> (slot, "probe" | "process")
        n, self.gpw = _worker_count(cfg, len(self.queue))
        log.info("starting %d workers (%g GPU, %g CPU each)", n, self.gpw, cfg.cpus_per_worker)
        self.slots = [_Slot(None) for _ in range(n)]
        for slot in self.slots:
            self._launch(slot)

    def _launch(self, slot: _Slot) -> None:
        """Starts a (new) actor in ``slot``; it gets work once its ``info()`` answers."""
        slot.actor = ReconstructionWorker.options(
            num_gpus=self.gpw, num_cpus=self.cfg.cpus_per_worker, max_restarts=0,
            max_concurrency=2,
        ).remote(self.cfg, self.run_id, self.hooks)
        slot.ready = False
        self.by_ref[slot.actor.info.remote()] = (slot, "probe")

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> dict[str, dict]:
        waiting_since = time.monotonic()
        try:
            while self._work_left():
                ready, _ = ray.wait(list(self.by_ref), num_returns=1, timeout=1.0)
                for ref in ready:
                    slot, what = self.by_ref.pop(ref)
                    if what == "probe":
                        self._probed(slot, ref)
                    else:
                        self._collect(slot, ref)
                self._fill()
                self.bar.tick()
                if any(s.ready for s in self.slots):
                    waiting_since = time.monotonic()
                elif time.monotonic() - waiting_since > WORKER_START_TIMEOUT_S:
                    raise HttmDistError(
                        f"no worker started within {WORKER_START_TIMEOUT_S:.0f} s: the Ray "
                        f"cluster may lack the resources a worker asks for ({self.gpw:g} GPU, "
                        f"{self.cfg.cpus_per_worker:g} CPU); check `ray status`")
        finally:
            self._stop_workers()
        return self.records

    def _work_left(self) -> bool:
        return bool(self.queue) or any(s.current is not None for s in self.slots)

    def _probed(self, slot: _Slot, ref: Any) -> None:
        try:
            info = ray.get(ref)
        except _WORKER_LOST as exc:
            self._replace(slot, exc)
            return
        self.init_failures = 0
        self.first_up = self.first_up or time.monotonic()
        slot.ready = True
        slot.info = dict(info, units={})
        self.worker_info.append(slot.info)
        log.info("worker up: pid %s on %s (%s)", info.get("pid"), info.get("host"),
                 info.get("device"))

    def _next_unit(self, steal: bool) -> tuple | None:
        """Pops the next runnable (unit, attempt); may take another worker's reserved unit."""
        while self.queue:
            unit = self.queue.popleft()
            if not self._dead_scene(unit):
                return unit, self.attempts[unit_key(unit)] + 1
        if steal:
            for slot in self.slots:
                if slot.reserved is not None:
                    taken, slot.reserved = slot.reserved, None
                    if not self._dead_scene(taken[0]):
                        return taken
        return None

    def _dead_scene(self, unit: Any) -> bool:
        state = self.scenes[unit.scene.scene_id]
        return state.failed or state.finished

    def _fill(self) -> None:
        live = [s for s in self.slots if s.ready]
        # Every idle worker gets a unit before any worker reserves a second one.
        for slot in live:
            if slot.current is None:
                item, slot.reserved = slot.reserved, None
                if item is None or self._dead_scene(item[0]):
                    item = self._next_unit(steal=True)
                if item is not None:
                    self._start(slot, *item)
        for slot in live:
            if slot.current is not None and slot.reserved is None:
                slot.reserved = self._next_unit(steal=False)
                if slot.reserved is not None:
                    slot.actor.prefetch.remote(slot.reserved[0])

    def _start(self, slot: _Slot, unit: Any, attempt: int) -> None:
        ref = slot.actor.process.remote(unit, attempt)
        slot.current = (unit, attempt, ref)
        self.by_ref[ref] = (slot, "process")
        self.units_run += 1

    # -- results ------------------------------------------------------------------------
    def _collect(self, slot: _Slot, ref: Any) -> None:
        unit, attempt, _ = slot.current
        slot.current = None
        try:
            record = ray.get(ref)
        except OutOfMemoryFault as exc:  # Ray re-raises it as itself
            if not self._shrink(unit, exc.frames):
                self._worker_lost(slot, unit, attempt, exc)
            else:
                self._replace(slot, exc)  # its memory state is unknown: a fresh worker
                self._replan_if_idle(self.scenes[unit.scene.scene_id])
            return
        except (WorkerFault, *_WORKER_LOST) as exc:  # Ray re-raises WorkerFault as itself
            self._worker_lost(slot, unit, attempt, exc)
            self._replan_if_idle(self.scenes[unit.scene.scene_id])
            return
        except rex.RayTaskError as exc:  # a bug outside the worker's own error handling
            record = {"status": "failed", "error": f"{type(exc).__name__}: {_first_line(exc)}",
                      "attempts": attempt}
        units = slot.info["units"]
        units[unit.kind] = units.get(unit.kind, 0) + 1
        state = self.scenes[unit.scene.scene_id]
        if state.replan is not None:  # a unit of the plan being replaced: its result is moot
            self._replan_if_idle(state)
            return
        if isinstance(record.get("started_at"), float) and isinstance(record.get("finished_at"), float):
            self.spans.append((record["started_at"], record["finished_at"]))
        self._unit_finished(unit, record)

    def _unit_finished(self, unit: Any, record: dict) -> None:
        state = self.scenes[unit.scene.scene_id]
        if state.failed or state.finished:
            return  # a sibling chunk already failed the scene
        if record.get("status") == "failed":
            self._scene_failed(state, record)
        elif unit.kind == "chunk":
            state.waiting_chunks.discard(unit.chunk_index)
            log.debug("%s done", describe_unit(unit))
            if not state.waiting_chunks:
                self.queue.appendleft(state.assemble)  # finish started scenes first
        else:
            state.finished = True
            self.records[unit.scene.scene_id] = record
            self.bar.scene_finished(True, _frame_count(record, unit.scene))
            log.debug("%s committed", describe_unit(unit))

    # -- out of memory: smaller chunks ---------------------------------------------------
    def _shrink(self, unit: Any, frames: int) -> bool:
        """Marks ``unit``'s scene for re-planning in chunks of ``frames // 2`` frames; False
        when that is impossible (an assembly, or chunks no longer than the overlap) and the
        unit should be retried as a worker fault instead."""
        state = self.scenes[unit.scene.scene_id]
        size = frames // 2
        if unit.kind == "assemble" or size <= self.cfg.chunk.overlap or size < 2:
            return False
        if state.failed or state.finished:
            return True
        state.replan = min(size, state.replan or size)
        log.warning("%s ran out of memory with %d frames: re-planning the scene in chunks of at "
                    "most %d frames", describe_unit(unit), frames, state.replan)
        sid = unit.scene.scene_id
        self.queue = collections.deque(u for u in self.queue if u.scene.scene_id != sid)
        for slot in self.slots:
            if slot.reserved is not None and slot.reserved[0].scene.scene_id == sid:
                slot.reserved = None
        return True

    def _replan_if_idle(self, state: _SceneState) -> None:
        """Once none of its units runs, queues the scene's new plan (see ``_shrink``): its
        chunks from the replaced plan are removed from the store, attempts start afresh."""
        from httm_dist.pipeline.memory import with_max_frames
        from httm_dist.pipeline.unit import assemble_unit, plan_units

        sid = state.scene.scene_id
        if state.replan is None or state.failed or state.finished:
            return
        if any(s.current is not None and s.current[0].scene.scene_id == sid for s in self.slots):
            return
        size, state.replan = state.replan, None
        state.replans += 1
        self.store.clear_chunks(sid)
        for key in [k for k in self.attempts if k[0] == sid]:
            del self.attempts[key]
        units = plan_units(state.scene, with_max_frames(self.cfg, size))
        state.waiting_chunks = {u.chunk_index for u in units}
        state.assemble = assemble_unit(state.scene, len(units))
        self.queue.extendleft(reversed(units))  # started scenes first
        self.replanned.append({"scene_id": sid, "max_frames": size, "chunks": len(units)})
        log.warning("scene %r re-planned: %d chunks of at most %d frames", sid, len(units), size)

    def _scene_failed(self, state: _SceneState, record: dict) -> None:
        state.failed = True
        record.setdefault("error", "unknown error")
        self.records[state.scene.scene_id] = record
        self.bar.scene_finished(False)

    def _worker_lost(self, slot: _Slot, unit: Any, attempt: int, exc: BaseException) -> None:
        """The worker died (or is unhealthy) running ``unit``: count the attempt, requeue."""
        from httm_dist.storage import redact

        error = redact(f"{type(exc).__name__}: {_first_line(exc)}")
        self.workers_lost += 1
        self.attempts[unit_key(unit)] = attempt
        log.warning("worker lost on %s (attempt %d of %d): %s", describe_unit(unit), attempt,
                    self.cfg.max_attempts, error)
        state = self.scenes[unit.scene.scene_id]
        if state.replan is not None:
            pass  # its scene is being re-planned smaller (out of memory): this unit is moot
        elif attempt < self.cfg.max_attempts:
            self.queue.appendleft(unit)
        else:
            if not (state.failed or state.finished):
                err = (f"{describe_unit(unit)} failed: its worker died on each of {attempt} "
                       f"attempts (max_attempts); last error: {error}")
                _driver_failure(self.store, self.run_id, unit.scene.scene_id, err, attempt)
                self._scene_failed(state, {"status": "failed", "error": err,
                                           "attempts": attempt})
        self._replace(slot, exc)

    def _replace(self, slot: _Slot, exc: BaseException) -> None:
        """Gives the slot's reserved unit back, kills its actor and starts a fresh one."""
        from httm_dist.storage import redact

        if not slot.ready:  # died before its model was up
            self.init_failures += 1
            cause = _init_error(exc)
            log.warning("a worker failed to start: %s", cause)
            config_error = re.search(r"httm_dist\.errors\.ConfigError: (.*)", cause)
            if config_error:  # the same config fails the same way on every worker
                raise ConfigError(f"workers cannot start: {config_error.group(1)}")
            if self.init_failures >= max(2, self.cfg.max_attempts):
                raise HttmDistError(f"workers fail to start ({self.init_failures} times in a "
                                    f"row); last error: {cause}")
        if slot.reserved is not None:
            self.queue.appendleft(slot.reserved[0])
            slot.reserved = None
        for ref, (other, _) in list(self.by_ref.items()):
            if other is slot:  # a pending probe of the dead actor
                del self.by_ref[ref]
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._launch(slot)

    def _stop_workers(self) -> None:
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals open at one instant (intervals that
    merely touch do not overlap)."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    best = running = 0
    for _, step in events:  # at equal times the end (-1) sorts before the start (+1)
        running += step
        best = max(best, running)
    return best


def _frame_count(record: dict, scene: Any) -> int:
    for key in ("num_frames", "frames"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (list, tuple)):
            return len(value)
    return len(getattr(scene, "frames", ()) or ())


def _init_error(exc: BaseException) -> str:
    """The exception line of a worker's failed ``__init__`` (Ray only passes its text), or
    the first line of the error when the worker died some other way."""
    from httm_dist.storage import redact

    text = str(exc)
    if getattr(exc, "actor_init_failed", False):
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return redact(lines[-1]) if lines else type(exc).__name__
    return redact(_first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
