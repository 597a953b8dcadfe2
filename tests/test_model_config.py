"""VGGTConfig: the fixture schema, presets, round trips, the official 1B layout, validation."""

from __future__ import annotations

import json

import pytest
import torch

from httm_dist.model import PRESETS, VGGT, VGGTConfig, count_parameters, register_preset


@pytest.fixture(scope="module")
def tiny_dict(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "vggt_tiny" / "config.json").read_text())


def test_fixture_schema_is_the_tiny_preset(tiny_dict):
    config = VGGTConfig.from_dict(tiny_dict)
    assert config == VGGTConfig.preset("tiny")
    out = config.to_dict()
    assert {k: out[k] for k in tiny_dict} == tiny_dict  # every fixture key, same values
    assert set(out) - set(tiny_dict) == {"rope_freq", "init_values"}


@pytest.mark.parametrize("name", ["vggt-1b", "tiny"])
def test_round_trip_through_json(name):
    config = VGGTConfig.preset(name)
    again = VGGTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict() == config.to_dict()


def test_official_hf_config_json_is_vggt_1b():
    assert VGGTConfig.from_dict({"embed_dim": 1024, "img_size": 518, "patch_size": 14}) == VGGTConfig.preset("vggt-1b")
    assert VGGTConfig.from_dict({}) == VGGTConfig()


def test_derived_widths_follow_embed_dim():
    c = VGGTConfig.from_dict({"embed_dim": 256, "img_size": 224, "patch_embed": {"depth": 2}})
    assert (c.patch_embed.embed_dim, c.patch_embed.img_size, c.camera_head.dim_in, c.dpt.dim_in) == (256, 224, 512, 512)


def test_vggt_1b_has_exactly_the_official_non_track_keys(fixtures_dir):
    official = {}
    for line in (fixtures_dir / "vggt_1b_state_dict_keys.tsv").read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        if not key.startswith("track_head."):
            official[key] = tuple(json.loads(shape.replace("(", "[").replace(",)", "]").replace(")", "]")))
    assert len(official) == 1403
    with torch.device("meta"):
        model = VGGT(VGGTConfig.preset("vggt-1b"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    assert count_parameters(model) == 1_190_596_120
    assert sum(torch.Size(s).numel() for s in official.values()) == 1_190_596_120


def test_presets_registry():
    assert {"vggt-1b", "tiny"} <= set(VGGTConfig.preset_names())
    with pytest.raises(ValueError, match="unknown VGGT preset 'nope'.*tiny"):
        VGGTConfig.preset("nope")
    register_preset("tiny-wide-test", {**PRESETS["tiny"].config, "num_heads": 4}, description="test")
    try:
        assert "tiny-wide-test" in VGGTConfig.preset_names()
        assert VGGTConfig.preset("tiny-wide-test").num_heads == 4
    finally:
        del PRESETS["tiny-wide-test"]


def with_changes(base: dict, path: str, value) -> dict:
    d = json.loads(json.dumps(base))
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    return d


@pytest.mark.parametrize(
    "path, value, names",
    [
        ("bogus", 1, "bogus"),
        ("patch_embed.bogus", 1, "patch_embed.bogus"),
        ("num_heads", 3, "num_heads"),  # 3 does not divide 128
        ("num_heads", 64, "num_heads"),  # head dim 2 is not divisible by 4
        ("camera_head.num_heads", 3, "camera_head.num_heads"),
        ("patch_embed.num_heads", 5, "patch_embed.num_heads"),
        ("dpt.intermediate_layer_idx", [0, 1, 2, 4], "dpt.intermediate_layer_idx"),
        ("dpt.intermediate_layer_idx", [0, 1, 2], "dpt.intermediate_layer_idx"),
        ("dpt.out_channels", [16, 32, 64, 62], "dpt.out_channels"),
        ("dpt.features", 20, "dpt.features"),
        ("dpt.dim_in", 128, "dpt.dim_in"),
        ("camera_head.dim_in", 512, "camera_head.dim_in"),
        ("patch_embed.embed_dim", 64, "patch_embed.embed_dim"),
        ("patch_embed.img_size", 71, "patch_embed.img_size"),
        ("patch_embed.kind", "conv", "patch_embed.kind"),
        ("patch_embed.interpolate_offset", 0.1, "patch_embed.interpolate_offset"),
        ("depth", 2.5, "depth"),
        ("depth", True, "depth"),
        ("depth", 0, "depth"),
        ("mlp_ratio", "4", "mlp_ratio"),
        ("patch_embed.interpolate_antialias", 1, "patch_embed.interpolate_antialias"),
        ("depth_head.activation", "sigmoid", "depth_head.activation"),
        ("point_head.output_dim", 1, "point_head.output_dim"),
        ("track_head", {"dim_in": 256}, "track_head"),
        ("camera_head", 3, "camera_head"),
    ],
)
def test_invalid_values_name_the_key(tiny_dict, path, value, names):
    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        VGGTConfig.from_dict(with_changes(tiny_dict, path, value))


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="num_heads"):
        VGGTConfig(num_heads=7)
