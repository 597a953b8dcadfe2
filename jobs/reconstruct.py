"""Ray job entry point: the same job as ``httm-dist run``, for ``ray job submit``.

    ray job submit --working-dir . -- python jobs/reconstruct.py \
        --config configs/vggt1b-httm-gpu.yaml --set input=s3://bucket/scenes

Inside a Ray job ``RAY_ADDRESS`` is set, so the driver joins the job's cluster (unless the
config names ``ray.address``). Exit status as ``httm-dist run``: 0 all scenes done, 1 some
failed, 2 configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from httm_dist.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job config YAML (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, value parsed as YAML (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging from httm-dist (libraries stay at INFO)")
    args = parser.parse_args(argv)
    forwarded = ["run", args.config]
    for item in args.set:
        forwarded += ["--set", item]
    if args.no_progress:
        forwarded.append("--no-progress")
    if args.verbose:
        forwarded.append("-v")
    return cli_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
