"""MergeConfig: defaults, YAML round trip, and an error naming the field for every bad value."""

import pytest

from httm_dist.errors import ConfigError
from httm_dist.merging import MergeConfig


def test_defaults_match_the_paper_settings():
    cfg = MergeConfig()
    assert (cfg.strategy, cfg.q_keep, cfg.kv_keep, cfg.outlier_frac) == ("httm", 0.2, 0.3, 0.1)
    assert (cfg.block_spatial, cfg.block_frames, cfg.plan_reuse) == (128, 30, 1)
    assert cfg.anchor_first_frame and cfg.protect_special_tokens and not cfg.proportional_attention
    assert (cfg.outlier_cap, cfg.min_tokens) == (1.5, 40000)  # issue 14: static length, dense below


def test_round_trip_through_dict():
    cfg = MergeConfig(strategy="uniform", kv_keep=0.5, layers=[3, 1], plan_reuse=2)
    d = cfg.to_dict()
    assert d["layers"] == [3, 1]
    assert MergeConfig.from_dict(d) == cfg
    assert cfg.layers == (3, 1)
    assert cfg.layer_indices(4) == [1, 3]
    assert MergeConfig().layer_indices(3) == [0, 1, 2]


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="q_kep"):
        MergeConfig.from_dict({"q_kep": 0.2})


@pytest.mark.parametrize(
    "field,value",
    [
        ("strategy", "tome"),
        ("q_keep", 0.0),
        ("q_keep", 1.5),
        ("kv_keep", -0.1),
        ("kv_keep", "0.3"),
        ("outlier_frac", 0.2),  # not < q_keep 0.2
        ("outlier_frac", -0.01),
        ("block_spatial", 0),
        ("block_frames", 2.5),
        ("plan_reuse", True),
        ("anchor_first_frame", 1),
        ("proportional_attention", "yes"),
        ("layers", "some"),
        ("layers", [0, -1]),
        ("layers", [1, 1]),
        ("layers", []),
        ("outlier_cap", 0.9),
        ("outlier_cap", "2"),
        ("min_tokens", -1),
        ("min_tokens", 1.5),
        ("min_tokens", True),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        MergeConfig(**{field: value})
    assert issubclass(ConfigError, ValueError)


def test_layers_out_of_range_for_the_model():
    with pytest.raises(ValueError, match="layers"):
        MergeConfig(layers=[0, 4]).layer_indices(4)
