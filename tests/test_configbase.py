"""The one config engine: the job, model and merging configs follow the same rules."""

from __future__ import annotations

import math

import pytest
from pydantic import Field

from httm_dist.config import load_config
from httm_dist.configbase import Section
from httm_dist.errors import ConfigError
from httm_dist.merging import MergeConfig
from httm_dist.model import VGGTConfig

BASE = {"input": "/data/scenes", "output": "/data/out",
        "model": {"preset": "tiny", "allow_random_weights": True}}


def _job(key: str, value):
    """Build a job config with ``key`` (dotted) set to ``value``; return the value it holds."""
    data = {**BASE}
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    node = load_config(data)
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)  # align_options: a dict
    return node


def _merge(key: str, value):
    return getattr(MergeConfig.from_dict({key: value}), key)


def _model(key: str, value):
    top = VGGTConfig.preset("tiny").to_dict()
    node = top
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    cfg = VGGTConfig.from_dict(top)
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# (builder, dotted key as errors name it, an int key's whole value)
INT_KEYS = [
    (_job, "workers", "workers", 2),
    (_job, "chunk.overlap", "chunk.overlap", 3),
    (_job, "chunk.align_options.iters", "chunk.align_options.iters", 5),
    (_merge, "block_frames", "merging.block_frames", 2),
    (_model, "depth", "depth", 4),
    (_model, "camera_head.trunk_depth", "camera_head.trunk_depth", 2),
]
FLOAT_KEYS = [
    (_job, "cpus_per_worker", "cpus_per_worker"),
    (_job, "chunk.residual_threshold", "chunk.residual_threshold"),
    (_job, "chunk.align_options.inlier_threshold", "chunk.align_options.inlier_threshold"),
    (_merge, "q_keep", "merging.q_keep"),
    (_model, "mlp_ratio", "mlp_ratio"),
]
IDS_INT = [name for _, _, name, _ in INT_KEYS]
IDS_FLOAT = [name for _, _, name in FLOAT_KEYS]


@pytest.mark.parametrize("build, key, name, whole", INT_KEYS, ids=IDS_INT)
def test_a_whole_float_is_an_int_everywhere(build, key, name, whole):
    value = build(key, float(whole))
    assert value == whole and type(value) is int


@pytest.mark.parametrize("bad", [2.5, True, "2"], ids=["fraction", "bool", "string"])
@pytest.mark.parametrize("build, key, name, whole", INT_KEYS, ids=IDS_INT)
def test_an_int_key_refuses_fractions_bools_and_strings(build, key, name, whole, bad):
    with pytest.raises(ConfigError) as err:
        build(key, bad)
    msg = str(err.value)
    assert msg.startswith(f"'{name}' must be an integer") and "\n" not in msg, msg


@pytest.mark.parametrize("build, key, name", FLOAT_KEYS, ids=IDS_FLOAT)
def test_an_int_is_a_float_everywhere(build, key, name):
    value = build(key, 1)
    assert value == 1.0 and type(value) is float


@pytest.mark.parametrize("bad", [math.inf, math.nan, True, "0.5"], ids=["inf", "nan", "bool", "string"])
@pytest.mark.parametrize("build, key, name", FLOAT_KEYS, ids=IDS_FLOAT)
def test_a_float_key_refuses_non_finite_bools_and_strings(build, key, name, bad):
    with pytest.raises(ConfigError) as err:
        build(key, bad)
    assert str(err.value).startswith(f"'{name}' must be a"), str(err.value)


@pytest.mark.parametrize(
    "build, key, name, suggestion",
    [
        (_job, "chunk.overlapp", "chunk.overlapp", "chunk.overlap"),
        (_job, "chunk.align_options.iter", "chunk.align_options.iter", "chunk.align_options.iters"),
        (_merge, "kv_kep", "merging.kv_kep", "merging.kv_keep"),
        (_model, "camera_head.trunk_dept", "camera_head.trunk_dept", "camera_head.trunk_depth"),
    ],
    ids=["job", "align_options", "merging", "model"],
)
def test_unknown_keys_get_the_same_hint_everywhere(build, key, name, suggestion):
    with pytest.raises(ConfigError) as err:
        build(key, 1)
    assert str(err.value).startswith(f"unknown config key '{name}'; did you mean '{suggestion}'?")


@pytest.mark.parametrize(
    "build, key, value, message",
    [
        (_job, "chunk.min_inlier_fraction", 1.5, "'chunk.min_inlier_fraction' must be >= 0 and <= 1, got 1.5"),
        (_job, "chunk.align_options.tol", 1.0, "'chunk.align_options.tol' must be >= 0 and < 1, got 1.0"),
        (_merge, "q_keep", 0, "'merging.q_keep' must be > 0 and <= 1, got 0"),
        (_model, "patch_embed.num_register_tokens", -1,
         "'patch_embed.num_register_tokens' must be >= 0, got -1"),
    ],
    ids=["job", "align_options", "merging", "model"],
)
def test_limits_state_the_whole_range(build, key, value, message):
    with pytest.raises(ConfigError) as err:
        build(key, value)
    assert str(err.value) == message


def test_merging_is_a_typed_section_of_the_job():
    cfg = load_config(BASE, ["merging.block_frames=4.0", "merging.layers=[2, 0]"])
    assert isinstance(cfg.merging, MergeConfig)
    assert cfg.merging == MergeConfig(block_frames=4, layers=(2, 0))
    with pytest.raises(ConfigError, match=r"^'merging\.layers\[1\]' must be an integer, got 'a'$"):
        load_config(BASE, ["merging.layers=[0, a]"])
    with pytest.raises(ConfigError, match=r"^'merging' must be a mapping of keys, got 3$"):
        load_config(BASE, ["merging=3"])


def test_a_null_section_is_its_defaults():
    cfg = load_config({**BASE, "chunk": None, "merging": None, "ray": None})
    assert cfg.chunk.overlap == 30 and cfg.merging == MergeConfig() and cfg.ray.address is None


def test_configs_are_frozen_values():
    cfg = load_config(BASE)
    with pytest.raises(Exception, match="frozen"):
        cfg.workers = 3
    assert MergeConfig(q_keep=0.3) == MergeConfig(q_keep=0.3)
    assert hash(MergeConfig(q_keep=0.3)) == hash(MergeConfig(q_keep=0.3))
    assert hash(VGGTConfig.preset("tiny")) == hash(VGGTConfig.preset("tiny"))


class _NewKey(Section):
    """A section as another room adds one: each key one line, with its docstring."""

    root = "demo"

    frames: int = Field(3, ge=1)
    """Frames per thing."""
    mode: str = "auto"


def test_a_new_key_gets_the_rules_and_its_doc():
    assert _NewKey.model_fields["frames"].description == "Frames per thing."
    assert _NewKey.from_dict({"frames": 5.0}).frames == 5
    assert _NewKey.from_dict(None) == _NewKey()
    with pytest.raises(ConfigError, match=r"^'demo\.frames' must be >= 1, got 0$"):
        _NewKey(frames=0)
    with pytest.raises(ConfigError, match=r"^'demo\.mode' must be a string, got 4$"):
        _NewKey.from_dict({"mode": 4})
    with pytest.raises(ConfigError, match=r"^'demo' must be a mapping of keys, got list$"):
        _NewKey.from_dict([1])
