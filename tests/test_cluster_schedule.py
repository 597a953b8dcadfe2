"""The dispatch policy (``httm_dist.cluster.schedule``), Ray-free: one behaviour per test."""

from __future__ import annotations

import pytest

from httm_dist.cluster.schedule import (Assignment, FailureKind, GiveUp, Lease, Retry, SceneState,
                                        Scheduler)
from httm_dist.data import FrameRef, SceneSpec
from httm_dist.pipeline.unit import WorkUnit, assemble_unit
from httm_dist.results import SceneRecord

IDENTITY = {"chunks": 1, "model_hash": "m", "merge_hash": "g", "attempts": 1}


def scene(sid: str, n: int = 2) -> SceneSpec:
    return SceneSpec(sid, f"/in/{sid}", "folder",
                     tuple(FrameRef(f"/in/{sid}/{i}.png", i, f"{i}.png") for i in range(n)))


def done(unit: WorkUnit) -> SceneRecord:
    if unit.kind == "chunk":
        return SceneRecord.chunk_done(unit.scene_id, chunk_index=unit.chunk_index,
                                      frame_range=unit.frame_range, num_frames=2, seconds=1,
                                      timings={}, **IDENTITY)
    return SceneRecord.done(unit.scene_id, unit=unit.kind, num_frames=2, seconds=1, timings={},
                            **IDENTITY)


def failed(unit: WorkUnit) -> SceneRecord:
    return SceneRecord.failed(unit.scene_id, "SceneError: corrupt", unit=unit.kind,
                              num_frames=2, **IDENTITY)


def make(ids=("a", "b", "c"), workers: int = 2, max_attempts: int = 3):
    """A scheduler over whole-scene units of ``ids``, and those units by scene id."""
    units = {sid: WorkUnit(scene(sid)) for sid in ids}
    states = {sid: SceneState(u.scene) for sid, u in units.items()}
    return Scheduler(list(units.values()), states, max_attempts, workers), units


def chunked(n_chunks: int = 3, workers: int = 1):
    """A scheduler over one scene split in ``n_chunks`` chunk units plus its assembly."""
    s = scene("long", n_chunks + 1)
    chunks = [WorkUnit(s, "chunk", i, (i, i + 2), n_chunks) for i in range(n_chunks)]
    state = SceneState(s, waiting_chunks=set(range(n_chunks)), assemble=assemble_unit(s, n_chunks))
    return Scheduler(chunks, {"long": state}, 3, workers), chunks, state


def starts(assignments: list[Assignment]) -> dict[int, str]:
    return {a.worker: a.lease.unit.unit_id for a in assignments if a.action == "start"}


def prefetches(assignments: list[Assignment]) -> dict[int, str]:
    return {a.worker: a.lease.unit.unit_id for a in assignments if a.action == "prefetch"}


def test_no_worker_up_gets_no_work():
    sched, _ = make()
    assert sched.fill() == [] and sched.work_left()


def test_fill_gives_every_idle_worker_a_unit_before_any_prefetch():
    sched, units = make(ids=("a", "b"))
    sched.worker_up(0)
    sched.worker_up(1)
    out = sched.fill()
    assert starts(out) == {0: "a", 1: "b"} and prefetches(out) == {}
    assert [a.lease for a in out] == [Lease(units["a"], 1), Lease(units["b"], 1)]
    assert sched.units_started == 2


def test_busy_worker_reserves_the_next_unit_to_prefetch_and_runs_it_next():
    sched, units = make()
    sched.worker_up(0)
    out = sched.fill()
    assert starts(out) == {0: "a"} and prefetches(out) == {0: "b"}
    assert sched.fill() == []  # nothing changes until a unit ends
    assert sched.unit_finished(0, done(units["a"])).scene_id == "a"
    out = sched.fill()
    assert starts(out) == {0: "b"} and prefetches(out) == {0: "c"}


def test_idle_worker_steals_a_reserved_unit_when_the_queue_is_empty():
    sched, units = make(ids=("a", "b"))
    sched.worker_up(0)
    assert prefetches(sched.fill()) == {0: "b"}
    sched.worker_up(1)  # a late worker: the queue is empty, b is reserved by worker 0
    assert starts(sched.fill()) == {1: "b"}
    assert sched.reserved(0) is None and sched.current(1) == Lease(units["b"], 1)


def test_lost_worker_requeues_its_running_unit_with_the_next_attempt():
    sched, units = make(ids=("a",), workers=1)
    sched.worker_up(0)
    sched.fill()
    decision = sched.unit_failed(0, FailureKind.WORKER_LOST, "RayActorError: died")
    assert decision == Retry(Lease(units["a"], 1))
    assert not sched.any_up() and sched.fill() == []  # the dead worker gets nothing
    sched.worker_up(0)  # its replacement
    assert [a.lease for a in sched.fill()] == [Lease(units["a"], 2)]


def test_lost_worker_gives_its_reserved_unit_back_first_in_line():
    sched, units = make(ids=("a", "b", "c"), workers=2)
    sched.worker_up(0)
    assert prefetches(sched.fill()) == {0: "b"}
    sched.unit_failed(0, FailureKind.WORKER_FAULT, "WorkerFault: out of memory")
    assert list(sched.queue) == [units["a"], units["b"], units["c"]]
    sched.worker_up(1)
    assert starts(sched.fill()) == {1: "a"}


def test_attempt_limit_gives_up_with_the_reason_and_fails_only_that_scene():
    sched, units = make(ids=("a", "b"), workers=1, max_attempts=2)
    for attempt in (1, 2):
        sched.worker_up(0)
        assert [a.lease for a in sched.fill() if a.action == "start"] == [Lease(units["a"], attempt)]
        decision = sched.unit_failed(0, FailureKind.WORKER_LOST, "boom")
    assert isinstance(decision, GiveUp) and decision.lease == Lease(units["a"], 2)
    assert "died on each of 2 attempts" in decision.reason and "boom" in decision.reason
    assert sched.scene_failed(failed(units["a"])) is not None
    sched.worker_up(0)
    assert starts(sched.fill()) == {0: "b"}
    sched.unit_finished(0, done(units["b"]))
    assert not sched.work_left() and {s: r.status for s, r in sched.records.items()} == {
        "a": "failed", "b": "done"}


def test_replaced_worker_that_never_came_up_returns_nothing():
    sched, _ = make(ids=("a",), workers=1)
    sched.worker_gone(0)  # its actor died before its model loaded
    sched.worker_up(0)
    assert starts(sched.fill()) == {0: "a"}


def test_worker_gone_while_running_must_settle_the_unit_first():
    sched, _ = make(ids=("a",), workers=1)
    sched.worker_up(0)
    sched.fill()
    with pytest.raises(RuntimeError, match="unit_failed"):
        sched.worker_gone(0)


def test_failed_record_fails_the_scene_and_drops_its_queued_units():
    sched, chunks, state = chunked(n_chunks=3, workers=1)
    sched.worker_up(0)
    sched.fill()  # chunk 0 runs, chunk 1 reserved
    final = sched.unit_finished(0, failed(chunks[0]))
    assert final is not None and final.is_failed and state.failed
    assert sched.fill() == [] and not sched.work_left()  # chunks 1 and 2 dropped


def test_last_chunk_queues_the_assembly_first_and_its_record_finishes_the_scene():
    sched, chunks, state = chunked(n_chunks=2, workers=1)
    sched.queue.append(WorkUnit(scene("z")))
    state_z = SceneState(scene("z"))
    sched.scenes["z"] = state_z
    sched.worker_up(0)
    sched.fill()  # chunk 0 runs, chunk 1 reserved
    assert sched.unit_finished(0, done(chunks[0])) is None
    sched.fill()  # chunk 1 runs, z reserved
    assert sched.unit_finished(0, done(chunks[1])) is None
    assert list(sched.queue) == [state.assemble]  # queued first; z is already reserved
    sched.fill()  # z (reserved) runs, the assembly is reserved
    assert sched.reserved(0).unit == state.assemble
    sched.unit_finished(0, done(sched.current(0).unit))
    sched.fill()
    final = sched.unit_finished(0, done(state.assemble))
    assert final.scene_id == "long" and state.finished and not sched.work_left()


def test_a_sibling_result_after_the_scene_failed_is_ignored():
    sched, chunks, state = chunked(n_chunks=2, workers=2)
    sched.worker_up(0)
    sched.worker_up(1)
    sched.fill()  # both chunks run
    sched.unit_finished(0, failed(chunks[0]))
    assert sched.unit_finished(1, done(chunks[1])) is None
    assert sched.records["long"].is_failed and not sched.work_left()


def test_max_attempts_below_one_is_refused():
    with pytest.raises(ValueError, match="max_attempts"):
        make(max_attempts=0)


# -- out of memory: re-plan smaller (issue 14) ------------------------------------------------


def _oom_sched(n_frames=10, workers=2, overlap=2):
    """One whole 10-frame scene and a short one; the planner cuts scenes like plan_units."""
    from httm_dist.pipeline.chunks import plan_chunks

    def planner(s, size):
        ranges = plan_chunks(len(s.frames), size, overlap)
        return [WorkUnit(s, "chunk", i, (int(a), int(b)), len(ranges)) for i, (a, b) in enumerate(ranges)]

    units = {"long": WorkUnit(scene("long", n_frames)), "a": WorkUnit(scene("a"))}
    states = {sid: SceneState(u.scene) for sid, u in units.items()}
    return Scheduler(list(units.values()), states, 3, workers, planner=planner, chunk_overlap=overlap), units, states


def test_out_of_memory_re_plans_the_scene_in_half_size_chunks_instead_of_retrying():
    from httm_dist.cluster.schedule import Shrink

    sched, units, states = _oom_sched(workers=1)
    sched.worker_up(0)
    assert starts(sched.fill()) == {0: "long"}  # "a" reserved behind it
    decision = sched.unit_failed(0, FailureKind.OUT_OF_MEMORY, "OutOfMemoryFault: cuda")
    assert decision == Shrink(Lease(units["long"], 1), 5)
    (r,) = sched.take_replans()
    assert r.scene_id == "long" and r.max_frames == 5 and sched.take_replans() == []
    assert [u.frame_range for u in r.units] == [(0, 5), (3, 8), (6, 10)]
    assert states["long"].waiting_chunks == {0, 1, 2} and states["long"].assemble.num_chunks == 3
    # the new chunks run first (a started scene), at attempt 1, then the reserved "a"
    sched.worker_up(0)
    out = sched.fill()
    assert starts(out) == {0: "long#chunk-000"} and prefetches(out) == {0: "long#chunk-001"}
    assert sched.current(0).attempt == 1
    assert [u.unit_id for u in sched.queue] == ["long#chunk-002", "a"]


def test_out_of_memory_waits_for_running_siblings_and_drops_their_results():
    from httm_dist.pipeline.chunks import plan_chunks

    s = scene("long", 10)
    ranges = plan_chunks(10, 6, 2)
    chunks = [WorkUnit(s, "chunk", i, r, len(ranges)) for i, r in enumerate(ranges)]
    state = SceneState(s, waiting_chunks={0, 1}, assemble=assemble_unit(s, 2))
    planner = lambda sc, size: [WorkUnit(sc, "chunk", i, r, 8) for i, r in enumerate(plan_chunks(10, size, 2))]
    sched = Scheduler(chunks, {"long": state}, 3, 2, planner=planner, chunk_overlap=2)
    sched.worker_up(0)
    sched.worker_up(1)
    assert starts(sched.fill()) == {0: "long#chunk-000", 1: "long#chunk-001"}
    sched.unit_failed(0, FailureKind.OUT_OF_MEMORY, "oom")  # chunk 1 still runs: wait
    assert sched.take_replans() == [] and not sched.queue
    assert sched.unit_finished(1, done(chunks[1])) is None  # the old plan's result is moot
    (r,) = sched.take_replans()
    assert r.max_frames == 3 and len(r.units) == 8 and state.waiting_chunks == set(range(8))


def test_out_of_memory_that_cannot_shrink_is_retried_like_a_worker_fault():
    sched, units, states = _oom_sched(n_frames=5, workers=1)  # 5 // 2 = 2 frames <= overlap 2
    sched.worker_up(0)
    sched.fill()
    assert sched.unit_failed(0, FailureKind.OUT_OF_MEMORY, "oom") == Retry(Lease(units["long"], 1))
    assert sched.take_replans() == [] and sched.queue[0] is units["long"]
    no_planner = Scheduler([units["a"]], {"a": SceneState(units["a"].scene)}, 3, 1)
    no_planner.worker_up(0)
    no_planner.fill()
    assert isinstance(no_planner.unit_failed(0, FailureKind.OUT_OF_MEMORY, "oom"), Retry)
