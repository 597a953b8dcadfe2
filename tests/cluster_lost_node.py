"""A lost Ray node mid-job, on a real multi-node Ray (issue 4, "Faults: lost node").

Run as a script (``python tests/cluster_lost_node.py WORKDIR``), never imported by the suite:
a process holds one Ray connection and the suite's is taken by ``conftest.ray_session``, so
``tests/test_cluster_lost_node.py`` runs this in a subprocess.

What it does, on this machine:

1. starts a ``ray.cluster_utils.Cluster``: a head node with no GPU (the driver's) and two
   worker nodes with one logical GPU each, so each of the job's two workers gets its own node;
2. writes a few tiny scenes and runs ``run_job`` (tiny model, two workers, max_attempts 3) in
   a thread, with the test-only per-unit delay so a unit is always in flight;
3. once a scene is committed, removes the node of the worker that committed it (that worker
   has just started its next unit), without a graceful shutdown (its raylet and workers are
   killed, as when a machine crashes), then adds a replacement GPU node. Ray's own failure
   detection is left at its defaults: the driver must cope with whichever error Ray raises
   first (the actor unreachable, or its node declared dead);
4. checks that the job completed, every scene once, and that the lost unit was retried.

It prints one JSON object on a stdout line starting with ``RESULT `` and exits 0 when every
check holds, 1 if one fails (the JSON's ``problems`` or ``error`` says which).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "tests" / "fixtures" / "vggt_tiny" / "weights.safetensors"
SCENES, FRAMES, H, W, SIZE = 5, 3, 42, 56, 56
UNIT_DELAY_S = 2.0  # each unit sleeps this long before committing: the node dies meanwhile
TIMEOUT_S = 100.0
#: The result line's prefix (Ray prints its own lines to stdout too, even after it).
RESULT_PREFIX = "RESULT "

log = logging.getLogger("cluster_lost_node")


class LossLog(logging.Handler):
    """Keeps the driver's "worker lost" warnings, with the time each was logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.losses: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("worker lost"):
            self.losses.append((time.monotonic(), message))


def make_scenes(root: Path) -> list[str]:
    """``SCENES`` folders of ``FRAMES`` random PNG frames each; returns their ids."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(SCENES)]
    for sid in ids:
        (root / sid).mkdir(parents=True)
        for f in range(FRAMES):
            img = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / sid / f"frame_{f:02d}.png")
    return ids


def job_config(input_dir: Path, output_dir: Path):
    from httm_dist.config import load_config

    return load_config({
        "input": str(input_dir), "output": str(output_dir),
        "model": {"preset": "tiny", "weights": str(WEIGHTS), "device": "cpu"},
        "image": {"mode": "crop", "size": SIZE},
        "workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 1, "max_attempts": 3,
    })


def wait_for_first_commit(store, job: threading.Thread, deadline: float):
    """The first committed scene's record (None if the job ended or time ran out first)."""
    while time.monotonic() < deadline and job.is_alive():
        committed = store.committed()
        if committed:
            return next(iter(committed.values()))
        time.sleep(0.05)
    return None


def check(output_dir: Path, ids: list[str], summary: dict, removed_node: str) -> list[str]:
    """Everything that must hold after the job; returns the problems (empty: all good)."""
    import httm_dist.results as results

    problems = []
    if summary.get("done") != len(ids) or summary.get("failed") != 0:
        problems.append(f"done {summary.get('done')}, failed {summary.get('failed')}: "
                        f"{summary.get('failures')}")
    reader = results.open(str(output_dir), {})
    records = reader.records()
    if sorted(records) != ids or any(r.get("status") != "done" for r in records.values()):
        problems.append(f"records: { {s: r.get('status') for s, r in records.items()} }")
    table = reader.frames(columns=["scene_id", "frame_index"])
    rows = list(zip(table.column("scene_id").to_pylist(), table.column("frame_index").to_pylist()))
    if sorted(rows) != [(s, f) for s in ids for f in range(FRAMES)]:
        problems.append(f"frame rows are not each scene's frames once: {sorted(rows)}")
    npz = sorted(p.name for p in (output_dir / "arrays").iterdir())
    if npz != [f"{s}.npz" for s in ids]:
        problems.append(f"array files: {npz}")
    retried = {s: r.get("attempts") for s, r in records.items() if (r.get("attempts") or 1) >= 2}
    if summary.get("workers_lost", 0) < 1 or not retried:
        problems.append(f"no lost worker / retried unit: workers_lost "
                        f"{summary.get('workers_lost')}, attempts "
                        f"{ {s: r.get('attempts') for s, r in records.items()} }")
    if any((r.get("worker") or {}).get("node_id") == removed_node and r.get("attempts", 1) >= 2
           for r in records.values()):
        problems.append("a retried unit was committed by the removed node")
    if removed_node not in {w.get("node_id") for w in summary.get("worker_units", [])}:
        problems.append("the removed node hosted none of the job's workers")
    return problems


def main(workdir: Path) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ["HTTM_DIST_TEST_UNIT_DELAY_S"] = str(UNIT_DELAY_S)  # read by the driver
    losses = LossLog()
    logging.getLogger("httm_dist.cluster.driver").addHandler(losses)
    import ray
    from ray.cluster_utils import Cluster

    from httm_dist.cluster.driver import run_job
    from httm_dist.results import ResultStore

    input_dir, output_dir = workdir / "scenes", workdir / "out"
    ids = make_scenes(input_dir)
    cfg = job_config(input_dir, output_dir)
    out: dict = {"ok": False}
    t0 = time.monotonic()
    node_args = {"num_cpus": 1, "num_gpus": 1}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        gpu_nodes = [cluster.add_node(**node_args) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        out["cluster_start_s"] = round(time.monotonic() - t0, 2)

        result: dict = {}

        def job() -> None:
            try:
                result["summary"] = run_job(cfg, progress=False)
            except BaseException as exc:  # noqa: BLE001 - reported in the JSON
                result["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=job, daemon=True)
        t_job = time.monotonic()
        thread.start()
        deadline = t_job + TIMEOUT_S
        first = wait_for_first_commit(ResultStore(str(output_dir), {}), thread, deadline)
        if first is None:
            out["error"] = result.get("error", "no scene was committed before the deadline")
            return _finish(out, 1)
        victim_id = (first.worker or {}).get("node_id")
        victim = next((n for n in gpu_nodes if n.node_id == victim_id), None)
        if victim is None:
            out["error"] = f"scene {first.scene_id} was committed on an unknown node {victim_id}"
            return _finish(out, 1)
        out["first_commit_s"] = round(time.monotonic() - t_job, 2)
        out["removed_node"] = victim_id
        log.info("removing node %s (its worker committed %s)", victim_id, first.scene_id)
        t_removed = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)
        out["node_removed_s"] = round(t_removed - t_job, 2)
        replacement = cluster.add_node(**node_args)
        out["replacement_node"] = replacement.node_id
        out["replacement_added_s"] = round(time.monotonic() - t_job, 2)

        thread.join(max(1.0, deadline - time.monotonic()))
        out["job_s"] = round(time.monotonic() - t_job, 2)
        if thread.is_alive():
            out["error"] = f"the job did not finish within {TIMEOUT_S:.0f} s"
            return _finish(out, 1)
        if "error" in result:
            out["error"] = result["error"]
            return _finish(out, 1)
        summary = result["summary"]
        records = ResultStore(str(output_dir), {}).records()
        out.update(
            done=summary["done"], failed=summary["failed"], workers=summary["workers"],
            workers_lost=summary["workers_lost"], units_run=summary["units_run"],
            attempts={s: r.get("attempts") for s, r in sorted(records.items())},
            committed_on={s: (r.get("worker") or {}).get("node_id") for s, r in
                          sorted(records.items())},
            worker_nodes=[w.get("node_id") for w in summary["worker_units"]],
            replacement_node=replacement.node_id,
            replacement_used=replacement.node_id in {
                (r.get("worker") or {}).get("node_id") for r in records.values()},
            losses=[m for _, m in losses.losses],
            loss_seen_after_s=[round(t - t_removed, 2) for t, _ in losses.losses],
        )
        out["problems"] = check(output_dir, ids, summary, victim_id)
        out["ok"] = not out["problems"]
        return _finish(out, 0 if out["ok"] else 1)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _finish(out: dict, code: int) -> int:
    print(RESULT_PREFIX + json.dumps(out, sort_keys=True), flush=True)
    return code


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/cluster_lost_node.py WORKDIR (an empty directory)")
    sys.exit(main(Path(sys.argv[1])))
