"""The driver: lists the work, keeps every worker busy, retries, resumes, reports.

``run_job(cfg)`` is the whole job:

1. validate the config's outside world (weights, input, output) before anything else;
2. ``chunk.max_frames: auto`` is resolved from one worker's free GPU memory
   (:mod:`~httm_dist.pipeline.memory`; Ray is connected first for it); list scenes, skip those already committed (resume), apply ``on_config_change`` to scenes
   committed under another model/merge config, and split the rest into units (a whole
   scene, or the chunks of a long one plus its "assemble" step); chunks already saved by an
   earlier run are not redone;
3. connect to Ray (``ray.address``, else ``RAY_ADDRESS``, else a private local Ray) and start the
   worker actors, one per GPU by default;
4. dispatch: each worker has one unit running and one reserved whose images it prefetches;
   a worker that dies gives its units back to the queue (the running one counts an attempt,
   up to ``max_attempts``) and is replaced; a scene's own failure is recorded and the job goes
   on; a chunked scene's "assemble" unit is queued once all its chunks are done; a unit that
   ran out of memory re-plans its scene in smaller chunks (the driver removes the replaced
   plan's saved chunks);
5. write and return the run summary (counts, failures with their errors, seconds, frames/s).

Workers write results themselves; the driver only sees small records. Step 2 is
:mod:`~httm_dist.cluster.plan`, the dispatch policy of step 4 is the Ray-free
:class:`~httm_dist.cluster.schedule.Scheduler`; this module is the Ray adapter around them
(actors, ``ray.wait``, replacing dead actors) plus the summary.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from datetime import datetime, timezone

import ray
from ray import exceptions as rex

from httm_dist.cluster.jobenv import check_paths_in_job_working_dir, reinstall_after_ray_init, sigterm_unwinds
from httm_dist.cluster.plan import Plan, plan_work, record_failure
from httm_dist.cluster.progress import JobProgress
from httm_dist.cluster.schedule import Assignment, FailureKind, GiveUp, Lease, Scheduler
from httm_dist.cluster.worker import (OutOfMemoryFault, ReconstructionWorker, WorkerFault,
                                     probe_worker_free_bytes, test_hooks_from_env)
from httm_dist.config import JobConfig, validate_resources
from httm_dist.errors import ConfigError, HttmDistError
from httm_dist.model import VGGTConfig
from httm_dist.model.config import PRESETS, preset_weights as _preset_weights
from httm_dist.pipeline.memory import parameter_count, resolve_max_frames, with_max_frames
from httm_dist.pipeline.unit import failure_line, failure_record, plan_units
from httm_dist.results import ResultStore, RunSummary, SceneRecord
from httm_dist.storage import redact

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


def run_job(cfg: JobConfig, *, progress: bool = True, run_id: str | None = None) -> dict:
    """Runs (or resumes) the job described by ``cfg``; returns the run summary.

    Raises ConfigError/StorageError before any work when the config or its storage is wrong,
    ConfigError when committed scenes were made under another config and
    ``on_config_change`` is ``refuse``. Scene failures do not raise: the summary's
    ``failed`` count and ``failures`` list report them (the CLI turns them into its exit
    status). SIGTERM during the run unwinds it like Ctrl-C, raising
    :class:`~httm_dist.cluster.jobenv.JobStopped` (:func:`~httm_dist.cluster.jobenv.sigterm_unwinds`).
    """
    with sigterm_unwinds():
        return _run_job(cfg, progress, run_id)


def _run_job(cfg: JobConfig, progress: bool, run_id: str | None) -> dict:
    check_paths_in_job_working_dir(cfg)  # before validate_resources probes the output
    validate_resources(cfg)
    random_weights = not (cfg.model.weights or _preset_weights(cfg.model.preset))
    log.log(logging.WARNING if random_weights else logging.INFO, "%s", describe_model(cfg))
    run_id = run_id or new_run_id()
    started_wall = datetime.now(timezone.utc)
    store = ResultStore(cfg.output, cfg.storage_options)
    started_ray = False  # whether this run started (or joined) Ray: shut down once, at the end
    try:
        if cfg.chunk.max_frames == "auto":  # sized from a worker's GPU: ask one (needs Ray)
            started_ray = _connect(cfg)
            cfg = with_max_frames(cfg, resolve_max_frames(cfg, probe_worker_free_bytes(cfg)))
            log.info("chunk.max_frames auto: %d frames per forward pass", cfg.chunk.max_frames)
        plan = plan_work(cfg, store, run_id)
        _remove_stale_temp_files(store)
        total = len(plan.scenes) + len(plan.failures)
        log.info("run %s: %d scenes to process (%d units), %d already committed, output %s",
                 run_id, total, len(plan.queue), len(plan.skipped), redact(cfg.output))

        bar = JobProgress(total, failed_at_start=len(plan.failures), enabled=progress)
        records: dict[str, dict] = {}
        worker_info: list[dict] = []
        units_run = workers_lost = max_parallel = 0
        replanned: list[dict] = []
        startup_s = None
        try:
            if plan.queue:
                started_ray = _connect(cfg) or started_ray
                dispatcher = _Dispatcher(cfg, store, run_id, plan, bar)
                records = dispatcher.run()
                worker_info, units_run = dispatcher.worker_info, dispatcher.units_run
                workers_lost, replanned = dispatcher.workers_lost, dispatcher.replanned
                max_parallel = max_overlap(dispatcher.spans)
                if dispatcher.first_up is not None:
                    startup_s = round(dispatcher.first_up - bar.started, 3)
        finally:
            bar.close()
    finally:
        if started_ray:
            ray.shutdown()
    if plan.queue:
        _remove_stale_temp_files(store)  # a long run outlives what a killed writer left

    failures = plan.failures + [
        {"scene_id": sid, "error": rec.error, "attempts": rec.attempts}
        for sid, rec in records.items() if not rec.is_done
    ]
    done = [rec for rec in records.values() if rec.is_done]
    seconds = bar.elapsed
    summary = RunSummary(
        run_id=run_id,
        started_at=started_wall.isoformat(),
        finished_at=datetime.now(timezone.utc).isoformat(),
        seconds=round(seconds, 3),
        startup_seconds=startup_s,
        scenes=total + len(plan.skipped) + len(plan.kept_failed),
        skipped=len(plan.skipped),
        not_retried=len(plan.kept_failed),
        done=len(done),
        failed=len(failures),
        failures=redact(failures),
        frames=bar.frames,
        frames_per_s=round(bar.frames / max(seconds, 1e-9), 4),
        units_run=units_run,
        reused_chunks=plan.reused_chunks,
        workers=len(worker_info),
        workers_lost=workers_lost,
        replanned=replanned,
        max_parallel_units=max_parallel,
        worker_hosts=sorted({w.get("host", "?") for w in worker_info}),
        worker_units=worker_info,
        model_hash=cfg.model_hash(),
        merge_hash=cfg.merge_hash(),
        input=redact(cfg.input),
        output=redact(cfg.output),
        config=cfg.to_dict(redacted=True),
    )
    summary_url = redact(store.write_run_summary(summary))
    out = redact({**summary.to_dict(), "summary_url": summary_url})
    log.info("run %s finished: %d done, %d failed, %d skipped, %d frames in %.1f s "
             "(%.2f frames/s)", run_id, summary.done, summary.failed, summary.skipped,
             summary.frames, seconds, summary.frames_per_s)
    for f in summary.failures:
        log.warning("%s", failure_line(f"scene {f['scene_id']!r}", f["scene_id"], f["error"]))
    return out


def _remove_stale_temp_files(store: ResultStore) -> None:
    """Removes what writers killed mid-write left under ``_tmp/``
    (:meth:`ResultStore.remove_stale_temp_files`); a failure to do so is logged, never fatal."""
    try:
        store.remove_stale_temp_files()
    except OSError as exc:
        log.warning("could not remove stale temporary files of %s: %s", store, exc)


def describe_model(cfg: JobConfig) -> str:
    """One line naming the model a job runs: preset (and what it is), weights source,
    parameter count (counted on the meta device: no memory, no weights read), device and
    merging. Logged by the driver at the start of every run."""
    preset = cfg.model.preset
    shipped = _preset_weights(preset)
    if cfg.model.weights:
        weights = f"weights {redact(cfg.model.weights)}"
    elif shipped:
        weights = f"weights shipped with the package ({shipped})"
    else:
        weights = "RANDOM weights (model.allow_random_weights: outputs are meaningless)"
    n = parameter_count(VGGTConfig.preset(preset), whole_model=True)
    device = cfg.model.device
    if device == "auto":
        device = "auto (CUDA where a worker sees a GPU, else CPU)"
    merge = cfg.merging.to_dict()
    merging = merge.get("strategy", "?")
    if merging != "dense":
        merging += " (" + ", ".join(f"{k}={v}" for k, v in merge.items()
                                    if k in ("q_keep", "kv_keep", "min_tokens")) + ")"
    about = getattr(PRESETS.get(preset), "description", "")
    return (f"model: preset '{preset}'{f' ({about})' if about else ''}; {weights}; "
            f"{n / 1e6:.1f}M parameters; device {device}; merging {merging}")


# --------------------------------------------------------------------------- Ray


def _connect(cfg: JobConfig) -> bool:
    """Connects to Ray; returns True when this call started it (so the job shuts it down).

    ``ray.address`` (e.g. ``auto``, ``ray://head:10001``), else ``RAY_ADDRESS`` (set inside
    ``ray job submit``), joins that cluster. With neither, a private local Ray is started for
    this job (``address="local"``): a cluster that ``ray start`` registered on this machine is
    never joined by accident (its workers would die with it). Logs which happened.
    """
    if ray.is_initialized():
        log.info("using the Ray session this process already runs")
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        source = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
        log.info("joining the Ray cluster at %s (from %s)", address, source)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("no ray.address and no RAY_ADDRESS: starting a private local Ray for this job "
                 "(set ray.address: auto to join a cluster started with `ray start`)")
        ray.init(address="local", include_dashboard=False)
    reinstall_after_ray_init()
    return True


def _worker_count(cfg: JobConfig, n_units: int) -> tuple[int, float]:
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
    """The Ray adapter around :class:`~httm_dist.cluster.schedule.Scheduler`: starts actors,
    turns its assignments into actor calls, and reports back what ``ray.wait`` returns.

    Worker ids are slots 0..n-1; a dead worker's slot gets a fresh actor, which gets work once
    its ``info()`` answers (its model is loaded).
    """

    def __init__(self, cfg: JobConfig, store: ResultStore, run_id: str, plan: Plan,
                 bar: JobProgress) -> None:
        self.cfg, self.store, self.run_id, self.bar = cfg, store, run_id, bar
        self.workers_lost = 0
        self.first_up: float | None = None  # time.monotonic() when the first worker was up
        self.spans: list[tuple[float, float]] = []  # (started_at, finished_at) of each unit
        self.worker_info: list[dict] = []  # one per actor that came up
        self.hooks = test_hooks_from_env()
        self.init_failures = 0
        self.by_ref: dict[ray.ObjectRef, tuple[int, str]] = {}  # ref -> (worker, "probe" | "process")
        n, self.gpw = _worker_count(cfg, len(plan.queue))
        self.schedule = Scheduler(plan.queue, plan.scenes, cfg.max_attempts, n,
                                  planner=lambda scene, size: plan_units(scene, with_max_frames(cfg, size)),
                                  chunk_overlap=cfg.chunk.overlap)
        self.replanned: list[dict] = []  # scenes re-planned smaller after running out of memory
        log.info("starting %d workers (%g GPU, %g CPU each)", n, self.gpw, cfg.cpus_per_worker)
        self.actors: list[ray.actor.ActorHandle | None] = [None] * n
        self.info: list[dict] = [{} for _ in range(n)]  # the current actor's info, per worker
        for worker in range(n):
            self._launch(worker)

    @property
    def units_run(self) -> int:
        return self.schedule.units_started

    def _launch(self, worker: int) -> None:
        """Starts a (new) actor for ``worker``; it gets work once its ``info()`` answers."""
        actor = ReconstructionWorker.options(
            num_gpus=self.gpw, num_cpus=self.cfg.cpus_per_worker, max_restarts=0,
            max_concurrency=2,
        ).remote(self.cfg, self.run_id, self.hooks)
        self.actors[worker] = actor
        self.by_ref[actor.info.remote()] = (worker, "probe")

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> dict[str, SceneRecord]:
        """Runs until no unit is queued or running; returns each scene's final record."""
        waiting_since = time.monotonic()
        try:
            while self.schedule.work_left():
                ready, _ = ray.wait(list(self.by_ref), num_returns=1, timeout=1.0)
                for ref in ready:
                    worker, what = self.by_ref.pop(ref)
                    if what == "probe":
                        self._probed(worker, ref)
                    else:
                        self._collect(worker, ref)
                self._clear_replaced_chunks()
                for assignment in self.schedule.fill():
                    self._assign(assignment)
                self.bar.tick()
                if self.schedule.any_up():
                    waiting_since = time.monotonic()
                elif time.monotonic() - waiting_since > WORKER_START_TIMEOUT_S:
                    raise HttmDistError(
                        f"no worker started within {WORKER_START_TIMEOUT_S:.0f} s: the Ray "
                        f"cluster may lack the resources a worker asks for ({self.gpw:g} GPU, "
                        f"{self.cfg.cpus_per_worker:g} CPU); check `ray status`")
        finally:
            self._stop_workers()
        return self.schedule.records

    def _clear_replaced_chunks(self) -> None:
        """Scenes re-planned smaller since the last fill: their saved chunks belong to the
        replaced plan; remove them before any chunk of the new plan starts."""
        for r in self.schedule.take_replans():
            self.store.clear_chunks(r.scene_id)
            self.replanned.append({"scene_id": r.scene_id, "max_frames": r.max_frames, "chunks": len(r.units)})
            log.warning("scene %r ran out of memory: re-planned as %d chunks of at most %d frames",
                        r.scene_id, len(r.units), r.max_frames)

    def _assign(self, assignment: Assignment) -> None:
        actor, lease = self.actors[assignment.worker], assignment.lease
        if assignment.action == "start":
            ref = actor.process.remote(lease.unit, lease.attempt)
            self.by_ref[ref] = (assignment.worker, "process")
        else:
            actor.prefetch.remote(lease.unit)

    def _probed(self, worker: int, ref: ray.ObjectRef) -> None:
        try:
            info = ray.get(ref)
        except _WORKER_LOST as exc:
            self._start_failed(worker, exc)
            return
        self.init_failures = 0
        self.first_up = self.first_up or time.monotonic()
        self.info[worker] = dict(info, units={})
        self.worker_info.append(self.info[worker])
        self.schedule.worker_up(worker)
        log.info("worker up: pid %s on %s (%s)", info.get("pid"), info.get("host"),
                 info.get("device"))

    # -- results ------------------------------------------------------------------------
    def _collect(self, worker: int, ref: ray.ObjectRef) -> None:
        lease = self.schedule.current(worker)
        try:
            record = ray.get(ref)
        except (WorkerFault, *_WORKER_LOST) as exc:  # Ray re-raises WorkerFault as itself
            self._lost(worker, lease, exc)
            return
        except rex.RayTaskError as exc:  # a bug outside the worker's own error handling
            record = failure_record(lease.unit, f"{type(exc).__name__}: {_first_line(exc)}",
                                    self.cfg, lease.attempt, run_id=self.run_id)
            record_failure(self.store, record)
        units = self.info[worker]["units"]
        units[lease.unit.kind] = units.get(lease.unit.kind, 0) + 1
        if record.started_at is not None and record.finished_at is not None:
            self.spans.append((record.started_at, record.finished_at))
        final = self.schedule.unit_finished(worker, record)
        if final is not None:
            self.bar.scene_finished(final.is_done, final.num_frames or 0 if final.is_done else 0)
            log.debug("%s %s", lease.unit.describe(), final.status)

    def _lost(self, worker: int, lease: Lease, exc: BaseException) -> None:
        """The worker died (or is unhealthy) running ``lease``: the schedule decides, the
        actor is replaced."""
        error = redact(f"{type(exc).__name__}: {_first_line(exc)}")
        kind = (FailureKind.OUT_OF_MEMORY if isinstance(exc, OutOfMemoryFault)
                else FailureKind.WORKER_FAULT if isinstance(exc, WorkerFault)
                else FailureKind.WORKER_LOST)
        self.workers_lost += 1
        log.warning("worker lost on %s (attempt %d of %d): %s", lease.unit.describe(),
                    lease.attempt, self.cfg.max_attempts, error)
        decision = self.schedule.unit_failed(worker, kind, error)
        if isinstance(decision, GiveUp) and not self.schedule.scenes[lease.scene_id].over:
            record = failure_record(lease.unit, decision.reason, self.cfg, lease.attempt,
                                    run_id=self.run_id)
            record_failure(self.store, record)
            self.schedule.scene_failed(record)
            self.bar.scene_finished(False)
        self._restart(worker)

    def _start_failed(self, worker: int, exc: BaseException) -> None:
        """The worker's actor died before its model was up: stop the job when that is a
        config error (every worker would fail the same way) or happens too often in a row."""
        self.init_failures += 1
        cause = _init_error(exc)
        log.warning("a worker failed to start: %s", cause)
        config_error = re.search(r"httm_dist\.errors\.ConfigError: (.*)", cause)
        if config_error:  # the same config fails the same way on every worker
            raise ConfigError(f"workers cannot start: {config_error.group(1)}")
        if self.init_failures >= max(2, self.cfg.max_attempts):
            raise HttmDistError(f"workers fail to start ({self.init_failures} times in a "
                                f"row); last error: {cause}")
        self.schedule.worker_gone(worker)
        self._restart(worker)

    def _restart(self, worker: int) -> None:
        """Kills the worker's actor (and forgets its pending calls) and starts a fresh one."""
        for ref, (other, _) in list(self.by_ref.items()):
            if other == worker:
                del self.by_ref[ref]
        try:
            ray.kill(self.actors[worker], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._launch(worker)

    def _stop_workers(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
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


def _init_error(exc: BaseException) -> str:
    """The exception line of a worker's failed ``__init__`` (Ray only passes its text), or
    the first line of the error when the worker died some other way."""
    text = str(exc)
    if getattr(exc, "actor_init_failed", False):
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return redact(lines[-1]) if lines else type(exc).__name__
    return redact(_first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
