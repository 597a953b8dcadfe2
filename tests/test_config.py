"""The job config: YAML + dotted overrides -> one typed tree, every mistake named before work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from httm_dist.config import (
    JobConfig,
    demo_config,
    load_config,
    parse_override,
    validate_resources,
)
from httm_dist.errors import ConfigError, HttmDistError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

BASE = {"input": "/data/scenes", "output": "/data/out",
        "model": {"preset": "tiny", "allow_random_weights": True}}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides_build_a_typed_tree(tmp_path):
    path = _write(tmp_path, {**BASE, "workers": 4, "chunk": {"max_frames": 60}})
    cfg = load_config(
        path,
        [
            "merging.q_keep=0.4",
            "workers=2",
            "gpus_per_worker=0.5",
            "model.weights=s3://bucket/w.safetensors",
            "include=[scene_*, other]",
            "chunk.overlap=20",
            "storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9000",
        ],
    )
    assert isinstance(cfg, JobConfig)
    assert cfg.workers == 2 and isinstance(cfg.workers, int)
    assert cfg.gpus_per_worker == 0.5
    assert cfg.merging.q_keep == pytest.approx(0.4)
    assert cfg.model.preset == "tiny"
    assert cfg.model.weights == "s3://bucket/w.safetensors"
    assert cfg.include == ["scene_*", "other"]
    assert (cfg.chunk.max_frames, cfg.chunk.overlap) == (60, 20)
    assert cfg.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    # Defaults the brief fixes.
    assert cfg.max_attempts == 3 and cfg.retry_failed is True and cfg.min_frames == 1
    assert cfg.image.size == 518 and cfg.image.mode == "crop" and cfg.output_dtype == "float16"
    # An int is accepted for a float field and becomes a float.
    assert isinstance(load_config(BASE, ["cpus_per_worker=2"]).cpus_per_worker, float)
    # A null override resets an optional value.
    assert load_config({**BASE, "max_frames": 5}, ["max_frames=null"]).max_frames is None


def test_to_dict_round_trips_and_redacts():
    cfg = load_config(
        {**BASE, "storage_options": {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value"}},
        ["merging.kv_keep=0.5", "chunk.max_frames=8", "chunk.overlap=3"],
    )
    again = load_config(cfg.to_dict())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    text = str(cfg.to_dict(redacted=True))
    assert "s3cr3t-value" not in text and "AKIAEXAMPLE" not in text
    assert cfg.to_dict()["storage_options"]["secret"] == "s3cr3t-value"  # original untouched


@pytest.mark.parametrize(
    "data, overrides, unknown, suggestion",
    [
        ({**BASE, "wokers": 2}, [], "wokers", "workers"),
        (BASE, ["model.presett=tiny"], "model.presett", "model.preset"),
        (BASE, ["chunk.max_frame=4"], "chunk.max_frame", "chunk.max_frames"),
        (BASE, ["merging.q_kep=0.3"], "merging.q_kep", "merging.q_keep"),
        (BASE, ["imag.size=168"], "imag", "image"),
        (BASE, ["chunk.align_options.los=huber"], "chunk.align_options.los",
         "chunk.align_options.loss"),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(data, overrides, unknown, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(data, overrides)
    msg = str(err.value)
    assert f"unknown config key '{unknown}'" in msg
    assert f"did you mean '{suggestion}'" in msg


def test_unknown_key_message_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'image\.colour'"):
        load_config(BASE, ["image.colour=red"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("image.size=500", "image.size"),
        ("image.size=0", "image.size"),
        ("image.mode=stretch", "image.mode"),
        ("workers=0", "workers"),
        ("workers=two", "workers"),
        ("workers=true", "workers"),
        ("workers=1.5", "workers"),
        ("gpus_per_worker=-1", "gpus_per_worker"),
        ("gpus_per_worker=1.5", "gpus_per_worker"),
        ("max_attempts=0", "max_attempts"),
        ("frame_stride=0", "frame_stride"),
        ("output_dtype=float64", "output_dtype"),
        ("on_config_change=ignore", "on_config_change"),
        ("retry_failed=maybe", "retry_failed"),
        ("model.device=tpu", "model.device"),
        ("model.preset=vggt-2b", "model.preset"),
        ("chunk.overlap=0", "chunk.overlap"),
        ("chunk.max_frames=1", "chunk.max_frames"),
        ("merging.q_keep=2.0", "merging"),
        ("merging.strategy=magic", "merging"),
        ("storage_options=5", "storage_options"),
        ("input=", "input"),
        ("min_frames=0", "min_frames"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [override])
    assert f"'{key}" in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        (BASE, ["chunk.max_frames=4", "chunk.overlap=4"],
         r"'chunk.overlap' \(4\) must be less than 'chunk.max_frames' \(4\)"),
        (BASE, ["max_frames=2", "min_frames=3"], "'max_frames' .* below 'min_frames'"),
        ({"input": "/x"}, [], "'output' is required"),
    ],
    ids=["overlap-vs-chunk", "max-vs-min-frames", "output-missing"],
)
def test_cross_field_checks(data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data, overrides)


@pytest.mark.parametrize("item", ["workers", "=3", "a..b=1", ".x=1"])
def test_malformed_overrides(item):
    with pytest.raises(ConfigError, match="override"):
        parse_override(item)


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="'workers' is a value, not a section"):
        load_config({**BASE, "workers": 3}, ["workers.count=2"])
    with pytest.raises(ConfigError, match="'workers' must be an integer or null"):
        load_config(BASE, ["workers.count=2"])


@pytest.mark.parametrize(
    "text, message",
    [(None, "not found"), ("input: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "must be a YAML mapping")],
    ids=["missing", "broken", "a-list"],
)
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_hashes_are_stable_and_track_the_right_fields():
    a = load_config(BASE)
    b = load_config(dict(BASE), ["workers=7", "max_attempts=9", "output=/elsewhere"])
    assert a.model_hash() == b.model_hash() and a.merge_hash() == b.merge_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", a.model_hash()) and re.fullmatch(r"[0-9a-f]{64}", a.merge_hash())
    c = load_config(BASE, ["merging.q_keep=0.5"])
    assert c.merge_hash() != a.merge_hash() and c.model_hash() == a.model_hash()
    d = load_config(BASE, ["model.weights=/w/other.safetensors"])
    assert d.model_hash() != a.model_hash() and d.merge_hash() == a.merge_hash()
    e = load_config(BASE, ["image.size=168"])
    assert e.model_hash() != a.model_hash()
    f = load_config(BASE, ["model.preset=vggt-1b"])
    assert f.model_hash() != a.model_hash()


def test_validate_resources(tmp_path):
    scenes = tmp_path / "scenes"
    (scenes / "s0").mkdir(parents=True)
    out = tmp_path / "out"
    ok = load_config({**BASE, "input": str(scenes), "output": str(out)})
    validate_resources(ok)  # weights null, input present, output creatable

    weights = tmp_path / "w.safetensors"
    with pytest.raises(ConfigError, match=r"'model.weights' file .*w\.safetensors' does not exist") as err:
        validate_resources(load_config(ok.to_dict(), [f"model.weights={weights}", "model.preset=tiny-synthetic"]))
    assert "model.weights: null" in str(err.value)  # tiny-synthetic ships weights: null is a way out
    with pytest.raises(ConfigError, match=r"does not exist: .*'tiny' ships no weights") as err:
        validate_resources(load_config(ok.to_dict(), [f"model.weights={weights}"]))  # tiny ships none
    assert "model.weights: null" not in str(err.value)  # that would only lead to the next error
    weights.write_bytes(b"x")  # exists, but is no checkpoint (tests/test_first_hour.py has more)
    with pytest.raises(ConfigError, match=r"w\.safetensors' is not a readable \.safetensors checkpoint"):
        validate_resources(load_config(ok.to_dict(), [f"model.weights={weights}"]))
    fixture = Path(__file__).parent / "fixtures" / "vggt_tiny" / "weights.safetensors"
    validate_resources(load_config(ok.to_dict(), [f"model.weights={fixture}"]))

    with pytest.raises(HttmDistError) as err:
        validate_resources(load_config(ok.to_dict(), [f"input={tmp_path / 'nowhere'}"]))
    assert "nowhere" in str(err.value)


def test_demo_config_is_small_and_local(tmp_path):
    cfg = demo_config(tmp_path)
    assert cfg.input == str(tmp_path / "scenes") and cfg.output == str(tmp_path / "output")
    assert cfg.model.device == "cpu" and cfg.gpus_per_worker == 0 and cfg.ray.address is None
    assert cfg.image.size % 14 == 0 and cfg.image.size <= 224
    assert cfg.model.preset in ("tiny", "tiny-synthetic")
    assert demo_config(tmp_path, ["workers=2"]).workers == 2


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.input and cfg.output


def test_the_documented_configs_ship():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"vggt1b-httm-gpu.yaml", "local-tiny-demo.yaml", "s3-example.yaml"} <= names
    gpu = load_config(CONFIGS / "vggt1b-httm-gpu.yaml")
    assert gpu.model.preset == "vggt-1b" and gpu.merging.strategy == "httm"
    assert gpu.model.weights == "hf://facebook/VGGT-1B/model.safetensors"
    s3 = load_config(CONFIGS / "s3-example.yaml")
    assert s3.input.startswith("s3://") and s3.output.startswith("s3://")


def test_align_options_are_the_keyword_options_of_robust_sim3():
    """Same names and defaults as the function's keyword options (less ``seed``), so the
    config checks exactly what ``robust_sim3`` is given."""
    import inspect

    from httm_dist.config import ALIGN_OPTIONS, AlignOptions
    from httm_dist.pipeline.align import robust_sim3

    params = inspect.signature(robust_sim3).parameters
    keyword = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(ALIGN_OPTIONS) == set(keyword) - {"seed"}
    assert AlignOptions().model_dump() == {n: keyword[n] for n in ALIGN_OPTIONS}
    assert load_config(BASE, ["chunk.align_options.iters=5"]).chunk.align_options == {"iters": 5}


@pytest.mark.parametrize(
    "override, message",
    [
        ("iters=0", "'chunk.align_options.iters' must be >= 1, got 0"),
        ("iters=-3", "'chunk.align_options.iters' must be >= 1, got -3"),
        ("iters=2.5", "'chunk.align_options.iters' must be an integer, got 2.5"),
        ("iters=thirty", "'chunk.align_options.iters' must be an integer, got 'thirty'"),
        ("ransac_hypotheses=0", "'chunk.align_options.ransac_hypotheses' must be >= 1, got 0"),
        ("ransac_sample_points=2", "'chunk.align_options.ransac_sample_points' must be >= 3, got 2"),
        ("threshold=0", "'chunk.align_options.threshold' must be > 0, got 0"),
        ("threshold=-0.1", "'chunk.align_options.threshold' must be > 0, got -0.1"),
        ("threshold=.nan", "'chunk.align_options.threshold' must be a finite number, got nan"),
        ("inlier_threshold=0", "'chunk.align_options.inlier_threshold' must be > 0, got 0"),
        ("inlier_threshold='0.1'", "'chunk.align_options.inlier_threshold' must be a number, got '0.1'"),
        ("tol=-0.001", "'chunk.align_options.tol' must be >= 0 and < 1, got -0.001"),
        ("tol=2", "'chunk.align_options.tol' must be >= 0 and < 1, got 2"),
        ("loss=l2", "'chunk.align_options.loss' must be one of 'cauchy' | 'huber', got 'l2'"),
        ("ransac=maybe", "'chunk.align_options.ransac' must be true/false, got 'maybe'"),
        ("ransac=1", "'chunk.align_options.ransac' must be true/false, got 1"),
        ("seed=3", "'chunk.align_options.seed' cannot be set: the pipeline seeds each alignment so "
                   "that reruns align the same way; remove it"),
    ],
)
def test_bad_align_options_fail_at_load_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [f"chunk.align_options.{override}"])
    assert str(err.value) == message


def test_unknown_align_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "chunk": {"align_options": {"inlier_treshold": 0.1}}})
    assert str(err.value) == (
        "unknown config key 'chunk.align_options.inlier_treshold'; did you mean "
        "'chunk.align_options.inlier_threshold'? (valid keys in chunk.align_options: "
        "inlier_threshold, iters, loss, ransac, ransac_hypotheses, ransac_sample_points, "
        "threshold, tol)"
    )
    with pytest.raises(ConfigError, match=r"^'chunk\.align_options' must be a mapping, got \[1\]$"):
        load_config(BASE, ["chunk.align_options=[1]"])


# Each documented option at its default and at another value in range (the limits included).
GOOD_ALIGN = {
    "loss": ["cauchy", "huber"],
    "threshold": [None, 1e-6, 0.5, 3],
    "iters": [30, 1, 200],
    "ransac": [True, False],
    "ransac_hypotheses": [128, 1, 512],
    "ransac_sample_points": [2000, 3, 50_000],
    "inlier_threshold": [0.05, 1e-4, 2],
    "tol": [1e-12, 0, 0.5],
}


def test_defaults_and_every_documented_align_option_load_and_run():
    """What the config accepts, ``robust_sim3`` runs with: the same seeded random point pairs
    (a known Sim(3), 5% noise) align under every accepted option."""
    import numpy as np

    from httm_dist.config import ALIGN_OPTIONS
    from httm_dist.pipeline.align import Sim3, robust_sim3

    assert set(GOOD_ALIGN) == set(ALIGN_OPTIONS)
    assert load_config(BASE).chunk.align_options == {}
    assert load_config(BASE, ["chunk.align_options=null"]).chunk.align_options == {}
    rng = np.random.default_rng(7)
    src = rng.normal(size=(400, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    truth = Sim3(1.7, q * np.sign(np.linalg.det(q)), rng.normal(size=3))
    dst = truth.apply(src) + 0.05 * rng.normal(size=src.shape)
    for key, values in GOOD_ALIGN.items():
        for value in values:
            cfg = load_config({**BASE, "chunk": {"align_options": {key: value}}})
            options = cfg.chunk.align_options
            assert options == {key: value}  # only the key set, as given
            if key in ("threshold", "inlier_threshold", "tol") and value is not None:
                assert type(options[key]) is float  # an int given for a float option
            assert load_config(cfg.to_dict()) == cfg
            sim, report = robust_sim3(src, dst, **options)
            assert abs(sim.scale - truth.scale) < 0.05 * truth.scale, (key, value, sim.scale)
            assert report.num_points == len(src)
