"""Ray job entry point: the same job as ``httm-dist run``, for ``ray job submit``.

    ray job submit --working-dir . -- python jobs/reconstruct.py \
        --config configs/vggt1b-httm-gpu.yaml --set input=s3://bucket/scenes

Every option after ``--config`` is one of ``httm-dist run`` (``--set KEY=VALUE``,
``--no-progress``, ``-v``, ``-q``, ``--debug-libraries``) and is passed to it unchanged, so the
two never drift apart. Inside a Ray job ``RAY_ADDRESS`` is set, so the driver joins the job's
cluster (unless the config names ``ray.address``). Exit status as ``httm-dist run``: 0 all
scenes done, 1 some failed, 2 configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from httm_dist.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Runs ``httm-dist run CONFIG [options]`` for ``--config CONFIG [options]``; returns its
    exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other options are those of `httm-dist run` (see `httm-dist run --help`): "
        "--set KEY=VALUE (repeatable), --no-progress, -v, -q, --debug-libraries.",
    )
    parser.add_argument("--config", required=True, help="job config YAML (see configs/)")
    args, rest = parser.parse_known_args(argv)
    return cli_main(["run", args.config, *rest])


if __name__ == "__main__":
    sys.exit(main())
