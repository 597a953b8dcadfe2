"""Merging fidelity benchmark: dense vs uniform vs httm on the same scenes and weights.

Locally:    python jobs/eval_merging.py --scenes 2 --frames 8
On Ray:     ray job submit --working-dir . -- python jobs/eval_merging.py --ray --frames 32
Real data:  python jobs/eval_merging.py --gt-scene s3://bucket/scene --width 518 --preset vggt-1b --weights ...

The options are exactly those of ``httm-dist eval`` (see ``httm-dist eval --help``) plus
``--ray``: run the benchmark inside one Ray task that asks for a GPU when the cluster has one,
so the timings are the GPU's. Prints a markdown table (columns: docs/evaluation.md).
"""

from __future__ import annotations

import sys


def _eval(argv: list[str]) -> int:
    from httm_dist.cli import main as cli_main

    return cli_main(["eval", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ray" not in argv:
        return _eval(argv)
    argv.remove("--ray")
    import os

    import ray

    # The job's cluster under `ray job submit` (RAY_ADDRESS), else a private local Ray: never
    # another job's cluster that happens to run on this machine.
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", ignore_reinit_error=True)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return ray.get(ray.remote(num_gpus=gpus)(_eval).remote(argv))


if __name__ == "__main__":
    sys.exit(main())
