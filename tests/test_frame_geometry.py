"""Frame geometry in the outputs (issue 11, items 5-6): cameras at the original resolution,
valid content boxes, statistics over real pixels, and the format_version 1 -> 2 reader."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import httm_dist.results as results
from httm_dist.model.preprocess import ImageDecodeError, frame_geometry, load_and_preprocess_frames
from httm_dist.results import ResultStore, SceneRecord, build_frame_table, column_matrices, scene_arrays, validity_mask
from httm_dist.results.frames import FRAME_SCHEMA, V2_COLUMNS
from httm_dist.storage import get_fs


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def _table(sizes_wh, mode, target, depth=None, seed=0):
    """Frame table of frames of the given sizes, with the intrinsics a model would predict
    for a photo camera K_orig (fx = fy = 1.2 * max side, principal point at the centre)."""
    images, geometry = load_and_preprocess_frames([_png(w, h) for w, h in sizes_wh], mode, target)
    s, _, h_in, w_in = images.shape
    k_orig = np.stack(
        [np.array([[1.2 * max(w, h), 0, w / 2], [0, 1.2 * max(w, h), h / 2], [0, 0, 1]]) for w, h in sizes_wh]
    )
    k_in = np.stack([np.linalg.inv(g.input_to_original()) for g in geometry]) @ k_orig
    rng = np.random.default_rng(seed)
    if depth is None:
        depth = rng.uniform(1, 2, size=(s, h_in, w_in)).astype(np.float32)
    table = build_frame_table(
        "sc", [f"f{i}.png" for i in range(s)], [g.orig_hw for g in geometry], (h_in, w_in),
        rng.normal(size=(s, 3, 4)), k_in, depth, rng.uniform(1, 3, size=(s, h_in, w_in)),
        geometry=geometry,
    )
    return table, geometry, k_orig, k_in


@pytest.mark.parametrize(
    "mode,sizes",
    [
        ("crop", [(1200, 1600)]),          # the reported case: a portrait photo in crop mode
        ("pad", [(1600, 900), (700, 1000)]),  # a second kind: padding shifts the principal point
    ],
)
def test_intrinsic_original_is_the_photo_camera(mode, sizes):
    table, geometry, k_orig, k_in = _table(sizes, mode, 518)
    np.testing.assert_allclose(column_matrices(table, "intrinsic_original"), k_orig, rtol=2e-6)
    a = column_matrices(table, "input_to_original")
    np.testing.assert_allclose(a, np.stack([g.input_to_original() for g in geometry]), rtol=1e-6)
    # a 3D point projects to the same place in the photo either way
    point = np.array([0.3, -0.2, 2.0])
    for ki, ko, ai in zip(k_in, k_orig, a):
        p_in = ki @ point
        np.testing.assert_allclose(ai @ (p_in / p_in[2]), (ko @ point) / point[2], rtol=1e-5)
    if mode == "crop":  # what users did before: rescaling each axis gets fy 30% wrong here
        (h, w), (h_in, w_in) = geometry[0].orig_hw, (518, 518)
        naive_fy = k_in[0, 1, 1] * h / h_in
        assert abs(naive_fy / k_orig[0, 1, 1] - 1) > 0.3


def test_statistics_are_over_real_pixels_and_readers_get_the_mask():
    # a landscape and a portrait frame in pad mode: both have white bands of padding
    sizes = [(160, 90), (90, 160)]
    images, geometry = load_and_preprocess_frames([_png(w, h) for w, h in sizes], "pad", 56)
    mask = np.zeros((2, 56, 56), bool)
    for i, g in enumerate(geometry):
        x0, y0, x1, y1 = g.valid_box()
        mask[i, y0:y1, x0:x1] = True
        assert (images[i][:, ~mask[i]] == 1.0).all() and 0 < mask[i].mean() < 1
    rng = np.random.default_rng(3)
    depth = np.where(mask, rng.uniform(1, 2, size=mask.shape), 9.0).astype(np.float32)
    table, *_ = _table(sizes, "pad", 56, depth=depth)
    np.testing.assert_array_equal(validity_mask(table), mask)
    for i in range(2):
        real = depth[i][mask[i]].astype(np.float64)
        assert table.column("depth_median")[i].as_py() == pytest.approx(np.median(real), rel=1e-6)
        assert table.column("depth_max")[i].as_py() == pytest.approx(real.max(), rel=1e-6)
        assert table.column("depth_mean")[i].as_py() == pytest.approx(real.mean(), rel=1e-6)


def test_crop_mode_mixed_batch_marks_the_batch_padding():
    sizes = [(160, 90), (90, 160)]  # landscape is padded top/bottom to the portrait's 56x56 crop
    images, geometry = load_and_preprocess_frames([_png(w, h) for w, h in sizes], "crop", 56)
    assert images.shape[-2:] == (56, 56)
    assert geometry[1].valid_box() == (0, 0, 56, 56)
    x0, y0, x1, y1 = geometry[0].valid_box()
    assert (x0, x1) == (0, 56) and y0 > 0 and y1 < 56 and (y1 - y0) == geometry[0].resized_hw[0]


def test_reader_accepts_format_version_1_and_2(tmp_path):
    url = str(tmp_path / "out")
    store = ResultStore(url)
    for sid in ("new", "old"):
        table, *_ = _table([(64, 48), (64, 48)], "crop", 56)
        table = table.set_column(0, "scene_id", pa.array([sid] * 2))
        arrays = scene_arrays({"depth": np.ones((2, 42, 56), np.float32)})
        store.write_scene(sid, table, arrays, SceneRecord.done(
            sid, unit="scene", num_frames=2, chunks=1, model_hash="m", merge_hash="g",
            attempts=1, seconds=1.0, timings={}))
    # rewrite "old" as a format_version 1 job wrote it: no geometry columns, version 1 record
    fs, root = get_fs(url)
    rec_path = f"{root}/scenes/old.json"
    rec = json.loads(fs.cat_file(rec_path))
    old_path = f"{root}/{rec['frames_path']}"
    v1 = pq.read_table(old_path).drop_columns(list(V2_COLUMNS))
    pq.write_table(v1, old_path)
    fs.pipe_file(rec_path, json.dumps({**rec, "format_version": 1}).encode())

    reader = results.open(url)
    table = reader.frames()
    assert table.schema.names == FRAME_SCHEMA.names
    by_scene = {s: table.filter(pa.compute.equal(table["scene_id"], s)) for s in ("new", "old")}
    assert by_scene["old"].column("intrinsic_original").null_count == 2
    assert by_scene["new"].column("intrinsic_original").null_count == 0
    assert validity_mask(by_scene["new"]).shape == (2, 42, 56) and validity_mask(by_scene["new"]).all()
    with pytest.raises(ValueError, match="valid_box"):
        validity_mask(by_scene["old"].drop_columns(["valid_box"]))
    # a record from a future format is refused with what to do
    fs.pipe_file(rec_path, json.dumps({**rec, "format_version": 3}).encode())
    with pytest.raises(ValueError, match="format_version.*upgrade httm-dist"):
        results.open(url)


def test_frame_table_records_the_orientation_and_the_upright_size():
    """A phone photo stored 300x200 with Orientation 6 is a 200x300 portrait in the table."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, format="JPEG", exif=exif)
    sources = [buf.getvalue(), _png(300, 200)]
    images, geometry = load_and_preprocess_frames(sources, "crop", 56)
    s, _, h, w = images.shape
    k = np.tile(np.eye(3), (s, 1, 1))
    table = build_frame_table(
        "sc", ["phone.jpg", "plain.png"], [g.orig_hw for g in geometry], (h, w),
        np.zeros((s, 3, 4)), k, np.ones((s, h, w)), np.ones((s, h, w)), geometry=geometry,
    )
    assert table.column("orig_height").to_pylist() == [300, 200]
    assert table.column("orig_width").to_pylist() == [200, 300]
    assert table.column("exif_orientation").to_pylist() == [6, 1]
    assert table.column("orientation_applied").to_pylist() == [True, False]
    # the portrait fills the 56-wide crop; the landscape is padded top and bottom in the batch
    assert table.column("valid_box").to_pylist()[0] == [0, 0, 56, 56]
    assert table.column("valid_box").to_pylist()[1][1] > 0


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_frame_geometry_is_where_the_loader_puts_the_content(mode):
    # fresh odd sizes (portrait and landscape, odd paddings) in one batch; a dark photo, so
    # the content is never white and the padding always is
    rng = np.random.default_rng()
    sizes = [tuple(int(v) for v in rng.integers(100, 300, size=2)) for _ in range(5)] + [(170, 61)]
    images, geometry = load_and_preprocess_frames([_png(w, h) for w, h in sizes], mode, 56)
    batch_hw = tuple(images.shape[-2:])
    for (w, h), g, img in zip(sizes, geometry, images):
        assert g == frame_geometry((h, w), mode, 56, batch_hw), (w, h)
        x0, y0, x1, y1 = g.valid_box()
        inside = torch.zeros(batch_hw, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert (img[:, ~inside] == 1.0).all() and (img[:, inside] < 1.0).all(), (w, h)


def test_frame_geometry_worked_examples_and_errors(tmp_path):
    g = frame_geometry((252, 168), "crop", 56)  # resized 56x84, the middle 56 rows kept
    assert (g.resized_hw, g.crop_top, g.content_hw, g.pad_top, g.pad_left) == ((84, 56), 14, (56, 56), 0, 0)
    g = frame_geometry((252, 168), "pad", 56)  # resized 42x56, centred in a 56 square
    assert (g.resized_hw, g.crop_top, g.content_hw, g.pad_top, g.pad_left) == ((56, 42), 0, (56, 42), 0, 7)
    g = frame_geometry((90, 160), "crop", 56, (71, 85))  # 56x28 content, then odd batch padding (floor halves)
    assert (g.content_hw, g.pad_top, g.pad_left) == ((28, 56), 21, 14)
    with pytest.raises(ValueError, match="cannot be resized"):
        frame_geometry((10, 1000), "crop", 56)
    with pytest.raises(ValueError, match="larger than the stored input"):
        frame_geometry((252, 168), "pad", 56, (56, 42))
    with pytest.raises(ValueError, match="mode"):
        frame_geometry((10, 10), "stretch", 56)
    with pytest.raises(ImageDecodeError, match=r"long\.png.*cannot be resized"):
        (tmp_path / "long.png").write_bytes(_png(1000, 10))
        load_and_preprocess_frames([str(tmp_path / "long.png")], "crop", 56)
