"""The Ray worker actor: owns one model for its whole life and runs units of work on it.

One actor per GPU (by default). It loads the model once in ``__init__`` (weights from an
fsspec URL, merge config applied) and then runs unit after unit; results are written to the
output store by the worker itself, so only a small JSON-like record travels back to the
driver.

I/O overlaps compute: ``process(unit, attempt, next_unit)`` hands ``next_unit`` to a
background thread that fetches and decodes its images while the model runs on ``unit``.

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
from typing import Any

import ray

from httm_dist.errors import HttmDistError, SceneError

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
    """The unit did not fit the worker's memory: the driver re-plans its scene in smaller
    chunks (``frames`` is how many the unit had) instead of retrying the same unit."""

    def __init__(self, message: str, frames: int) -> None:
        super().__init__(message)
        self.frames = frames

    def __reduce__(self) -> tuple:  # Ray pickles it back to the driver
        return (type(self), (str(self), self.frames))


def unit_key(unit: Any) -> tuple[str, str, int | None]:
    """Identity of a unit of work: (scene id, kind, chunk index)."""
    return (unit.scene.scene_id, unit.kind, unit.chunk_index)


def describe_unit(unit: Any) -> str:
    """Human-readable unit name for logs and errors, e.g. ``scene 'a' chunk 2/5``."""
    text = f"scene {unit.scene.scene_id!r}"
    if unit.kind == "chunk":
        text += f" chunk {unit.chunk_index + 1}/{unit.num_chunks}"
    elif unit.kind == "assemble":
        text += " (assembling chunks)"
    return text


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


@ray.remote
class ReconstructionWorker:
    """A Ray actor that owns one model (a ``UnitRunner``) for its life and runs units.

    Create with ``ReconstructionWorker.options(num_gpus=..., num_cpus=..., max_restarts=0,
    max_concurrency=2).remote(cfg, run_id)``: two threads, so ``info``/``prefetch`` are served
    while ``process`` runs (the plain class is ``ReconstructionWorker.__ray_actor_class__``).
    """

    def __init__(self, cfg: Any, run_id: str, test_hooks: dict | None = None) -> None:
        from httm_dist.pipeline.unit import UnitRunner
        from httm_dist.results import ResultStore

        self.cfg = cfg
        self.run_id = run_id
        self._test_hooks = dict(test_hooks or {})
        t0 = time.monotonic()
        self.runner = UnitRunner(cfg)
        self.store = ResultStore(cfg.output, cfg.storage_options)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._prefetched: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(getattr(self.runner, "device", "unknown")),
            "node_id": _node_id(),
        }
        log.info("worker %s ready on %s (model loaded in %.1f s)", self._info["pid"],
                 self._info["device"], time.monotonic() - t0)

    def info(self) -> dict:
        """Where this worker runs: host, pid, torch device, Ray node id."""
        return dict(self._info)

    def prefetch(self, unit: Any) -> None:
        """Starts fetching and decoding ``unit``'s images in the background; returns at once."""
        if unit is None or unit.kind == "assemble":
            return
        key = unit_key(unit)
        with self._lock:
            if key not in self._prefetched:
                self._prefetched[key] = self._pool.submit(self.runner.load, unit)
            # Keep only a couple of loads around: a stale one (its unit went elsewhere after a
            # retry) must not pin decoded images forever.
            while len(self._prefetched) > 2:
                self._prefetched.pop(next(iter(self._prefetched))).cancel()

    def _take_loaded(self, unit: Any, extra: dict) -> Any:
        """The unit's loaded images: from its prefetch when there was one, else loaded now.
        Notes in ``extra`` whether it was prefetched and how long the model waited for I/O."""
        t0 = time.monotonic()
        with self._lock:
            future = self._prefetched.pop(unit_key(unit), None)
        prefetched = future is not None and not future.cancelled()
        try:
            # future.result() re-raises the load's SceneError, if any
            return future.result() if prefetched else self.runner.load(unit)
        finally:
            extra["prefetched"] = prefetched
            extra["load_wait_s"] = round(time.monotonic() - t0, 4)

    def process(self, unit: Any, attempt: int = 1, next_unit: Any = None) -> dict:
        """Runs one unit and writes its results; returns its (small) record.

        ``next_unit`` (optional) is prefetched while this one runs. Scene faults come back as
        a ``status: failed`` record; worker faults raise ``WorkerFault``.
        """
        started = time.time()
        self.prefetch(next_unit)
        extra = {"run_id": self.run_id, "attempt": attempt, "worker": self.info(),
                 "started_at": started}
        try:
            if unit.kind == "assemble":
                self._test_hook(unit, attempt)
                record = self.runner.assemble(unit, self.store, extra)
            else:
                loaded = self._take_loaded(unit, extra)
                preds = self.runner.run(loaded)
                self._test_hook(unit, attempt)
                extra["finished_at"] = time.time()
                record = self.runner.commit(unit, loaded, preds, self.store, extra)
        except Exception as exc:  # noqa: BLE001 - sorted below: worker fault or scene fault
            if _is_oom(exc):
                log.error("worker %s out of memory on %s: %s", self._info["pid"],
                          describe_unit(unit), exc)
                raise OutOfMemoryFault(f"out of memory on {describe_unit(unit)}: {exc}",
                                       len(unit.frames())) from None
            return self._failed(unit, attempt, exc, extra)
        record = dict(record or {})
        for k, v in extra.items():
            record.setdefault(k, v)
        record.setdefault("finished_at", time.time())
        return record

    def _failed(self, unit: Any, attempt: int, exc: Exception, extra: dict) -> dict:
        from httm_dist.pipeline.unit import failure_record
        from httm_dist.storage import redact

        if isinstance(exc, SceneError):
            log.warning("%s failed: %s", describe_unit(unit), exc)
        else:
            log.error("%s failed unexpectedly:\n%s", describe_unit(unit), traceback.format_exc())
        record = failure_record(unit, exc, self.cfg, attempts=attempt)
        record.update(extra, finished_at=time.time(), worker_host=self._info["host"])
        record["error"] = redact(record["error"])
        try:
            self.store.write_failure(unit.scene.scene_id, record)
        except Exception as write_exc:  # noqa: BLE001 - the driver still gets the record
            log.error("could not write the failure record of %s: %s", describe_unit(unit),
                      redact(str(write_exc)))
            record["failure_write_error"] = redact(str(write_exc))
        return record

    def _test_hook(self, unit: Any, attempt: int) -> None:
        """Test-only behaviour (see ``TEST_HOOK_ENV``); nothing when no hook is set."""
        if not self._test_hooks:
            return
        delay = float(self._test_hooks.get("unit_delay_s", 0) or 0)
        if delay > 0:
            time.sleep(delay)
        over = int(self._test_hooks.get("oom_over_frames", 0) or 0)
        if over and unit.kind != "assemble" and len(unit.frames()) > over:
            import torch

            raise torch.OutOfMemoryError(f"test fault injection: {len(unit.frames())} frames > {over}")
        if self._test_hooks.get("kill_scene") == unit.scene.scene_id and attempt == 1:
            log.warning("test fault injection: killing worker %s on %s", os.getpid(),
                        describe_unit(unit))
            os.kill(os.getpid(), signal.SIGKILL)


def _node_id() -> str | None:
    if not ray.is_initialized():  # in-process use; asking would start a Ray
        return None
    return ray.get_runtime_context().get_node_id()
