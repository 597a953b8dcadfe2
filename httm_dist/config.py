"""The job's configuration: one typed tree, loaded from YAML plus dotted ``--set`` overrides.

Everything a job needs is decided here, before any work starts: a wrong key, a wrong type or
an impossible value raises :class:`~httm_dist.errors.ConfigError` naming the dotted key (with
a "did you mean" suggestion for typos), so an overnight run never dies an hour in on a typo.

``load_config(path_or_dict, overrides)`` builds a :class:`JobConfig`; ``validate_resources``
then checks the outside world (weights file, input URL, output URL) separately, because tests
and ``configs/`` validation must be able to parse a config without touching storage.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from httm_dist.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

PATCH_SIZE = 14


@dataclass
class ModelSection:
    """Which VGGT to run and where its weights live."""

    preset: str = "vggt-1b"
    """A name from ``VGGTConfig.preset_names()`` (e.g. ``vggt-1b``, ``tiny``)."""
    weights: Optional[str] = None
    """Local path or fsspec URL of a ``.safetensors``/``.pt`` checkpoint; null = the preset's
    shipped weights, or random initialisation when it ships none."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` = CUDA when the worker sees a GPU, else CPU."""


@dataclass
class ImageSection:
    """Preprocessing, as in the official VGGT ``load_and_preprocess_images``."""

    mode: Literal["crop", "pad"] = "crop"
    size: int = 518
    """Target width (crop) or longest side (pad), a multiple of 14."""


@dataclass
class ChunkSection:
    """Long scenes: overlapping chunks run as independent units, then aligned (Sim(3))."""

    max_frames: Union[int, Literal["auto"], None] = None
    """Frames per forward pass; a scene at or under it runs whole. null = never chunk.
    ``auto``: the most frames one worker's free GPU memory fits, from the memory model with a
    safety margin (``httm_dist.pipeline.memory``); a fixed 64 on CPU workers."""
    overlap: int = 30
    """Frames shared by consecutive chunks (alignment is estimated on them)."""
    residual_threshold: float = 0.05
    """A chunk pair whose weighted median alignment residual (units of the scene's extent, as
    reported by ``pipeline.align``) exceeds this is flagged in the scene record."""
    min_inlier_fraction: float = 0.5
    """A pair whose alignment keeps fewer inliers than this is flagged too."""
    points_source: Literal["depth", "point_head"] = "depth"
    """Points aligned on the overlap: depth unprojected with the predicted cameras (weighted by
    depth_conf), or the point head's world_points (weighted by world_points_conf)."""
    max_points: int = 100_000
    """At most this many overlap pixels (seeded random sample) per chunk pair."""
    align_options: dict = field(default_factory=dict)
    """Extra keyword options of ``pipeline.align.robust_sim3`` (loss, threshold, iters,
    ransac, inlier_threshold, ...)."""


@dataclass
class RaySection:
    """Where the Ray cluster is."""

    address: Optional[str] = None
    """null = start a local Ray (or join the job's cluster when ``RAY_ADDRESS`` is set, as
    inside ``ray job submit``); otherwise e.g. ``ray://head:10001`` or ``auto``."""


def _default_merging() -> Any:
    from httm_dist.merging import MergeConfig

    return MergeConfig()


@dataclass
class JobConfig:
    """The whole job. Build it with :func:`load_config`; never mutate it after validation."""

    input: str = ""
    """Scenes root (folder/prefix of scene folders or .tar/.zip archives) or a manifest
    (Parquet/CSV/JSONL), as a local path or fsspec URL."""
    output: str = ""
    """Output root (local path or fsspec URL)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options (credentials, endpoint), passed on the driver and every worker."""
    model: ModelSection = field(default_factory=ModelSection)
    merging: Any = field(default_factory=_default_merging)
    """A ``httm_dist.merging.MergeConfig``."""
    workers: Optional[int] = None
    """Number of worker actors; null = one per cluster GPU (or 1 CPU worker if none)."""
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_attempts: int = 3
    """Attempts per unit of work before a scene is recorded as failed (worker deaths)."""
    frame_stride: int = 1
    max_frames: Optional[int] = None
    """Keep at most this many frames per scene (after the stride); null = all."""
    min_frames: int = 1
    """A scene with fewer frames fails with a clear error."""
    include: list[str] = field(default_factory=list)
    """Glob patterns on scene ids; empty = all scenes."""
    exclude: list[str] = field(default_factory=list)
    image: ImageSection = field(default_factory=ImageSection)
    output_dtype: Literal["float16", "float32"] = "float16"
    """dtype of the dense maps in the NPZ files."""
    on_config_change: Literal["refuse", "reprocess"] = "refuse"
    """When committed scenes were made with another model/merge config: stop, or redo them."""
    retry_failed: bool = True
    """On a rerun, retry scenes recorded as failed (false: keep their failure records)."""
    chunk: ChunkSection = field(default_factory=ChunkSection)
    ray: RaySection = field(default_factory=RaySection)
    preview: bool = False
    """Write a PNG contact sheet and a PLY point cloud next to each scene's NPZ."""

    def to_dict(self, redacted: bool = False) -> dict:
        """Plain nested dict (YAML/JSON-able) that :func:`load_config` turns back into an equal
        config. ``redacted=True`` hides credentials in ``storage_options`` (for logs/records)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "merging":
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = copy.deepcopy(value)
        if redacted:
            from httm_dist.storage import redact

            out["storage_options"] = redact(out["storage_options"])
        return out

    def model_hash(self) -> str:
        """sha256 of everything that decides the model's outputs except merging: the preset's
        architecture, the weights URL and the preprocessing (mode, size)."""
        from httm_dist.model import VGGTConfig

        return _hash(
            {
                "preset": self.model.preset,
                "architecture": VGGTConfig.preset(self.model.preset).to_dict(),
                "weights": self.model.weights,
                "image": dataclasses.asdict(self.image),
            }
        )

    def merge_hash(self) -> str:
        """sha256 of the merge config (canonical JSON)."""
        return _hash(self.merging.to_dict())


def model_hash(cfg: JobConfig) -> str:
    """Function form of :meth:`JobConfig.model_hash`."""
    return cfg.model_hash()


def merge_hash(cfg: JobConfig) -> str:
    """Function form of :meth:`JobConfig.merge_hash`."""
    return cfg.merge_hash()


def _hash(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- loading


def load_config(
    path_or_dict: Union[str, Path, Mapping[str, Any]], overrides: Sequence[str] = ()
) -> JobConfig:
    """Build and validate a :class:`JobConfig` from a YAML file (or a dict) plus ``key=value``
    overrides (dotted keys, values parsed as YAML scalars: ``merging.q_keep=0.4``,
    ``workers=2``, ``model.weights=null``, ``include=[a*,b*]``).

    Raises ConfigError naming the offending key. Touches no storage (see
    :func:`validate_resources`).
    """
    if isinstance(path_or_dict, Mapping):
        data = copy.deepcopy(dict(path_or_dict))
    else:
        data = _read_yaml(path_or_dict)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    cfg = _build(JobConfig, data, "")
    _check_semantics(cfg)
    return cfg


def _read_yaml(path: Union[str, Path]) -> dict:
    text: str
    try:
        if "://" in str(path):
            import fsspec

            with fsspec.open(str(path), "r") as fh:
                text = fh.read()
        else:
            text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found: check the path") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must be a YAML mapping of keys (input:, output:, ...), "
            f"got {type(data).__name__}"
        )
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"merging.q_keep=0.4"`` -> ``("merging.q_keep", 0.4)`` (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. workers=2")
    if any(not part for part in key.split(".")):
        raise ConfigError(f"override key '{key}' has an empty part; use e.g. merging.q_keep=0.4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
    return key, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set '{key}': '{where}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _unknown_key(dotted: str, valid: Sequence[str], prefix: str) -> ConfigError:
    name = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    return ConfigError(
        f"unknown config key '{dotted}'{hint} (valid keys in {section}: {', '.join(sorted(valid))})"
    )


_SECTIONS = (ModelSection, ImageSection, ChunkSection, RaySection, JobConfig)


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate section ``cls`` from ``data``, type-checking each field."""
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{where}' must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(f"{prefix}{key}", list(fields), prefix)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in fields:
        if name not in data:
            continue
        dotted = f"{prefix}{name}"
        if name == "merging" and cls is JobConfig:
            kwargs[name] = _build_merging(data[name], dotted)
        else:
            kwargs[name] = _coerce(hints[name], data[name], dotted)
    return cls(**kwargs)


def _build_merging(data: Any, dotted: str) -> Any:
    from httm_dist.merging import MergeConfig

    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{dotted}' must be a mapping of MergeConfig fields, got {data!r}")
    if dataclasses.is_dataclass(MergeConfig):
        valid = [f.name for f in dataclasses.fields(MergeConfig)]
        for key in data:
            if key not in valid:
                raise _unknown_key(f"{dotted}.{key}", valid, f"{dotted}.")
    try:
        return MergeConfig.from_dict(dict(data))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid '{dotted}': {exc}") from None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list of " + _type_name(typing.get_args(tp)[0])
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"'{dotted}' must be {_type_name(tp)}, got {value!r}")
    if tp in _SECTIONS:
        return _build(tp, value, f"{dotted}.")
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, dotted)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(item_tp, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is dict:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return copy.deepcopy(dict(value))
        raise bad
    raise TypeError(f"config field '{dotted}' has an unsupported type {tp!r}")  # our bug


def _check_semantics(cfg: JobConfig) -> None:
    """Value checks that types alone cannot express; each names the key and the fix."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(bool(cfg.input.strip()), "'input' is required: a scenes root or manifest URL/path")
    need(bool(cfg.output.strip()), "'output' is required: an output URL/path")
    need(cfg.workers is None or cfg.workers >= 1, f"'workers' must be >= 1 or null, got {cfg.workers}")
    need(cfg.gpus_per_worker >= 0, f"'gpus_per_worker' must be >= 0, got {cfg.gpus_per_worker}")
    need(
        cfg.gpus_per_worker <= 1 or cfg.gpus_per_worker.is_integer(),
        f"'gpus_per_worker' above 1 must be a whole number (Ray), got {cfg.gpus_per_worker}",
    )
    need(cfg.cpus_per_worker >= 0, f"'cpus_per_worker' must be >= 0, got {cfg.cpus_per_worker}")
    need(cfg.max_attempts >= 1, f"'max_attempts' must be >= 1, got {cfg.max_attempts}")
    need(cfg.frame_stride >= 1, f"'frame_stride' must be >= 1, got {cfg.frame_stride}")
    need(cfg.max_frames is None or cfg.max_frames >= 1,
         f"'max_frames' must be >= 1 or null, got {cfg.max_frames}")
    need(cfg.min_frames >= 1, f"'min_frames' must be >= 1, got {cfg.min_frames}")
    need(cfg.max_frames is None or cfg.max_frames >= cfg.min_frames,
         f"'max_frames' ({cfg.max_frames}) is below 'min_frames' ({cfg.min_frames}): "
         "every scene would fail")
    size = cfg.image.size
    need(size >= PATCH_SIZE and size % PATCH_SIZE == 0,
         f"'image.size' must be a positive multiple of {PATCH_SIZE} (e.g. 518, 168), got {size}")
    ch = cfg.chunk
    fixed = isinstance(ch.max_frames, int)
    need(ch.max_frames in (None, "auto") or (fixed and ch.max_frames >= 2),
         f"'chunk.max_frames' must be >= 2, auto or null, got {ch.max_frames}")
    need(ch.overlap >= 1, f"'chunk.overlap' must be >= 1 (alignment needs shared frames), "
         f"got {ch.overlap}")
    need(not fixed or ch.overlap < ch.max_frames,
         f"'chunk.overlap' ({ch.overlap}) must be less than 'chunk.max_frames' ({ch.max_frames})")
    need(ch.residual_threshold > 0, f"'chunk.residual_threshold' must be > 0, got "
         f"{ch.residual_threshold}")
    need(0 <= ch.min_inlier_fraction <= 1, "'chunk.min_inlier_fraction' must be in [0, 1], "
         f"got {ch.min_inlier_fraction}")
    need(ch.max_points >= 3, f"'chunk.max_points' must be >= 3, got {ch.max_points}")
    _check_align_options(ch.align_options)
    from httm_dist.model import VGGTConfig

    names = list(VGGTConfig.preset_names())
    if cfg.model.preset not in names:
        close = difflib.get_close_matches(cfg.model.preset, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"'model.preset' is '{cfg.model.preset}', not a known preset{hint} "
            f"(known: {', '.join(names)})"
        )


def _check_align_options(options: dict) -> None:
    """Keys of ``chunk.align_options`` must be keyword options of ``robust_sim3``."""
    import inspect

    from httm_dist.pipeline.align import robust_sim3

    params = inspect.signature(robust_sim3).parameters
    valid = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "seed"]
    for key in options:
        if key not in valid:
            raise _unknown_key(f"chunk.align_options.{key}", valid, "chunk.align_options.")


# --------------------------------------------------------------------------- resources


def validate_resources(cfg: JobConfig) -> None:
    """Check the outside world before any work: the weights file exists, the input is
    reachable and the output is writable. Raises ConfigError (fix the config) or StorageError
    (storage unreachable), each naming the thing and what to do. Credentials never appear."""
    from httm_dist.storage import check_reachable, redact

    weights = cfg.model.weights
    if weights:
        _check_weights(weights, cfg.storage_options, redact)
    check_reachable(cfg.input, cfg.storage_options, for_write=False)
    check_reachable(cfg.output, cfg.storage_options, for_write=True)


def _check_weights(url: str, storage_options: dict, redact: Any) -> None:
    from httm_dist.storage import get_fs

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol == "hf":
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"'model.weights' is '{url}', which needs huggingface_hub: "
                "`pip install huggingface_hub`, or download the file and set model.weights "
                "to its local path or an s3:// URL"
            ) from None
    options = {} if protocol in ("file", "local", "hf") else dict(storage_options)
    try:
        fs, path = get_fs(url, options)
        exists = fs.exists(path) and not fs.isdir(path)
    except Exception as exc:  # noqa: BLE001 - any backend error means "cannot reach it"
        raise StorageError(
            f"cannot reach 'model.weights' at '{url}': {redact(str(exc))}; check the URL, "
            "network access and storage_options"
        ) from None
    if not exists:
        raise ConfigError(
            f"'model.weights' file '{url}' does not exist: fix the path, or set "
            "model.weights: null to use the preset's shipped weights (random if it ships none)"
        )


# --------------------------------------------------------------------------- demo


DEMO_IMAGE_SIZE = 126  # tiny-synthetic was trained at 126 px wide (98x126 from the 4:3 renders)


def demo_preset() -> str:
    """The preset the demo runs: the shipped trained tiny model when this build has it,
    otherwise the random-weight ``tiny``."""
    from httm_dist.model import VGGTConfig

    names = list(VGGTConfig.preset_names())
    return "tiny-synthetic" if "tiny-synthetic" in names else "tiny"


def demo_config(root: Union[str, Path], overrides: Sequence[str] = ()) -> JobConfig:
    """The embedded default job: scenes under ``root/scenes``, results under ``root/output``,
    the shipped trained tiny preset on CPU, local Ray with one CPU worker, small images at the
    width that preset was trained at."""
    root = Path(root)
    data = {
        "input": str(root / "scenes"),
        "output": str(root / "output"),
        "model": {"preset": demo_preset(), "weights": None, "device": "cpu"},
        "workers": 1,
        "gpus_per_worker": 0,
        "cpus_per_worker": 1,
        "image": {"mode": "crop", "size": DEMO_IMAGE_SIZE},
        "ray": {"address": None},
    }
    return load_config(data, overrides)
