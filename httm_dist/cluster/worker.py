"""The Ray worker actor: owns one model for its whole life and runs units of work on it.

One actor per GPU (by default). It loads the model once in ``__init__`` (weights from an
fsspec URL, merge config applied) and then runs unit after unit; results are written to the
output store by the worker itself, so only a small JSON-like record travels back to the
driver.

I/O overlaps compute: while ``process(unit, attempt)`` runs, the driver calls ``prefetch`` with
the unit this worker runs next; a background thread fetches and decodes that unit's images
meanwhile, and its own ``process`` call takes them from there.

Faults are sorted in two kinds:
- the scene's own fault (``SceneError``: corrupt image, empty scene, ...; or any other
  exception raised while processing it): returned as a ``status: failed`` record and written
  with ``store.write_failure``; the worker stays healthy;
- the worker's fault (out of memory): raised as ``WorkerFault`` so the driver kills this actor
  and retries the unit on a fresh one. A crash (kill -9, lost node) reaches the driver as a
  ``RayActorError``, handled the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import ray
import torch

from httm_dist.errors import HttmDistError, SceneError
from httm_dist.config import JobConfig
from httm_dist.pipeline.publish import ResultPublisher
from httm_dist.pipeline.runner import ModelRunner
from httm_dist.pipeline.unit import LoadedUnit, WorkUnit, failure_line, failure_record
from httm_dist.results import ResultStore, SceneRecord
from httm_dist.pipeline.memory import local_free_bytes
from httm_dist.storage import install_log_redaction, redact, register_secrets

log = logging.getLogger(__name__)

#: Test-only hooks, read from the driver's environment and passed to its workers; never set
#: them outside tests. ``HTTM_DIST_TEST_KILL_SCENE=<scene id>``: a worker SIGKILLs itself on
#: the first attempt of that scene's units (after the model ran, before committing).
#: ``HTTM_DIST_TEST_UNIT_DELAY_S=<seconds>``: every unit sleeps that long before committing, so
#: tests can observe (and interrupt) a run in flight. ``HTTM_DIST_TEST_OOM_OVER_FRAMES=<n>``:
#: a unit of more than n frames raises torch's out-of-memory error after the model ran, as a
#: GPU too small for it would.
TEST_HOOK_ENV = {"kill_scene": "HTTM_DIST_TEST_KILL_SCENE",
                 "unit_delay_s": "HTTM_DIST_TEST_UNIT_DELAY_S",
                 "oom_over_frames": "HTTM_DIST_TEST_OOM_OVER_FRAMES"}


def test_hooks_from_env() -> dict:
    """The test-only hooks set in this process's environment (usually none)."""
    return {k: os.environ[v] for k, v in TEST_HOOK_ENV.items() if os.environ.get(v)}


class WorkerFault(HttmDistError):
    """The worker itself is unhealthy (e.g. out of memory): replace it and retry the unit."""


class OutOfMemoryFault(WorkerFault):
    """The unit did not fit the worker's memory: the scheduler re-plans its scene in smaller
    chunks instead of retrying the same unit (``cluster.schedule``)."""


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


@ray.remote
class ReconstructionWorker:
    """A Ray actor that owns one model (a ``ModelRunner``) for its life and runs units,
    publishing their results with a ``ResultPublisher``.

    Create with ``ReconstructionWorker.options(num_gpus=..., num_cpus=..., max_restarts=0,
    max_concurrency=2).remote(cfg, run_id)``: two threads, so ``info``/``prefetch`` are served
    while ``process`` runs (the plain class is ``ReconstructionWorker.__ray_actor_class__``).
    """

    def __init__(self, cfg: JobConfig, run_id: str, test_hooks: dict | None = None) -> None:
        install_log_redaction()  # this worker process's log lines pass the same redaction
        register_secrets(cfg.storage_options)
        self.cfg = cfg
        self.run_id = run_id
        self._test_hooks = dict(test_hooks or {})
        t0 = time.monotonic()
        self.runner = ModelRunner(cfg)
        self.store = ResultStore(cfg.output, cfg.storage_options)
        self.publisher = ResultPublisher(cfg, self.store, str(self.runner.device))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        # unit -> its load, keyed by the whole (frozen) unit: after an out-of-memory re-plan a
        # chunk keeps its unit_id but covers other frames
        self._prefetched: dict[WorkUnit, Future] = {}
        self._lock = threading.Lock()
        self._info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.runner.device),
            "node_id": _node_id(),
        }
        log.info("worker %s ready on %s (model loaded in %.1f s)", self._info["pid"],
                 self._info["device"], time.monotonic() - t0)

    def info(self) -> dict:
        """Where this worker runs: host, pid, torch device, Ray node id."""
        return dict(self._info)

    def prefetch(self, unit: WorkUnit) -> None:
        """Starts fetching and decoding ``unit``'s images in the background; returns at once
        (an assemble unit has no images: nothing to fetch)."""
        if unit.kind == "assemble":
            return
        with self._lock:
            if unit not in self._prefetched:
                self._prefetched[unit] = self._pool.submit(self.runner.load, unit)
            # Keep only a couple of loads around: a stale one (its unit went elsewhere after a
            # retry) must not pin decoded images forever.
            while len(self._prefetched) > 2:
                self._prefetched.pop(next(iter(self._prefetched))).cancel()

    def _take_loaded(self, unit: WorkUnit, extra: dict) -> LoadedUnit:
        """The unit's loaded images: from its prefetch when there was one, else loaded now.
        Notes in ``extra`` whether it was prefetched and how long the model waited for I/O."""
        t0 = time.monotonic()
        with self._lock:
            future = self._prefetched.pop(unit, None)
        prefetched = future is not None and not future.cancelled()
        try:
            # future.result() re-raises the load's SceneError, if any
            return future.result() if prefetched else self.runner.load(unit)
        finally:
            extra["prefetched"] = prefetched
            extra["load_wait_s"] = round(time.monotonic() - t0, 4)

    def process(self, unit: WorkUnit, attempt: int = 1) -> SceneRecord:
        """Runs one unit and writes its results; returns its (small) record.

        Scene faults come back as a ``status: failed`` record (also written to the store);
        worker faults raise ``WorkerFault``.
        """
        extra = {"run_id": self.run_id, "attempts": attempt, "worker": self.info(),
                 "started_at": time.time()}
        try:
            if unit.kind == "assemble":
                self._test_hook(unit, attempt)
                record = self.publisher.assemble(unit, extra)
            else:
                loaded = self._take_loaded(unit, extra)
                preds = self.runner.run(loaded)
                self._test_hook(unit, attempt)
                extra["finished_at"] = time.time()
                record = self.publisher.commit(unit, loaded, preds, extra)
        except Exception as exc:  # noqa: BLE001 - sorted below: worker fault or scene fault
            if _is_oom(exc):
                log.error("worker %s out of memory on %s: %s", self._info["pid"],
                          unit.describe(), exc)
                raise OutOfMemoryFault(f"out of memory on {unit.describe()}: {exc}") from None
            return self._failed(unit, attempt, exc, extra)
        if record.finished_at is None:
            record = record.replace(finished_at=time.time())
        return record

    def _failed(self, unit: WorkUnit, attempt: int, exc: Exception, extra: dict) -> SceneRecord:
        if isinstance(exc, SceneError):
            log.warning("%s", failure_line(unit.describe(), unit.scene_id, str(exc)))
        else:
            log.error("%s failed unexpectedly:\n%s", unit.describe(), traceback.format_exc())
        # attempts and finished_at are set here (a failed commit already noted finished_at)
        extra = {k: v for k, v in extra.items() if k not in ("attempts", "finished_at")}
        record = failure_record(unit, exc, self.cfg, attempt, finished_at=time.time(),
                                worker_host=self._info["host"], **extra)
        try:
            self.store.write_failure(record)
        except Exception as write_exc:  # noqa: BLE001 - the driver still gets the record
            log.error("could not write the failure record of %s: %s", unit.describe(),
                      redact(str(write_exc)))
            record = record.replace(failure_write_error=redact(str(write_exc)))
        return record

    def _test_hook(self, unit: WorkUnit, attempt: int) -> None:
        """Test-only behaviour (see ``TEST_HOOK_ENV``); nothing when no hook is set."""
        if not self._test_hooks:
            return
        delay = float(self._test_hooks.get("unit_delay_s", 0) or 0)
        if delay > 0:
            time.sleep(delay)
        over = int(self._test_hooks.get("oom_over_frames", 0) or 0)
        if over and unit.kind != "assemble" and len(unit.frames()) > over:
            raise torch.OutOfMemoryError(f"test fault injection: {len(unit.frames())} frames > {over}")
        if self._test_hooks.get("kill_scene") == unit.scene.scene_id and attempt == 1:
            log.warning("test fault injection: killing worker %s on %s", os.getpid(),
                        unit.describe())
            os.kill(os.getpid(), signal.SIGKILL)


def _node_id() -> str | None:
    if not ray.is_initialized():  # in-process use; asking would start a Ray
        return None
    return ray.get_runtime_context().get_node_id()


def probe_worker_free_bytes(cfg: JobConfig) -> Optional[int]:
    """Free GPU bytes one worker will get, read by a Ray task placed like a worker (Ray must
    be initialised); None when workers run on CPU. A fractional ``gpus_per_worker`` gets that
    share of the GPU; more than one GPU per worker still runs the model on one."""
    gpw = float(cfg.gpus_per_worker)
    if gpw <= 0 or float(ray.cluster_resources().get("GPU", 0)) == 0 or cfg.model.device == "cpu":
        return None

    @ray.remote(num_gpus=gpw, num_cpus=0)
    def _free() -> Optional[int]:
        return local_free_bytes("auto")

    free = ray.get(_free.remote())
    return None if free is None else int(free * min(1.0, gpw))
