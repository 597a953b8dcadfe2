"""The per-unit pipeline without Ray: scenes and chunks from image files to committed results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster_data import direct_arrays
from httm_dist.config import load_config
from httm_dist.data import discover_scenes
from httm_dist.errors import ConfigError, SceneError
from httm_dist.merging import apply_merging
from httm_dist.model import VGGT, VGGTConfig, load_vggt
from httm_dist.model.preprocess import load_and_preprocess_frames, load_and_preprocess_images_with_sizes
from httm_dist.pipeline import (
    ModelRunner,
    ResultPublisher,
    WorkUnit,
    assemble_unit,
    failure_record,
    plan_units,
    process_unit,
    resolve_device,
)
from httm_dist.results import ResultStore, column_matrices
from httm_dist.results import open as open_results

SIZE = 56  # model input width: 4 x 4 patches, keeps the tiny model fast
FRAMES = {"alpha": (3, (42, 56)), "beta": (2, (60, 45)), "long": (9, (42, 56))}
# float16 storage: relative precision 2^-11; allow a little for rounding of small values
F16 = dict(rtol=2e-3, atol=1e-4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Scenes of random images (plus a corrupt and an empty one) and seeded tiny weights."""
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    scenes = root / "scenes"
    for name, (n, (h, w)) in FRAMES.items():
        (scenes / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(scenes / name / f"frame_{i:02d}.png")
    (scenes / "corrupt").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (42, 56, 3), dtype=np.uint8)).save(
            scenes / "corrupt" / f"frame_{i:02d}.png"
        )
    (scenes / "corrupt" / "frame_02.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (scenes / "empty").mkdir()
    (scenes / "empty" / "notes.txt").write_text("no images here")

    from safetensors.torch import save_file

    torch.manual_seed(1234)
    model = VGGT(VGGTConfig.preset("tiny"))
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"root": root, "scenes": scenes, "weights": str(weights)}


def _cfg(dataset: dict, out: str, *overrides: str):
    return load_config(
        {
            "input": str(dataset["scenes"]),
            "output": out,
            "model": {"preset": "tiny", "weights": dataset["weights"], "device": "cpu"},
            "merging": {"strategy": "httm", "q_keep": 0.5, "kv_keep": 0.5, "min_tokens": 0},
            "image": {"size": SIZE},
        },
        overrides,
    )


@pytest.fixture(scope="module")
def runner(dataset, tmp_path_factory) -> ModelRunner:
    out = str(tmp_path_factory.mktemp("out-default"))
    return ModelRunner(_cfg(dataset, out, "chunk.max_frames=4", "chunk.overlap=2"))


def process(runner: ModelRunner, unit: WorkUnit, store: ResultStore, extra: dict | None = None):
    """One whole unit, as a worker runs it: the runner's model, then a publisher to ``store``."""
    return process_unit(runner, ResultPublisher(runner.cfg, store, str(runner.device)), unit, extra)


@pytest.fixture(scope="module")
def scenes(dataset) -> dict:
    return {s.scene_id: s for s in discover_scenes(str(dataset["scenes"]))}


@pytest.fixture(scope="module")
def reference_model(dataset, runner) -> torch.nn.Module:
    """A second, independently loaded model with the same weights and merging as ``runner``."""
    return apply_merging(load_vggt("tiny", weights=dataset["weights"], device="cpu"), runner.cfg.merging)


def _reference(model: torch.nn.Module, paths: list[Path]) -> dict:
    """The model called directly on the same images, preprocessed by the preprocessing API."""
    images, sizes = load_and_preprocess_images_with_sizes(paths, mode="crop", target_size=SIZE)
    return {**direct_arrays(model, images), "sizes": sizes, "input_hw": tuple(images.shape[-2:])}


def test_plan_units(runner, scenes, dataset):
    assert plan_units(scenes["alpha"], runner.cfg) == [WorkUnit(scenes["alpha"], "scene")]
    units = plan_units(scenes["long"], runner.cfg)
    assert [u.kind for u in units] == ["chunk"] * len(units) and len(units) >= 3
    assert [u.chunk_index for u in units] == list(range(len(units)))
    assert all(u.num_chunks == len(units) for u in units)
    ranges = [u.frame_range for u in units]
    assert ranges[0][0] == 0 and ranges[-1][1] == 9
    assert all(e - s <= 4 for s, e in ranges)
    assert all(ranges[i][1] - ranges[i + 1][0] == 2 for i in range(len(ranges) - 1))
    assert [f.frame_index for f in units[1].frames()] == list(range(*ranges[1]))
    assert len({u.unit_id for u in units}) == len(units)
    # chunking off: the long scene is one unit
    whole = load_config(runner.cfg.to_dict(), ["chunk.max_frames=null"])
    assert [u.kind for u in plan_units(scenes["long"], whole)] == ["scene"]
    assert assemble_unit(scenes["long"], 4) == WorkUnit(scenes["long"], "assemble", None, None, 4)


@pytest.fixture(scope="module")
def committed(runner, scenes, tmp_path_factory) -> dict:
    """Scenes alpha and beta processed as a worker does (attempt 2 on host node-7) into a
    fresh output; returns ``{"reader", "records"}`` (records as process_unit returned them)."""
    out = str(tmp_path_factory.mktemp("out-scenes"))
    store = ResultStore(out)
    recs = {}
    for sid in ("alpha", "beta"):
        (unit,) = plan_units(scenes[sid], runner.cfg)
        recs[sid] = process(runner, unit, store, {"attempts": 2, "worker": {"host": "node-7"}})
    return {"reader": open_results(out), "records": recs}


def test_scene_units_commit_one_row_per_frame_in_scene_order(committed):
    reader = committed["reader"]
    assert reader.scene_ids == ["alpha", "beta"]
    table = reader.frames()
    assert table.column("scene_id").to_pylist() == ["alpha"] * 3 + ["beta"] * 2


@pytest.mark.parametrize("sid", ["alpha", "beta"])
def test_scene_unit_frame_table_equals_the_model(committed, scenes, dataset, reference_model, sid):
    n, (h, w) = FRAMES[sid]
    paths = sorted((dataset["scenes"] / sid).glob("*.png"))
    ref = _reference(reference_model, paths)
    H, W = ref["input_hw"]
    rows = committed["reader"].frames([sid])
    assert rows.column("frame_index").to_pylist() == list(range(n))
    assert rows.column("image_uri").to_pylist() == [s.uri for s in scenes[sid].frames]
    assert rows.column("orig_height").to_pylist() == [h] * n
    assert rows.column("orig_width").to_pylist() == [w] * n
    assert rows.column("input_height").to_pylist() == [H] * n
    assert rows.column("input_width").to_pylist() == [W] * n
    np.testing.assert_allclose(column_matrices(rows, "extrinsic"), ref["extrinsic"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(column_matrices(rows, "intrinsic"), ref["intrinsic"], rtol=1e-5)
    _, geometry = load_and_preprocess_frames(paths, mode="crop", target_size=SIZE)
    to_orig = np.stack([g.input_to_original() for g in geometry])
    np.testing.assert_allclose(column_matrices(rows, "input_to_original"), to_orig, rtol=1e-6)
    with np.errstate(invalid="ignore"):  # the untrained model may predict an infinite focal
        expected_k = to_orig @ ref["intrinsic"]
    np.testing.assert_allclose(column_matrices(rows, "intrinsic_original"), expected_k, rtol=1e-5)
    assert rows.column("valid_box").to_pylist() == [[0, 0, W, H]] * n
    assert rows.column("orientation_applied").to_pylist() == [False] * n
    np.testing.assert_allclose(
        rows.column("depth_mean").to_numpy(), ref["depth"].mean(axis=(1, 2)), rtol=1e-5
    )


@pytest.mark.parametrize("sid", ["alpha", "beta"])
def test_scene_unit_arrays_equal_the_model(committed, scenes, dataset, reference_model, sid):
    n = FRAMES[sid][0]
    ref = _reference(reference_model, sorted((dataset["scenes"] / sid).glob("*.png")))
    H, W = ref["input_hw"]
    arrays = committed["reader"].arrays(sid)
    for key, shape in [
        ("depth", (n, H, W)), ("depth_conf", (n, H, W)),
        ("world_points", (n, H, W, 3)), ("world_points_conf", (n, H, W)),
    ]:
        dtype = np.float32 if key.endswith("_conf") else np.float16  # confidences keep their order
        assert arrays[key].shape == shape and arrays[key].dtype == dtype, key
        np.testing.assert_allclose(arrays[key].astype(np.float32), ref[key], **F16, err_msg=key)
    assert arrays["extrinsic"].dtype == np.float32
    np.testing.assert_allclose(arrays["extrinsic"], ref["extrinsic"], rtol=1e-5, atol=1e-6)
    assert list(arrays["frame_uris"]) == [s.uri for s in scenes[sid].frames]


@pytest.mark.parametrize("sid", ["alpha", "beta"])
def test_scene_unit_record_names_its_config_attempt_and_time(committed, runner, sid):
    rec = committed["reader"].records()[sid]
    assert rec["status"] == "done" and rec["error"] is None and rec["num_frames"] == FRAMES[sid][0]
    assert rec["model_hash"] == runner.cfg.model_hash()
    assert rec["merge_hash"] == runner.cfg.merge_hash()
    assert rec["worker_host"] == "node-7" and rec["attempts"] == 2
    assert rec["chunks"] == 1 and rec["alignment"] == [] and rec["seconds"] > 0
    # seconds = load + run + commit (the data writes), the same sum a chunk's record has
    assert set(rec["timings"]) == {"load", "run", "commit"} and rec["timings"]["commit"] > 0
    assert rec["seconds"] == pytest.approx(sum(rec["timings"].values()), abs=1e-3)
    assert committed["records"][sid].to_dict() == rec  # what the worker returns is what is written


def test_float32_output_and_dense_merging(dataset, scenes, tmp_path, reference_model):
    cfg = _cfg(dataset, str(tmp_path / "out"), "output_dtype=float32", "merging.strategy=dense")
    dense = ModelRunner(cfg, model=load_vggt("tiny", weights=dataset["weights"], device="cpu"))
    store = ResultStore(cfg.output)
    process(dense, plan_units(scenes["beta"], cfg)[0], store)
    arrays = store.read_arrays("beta")
    assert arrays["depth"].dtype == np.float32
    paths = sorted((dataset["scenes"] / "beta").glob("*.png"))
    ref = _reference(load_vggt("tiny", weights=dataset["weights"], device="cpu"), paths)
    np.testing.assert_allclose(arrays["depth"], ref["depth"], rtol=1e-5)
    merged = _reference(reference_model, paths)  # the merge config is honoured: httm differs
    assert not np.array_equal(arrays["world_points"], merged["world_points"])


def test_corrupt_empty_and_short_scenes_raise_scene_errors(runner, scenes, dataset):
    with pytest.raises(SceneError) as err:
        runner.load(plan_units(scenes["corrupt"], runner.cfg)[0])
    msg = str(err.value)
    assert "corrupt" in msg and "frame_02.png" in msg, msg

    with pytest.raises(SceneError, match=r"'empty'.* (no image frames|empty)"):
        runner.load(plan_units(scenes["empty"], runner.cfg)[0])

    strict = ModelRunner(load_config(runner.cfg.to_dict(), ["min_frames=4"]), model=runner.model)
    with pytest.raises(SceneError, match=r"'beta' has 2 frame\(s\), fewer than min_frames=4"):
        strict.load(plan_units(scenes["beta"], strict.cfg)[0])

    rec = failure_record(plan_units(scenes["corrupt"], runner.cfg)[0], err.value, runner.cfg, 3)
    assert rec.status == "failed" and rec.error == msg and rec.attempts == 3
    assert rec.model_hash == runner.cfg.model_hash() and rec.num_frames == 3 and rec.unit == "scene"
    rec = failure_record(plan_units(scenes["alpha"], runner.cfg)[0], KeyError("x"), runner.cfg)
    assert rec.error.startswith("KeyError")


def test_chunked_scene_assembles_every_frame_once(runner, scenes, dataset, reference_model):
    store = ResultStore(runner.cfg.output, runner.cfg.storage_options)
    scene = scenes["long"]
    units = plan_units(scene, runner.cfg)
    done = assemble_unit(scene, len(units))
    for unit in units[:-1]:
        chunk = process(runner, unit, store)
        assert chunk.status == "chunk_done" and chunk.num_frames == unit.frame_range[1] - unit.frame_range[0]
        assert chunk.timings["commit"] > 0 and chunk.seconds == pytest.approx(sum(chunk.timings.values()), abs=1e-3)
    assert "long" not in store.committed()
    with pytest.raises(RuntimeError, match=r"chunk\(s\) \[%d\]" % (len(units) - 1)):
        ResultPublisher(runner.cfg, store).assemble(done)
    process(runner, units[-1], store)
    assert sorted(store.done_chunks("long")) == list(range(len(units)))
    assert "long" not in store.committed()  # chunks alone never commit the scene

    record = process(runner, done, store)
    assert record.status == "done" and record.chunks == len(units) and record.num_frames == 9
    assert len(record.alignment) == len(units) - 1
    assert all(np.isfinite(a["residual"]) and "flagged" in a for a in record.alignment)
    assert set(record.timings) == {"assemble", "commit"}
    assert store.done_chunks("long") == {}  # intermediate chunks cleaned up

    reader = open_results(runner.cfg.output)
    rows = reader.frames(["long"])
    assert rows.column("frame_index").to_pylist() == list(range(9))
    assert rows.column("image_uri").to_pylist() == [f.uri for f in scene.frames]
    arrays = reader.arrays("long")
    assert arrays["depth"].shape[0] == 9 and arrays["extrinsic"].shape == (9, 3, 4)
    assert list(arrays["frame_uris"]) == [f.uri for f in scene.frames]
    assert reader.records()["long"]["chunks"] == len(units)

    # Frames taken from chunk 0 are in chunk 0's frame: equal to the model run on chunk 0 alone.
    paths = sorted((dataset["scenes"] / "long").glob("*.png"))
    start, end = units[0].frame_range
    ref = _reference(reference_model, paths[start:end])
    from_first = [g for g, c in enumerate(record.frame_source_chunk) if c == 0]
    assert 0 in from_first
    for g in from_first:
        np.testing.assert_allclose(arrays["depth"][g].astype(np.float32), ref["depth"][g], **F16)
        np.testing.assert_allclose(arrays["extrinsic"][g], ref["extrinsic"][g], rtol=1e-4, atol=1e-5)


def test_assemble_drops_chunks_of_another_config(runner, scenes, tmp_path):
    store = ResultStore(str(tmp_path / "out"))
    units = plan_units(scenes["long"], runner.cfg)
    for unit in units:
        process(runner, unit, store)
    # assembling needs no model: a publisher under the second config is enough
    other = ResultPublisher(load_config(runner.cfg.to_dict(), ["merging.q_keep=0.9"]), store)
    with pytest.raises(SceneError, match="another model/merge config"):
        other.assemble(assemble_unit(scenes["long"], len(units)))
    assert store.done_chunks("long") == {}


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            resolve_device("cuda")


def test_corrupt_archive_reports_the_archive_not_an_empty_scene(runner, tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"not a tar archive at all" * 40)
    (scene,) = discover_scenes(str(tmp_path))
    assert scene.frames == () and scene.error
    with pytest.raises(SceneError) as err:
        runner.load(plan_units(scene, runner.cfg)[0])
    assert "broken" in str(err.value) and "empty" not in str(err.value), str(err.value)


def test_preview_option_writes_previews_of_each_committed_scene(runner, scenes, tmp_path):
    from httm_dist.pipeline.preview import read_ply

    out = str(tmp_path / "out")
    cfg = load_config(runner.cfg.to_dict(), [f"output={out}", "preview=true"])
    previewing = ModelRunner(cfg, model=runner.model)
    store = ResultStore(out)
    (unit,) = plan_units(scenes["alpha"], cfg)
    assert process(previewing, unit, store).status == "done"
    arrays = open_results(out).arrays("alpha")
    S, H, W = arrays["depth"].shape[:3]
    with Image.open(tmp_path / "out" / "previews" / "alpha.png") as png:
        png.load()
        assert png.width >= W * min(S, 8) and png.height >= 3 * H  # frames, depth, confidence
    points, colours = read_ply((tmp_path / "out" / "previews" / "alpha.ply").read_bytes())
    assert len(points) > 0 and len(points) == len(colours) and np.isfinite(points).all()


@pytest.mark.parametrize(
    "name, error, line",
    [
        ("scene 'b'", "scene 'b': image x.png cannot be decoded", "scene 'b' failed: image x.png cannot be decoded"),
        ("scene 'b' chunk 2/5", "scene 'b': image x.png cannot be decoded",
         "scene 'b' chunk 2/5 failed: image x.png cannot be decoded"),
        ("scene 'b'", "scene 'b' has no image frames in /in/b", "scene 'b' failed: it has no image frames in /in/b"),
        ("scene 'b' (assembling chunks)", "scene 'b' has 2 chunks missing",
         "scene 'b' (assembling chunks) failed: the scene has 2 chunks missing"),
        ("scene 'b'", "scene 'b' chunk 2/5 failed: its worker died 3 times",
         "scene 'b' chunk 2/5 failed: its worker died 3 times"),
        ("scene 'b'", "ValueError: a bug", "scene 'b' failed: ValueError: a bug"),
        ("scene 'b'", "scene 'b2': another scene's words", "scene 'b' failed: scene 'b2': another scene's words"),
    ],
)
def test_a_failure_line_names_the_scene_once(name, error, line):
    from httm_dist.pipeline.unit import failure_line

    assert failure_line(name, "b", error) == line
