"""The VGGT architecture as a validated, hashable value, and the registry of named presets.

``VGGTConfig`` describes the network's shape only (no runtime switches), so two equal configs
build models with identical state-dict keys and shapes, and ``to_dict()`` is a stable thing to
hash. Its dict schema is the one of ``tests/fixtures/vggt_tiny/config.json``; every default is
the official VGGT-1B value, and the dimensions that follow from others (head input widths,
the patch embed's width and image size) default to the consistent value, so the official
Hugging Face ``config.json`` (``{"embed_dim": 1024, "img_size": 518, "patch_size": 14}``) is
a valid input.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from httm_dist.errors import ConfigError

DENSE_ACTIVATIONS = ("exp", "inv_log")
CONF_ACTIVATIONS = ("expp1",)


@dataclass(frozen=True)
class PatchEmbedConfig:
    """The DINOv2 ViT (with register tokens) that turns each frame into patch tokens."""

    kind: str = "dinov2"
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    img_size: int = 518
    num_register_tokens: int = 4
    layerscale_init: Optional[float] = 1.0
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0


@dataclass(frozen=True)
class CameraHeadConfig:
    """The iterative camera head: a small transformer trunk over the S camera tokens."""

    dim_in: int = 2048
    trunk_depth: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float = 0.01


@dataclass(frozen=True)
class DPTConfig:
    """The DPT decoder shared in shape by the depth and point heads."""

    dim_in: int = 2048
    features: int = 256
    out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23)


@dataclass(frozen=True)
class DenseHeadConfig:
    """What one DPT head predicts: ``output_dim - 1`` value channels plus one confidence."""

    output_dim: int
    activation: str
    conf_activation: str = "expp1"


@dataclass(frozen=True)
class VGGTConfig:
    """Shape of a VGGT network; defaults are the official VGGT-1B.

    Build one with ``from_dict`` (the ``config.json`` schema) or ``preset(name)``; direct
    construction validates too. Invalid values raise ``ConfigError`` (a ``ValueError``) whose
    message names the offending key, e.g. ``camera_head.num_heads``.
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    depth: int = 24
    num_register_tokens: int = 4
    rope_freq: float = 100.0
    init_values: float = 0.01
    patch_embed: PatchEmbedConfig = field(default_factory=PatchEmbedConfig)
    camera_head: CameraHeadConfig = field(default_factory=CameraHeadConfig)
    dpt: DPTConfig = field(default_factory=DPTConfig)
    depth_head: DenseHeadConfig = field(default_factory=lambda: DenseHeadConfig(2, "exp"))
    point_head: DenseHeadConfig = field(default_factory=lambda: DenseHeadConfig(4, "inv_log"))
    track_head: None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def head_layers(self) -> tuple[int, ...]:
        """Aggregator layers some head reads: the DPT layers and the last (camera) layer."""
        return tuple(sorted({*self.dpt.intermediate_layer_idx, self.depth - 1}))

    # -- dict schema -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VGGTConfig":
        """Parse the ``config.json`` schema; missing keys take the VGGT-1B (or derived) value."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"VGGT config must be a mapping, got {type(d).__name__}")
        top = _parse(cls, d, "", skip=_SECTIONS)
        embed_dim = top.get("embed_dim", 1024)
        derived = {
            "patch_embed": {"embed_dim": embed_dim, "img_size": top.get("img_size", 518)},
            "camera_head": {"dim_in": 2 * embed_dim},
            "dpt": {"dim_in": 2 * embed_dim},
        }
        for name, section_cls in _SECTIONS.items():
            if name not in d:
                if name in derived:
                    top[name] = section_cls(**derived[name])
                continue
            sub = d[name]
            if name == "track_head":
                if sub is not None:
                    raise ConfigError("track_head: the track head is not implemented; use null")
                continue
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{name}: expected a mapping, got {type(sub).__name__}")
            values = {**derived.get(name, {}), **_parse(section_cls, sub, name + ".")}
            try:
                top[name] = section_cls(**values)
            except TypeError as e:  # a required field of DenseHeadConfig is absent
                raise ConfigError(f"{name}: {e}") from None
        return cls(**top)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` schema (lists, not tuples); ``from_dict`` inverts it exactly."""

        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            f.name: (
                {k: plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                if dataclasses.is_dataclass(getattr(self, f.name))
                else plain(getattr(self, f.name))
            )
            for f in dataclasses.fields(self)
        }

    # -- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "VGGTConfig":
        """The named architecture (``preset_names()`` lists them)."""
        return cls.from_dict(_preset(name).config)

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(PRESETS)


_SECTIONS: dict[str, Any] = {
    "patch_embed": PatchEmbedConfig,
    "camera_head": CameraHeadConfig,
    "dpt": DPTConfig,
    "depth_head": DenseHeadConfig,
    "point_head": DenseHeadConfig,
    "track_head": None,
}


def _parse(cls: type, d: Mapping[str, Any], prefix: str, skip: Mapping[str, Any] = {}) -> dict:
    """Type-checked field values of dataclass ``cls`` from ``d``; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"unknown VGGT config key(s): {', '.join(prefix + k for k in unknown)} "
            f"(known: {', '.join(sorted(prefix + k for k in known))})"
        )
    return {k: _coerce(v, hints[k], prefix + k) for k, v in d.items() if k not in skip}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        return None if value is None else _coerce(value, args[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled config type {hint} for {key}")


def _validate(c: VGGTConfig) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    def positive(obj: Any, prefix: str, *names: str) -> None:
        for n in names:
            need(getattr(obj, n) > 0, prefix + n, f"must be positive, got {getattr(obj, n)}")

    def attention(prefix: str, width: int, heads: int, rope: bool) -> None:
        need(width % heads == 0, prefix + "num_heads", f"{heads} heads do not divide width {width}")
        if rope:  # 2-D RoPE rotates pairs within each half of the head dimension
            need((width // heads) % 4 == 0, prefix + "num_heads",
                 f"head dim {width // heads} (width {width} / {heads} heads) must be divisible by 4")

    positive(c, "", "img_size", "patch_size", "embed_dim", "num_heads", "mlp_ratio", "depth",
             "rope_freq")
    need(c.num_register_tokens >= 0, "num_register_tokens", "must be >= 0")
    attention("", c.embed_dim, c.num_heads, rope=True)

    pe = c.patch_embed
    need(pe.kind == "dinov2", "patch_embed.kind", f"only 'dinov2' is supported, got {pe.kind!r}")
    positive(pe, "patch_embed.", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size")
    need(pe.embed_dim == c.embed_dim, "patch_embed.embed_dim",
         f"must equal embed_dim ({c.embed_dim}), got {pe.embed_dim}")
    need(pe.img_size % c.patch_size == 0, "patch_embed.img_size",
         f"{pe.img_size} is not a multiple of patch_size {c.patch_size}")
    need(pe.interpolate_offset == 0.0, "patch_embed.interpolate_offset",
         f"only 0.0 (resize by size, as VGGT) is supported, got {pe.interpolate_offset}")
    need(pe.num_register_tokens >= 0, "patch_embed.num_register_tokens", "must be >= 0")
    attention("patch_embed.", pe.embed_dim, pe.num_heads, rope=False)

    ch = c.camera_head
    positive(ch, "camera_head.", "trunk_depth", "num_heads", "mlp_ratio")
    need(ch.dim_in == 2 * c.embed_dim, "camera_head.dim_in",
         f"must be 2 * embed_dim = {2 * c.embed_dim}, got {ch.dim_in}")
    attention("camera_head.", ch.dim_in, ch.num_heads, rope=False)

    dpt = c.dpt
    need(dpt.dim_in == 2 * c.embed_dim, "dpt.dim_in",
         f"must be 2 * embed_dim = {2 * c.embed_dim}, got {dpt.dim_in}")
    need(dpt.features > 0 and dpt.features % 8 == 0, "dpt.features",
         f"must be a positive multiple of 8 (its half carries a sin/cos embedding), got {dpt.features}")
    need(len(dpt.out_channels) == 4, "dpt.out_channels", "must list 4 widths")
    need(all(o > 0 and o % 4 == 0 for o in dpt.out_channels), "dpt.out_channels",
         f"every width must be a positive multiple of 4, got {list(dpt.out_channels)}")
    need(len(dpt.intermediate_layer_idx) == 4, "dpt.intermediate_layer_idx", "must list 4 layers")
    need(all(0 <= i < c.depth for i in dpt.intermediate_layer_idx), "dpt.intermediate_layer_idx",
         f"layers {list(dpt.intermediate_layer_idx)} must lie in [0, depth={c.depth})")

    for name in ("depth_head", "point_head"):
        h = getattr(c, name)
        need(h.output_dim >= 2, f"{name}.output_dim", f"must be >= 2 (values + confidence), got {h.output_dim}")
        need(h.activation in DENSE_ACTIVATIONS, f"{name}.activation",
             f"must be one of {DENSE_ACTIVATIONS}, got {h.activation!r}")
        need(h.conf_activation in CONF_ACTIVATIONS, f"{name}.conf_activation",
             f"must be one of {CONF_ACTIVATIONS}, got {h.conf_activation!r}")
    need(c.track_head is None, "track_head", "the track head is not implemented; use null")


# -- preset registry ---------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A named architecture, optionally with weights shipped for it (path or fsspec URL)."""

    config: Mapping[str, Any]
    weights: Optional[str] = None
    description: str = ""


PRESETS: dict[str, Preset] = {}


def register_preset(
    name: str,
    config: Union[VGGTConfig, Mapping[str, Any]],
    weights: Optional[str] = None,
    description: str = "",
) -> None:
    """Add (or replace) a preset. ``weights`` is loaded by ``load_vggt(name)`` when given."""
    cfg = config if isinstance(config, VGGTConfig) else VGGTConfig.from_dict(config)
    PRESETS[name] = Preset(cfg.to_dict(), None if weights is None else str(weights), description)


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown VGGT preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_weights(name: str) -> Optional[str]:
    """Weights shipped with preset ``name`` (path or URL), or None."""
    return _preset(name).weights


register_preset("vggt-1b", VGGTConfig(), description="official VGGT-1B architecture (facebook/VGGT-1B); set model.weights to its checkpoint")
register_preset(
    "tiny",
    {
        "img_size": 70, "patch_size": 14, "embed_dim": 128, "num_heads": 2, "mlp_ratio": 4.0,
        "depth": 4, "num_register_tokens": 4,
        "patch_embed": {"kind": "dinov2", "embed_dim": 128, "depth": 2, "num_heads": 2,
                        "mlp_ratio": 4.0, "img_size": 70, "num_register_tokens": 4,
                        "layerscale_init": 1.0, "interpolate_antialias": True,
                        "interpolate_offset": 0.0},
        "camera_head": {"dim_in": 256, "trunk_depth": 2, "num_heads": 2, "mlp_ratio": 4,
                        "init_values": 0.01},
        "dpt": {"dim_in": 256, "features": 32, "out_channels": [16, 32, 64, 64],
                "intermediate_layer_idx": [0, 1, 2, 3]},
        "depth_head": {"output_dim": 2, "activation": "exp", "conf_activation": "expp1"},
        "point_head": {"output_dim": 4, "activation": "inv_log", "conf_activation": "expp1"},
        "track_head": None,
    },
    description="tiny architecture of the parity fixtures (tests); ships no weights",
)


def _register_shipped_presets() -> None:
    """Presets whose trained weights ship inside the package (httm_dist/weights/)."""
    import json
    from importlib.resources import files

    folder = files("httm_dist") / "weights"
    meta_file = folder / "tiny_synthetic.json"
    if not meta_file.is_file():  # a build without the packaged checkpoint
        return
    meta = json.loads(meta_file.read_text())
    register_preset(
        "tiny-synthetic",
        meta["config"],
        weights=str(folder / "tiny_synthetic.safetensors"),
        description=(
            "a small VGGT trained by the project on its synthetic rooms: it has learned a layout "
            "prior of those rooms, not geometry (on real photos its depth does no better than "
            "'lower in the image is nearer'; camera poses are not learned); real scenes need the "
            "VGGT-1B weights (docs/training.md)"
        ),
    )


_register_shipped_presets()
