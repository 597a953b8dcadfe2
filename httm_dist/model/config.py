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

import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import Field, field_validator, model_validator

from httm_dist.configbase import Invalid, Section
from httm_dist.errors import ConfigError

PATCH_SIZE = 14
"""VGGT's patch size: each frame is cut into PATCH_SIZE x PATCH_SIZE pixel patches, so image
sides must be multiples of it. The one place the number is written (``VGGTConfig.patch_size``
defaults to it; the job config, preprocessing, previews, evaluation and training read it)."""

DenseActivation = Literal["exp", "inv_log"]
ConfActivation = Literal["expp1"]


class _TransformerShape(Section):
    """The shape shared by the patch-embedding ViT and the aggregator (VGGT-1B values)."""

    img_size: int = Field(518, gt=0)
    embed_dim: int = Field(1024, gt=0)
    depth: int = Field(24, gt=0)
    num_heads: int = Field(16, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    num_register_tokens: int = Field(4, ge=0)


class PatchEmbedConfig(_TransformerShape):
    """The DINOv2 ViT (with register tokens) that turns each frame into patch tokens."""

    kind: Literal["dinov2"] = "dinov2"
    layerscale_init: Optional[float] = 1.0
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0
    """Only 0.0 (resize by size, as VGGT) is supported."""

    @field_validator("interpolate_offset")
    @classmethod
    def _offset(cls, value: float) -> float:
        if value != 0.0:
            raise Invalid("", f"only 0.0 (resize by size, as VGGT) is supported, got {value}")
        return value


class CameraHeadConfig(Section):
    """The iterative camera head: a small transformer trunk over the S camera tokens."""

    dim_in: int = 2048
    trunk_depth: int = Field(4, gt=0)
    num_heads: int = Field(16, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    init_values: float = 0.01


class DPTConfig(Section):
    """The DPT decoder shared in shape by the depth and point heads."""

    dim_in: int = 2048
    features: int = 256
    """A positive multiple of 8 (its half carries a sin/cos embedding)."""
    out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    """Four widths, each a positive multiple of 4."""
    intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23)
    """The four aggregator layers the decoder reads."""

    @field_validator("features")
    @classmethod
    def _features(cls, value: int) -> int:
        if value <= 0 or value % 8:
            raise Invalid("", f"must be a positive multiple of 8 (its half carries a sin/cos "
                          f"embedding), got {value}")
        return value

    @field_validator("out_channels")
    @classmethod
    def _out_channels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) != 4 or not all(o > 0 and o % 4 == 0 for o in value):
            raise Invalid("", f"must list 4 positive multiples of 4, got {list(value)}")
        return value

    @field_validator("intermediate_layer_idx")
    @classmethod
    def _layers(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) != 4:
            raise Invalid("", f"must list 4 layers, got {list(value)}")
        return value


class DenseHeadConfig(Section):
    """What one DPT head predicts: ``output_dim - 1`` value channels plus one confidence."""

    output_dim: int = Field(ge=2)
    """Value channels plus one confidence channel."""
    activation: DenseActivation
    conf_activation: ConfActivation = "expp1"


class VGGTConfig(_TransformerShape):
    """Shape of a VGGT network; defaults are the official VGGT-1B.

    Build one with ``from_dict`` (the ``config.json`` schema) or ``preset(name)``; direct
    construction validates too. A section left out takes the widths that follow from
    ``embed_dim`` and ``img_size``. Invalid values raise ``ConfigError`` (a ``ValueError``)
    whose message names the offending key, e.g. ``camera_head.num_heads``.
    """

    patch_size: int = Field(PATCH_SIZE, gt=0)
    rope_freq: float = Field(100.0, gt=0)
    init_values: float = 0.01
    patch_embed: PatchEmbedConfig = PatchEmbedConfig()
    camera_head: CameraHeadConfig = CameraHeadConfig()
    dpt: DPTConfig = DPTConfig()
    depth_head: DenseHeadConfig = DenseHeadConfig(output_dim=2, activation="exp")
    point_head: DenseHeadConfig = DenseHeadConfig(output_dim=4, activation="inv_log")
    track_head: None = None
    """The track head is not implemented: null."""

    @property
    def head_layers(self) -> tuple[int, ...]:
        """Aggregator layers some head reads: the DPT layers and the last (camera) layer."""
        return tuple(sorted({*self.dpt.intermediate_layer_idx, self.depth - 1}))

    @model_validator(mode="before")
    @classmethod
    def _derive_widths(cls, data: Any) -> Any:
        """Sections given as mappings take the widths that follow from the top level unless
        they set them (the official ``config.json`` lists only the top level)."""
        if not isinstance(data, Mapping):
            return data
        embed_dim = data.get("embed_dim", 1024)
        derived = {
            "patch_embed": {"embed_dim": embed_dim, "img_size": data.get("img_size", 518)},
            "camera_head": {"dim_in": 2 * embed_dim},
            "dpt": {"dim_in": 2 * embed_dim},
        }
        out = dict(data)
        for name, values in derived.items():
            sub = out.get(name, {})
            if sub is None or isinstance(sub, Mapping):
                out[name] = {**values, **(sub or {})}
        if out.get("track_head") is not None:
            raise Invalid("track_head", "must be null: the track head is not implemented")
        return out

    @model_validator(mode="after")
    def _consistent(self) -> "VGGTConfig":
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise Invalid(key, why)

        def attention(prefix: str, width: int, heads: int, rope: bool) -> None:
            need(width % heads == 0, prefix + "num_heads", f"({heads}) must divide the width {width}")
            if rope:  # 2-D RoPE rotates pairs within each half of the head dimension
                need((width // heads) % 4 == 0, prefix + "num_heads",
                     f"({heads}) gives head dim {width // heads} (width {width}), which must be "
                     "divisible by 4")

        attention("", self.embed_dim, self.num_heads, rope=True)
        pe = self.patch_embed
        need(pe.embed_dim == self.embed_dim, "patch_embed.embed_dim",
             f"must equal embed_dim ({self.embed_dim}), got {pe.embed_dim}")
        need(pe.img_size % self.patch_size == 0, "patch_embed.img_size",
             f"({pe.img_size}) must be a multiple of patch_size {self.patch_size}")
        attention("patch_embed.", pe.embed_dim, pe.num_heads, rope=False)
        ch = self.camera_head
        need(ch.dim_in == 2 * self.embed_dim, "camera_head.dim_in",
             f"must be 2 * embed_dim = {2 * self.embed_dim}, got {ch.dim_in}")
        attention("camera_head.", ch.dim_in, ch.num_heads, rope=False)
        dpt = self.dpt
        need(dpt.dim_in == 2 * self.embed_dim, "dpt.dim_in",
             f"must be 2 * embed_dim = {2 * self.embed_dim}, got {dpt.dim_in}")
        need(all(0 <= i < self.depth for i in dpt.intermediate_layer_idx),
             "dpt.intermediate_layer_idx",
             f"({list(dpt.intermediate_layer_idx)}) must lie in [0, depth={self.depth})")
        return self

    # -- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "VGGTConfig":
        """The named architecture (``preset_names()`` lists them)."""
        return cls.from_dict(_preset(name).config)

    @staticmethod
    def preset_names() -> list[str]:
        """Names of the registered presets, sorted."""
        return sorted(PRESETS)


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
        "img_size": 70, "patch_size": PATCH_SIZE, "embed_dim": 128, "num_heads": 2, "mlp_ratio": 4.0,
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
