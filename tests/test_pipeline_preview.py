"""Previews decode as valid PNG / PLY of the expected sizes, with the right points."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from test_results_store import done_record

from httm_dist.pipeline import preview
from httm_dist.pipeline.preview import contact_sheet, read_ply, select_points, write_ply
from httm_dist.eval.synthetic import render_scene, write_scene_folder


def test_contact_sheet_size_and_content():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 10, 14, 3), dtype=np.uint8)
    depth = rng.uniform(1, 5, (3, 10, 14))
    conf = rng.uniform(1, 3, (3, 10, 14))
    sheet = contact_sheet(imgs, depth, conf, pad=4)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.format == "PNG" and img.size == (3 * 14 + 4 * 4, 3 * 10 + 4 * 4)
    arr = np.asarray(img)
    np.testing.assert_array_equal(arr[4:14, 4 + 18 : 18 + 18], imgs[1])  # frame 1 in column 1
    # Depth row is colour-mapped: the nearest and farthest pixels get different colours.
    drow = arr[18:28, 4:18].reshape(-1, 3)
    d0 = depth[0].reshape(-1)
    assert not np.array_equal(drow[d0.argmin()], drow[d0.argmax()])
    assert contact_sheet(imgs / 255.0, depth, None).size == (3 * 14 + 16, 2 * 10 + 12)
    with pytest.raises(ValueError, match="depth must be"):
        contact_sheet(imgs, depth[:, :5], conf)


def test_ply_round_trip_and_header(tmp_path):
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(37, 3)).astype(np.float32)
    cols = rng.integers(0, 256, (37, 3), dtype=np.uint8)
    path = str(tmp_path / "a.ply")
    n = write_ply(path, pts, cols)
    data = open(path, "rb").read()
    assert len(data) == n
    header = data[: data.index(b"end_header\n")].decode().splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    assert "element vertex 37" in header
    end = data.index(b"end_header\n") + len(b"end_header\n")
    assert len(data) - end == 37 * 15
    p2, c2 = read_ply(data)
    np.testing.assert_array_equal(p2, pts)
    np.testing.assert_array_equal(c2, cols)
    with pytest.raises(ValueError, match="colours"):
        write_ply(io.BytesIO(), pts, cols[:3])


def test_select_points_filters_by_confidence_and_caps():
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(2, 5, 8, 3))
    pts[0, 0, 0] = np.nan
    conf = np.arange(80, dtype=np.float64).reshape(2, 5, 8)
    imgs = rng.integers(0, 256, (2, 5, 8, 3), dtype=np.uint8)
    p, c = select_points(pts, conf, imgs, max_points=1000, conf_percentile=50)
    # Finite points are 1..79; the median of their confidence is 40: 40 points kept.
    assert len(p) == 40
    kept = conf.reshape(-1) >= 40
    np.testing.assert_allclose(p, pts.reshape(-1, 3)[kept].astype(np.float32))
    np.testing.assert_array_equal(c, imgs.reshape(-1, 3)[kept])
    assert len(select_points(pts, conf, imgs, max_points=7)[0]) == 7


def _commit_scene(output_url, scene_id, sc, frame_uris, conf, storage_options=None):
    """Commit a scene through the project's results store, as a pipeline worker would."""
    from httm_dist.results import ResultStore, build_frame_table, scene_arrays

    S, H, W = sc.depth.shape
    arrays = scene_arrays(
        {
            "depth": sc.depth,
            "depth_conf": conf,
            "world_points": sc.world_points,
            "world_points_conf": conf,
            "extrinsic": sc.extrinsic,
            "intrinsic": sc.intrinsic,
            "frame_uris": frame_uris,
        }
    )
    table = build_frame_table(scene_id, frame_uris, [(H, W)] * S, (H, W), sc.extrinsic, sc.intrinsic, sc.depth, conf)
    ResultStore(output_url, storage_options).write_scene(scene_id, table, arrays, done_record(scene_id, S))


def test_write_scene_preview_from_results(tmp_path):
    """The scene-level function reads a committed scene through httm_dist.results and the
    frames from their URIs (through the project's preprocessing) and writes both files."""
    sc = render_scene(5, 28, 42, seed=0)
    frames = write_scene_folder(sc, str(tmp_path / "in"))
    conf = np.linspace(1, 2, 5 * 28 * 42).reshape(5, 28, 42).astype(np.float32)
    _commit_scene(str(tmp_path / "out"), "s1", sc, [f"{frames}/frame_{i:04d}.png" for i in range(5)], conf)
    out = preview.write_scene_preview(str(tmp_path / "out"), "s1", max_frames=3, max_points=1000, conf_percentile=50)
    assert out["png"].endswith("previews/s1.png") and out["ply"].endswith("previews/s1.ply")
    img = Image.open(out["png"])
    assert img.format == "PNG" and img.size == (3 * 42 + 4 * 4, 3 * 28 + 4 * 4)
    # Column 0 is frame 0, decoded from its file unchanged.
    np.testing.assert_array_equal(np.asarray(img)[4:32, 4:46], sc.images[0])
    pts, cols = read_ply(open(out["ply"], "rb").read())
    assert len(pts) == 1000
    # Each point keeps its pixel's colour: look the points up in the GT by position.
    wp = sc.world_points.astype(np.float16).astype(np.float32).reshape(-1, 3)
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(wp).query(pts)
    assert dist.max() < 1e-6
    np.testing.assert_array_equal(cols, sc.images.reshape(-1, 3)[idx])
    conf16 = conf.astype(np.float16).astype(np.float32).reshape(-1)  # stored as float16
    assert conf16[idx].min() >= np.percentile(conf16, 50)


@pytest.mark.s3
def test_previews_on_s3(s3_bucket):
    """Frames, results and previews all on S3 with storage options; and the in-memory
    variant with depth-unprojected points."""
    bucket, so = s3_bucket
    import fsspec

    sc = render_scene(2, 28, 42, seed=1)
    frames = write_scene_folder(sc, f"{bucket}/in", storage_options=so)
    conf = np.ones((2, 28, 42), np.float32)
    _commit_scene(f"{bucket}/run", "a", sc, [f"{frames}/frame_{i:04d}.png" for i in range(2)], conf, so)
    out = preview.write_scene_preview(f"{bucket}/run", "a", so, max_points=50)
    assert out["png"] == f"{bucket}/run/previews/a.png"
    with fsspec.open(out["png"], "rb", **so) as f:
        png = np.asarray(Image.open(io.BytesIO(f.read())))
    assert png.shape == (3 * 28 + 16, 2 * 42 + 12, 3)
    np.testing.assert_array_equal(png[4:32, 50:92], sc.images[1])  # frames were read from S3
    with fsspec.open(out["ply"], "rb", **so) as f:
        assert len(read_ply(f.read())[0]) == 50

    arrays = {"depth": sc.depth, "world_points": sc.world_points, "extrinsic": sc.extrinsic, "intrinsic": sc.intrinsic}
    out = preview.write_preview_files(f"{bucket}/mem", "b", arrays, sc.images, so, point_source="depth")
    with fsspec.open(out["png"], "rb", **so) as f:
        assert Image.open(io.BytesIO(f.read())).size == (2 * 42 + 12, 2 * 28 + 12)
    with fsspec.open(out["ply"], "rb", **so) as f:
        pts, _ = read_ply(f.read())
    np.testing.assert_allclose(pts, sc.world_points.reshape(-1, 3), atol=1e-4)
