"""The job's configuration: one typed tree, loaded from YAML plus dotted ``--set`` overrides.

Everything a job needs is decided here, before any work starts: a wrong key, a wrong type or
an impossible value raises :class:`~httm_dist.errors.ConfigError` naming the dotted key (with
a "did you mean" suggestion for typos), so an overnight run never dies an hour in on a typo.

``load_config(path_or_dict, overrides)`` builds a :class:`JobConfig`; ``validate_resources``
then checks the outside world (weights file, input URL, output URL) separately, because tests
and ``configs/`` validation must be able to parse a config without touching storage.

The sections are :class:`~httm_dist.configbase.Section` models, so the job config, the
``merging`` section (:class:`~httm_dist.merging.MergeConfig`) and the model architecture
(:class:`~httm_dist.model.VGGTConfig`) share one set of rules (numbers, unknown keys,
messages). To add a key, add one typed line with its default and a docstring under it to
the section it belongs to; limits go in ``Field(ge=...)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import fsspec
import yaml
from pydantic import Field, field_validator, model_validator

from httm_dist.configbase import Invalid, Section, closest
from httm_dist.errors import ConfigError, StorageError
from httm_dist.merging.config import MergeConfig
from httm_dist.model import VGGTConfig
from httm_dist.model.config import PATCH_SIZE, preset_weights
from httm_dist.model.weights import check_weights_file
from httm_dist.storage import check_reachable, get_fs, redact

log = logging.getLogger(__name__)

class AlignOptions(Section):
    """The keyword options of ``pipeline.align.robust_sim3`` that ``chunk.align_options`` may
    set, with the ranges a job accepts. The defaults are the function's (a test keeps the two in
    step); the config keeps only the keys a job sets and passes them on. Named here, not read
    from the function, so that the config does not import the pipeline, which imports the
    config. ``seed`` is not one: the alignment's random sampling is seeded by the pipeline so
    that reruns align the same way."""

    root: ClassVar[str] = "chunk.align_options"

    loss: Literal["cauchy", "huber"] = "cauchy"
    """IRLS loss: ``cauchy`` (redescending, for gross outliers) or ``huber``."""
    threshold: Optional[float] = Field(None, gt=0)
    """IRLS loss scale in units of the scene's extent; null = twice the weighted median
    residual of the current fit (adapts to the noise level)."""
    iters: int = Field(30, ge=1)
    """Most IRLS rounds. At least 1: with none, the alignment would be the unrefined RANSAC
    start (one 3-point fit) or the plain least-squares fit, and the record would not say so."""
    ransac: bool = True
    """Start IRLS from the least-median-of-squares best of ``ransac_hypotheses`` 3-point fits
    and the plain fit (robust to up to 50% outliers); false = from the plain fit."""
    ransac_hypotheses: int = Field(128, ge=1)
    """3-point Sim(3) hypotheses the RANSAC start scores."""
    ransac_sample_points: int = Field(2000, ge=3)
    """Point pairs (random sample) each hypothesis is scored on."""
    inlier_threshold: float = Field(0.05, gt=0)
    """A pair is an inlier when its residual (units of the scene's extent) is below this; the
    share of inliers is compared with ``chunk.min_inlier_fraction``."""
    tol: float = Field(1e-12, ge=0, lt=1)
    """IRLS stops when the transform changes by less than this (relative); 0 = run all
    ``iters`` rounds."""

    @model_validator(mode="before")
    @classmethod
    def _no_seed(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "seed" in data:
            raise Invalid("seed", "cannot be set: the pipeline seeds each alignment so that "
                          "reruns align the same way; remove it")
        return data


ALIGN_OPTIONS = tuple(AlignOptions.model_fields)
"""The names ``chunk.align_options`` may set (the fields of :class:`AlignOptions`)."""


class ModelSection(Section):
    """Which VGGT to run and where its weights live."""

    preset: str = "vggt-1b"
    """A name from ``VGGTConfig.preset_names()`` (e.g. ``vggt-1b``, ``tiny``)."""
    weights: Optional[str] = None
    """Local path or fsspec URL of a ``.safetensors``/``.pt`` checkpoint; null = the preset's
    shipped weights (a preset that ships none needs ``allow_random_weights``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` = CUDA when the worker sees a GPU, else CPU."""
    allow_random_weights: bool = False
    """Run a preset with no weights (neither ``weights`` nor shipped ones) with random
    weights, for benchmarks. Without it such a config is an error: random weights compute
    meaningless cameras, depth and points."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        names = list(VGGTConfig.preset_names())
        if name not in names:
            close = closest(name, names)
            hint = f"; did you mean '{close}'?" if close else ""
            raise Invalid("", f"is '{name}', not a known preset{hint} (known: {', '.join(names)})")
        return name


class ImageSection(Section):
    """Preprocessing, as in the official VGGT ``load_and_preprocess_images``."""

    mode: Literal["crop", "pad"] = "crop"
    size: int = 518
    """Target width (crop) or longest side (pad), a multiple of 14."""
    exif_orientation: bool = True
    """Apply each photo's EXIF orientation (the frame is what viewers show); false ignores it,
    as the official VGGT loader does."""
    max_pixels: Optional[int] = Field(178_956_970, ge=1)
    """Images with more pixels fail (decompression-bomb guard; Pillow's own threshold by
    default); null = no limit."""

    @field_validator("size")
    @classmethod
    def _patch_multiple(cls, size: int) -> int:
        if size < PATCH_SIZE or size % PATCH_SIZE:
            raise Invalid("", f"must be a positive multiple of {PATCH_SIZE} (e.g. 518, 168), got {size}")
        return size


class ChunkSection(Section):
    """Long scenes: overlapping chunks run as independent units, then aligned (Sim(3))."""

    max_frames: Union[Annotated[int, Field(ge=2)], Literal["auto"], None] = None
    """Frames per forward pass; a scene at or under it runs whole. null = never chunk.
    ``auto``: the most frames one worker's free GPU memory fits, from the memory model with a
    safety margin (``httm_dist.pipeline.memory``); a fixed 64 on CPU workers."""
    overlap: int = Field(30, ge=1)
    """Frames shared by consecutive chunks (alignment is estimated on them)."""
    residual_threshold: float = Field(0.05, gt=0)
    """A chunk pair whose weighted median alignment residual (units of the scene's extent, as
    reported by ``pipeline.align``) exceeds this is flagged in the scene record."""
    min_inlier_fraction: float = Field(0.5, ge=0, le=1)
    """A pair whose alignment keeps fewer inliers than this is flagged too."""
    points_source: Literal["depth", "point_head"] = "depth"
    """Points aligned on the overlap: depth unprojected with the predicted cameras (weighted by
    depth_conf), or the point head's world_points (weighted by world_points_conf)."""
    max_points: int = Field(100_000, ge=3)
    """At most this many overlap pixels (seeded random sample) per chunk pair."""
    align_options: dict = Field(default_factory=dict)
    """Keyword options of ``pipeline.align.robust_sim3`` (loss, threshold, iters, ransac,
    ransac_hypotheses, ransac_sample_points, inlier_threshold, tol): see :class:`AlignOptions`
    for each one's meaning, default and range. Checked when the config loads; only the keys
    set here are kept (the others take the function's defaults)."""

    @field_validator("align_options", mode="before")
    @classmethod
    def _null_is_no_options(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("align_options")
    @classmethod
    def _align_options(cls, options: dict) -> dict:
        return AlignOptions.from_dict(options).model_dump(exclude_unset=True)

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> "ChunkSection":
        if isinstance(self.max_frames, int) and self.overlap >= self.max_frames:
            raise Invalid("overlap", f"({self.overlap}) must be less than 'chunk.max_frames' "
                          f"({self.max_frames})")
        return self


class RaySection(Section):
    """Where the Ray cluster is."""

    address: Optional[str] = None
    """null = start a private local Ray for the job (or join the job's cluster when
    ``RAY_ADDRESS`` is set, as inside ``ray job submit``); ``auto`` = join the cluster that
    ``ray start`` runs on this machine; or an address such as ``ray://head:10001``."""


class JobConfig(Section):
    """The whole job. Build it with :func:`load_config`; it is frozen once validated."""

    input: str
    """The scenes root (folder/prefix of scene folders or .tar/.zip archives) or a manifest
    (Parquet/CSV/JSONL), as a local path or fsspec URL."""
    output: str
    """The output root (local path or fsspec URL)."""
    storage_options: dict = Field(default_factory=dict)
    """fsspec options (credentials, endpoint), passed on the driver and every worker."""
    model: ModelSection = ModelSection()
    merging: MergeConfig = MergeConfig()
    """Token merging in the global-attention blocks (``httm_dist.merging.MergeConfig``)."""
    workers: Optional[int] = Field(None, ge=1)
    """Number of worker actors; null = one per cluster GPU (or 1 CPU worker if none)."""
    gpus_per_worker: float = Field(1.0, ge=0)
    """GPUs each worker reserves; above 1 it must be a whole number (Ray)."""
    cpus_per_worker: float = Field(1.0, ge=0)
    max_attempts: int = Field(3, ge=1)
    """Attempts per unit of work before a scene is recorded as failed (worker deaths)."""
    frame_stride: int = Field(1, ge=1)
    max_frames: Optional[int] = Field(None, ge=1)
    """Keep at most this many frames per scene (after the stride); null = all."""
    min_frames: int = Field(1, ge=1)
    """A scene with fewer frames fails with a clear error."""
    include: list[str] = Field(default_factory=list)
    """Glob patterns on scene ids; empty = all scenes."""
    exclude: list[str] = Field(default_factory=list)
    image: ImageSection = ImageSection()
    output_dtype: Literal["float16", "float32"] = "float16"
    """dtype of the depth and point maps in the NPZ files (confidences are always float32)."""
    on_config_change: Literal["refuse", "reprocess"] = "refuse"
    """When committed scenes were made with another model/merge config: stop, or redo them."""
    retry_failed: bool = True
    """On a rerun, retry scenes recorded as failed (false: keep their failure records)."""
    chunk: ChunkSection = ChunkSection()
    ray: RaySection = RaySection()
    preview: bool = False
    """Write a PNG contact sheet and a PLY point cloud next to each scene's NPZ."""

    @field_validator("storage_options", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else copy.deepcopy(value)

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("input", "output")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise Invalid("", "is required and must not be blank")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobConfig":
        if self.gpus_per_worker > 1 and not self.gpus_per_worker.is_integer():
            raise Invalid("gpus_per_worker", f"above 1 must be a whole number (Ray), got {self.gpus_per_worker}")
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise Invalid("max_frames", f"({self.max_frames}) is below 'min_frames' ({self.min_frames}): "
                          "every scene would fail")
        model = self.model
        if not (model.weights or preset_weights(model.preset) or model.allow_random_weights):
            raise Invalid(
                "model.weights",
                f"is not set and preset '{model.preset}' ships no weights, so the model would "
                "run with random weights (meaningless output): set model.weights to its "
                "checkpoint (e.g. hf://facebook/VGGT-1B/model.safetensors), use the trained "
                "'tiny-synthetic' preset, or set model.allow_random_weights: true for a benchmark",
            )
        return self

    def to_dict(self, redacted: bool = False) -> dict:
        """Plain nested dict (YAML/JSON-able) that :func:`load_config` turns back into an equal
        config. ``redacted=True`` hides credentials in ``storage_options`` (for logs/records)."""
        out = super().to_dict()
        if redacted:
            out["storage_options"] = redact(out["storage_options"])
        return out

    def model_hash(self) -> str:
        """sha256 of everything that decides the model's outputs except merging: the preset's
        architecture, the weights URL and the preprocessing (mode, size, EXIF orientation;
        not ``max_pixels``, which only decides whether an image is read)."""
        return _hash(
            {
                "preset": self.model.preset,
                "architecture": VGGTConfig.preset(self.model.preset).to_dict(),
                "weights": self.model.weights,
                "image": self.image.model_dump(mode="json", exclude={"max_pixels"}),
            }
        )

    def merge_hash(self) -> str:
        """sha256 of the merge config (canonical JSON)."""
        return _hash(self.merging.to_dict())


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
    return JobConfig.from_dict(data)


def _read_yaml(path: Union[str, Path]) -> dict:
    text: str
    try:
        if "://" in str(path):
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


# --------------------------------------------------------------------------- resources


def validate_resources(cfg: JobConfig) -> None:
    """Check the outside world before any work: the weights file exists, the input is
    reachable and the output is writable. Raises ConfigError (fix the config) or StorageError
    (storage unreachable), each naming the thing and what to do. Credentials never appear."""
    weights = cfg.model.weights
    if weights:
        _check_weights(weights, cfg.model.preset, cfg.storage_options)
    check_reachable(cfg.input, cfg.storage_options, for_write=False)
    check_reachable(cfg.output, cfg.storage_options, for_write=True)


def _check_weights(url: str, preset: str, storage_options: dict) -> None:
    """The weights file exists and is a checkpoint of ``preset`` (see
    :func:`httm_dist.model.weights.check_weights_file`)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol == "hf":
        try:
            import huggingface_hub  # noqa: F401 - optional: only hf:// weights need it
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
        fallback = ("or set model.weights: null to use the preset's shipped weights"
                    if preset_weights(preset) else
                    f"preset '{preset}' ships no weights (download its checkpoint, e.g. "
                    "hf://facebook/VGGT-1B/model.safetensors, and point model.weights at it)")
        raise ConfigError(f"'model.weights' file '{url}' does not exist: fix the path, {fallback}")
    check_weights_file(preset, url, options)


# --------------------------------------------------------------------------- demo


DEMO_IMAGE_SIZE = 126  # tiny-synthetic was trained at 126 px wide (98x126 from the 4:3 renders)


def demo_preset() -> str:
    """The preset the demo runs: the shipped trained tiny model when this build has it,
    otherwise the random-weight ``tiny``."""
    names = list(VGGTConfig.preset_names())
    return "tiny-synthetic" if "tiny-synthetic" in names else "tiny"


def demo_config(root: Union[str, Path], overrides: Sequence[str] = ()) -> JobConfig:
    """The embedded default job, the same as ``configs/local-tiny-demo.yaml`` (a test keeps
    them equal): scenes under ``root/scenes``, results under ``root/output``, the shipped
    trained tiny preset on CPU, HTTM merging, local Ray with one CPU worker, small images at
    the width that preset was trained at."""
    root = Path(root)
    preset = demo_preset()
    data = {
        "input": str(root / "scenes"),
        "output": str(root / "output"),
        "model": {"preset": preset, "weights": None, "device": "cpu",
                  "allow_random_weights": preset == "tiny"},  # a build without the checkpoint
        "merging": {"strategy": "httm", "q_keep": 0.5, "kv_keep": 0.5, "min_tokens": 0},
        "workers": 1,
        "gpus_per_worker": 0,
        "cpus_per_worker": 1,
        "max_attempts": 2,
        "image": {"mode": "crop", "size": DEMO_IMAGE_SIZE},
        "chunk": {"max_frames": None, "overlap": 2},
        "ray": {"address": None},
        "preview": False,
    }
    return load_config(data, overrides)
