"""The ``httm-dist`` command: ``run``, ``demo``, ``eval``, ``preview`` and ``export``.

Thin on purpose: it parses arguments, sets up logging, calls the package, and turns the
outcome into an exit status:

- 0: every scene is done;
- 1: the job ran but some scenes failed (their errors are in the summary and the records);
- 2: the configuration (or a storage URL it names) is wrong, and nothing was processed; or
  storage refused a read or write outside any scene. One clear line on stderr, no traceback.
- 130 / 143: interrupted (Ctrl-C) / stopped by SIGTERM; ``run`` resumes when rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from httm_dist.errors import ConfigError, StorageError
from httm_dist.storage import install_log_redaction, redact

log = logging.getLogger("httm_dist.cli")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


# --------------------------------------------------------------------------- commands


def _cmd_run(args: argparse.Namespace) -> int:
    from httm_dist.config import load_config  # deferred (torch): keeps --help fast

    cfg = load_config(args.config, args.set)
    return _run_and_report(cfg, progress=args.progress)


def _run_and_report(cfg: Any, progress: bool) -> int:
    """Run the job on Ray and print its summary; exit status 0 all done, 1 some failed."""
    import httm_dist.cluster.driver as driver  # deferred (Ray, torch): keeps --help fast

    summary = driver.run_job(cfg, progress=progress)
    kept = summary.get("not_retried", 0)
    print(
        f"run {summary.get('run_id')}: {summary.get('done', 0)} done, {summary.get('failed', 0)} "
        f"failed, {summary.get('skipped', 0)} already committed"
        + (f", {kept} failed in earlier runs and not retried (retry_failed: false)" if kept else "")
        + f"; {summary.get('frames', 0)} frames in {summary.get('seconds', 0):.1f} s"
    )
    from httm_dist.pipeline.unit import failure_line  # loaded by the driver already

    for failure in summary.get("failures", []):
        sid = str(failure.get("scene_id"))
        print(f"  {failure_line(f'scene {sid!r}', sid, str(failure.get('error')))}")
    if summary.get("summary_url"):
        print(f"summary: {summary['summary_url']}")
    return EXIT_OK if not summary.get("failed") else EXIT_FAILED


def _cmd_demo(args: argparse.Namespace) -> int:
    # deferred (torch): keeps --help fast
    from httm_dist.config import demo_config
    from httm_dist.eval.synthetic import make_synthetic_dataset
    from httm_dist.model.config import PRESETS, preset_weights

    root = Path(args.root).resolve()
    cfg = demo_config(root, args.set)
    if not (cfg.model.weights or preset_weights(cfg.model.preset)):
        log.warning(
            "DEMO WITH UNTRAINED WEIGHTS: preset '%s' ships no trained weights, so the model is "
            "randomly initialised and its cameras, depth and points are MEANINGLESS. The demo "
            "shows the pipeline (discovery, Ray workers, merging, outputs), not reconstruction "
            "quality. For real geometry use trained weights (--set model.weights=... or "
            "configs/vggt1b-httm-gpu.yaml).",
            cfg.model.preset,
        )
    _demo_dataset(Path(cfg.input), make_synthetic_dataset, num_scenes=args.scenes,
                  num_frames=args.frames, height=args.height, width=args.width, seed=args.seed)
    status = _run_and_report(cfg, progress=args.progress)
    print(demo_next_steps(cfg.output, cfg.input, first="scene_000"))
    return status


DEMO_CONFIG = Path("configs") / "local-tiny-demo.yaml"
DEMO_PARAMS = "_demo.json"  # under the demo's scenes folder; names starting with _ are no scene


def _demo_dataset(folder: Path, make: Any, **params: Any) -> None:
    """Write the demo's synthetic scenes under ``folder``, unless the same ``params`` wrote
    them already (a rerun then finds its scenes committed). Other params replace the old
    scenes whole, so no frame of an earlier, longer demo stays behind; the job then sees the
    changed inputs and reprocesses them."""
    marker = folder / DEMO_PARAMS
    if marker.is_file():
        if json.loads(marker.read_text()) == params:
            log.info("demo: reusing the synthetic scenes under %s (same parameters)", folder)
            return
        shutil.rmtree(folder)
    log.info("demo: writing %d synthetic scenes of %d frames (%dx%d) under %s",
             params["num_scenes"], params["num_frames"], params["width"], params["height"], folder)
    make(str(folder), **params)
    marker.write_text(json.dumps(params))


def command_path(name: str) -> str:
    """How to call ``name`` (``python``, ``httm-dist``) of the Python running this, as a shell
    word that works in a fresh shell without an activated virtual environment: the file
    beside ``sys.executable`` (``.venv/bin/httm-dist`` relative to the current folder when it
    lies below it, else absolute). Without an ``httm-dist`` script there (run via
    ``python -m``), ``<python> -m httm_dist.cli``."""
    python = Path(sys.executable)
    target = python if name == "python" else python.parent / name
    if name != "python" and not target.exists():
        return f"{command_path('python')} -m httm_dist.cli"
    try:
        shown = os.path.relpath(target) if target.is_absolute() else str(target)
    except ValueError:  # another drive (Windows)
        shown = str(target)
    if shown.startswith(".."):
        shown = str(target.absolute())
    elif not shown.startswith((".", "/")):
        shown = f"./{shown}" if "/" not in shown else shown
    return shlex.quote(shown)


def _shell_quote(code: str) -> str:
    """``code`` as one shell word, in double quotes when that needs no escaping (readable:
    the Python inside keeps its single quotes), else :func:`shlex.quote`."""
    if any(c in code for c in '"$`\\!'):
        return shlex.quote(code)
    return f'"{code}"'


def demo_next_steps(output: str, input_url: str, first: str) -> str:
    """What the demo prints after its run: the output layout and commands that read it, each
    runnable as printed in a fresh shell (no activated venv; see :func:`command_path`)."""
    py, cli = command_path("python"), command_path("httm-dist")
    frames = f"{output}/frames"
    pandas_read = (f"import pandas as pd; df = pd.read_parquet({frames!r}); "
                   f"print(df[['scene_id', 'frame_index', 'depth_median']])")
    results_read = (f"import httm_dist.results as r; res = r.open({output!r}); "
                    f"print(res.scene_ids); print(res.arrays({first!r})['depth'].shape)")
    lines = [
        f"\noutputs: {output}",
        "  frames/   per-frame Parquet, one file per scene (pandas, pyarrow, DuckDB, Polars)",
        "  arrays/   per-scene NPZ: depth, depth_conf, world_points, world_points_conf, "
        "extrinsic, intrinsic, frame_uris, frame_indices",
        "  scenes/   per-scene records (done/failed, timings, config hashes, input fingerprints)",
        "  runs/     run summaries",
        "read them:",
        f"  {py} -c {_shell_quote(pandas_read)}",
        f"  {py} -c {_shell_quote(results_read)}",
        f"  {cli} preview {shlex.quote(output)} {first}    # PNG contact sheet + PLY point cloud",
    ]
    if DEMO_CONFIG.is_file():
        lines += [
            f"the same job from its config file ({DEMO_CONFIG}; point input/output at your scenes):",
            f"  {cli} run {DEMO_CONFIG} --set input={shlex.quote(input_url)} "
            f"--set output={shlex.quote(output)}",
        ]
    return "\n".join(lines)


def add_eval_arguments(p: argparse.ArgumentParser, ground_truth: bool = False) -> None:
    """The options of ``httm-dist eval`` (merging fidelity on synthetic scenes); with
    ``ground_truth`` also ``--gt-scene``, ``--storage-options`` and ``--point-source``."""
    p.add_argument("--scenes", type=int, default=2, help="synthetic scenes (default 2)")
    p.add_argument("--frames", type=int, default=8, help="frames per scene (default 8)")
    p.add_argument("--height", type=int, default=98, help="image height, multiple of 14 (default 98)")
    p.add_argument("--width", type=int, default=126, help="image width, multiple of 14 (default 126: tiny-synthetic was trained at 98x126)")
    p.add_argument("--preset", default="tiny-synthetic", help="model preset (default tiny-synthetic, the shipped trained model)")
    p.add_argument("--weights", default=None, help="weights path/URL (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument(
        "--strategy", action="append", default=None, metavar="NAME:KEY=VALUE,...",
        help="a merge config to compare, e.g. 'httm q0.3:strategy=httm,q_keep=0.3,kv_keep=0.3' "
        "(repeatable; dense is always included; default: dense, uniform and httm at two ratios)",
    )
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    if ground_truth:
        p.add_argument(
            "--gt-scene", action="append", default=None, metavar="URL",
            help="a ground-truth scene folder (docs/evaluation.md) instead of synthetic scenes "
            "(repeatable; its first --frames frames, preprocessed to --width)",
        )
        p.add_argument("--storage-options", default=None,
                       help="fsspec options (YAML/JSON) for --gt-scene URLs")
        p.add_argument("--point-source", choices=("world_points", "depth"), default="world_points",
                       help="points evaluated: the point head's, or depth unprojected")


def parse_strategy(text: str) -> tuple[str, dict]:
    """``"name:strategy=httm,q_keep=0.3"`` -> ``("name", {"strategy": "httm", "q_keep": 0.3})``."""
    name, sep, body = text.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"--strategy '{text}' must look like NAME:strategy=httm,q_keep=0.3")
    fields: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--strategy '{text}': '{item}' must be KEY=VALUE")
        fields[key.strip()] = yaml.safe_load(value)
    from httm_dist.merging import MergeConfig  # deferred (torch): keeps --help fast

    try:
        MergeConfig.from_dict(fields)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--strategy '{text}': {exc}") from None
    return name.strip(), fields


def _cmd_eval(args: argparse.Namespace) -> int:
    # deferred (torch): keeps --help fast
    from httm_dist.eval.fidelity import format_table, run_fidelity
    from httm_dist.model.config import PATCH_SIZE

    for name in ("height", "width"):
        if getattr(args, name) % PATCH_SIZE:
            raise ConfigError(f"--{name} must be a multiple of {PATCH_SIZE}, got {getattr(args, name)}")
    strategies = [parse_strategy(s) for s in args.strategy] if args.strategy else None
    rows = run_fidelity(
        num_scenes=args.scenes, num_frames=args.frames, height=args.height, width=args.width,
        preset=args.preset, weights=args.weights, strategies=strategies, seed=args.seed,
        device=args.device, point_source=args.point_source, gt_scenes=args.gt_scene,
        storage_options=_storage_options(args.storage_options),
    )
    source = (f"{len(args.gt_scene)} ground-truth scenes" if args.gt_scene
              else f"{args.scenes} synthetic scenes at {args.width}x{args.height}")
    print(
        f"fidelity: {source} x {args.frames} frames, preset {args.preset}, "
        f"weights {args.weights or 'preset default (random if none)'}\n"
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return EXIT_OK


def _cmd_preview(args: argparse.Namespace) -> int:
    from httm_dist.pipeline.preview import write_scene_preview  # deferred (torch, via the pipeline package)

    options: dict = {}
    if args.config:
        from httm_dist.config import load_config  # deferred (torch): keeps --help fast

        options = load_config(args.config).storage_options
    options = {**options, **_storage_options(args.storage_options)}
    try:
        paths = write_scene_preview(args.output_url, args.scene, options)
    except (KeyError, FileNotFoundError) as exc:
        raise ConfigError(str(exc.args[0] if exc.args else exc)) from None
    for kind, url in paths.items():
        print(f"{kind}: {url}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from httm_dist.export import export_scenes  # deferred (numpy, plyfile): keeps --help fast

    options = _storage_options(args.storage_options)
    to_options = _storage_options(args.to_storage_options) if args.to_storage_options else None
    result = export_scenes(
        args.output_url, args.to, args.format, scene_ids=args.scene, conf_percentile=args.conf_percentile,
        max_points=args.max_points, text=args.text, image_mode=args.image_mode,
        storage_options=options, to_storage_options=to_options,
    )
    for sid, url in result["exported"].items():
        print(f"{sid}: {url}")
    for sid, error in result["failed"].items():
        print(f"  failed: {sid}: {error}")
    return EXIT_OK if not result["failed"] else EXIT_FAILED


def _storage_options(text: Optional[str]) -> dict:
    """``--storage-options`` (YAML or JSON mapping) -> dict; empty when not given."""
    if not text:
        return {}
    try:
        options = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--storage-options is not valid YAML/JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ConfigError("--storage-options must be a mapping, e.g. '{anon: true}'")
    return options


# --------------------------------------------------------------------------- parsing


def _add_logging(p: argparse.ArgumentParser, top: bool) -> None:
    default = 0 if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more logging (DEBUG) from httm-dist itself; libraries stay at INFO")
    p.add_argument("-q", "--quiet", action="count", default=default, help="less logging (WARNING)")
    p.add_argument("--debug-libraries", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="DEBUG logging from third-party libraries too (botocore, s3fs, ray...); "
                   "secrets are redacted, but the output is long")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress", dest="progress", action="store_false",
        help="no progress bar (log lines only)",
    )


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, dotted, value parsed as YAML (repeatable), e.g. "
        "--set merging.q_keep=0.4 --set workers=2",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="httm-dist",
        description="Batch 3D reconstruction with VGGT + HTTM token merging on Ray.",
    )
    _add_logging(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run (or resume) a job from a YAML config")
    p.add_argument("config", help="job config YAML (see configs/)")
    _add_set(p)
    _add_progress(p)
    _add_logging(p, top=False)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="make a small synthetic dataset and run the whole pipeline")
    p.add_argument("--root", default="httm-demo", help="demo folder (default ./httm-demo)")
    p.add_argument("--scenes", type=int, default=3, help="synthetic scenes (default 3)")
    p.add_argument("--frames", type=int, default=8, help="frames per scene (default 8)")
    p.add_argument("--height", type=int, default=126, help="image height (default 126)")
    p.add_argument("--width", type=int, default=168, help="image width (default 168)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    _add_set(p)
    _add_progress(p)
    _add_logging(p, top=False)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("eval", help="merging fidelity: dense vs uniform vs httm on synthetic scenes")
    add_eval_arguments(p, ground_truth=True)
    _add_logging(p, top=False)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("preview", help="PNG contact sheet + PLY point cloud of a finished scene")
    p.add_argument("output_url", help="the job's output URL/path")
    p.add_argument("scene", help="scene id")
    p.add_argument("--config", default=None, help="take storage_options from this job config")
    p.add_argument("--storage-options", default=None, help="fsspec options as YAML/JSON")
    _add_logging(p, top=False)
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser("export", help="committed scenes as COLMAP sparse models or nerfstudio datasets")
    p.add_argument("output_url", help="the job's output URL/path")
    p.add_argument("--format", required=True, choices=("colmap", "nerfstudio"))
    p.add_argument("--to", required=True, help="destination URL/path; one folder per scene")
    p.add_argument("--scene", nargs="+", action="extend", default=None, metavar="ID",
                   help="scene ids (default: every committed scene)")
    p.add_argument("--conf-percentile", type=float, default=50.0,
                   help="per frame, keep depth pixels at or above this confidence percentile (default 50)")
    p.add_argument("--max-points", type=int, default=200_000, help="points per scene at most (default 200000)")
    p.add_argument("--text", action="store_true", help="COLMAP text files instead of binary")
    p.add_argument("--image-mode", choices=("crop", "pad"), default=None,
                   help="the job's image.mode, when an older output cannot tell (portrait photos in square inputs)")
    p.add_argument("--storage-options", default=None, help="fsspec options (YAML/JSON) for the results and images")
    p.add_argument("--to-storage-options", default=None, help="fsspec options for --to (default: --storage-options)")
    _add_logging(p, top=False)
    p.set_defaults(func=_cmd_export)
    return parser


#: Third-party loggers that say something at INFO for every scene: fsspec's ``tar`` logs
#: "Inferred compression None from file name ..." for each archive. WARNING unless
#: ``--debug-libraries``.
CHATTY_LIBRARY_LOGGERS = ("tar",)


def setup_logging(verbose: int = 0, quiet: int = 0, debug_libraries: bool = False) -> None:
    """INFO by default; ``-v`` DEBUG for httm-dist's own loggers only; ``-q`` WARNING (``-qq``
    ERROR) for all. Third-party loggers (botocore prints credentials at DEBUG) go to DEBUG
    only with ``debug_libraries``. Every handler of the root logger redacts secrets."""

    level = logging.INFO + 10 * (min(quiet, 2) - min(verbose, 1))
    root_level = logging.DEBUG if debug_libraries else max(level, logging.INFO)
    root = logging.getLogger()
    if root.handlers:  # embedded (tests, notebooks): keep their handlers, set the level only
        root.setLevel(root_level)
    else:
        logging.basicConfig(level=root_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httm_dist").setLevel(level)
    for name in CHATTY_LIBRARY_LOGGERS:  # back to the root's level with --debug-libraries
        logging.getLogger(name).setLevel(logging.NOTSET if debug_libraries else max(level, logging.WARNING))
    install_log_redaction(root)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``httm-dist``; returns the exit status (see the module doc)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    setup_logging(args.verbose, args.quiet, args.debug_libraries)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"httm-dist: configuration error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except (StorageError, OSError) as exc:  # OSError: a file or server refused outside any scene
        print(f"httm-dist: storage error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (cluster.jobenv.JobStopped)
        how, status = getattr(exc, "how", "interrupted"), getattr(exc, "exit_status", 130)
        resume = ("; committed scenes are kept: rerun the same command to resume"
                  if args.command in ("run", "demo") else "")
        print(f"httm-dist: {how}{resume}", file=sys.stderr)
        return int(status)


def _one_line(exc: BaseException) -> str:
    return " ".join(redact(str(exc)).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
