"""The dispatch policy as a pure state machine: which worker runs (and prefetches) which unit.

Knows nothing of Ray: workers are small integer ids, units are
:class:`~httm_dist.pipeline.unit.WorkUnit`, and every decision is a return value. The driver
(:mod:`httm_dist.cluster.driver`) is the Ray adapter: it turns :class:`Assignment` s into actor
calls and reports back what Ray tells it (:meth:`Scheduler.worker_up`,
:meth:`Scheduler.unit_finished`, :meth:`Scheduler.unit_failed`, :meth:`Scheduler.worker_gone`).

The policy:

- **fill**: a worker gets units only once it is up (its model loaded); every idle worker
  gets a unit before any worker reserves a second one;
- **prefetch**: a busy worker reserves one more unit, whose images it loads while it runs the
  current one; the reserved unit runs next;
- **steal**: an idle worker, when the queue is empty, takes another worker's reserved unit;
- **requeue**: when a worker dies (or is unhealthy) its reserved unit goes back to the front
  of the queue, and its running unit in front of it while it has attempts left;
- **attempt limits**: a unit whose worker died on each of ``max_attempts`` attempts fails its
  scene (see :meth:`Scheduler.unit_failed`: one decision per failure kind);
- **replace**: a worker that died is gone until the driver reports it up again
  (:meth:`Scheduler.worker_up` with the same id, for its replacement);
- **chunked scenes**: once every chunk of a scene is done, its "assemble" unit is put at the
  front of the queue (finish started scenes first); units of a scene that already failed or
  finished are dropped;
- **out of memory**: a unit that did not fit its worker's memory is not retried as it was:
  its scene is re-planned in chunks of half the unit's frames (``planner``), once none of the
  scene's units runs any more (their results belong to the replaced plan and are dropped);
  the driver clears the replaced plan's saved chunks (:meth:`Scheduler.take_replans`) before
  the new ones start. A unit that cannot shrink (an assembly, or chunks that would not be
  longer than the overlap) is retried like any worker fault.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from httm_dist.data import SceneSpec
from httm_dist.pipeline.unit import WorkUnit, assemble_unit
from httm_dist.results import SceneRecord


@dataclass(frozen=True)
class Lease:
    """One attempt of one unit, handed to one worker. ``attempt`` counts from 1."""

    unit: WorkUnit
    attempt: int

    @property
    def scene_id(self) -> str:
        return self.unit.scene_id


@dataclass(frozen=True)
class Assignment:
    """What the driver must do now: ``start`` the lease on the worker, or ``prefetch`` it
    (load its images in the background: it runs next on that worker)."""

    worker: int
    lease: Lease
    action: str  # "start" | "prefetch"


class FailureKind(enum.Enum):
    """Why a unit did not finish on its worker (a scene's own error is not one of these: it
    comes back as a failed record through :meth:`Scheduler.unit_finished`)."""

    WORKER_LOST = "worker_lost"  # the process or its node died (Ray actor/worker errors)
    WORKER_FAULT = "worker_fault"  # the worker raised WorkerFault
    OUT_OF_MEMORY = "out_of_memory"  # the unit did not fit the worker's memory


@dataclass(frozen=True)
class Retry:
    """The lease's unit is back at the front of the queue; its next attempt is ``attempt+1``."""

    lease: Lease


@dataclass(frozen=True)
class GiveUp:
    """The unit used its last attempt: the driver records the scene as failed with ``reason``
    and reports it with :meth:`Scheduler.scene_failed`."""

    lease: Lease
    reason: str


@dataclass(frozen=True)
class Shrink:
    """The lease's unit ran out of memory (or belongs to a scene being re-planned after one):
    its scene will run in chunks of at most ``max_frames`` frames once none of its units runs."""

    lease: Lease
    max_frames: int


@dataclass(frozen=True)
class Replanned:
    """A scene's new plan, queued: the driver removes the saved chunks of the replaced plan."""

    scene_id: str
    max_frames: int
    units: tuple[WorkUnit, ...]


Planner = Callable[[SceneSpec, int], list[WorkUnit]]
"""``planner(scene, max_frames)``: the scene's units in chunks of at most ``max_frames``."""

Decision = Retry | GiveUp | Shrink


@dataclass
class SceneState:
    """Where one scene stands: chunks still running, its assemble unit, done or failed."""

    scene: SceneSpec
    waiting_chunks: set[int] = field(default_factory=set)
    assemble: Optional[WorkUnit] = None  # queued when ``waiting_chunks`` empties
    failed: bool = False
    finished: bool = False
    replan: Optional[int] = None  # out of memory: re-plan in chunks of this size when idle

    @property
    def over(self) -> bool:
        return self.failed or self.finished


@dataclass
class _Worker:
    up: bool = False
    current: Optional[Lease] = None
    reserved: Optional[Lease] = None


class Scheduler:
    """The dispatch state of one run (see the module doc). Not thread-safe; one per run."""

    def __init__(self, queue: Iterable[WorkUnit], scenes: dict[str, SceneState],
                 max_attempts: int, workers: int, planner: Optional[Planner] = None,
                 chunk_overlap: int = 1) -> None:
        """``queue``: runnable units in order; ``scenes``: the state of every scene they
        belong to; ``max_attempts`` >= 1; ``workers``: how many worker ids (0..n-1) exist;
        ``planner`` re-plans a scene smaller after an out-of-memory (None: out of memory is
        retried like a worker fault); ``chunk_overlap``: frames consecutive chunks share (a
        chunk must be longer)."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.queue: collections.deque[WorkUnit] = collections.deque(queue)
        self.scenes = scenes
        self.max_attempts = max_attempts
        self.attempts: collections.Counter[str] = collections.Counter()  # unit_id -> attempts used
        self.records: dict[str, SceneRecord] = {}  # scene id -> its final record (done/failed)
        self.units_started = 0
        self._workers = {w: _Worker() for w in range(workers)}
        self.planner, self.chunk_overlap = planner, chunk_overlap
        self._replans: list[Replanned] = []
        # One decision per failure kind.
        self._on_failure = {
            FailureKind.WORKER_LOST: self._retry_or_give_up,
            FailureKind.WORKER_FAULT: self._retry_or_give_up,
            FailureKind.OUT_OF_MEMORY: self._shrink_or_retry,
        }

    # ------------------------------------------------------------------ queries

    def work_left(self) -> bool:
        """Units are queued or running. A reserved unit needs no check of its own: its worker
        is running a unit, and runs the reserved one next or gives it back when it dies."""
        return bool(self.queue) or any(w.current is not None for w in self._workers.values())

    def any_up(self) -> bool:
        return any(w.up for w in self._workers.values())

    def current(self, worker: int) -> Optional[Lease]:
        return self._workers[worker].current

    def reserved(self, worker: int) -> Optional[Lease]:
        return self._workers[worker].reserved

    # ------------------------------------------------------------------ worker life

    def worker_up(self, worker: int) -> None:
        """The worker's model is loaded: it may get units from the next :meth:`fill`."""
        self._workers[worker] = _Worker(up=True)

    def worker_gone(self, worker: int) -> None:
        """The worker died or is being replaced: its reserved unit goes back to the front of
        the queue (its running unit, if any, must be settled by :meth:`unit_failed` first)."""
        state = self._workers[worker]
        if state.current is not None:
            raise RuntimeError(f"worker {worker} still runs {state.current.unit.unit_id}: "
                               "report it with unit_failed before worker_gone")
        if state.reserved is not None:
            self.queue.appendleft(state.reserved.unit)
        self._workers[worker] = _Worker()

    # ------------------------------------------------------------------ dispatch

    def fill(self) -> list[Assignment]:
        """Give every idle live worker a unit (its reserved one, else the queue's next, else
        another worker's reserved one), then let every busy one reserve one to prefetch."""
        out = []
        live = [w for w, s in self._workers.items() if s.up]
        for w in live:
            state = self._workers[w]
            if state.current is not None:
                continue
            lease, state.reserved = state.reserved, None
            if lease is None or self._over(lease.unit):
                lease = self._next(steal=True)
            if lease is not None:
                state.current = lease
                self.units_started += 1
                out.append(Assignment(w, lease, "start"))
        for w in live:
            state = self._workers[w]
            if state.current is not None and state.reserved is None:
                state.reserved = self._next(steal=False)
                if state.reserved is not None:
                    out.append(Assignment(w, state.reserved, "prefetch"))
        return out

    def _next(self, steal: bool) -> Optional[Lease]:
        while self.queue:
            unit = self.queue.popleft()
            if not self._over(unit):
                return Lease(unit, self.attempts[unit.unit_id] + 1)
        if steal:
            for state in self._workers.values():
                if state.reserved is not None:
                    taken, state.reserved = state.reserved, None
                    if not self._over(taken.unit):
                        return taken
        return None

    def _over(self, unit: WorkUnit) -> bool:
        return self.scenes[unit.scene_id].over

    # ------------------------------------------------------------------ outcomes

    def unit_finished(self, worker: int, record: SceneRecord) -> Optional[SceneRecord]:
        """The worker's running unit returned ``record`` (done, chunk_done or failed).
        Returns the scene's final record when this finished or failed the scene, else None
        (a chunk done, or the scene was already over: a sibling chunk failed it)."""
        state = self._workers[worker]
        lease, state.current = state.current, None
        if lease is None:
            raise RuntimeError(f"worker {worker} finished a unit it was not running")
        scene = self.scenes[lease.scene_id]
        if scene.replan is not None:  # a unit of the replaced plan: its result is moot
            self._replan_if_idle(scene)
            return None
        if scene.over:
            return None
        if record.is_failed:
            return self.scene_failed(record)
        if lease.unit.kind == "chunk":
            scene.waiting_chunks.discard(lease.unit.chunk_index)
            if not scene.waiting_chunks and scene.assemble is not None:
                self.queue.appendleft(scene.assemble)
            return None
        scene.finished = True
        self.records[lease.scene_id] = record
        return record

    def unit_failed(self, worker: int, kind: FailureKind, error: str) -> Decision:
        """The worker's running unit did not finish because of the worker (``kind``): count
        the attempt and decide. The worker is then gone (:meth:`worker_gone` is applied)."""
        state = self._workers[worker]
        lease, state.current = state.current, None
        if lease is None:
            raise RuntimeError(f"worker {worker} lost a unit it was not running")
        self.attempts[lease.unit.unit_id] = lease.attempt
        self.worker_gone(worker)  # its reserved unit back first, so a retry goes before it
        decision = self._on_failure[kind](lease, error)
        self._replan_if_idle(self.scenes[lease.scene_id])
        return decision

    def _retry_or_give_up(self, lease: Lease, error: str) -> Decision:
        scene = self.scenes[lease.scene_id]
        if scene.replan is not None:  # being re-planned smaller: this unit is not retried
            return Shrink(lease, scene.replan)
        if lease.attempt < self.max_attempts:
            self.queue.appendleft(lease.unit)
            return Retry(lease)
        return GiveUp(lease, f"{lease.unit.describe()} failed: its worker died on each of "
                             f"{lease.attempt} attempts (max_attempts); last error: {error}")

    def _shrink_or_retry(self, lease: Lease, error: str) -> Decision:
        """Out of memory: mark the scene for a plan in chunks of half the unit's frames and
        drop its queued and reserved units; a unit that cannot shrink is retried."""
        unit, scene = lease.unit, self.scenes[lease.scene_id]
        size = len(unit.frames()) // 2
        if self.planner is None or unit.kind == "assemble" or size <= self.chunk_overlap or size < 2:
            return self._retry_or_give_up(lease, error)
        scene.replan = min(size, scene.replan or size)
        self.queue = collections.deque(u for u in self.queue if u.scene_id != lease.scene_id)
        for state in self._workers.values():
            if state.reserved is not None and state.reserved.scene_id == lease.scene_id:
                state.reserved = None
        return Shrink(lease, scene.replan)

    def _replan_if_idle(self, scene: SceneState) -> None:
        """Queue the scene's smaller plan once none of its units runs (see the module doc)."""
        sid = scene.scene.scene_id
        if scene.replan is None:
            return
        if scene.over:
            scene.replan = None
            return
        if any(w.current is not None and w.current.scene_id == sid for w in self._workers.values()):
            return
        size, scene.replan = scene.replan, None
        units = self.planner(scene.scene, size)
        for key in [k for k in self.attempts if k == sid or k.startswith(f"{sid}#")]:
            del self.attempts[key]  # a new plan: its units start at attempt 1
        chunks = [u for u in units if u.kind == "chunk"]
        scene.waiting_chunks = {u.chunk_index for u in chunks}
        scene.assemble = assemble_unit(scene.scene, len(chunks)) if chunks else None
        self.queue.extendleft(reversed(units))  # started scenes first
        self._replans.append(Replanned(sid, size, tuple(units)))

    def take_replans(self) -> list[Replanned]:
        """The re-plans queued since the last call (the driver clears the replaced chunks)."""
        out, self._replans = self._replans, []
        return out

    def scene_failed(self, record: SceneRecord) -> Optional[SceneRecord]:
        """Mark the record's scene failed (its queued units are dropped); returns the record,
        or None when the scene was already over."""
        scene = self.scenes[record.scene_id]
        if scene.over:
            return None
        scene.failed = True
        self.records[record.scene_id] = record
        return record
