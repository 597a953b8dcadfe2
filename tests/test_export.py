"""Export of committed scenes to COLMAP and nerfstudio (httm_dist/export).

Scenes are written with the real result writer from small synthetic arrays. Their photos
encode each pixel's own coordinates (red = column, green = row), and the model inputs are made
by the real loader, so the input pixel a point came from tells, independently of the export's
arithmetic, which original pixel it shows: the truth the exported cameras must project to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np
import pytest
from PIL import Image

from httm_dist.errors import ConfigError, SceneError
from httm_dist.export import derive_geometry, export_scenes, image_names, read_ply
from httm_dist.export.cameras import derive_frames
from httm_dist.export.points import unproject_pixels
from httm_dist.model.geometry import unproject_depth_map_to_point_map
from httm_dist.model.preprocess import load_and_preprocess_frames
from httm_dist.results import ResultStore, build_frame_table, scene_arrays
from httm_dist.results.frames import V2_COLUMNS
from httm_dist.results.record import RunSummary, SceneRecord

import pycolmap  # the test extra installs it (httm-dist[export])
from http_files import serve

TARGET = 56
LANDSCAPE, PORTRAIT = (252, 168), (168, 252)  # (width, height); originals 4.5x the input


def _coord_photo(path: Path, size: tuple[int, int], exif_rotated: bool = False) -> None:
    """A photo whose red is the pixel's column and green its row (sizes < 256). With
    ``exif_rotated`` it is stored lying on its side with EXIF Orientation 6, so that viewers
    (and the job, which applies the orientation) see the upright coordinate picture."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :]
    a[..., 1] = np.arange(h)[:, None]
    img = Image.fromarray(a)
    if not exif_rotated:
        img.save(path)
        return
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def _write_scene(out: Path, scene_id: str, sizes, mode: str, rng, run_id: str = "run-1",
                 exif_rotated: tuple[int, ...] = (), stored_uri: Callable[[str], str] | None = None) -> dict:
    """Photos + a committed format-2 scene; returns what the test needs to check the export.
    ``stored_uri`` gives the URI recorded for a photo's path (default: the path)."""
    folder = out.parent / "input" / scene_id
    folder.mkdir(parents=True)
    uris = []
    for i, size in enumerate(sizes):
        uris.append(str(folder / f"frame_{i:02d}.png"))
        _coord_photo(Path(uris[-1]), size, i in exif_rotated)
    images, geometry = load_and_preprocess_frames(uris, mode=mode, target_size=TARGET)
    s, _, h, w = images.shape
    extr = np.zeros((s, 3, 4), np.float32)
    extr[0, :, :3] = np.eye(3)
    for i in range(1, s):
        extr[i, :, :3] = _rotation(rng)
        extr[i, :, 3] = rng.normal(size=3)
    intr = np.zeros((s, 3, 3), np.float32)
    intr[:, 0, 0] = rng.uniform(40, 80, s)
    intr[:, 1, 1] = rng.uniform(40, 80, s)
    intr[:, 0, 2], intr[:, 1, 2], intr[:, 2, 2] = w / 2, h / 2, 1
    depth = rng.uniform(1, 5, (s, h, w, 1)).astype(np.float32)
    conf = rng.uniform(1, 3, (s, h, w)).astype(np.float32)
    orig_hw = [g.orig_hw for g in geometry]
    uris = [stored_uri(u) for u in uris] if stored_uri else uris
    table = build_frame_table(scene_id, uris, orig_hw, (h, w), extr, intr, depth, conf, geometry=geometry)
    arrays = scene_arrays({"depth": depth, "depth_conf": conf, "extrinsic": extr, "intrinsic": intr,
                           "frame_uris": uris}, dense_dtype="float32")
    record = SceneRecord.done(scene_id, unit="scene", num_frames=s, chunks=1, model_hash="m", merge_hash="h",
                              attempts=1, seconds=0.0, timings={}, run_id=run_id)
    ResultStore(str(out)).write_scene(scene_id, table, arrays, record)
    inputs = np.rint(images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    return {"uris": uris, "extrinsic": extr, "intrinsic": intr, "orig_hw": np.array(orig_hw), "inputs": inputs,
            "conf": conf, "depth": depth[..., 0], "geometry": geometry}


def _as_format_1(out: Path, scene_id: str) -> None:
    """Rewrite a committed scene as a format_version 1 job wrote it: no geometry columns."""
    import pyarrow.parquet as pq

    rec_path = out / "scenes" / f"{scene_id}.json"
    rec = json.loads(rec_path.read_text())
    frames = out / rec["frames_path"]
    pq.write_table(pq.read_table(frames).drop_columns(list(V2_COLUMNS)), frames)
    rec_path.write_text(json.dumps({**rec, "format_version": 1}))


def _truth(scene: dict, frame: np.ndarray, xyz: np.ndarray):
    """Input pixel (row, col) each point projects to with the stored input-size camera, and the
    original-photo position (corner convention) that pixel shows, read from its colour."""
    e, k = scene["extrinsic"][frame].astype(np.float64), scene["intrinsic"][frame].astype(np.float64)
    cam = np.einsum("mij,mj->mi", e[:, :, :3], xyz) + e[:, :, 3]
    uv = np.einsum("mij,mj->mi", k, cam)
    col, row = np.floor(uv[:, 0] / uv[:, 2]).astype(int), np.floor(uv[:, 1] / uv[:, 2]).astype(int)
    h, w = scene["inputs"].shape[1:3]
    rgb = scene["inputs"][frame, np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)]
    return row, col, rgb, np.stack([rgb[:, 0] + 0.5, rgb[:, 1] + 0.5], -1)


def _interior(xy: np.ndarray, hw: np.ndarray, margin: float = 10.0) -> np.ndarray:
    """Points far enough from the photo's border for bicubic's ramp to be exact."""
    return (xy[:, 0] > margin) & (xy[:, 0] < hw[:, 1] - margin) & (xy[:, 1] > margin) & (xy[:, 1] < hw[:, 0] - margin)


CASES = [
    ("crop", [LANDSCAPE, PORTRAIT, LANDSCAPE], ()),  # portrait centre-cropped; landscape padded
    ("pad", [PORTRAIT, LANDSCAPE, PORTRAIT], ()),  # portrait padded left/right, landscape top/bottom
    ("crop", [LANDSCAPE, (200, 150)], ()),  # non-square input: no padding at all
    ("crop", [LANDSCAPE, PORTRAIT], (1,)),  # a portrait photo stored on its side + EXIF orientation
]


@pytest.mark.parametrize("mode, sizes, exif_rotated", CASES)
def test_colmap_round_trip_through_pycolmap(tmp_path, mode, sizes, exif_rotated):
    rng = np.random.default_rng(len(sizes) * 7 + (mode == "pad") + 3 * len(exif_rotated))
    out, dest = tmp_path / "out", tmp_path / "colmap"
    scene = _write_scene(out, "scene_a", sizes, mode, rng, exif_rotated=exif_rotated)
    assert [g.orientation_applied for g in scene["geometry"]] == [i in exif_rotated for i in range(len(sizes))]
    result = export_scenes(str(out), str(dest), "colmap", max_points=3000)
    assert result == {"exported": {"scene_a": str(dest / "scene_a" / "sparse" / "0")}, "failed": {}}
    rec = pycolmap.Reconstruction(str(dest / "scene_a" / "sparse" / "0"))
    s = len(sizes)
    assert rec.num_images() == s and rec.num_cameras() == s
    assert 0 < rec.num_points3D() <= 3000
    by_name = {img.name: img for img in rec.images.values()}
    assert sorted(by_name) == [f"frame_{i:02d}.png" for i in range(s)]
    frame_of_image = {}
    for i in range(s):
        img = by_name[f"frame_{i:02d}.png"]
        frame_of_image[img.image_id] = i
        cam = rec.cameras[img.camera_id]
        assert (cam.height, cam.width) == tuple(scene["orig_hw"][i]) and cam.model_name == "PINHOLE"
        np.testing.assert_allclose(img.cam_from_world().matrix(), scene["extrinsic"][i], atol=2e-6)
    ids = sorted(rec.points3D)
    xyz = np.array([rec.points3D[p].xyz for p in ids])
    elems = [rec.points3D[p].track.elements for p in ids]
    assert all(len(e) == 1 for e in elems)
    image_id = np.array([e[0].image_id for e in elems])
    frame = np.array([frame_of_image[i] for i in image_id])
    proj = np.array([rec.cameras[rec.images[i].camera_id].img_from_cam(rec.images[i].cam_from_world() * x)
                     for i, x in zip(image_id, xyz)])
    observed = np.array([rec.images[i].points2D[e[0].point2D_idx].xy for i, e in zip(image_id, elems)])
    np.testing.assert_allclose(observed, proj, atol=1e-3)  # each observation is its point's projection
    row, col, rgb, truth = _truth(scene, frame, xyz)
    inside = _interior(truth, scene["orig_hw"][frame])
    assert inside.sum() > 0.5 * len(ids)
    err = np.abs(proj - truth)[inside]
    assert err.max() <= 1.0, f"max reprojection error {err.max():.3f} px at the original resolution"
    # colours are the photo's pixel under each observation (red = column, green = row there)
    colour = np.array([rec.points3D[p].color for p in ids]).astype(int)
    np.testing.assert_array_equal(colour[:, :2], np.floor(observed).astype(int))
    assert not (rgb == 255).all(-1).any()  # no point comes from white padding


def test_points_come_from_the_upper_confidence_percentile_of_each_frame(tmp_path):
    rng = np.random.default_rng(5)
    out, dest = tmp_path / "out", tmp_path / "colmap"
    scene = _write_scene(out, "s", [LANDSCAPE, LANDSCAPE], "crop", rng)
    export_scenes(str(out), str(dest), "colmap", conf_percentile=80, max_points=10**6)
    rec = pycolmap.Reconstruction(str(dest / "s" / "sparse" / "0"))
    xyz = np.array([p.xyz for p in rec.points3D.values()])
    frame = np.array([p.track.elements[0].image_id - 1 for p in rec.points3D.values()])
    row, col, _, _ = _truth(scene, frame, xyz)
    for f in range(2):  # landscape photos fill the 42x56 input: no padding to leave out
        c = scene["conf"][f]
        kept = c[row[frame == f], col[frame == f]]
        assert (kept >= np.percentile(c, 80)).all()
        assert abs(len(kept) - 0.2 * c.size) <= 2


def test_nerfstudio_frame_zero_identity_is_diag_and_points_project(tmp_path):
    rng = np.random.default_rng(11)
    out, dest = tmp_path / "out", tmp_path / "ns"
    scene = _write_scene(out, "scene_b", [PORTRAIT, LANDSCAPE, PORTRAIT], "crop", rng)
    result = export_scenes(str(out), str(dest), "nerfstudio", image_mode="crop", max_points=2000)
    assert result["exported"] == {"scene_b": str(dest / "scene_b")}
    meta = json.loads((dest / "scene_b" / "transforms.json").read_text())
    frames = meta["frames"]
    assert np.array_equal(np.array(frames[0]["transform_matrix"]), np.diag([1.0, -1.0, -1.0, 1.0]))
    assert [f["file_path"] for f in frames] == scene["uris"]
    assert [(f["h"], f["w"]) for f in frames] == [tuple(hw) for hw in scene["orig_hw"]]
    xyz, rgb = read_ply((dest / "scene_b" / meta["ply_file_path"]).read_bytes())
    assert 0 < len(xyz) <= 2000
    # nerfstudio's convention: camera looks down -z, y up; pixel = (fx x/-z + cx, -fy y/-z + cy).
    # A point's source frame is the one in which its depth is the stored depth of the pixel it
    # projects to (the stored input-size camera gives that pixel, independently of the export).
    xyz = xyz.astype(np.float64)
    n, s = len(xyz), len(frames)
    source = np.full(n, -1)
    for f in range(s):
        e = scene["extrinsic"][f].astype(np.float64)
        z = xyz @ e[:, :3].T[:, 2] + e[2, 3]
        row, col, _, _ = _truth(scene, np.full(n, f), xyz)
        h, w = scene["depth"].shape[1:]
        ok = (z > 0) & (row >= 0) & (row < h) & (col >= 0) & (col < w)
        d = scene["depth"][f, np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)]  # masked by ok
        source[ok & (np.abs(z - d) < 1e-4 * d)] = f
    assert (source >= 0).all()
    for f, fr in enumerate(frames):
        mine = xyz[source == f]
        w2c = np.linalg.inv(np.array(fr["transform_matrix"]))
        p = mine @ w2c[:3, :3].T + w2c[:3, 3]
        uv = np.stack([fr["fl_x"] * p[:, 0] / -p[:, 2] + fr["cx"], -fr["fl_y"] * p[:, 1] / -p[:, 2] + fr["cy"]], -1)
        _, _, _, truth = _truth(scene, np.full(len(mine), f), mine)
        inside = _interior(truth, np.tile(scene["orig_hw"][f], (len(mine), 1)))
        assert inside.sum() > 0.5 * len(mine) > 0
        assert np.abs(uv - truth)[inside].max() <= 1.0


def test_only_committed_scenes_are_exported(tmp_path):
    rng = np.random.default_rng(3)
    out, dest = tmp_path / "out", tmp_path / "ns"
    _write_scene(out, "good", [LANDSCAPE], "crop", rng)
    _write_scene(out, "half", [LANDSCAPE], "crop", rng)
    (out / "scenes" / "half.json").unlink()  # frames + arrays written, the commit never came
    ResultStore(str(out)).write_failure(SceneRecord.failed(
        "bad", "SceneError: corrupt image", unit="scene", num_frames=1, chunks=1, model_hash="m", merge_hash="h",
        attempts=1))
    result = export_scenes(str(out), str(dest), "nerfstudio")
    assert list(result["exported"]) == ["good"]
    assert sorted(p.name for p in dest.iterdir()) == ["good"]
    with pytest.raises(ConfigError, match="'bad' is not committed.*failed.*corrupt image"):
        export_scenes(str(out), str(dest), "nerfstudio", scene_ids=["bad"])
    with pytest.raises(ConfigError, match="'half' is not committed.*no record"):
        export_scenes(str(out), str(dest), "colmap", scene_ids=["half"])
    assert not (dest / "half").exists() and not (dest / "bad").exists()


def test_a_photo_the_server_refuses_fails_its_scene_in_one_redacted_line(tmp_path):
    """A presigned photo URL answering 403 (expired) fails its scene's export, as a missing
    photo does, with one line naming the URL once and none of its signature."""
    rng = np.random.default_rng(5)
    out, dest = tmp_path / "out", tmp_path / "ns"
    (tmp_path / "input").mkdir()
    signed = "?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F20261130&X-Amz-Signature=0123456789abcdef0123456789abcdef"
    with serve(str(tmp_path / "input")) as (base, server):
        def presigned(path: str) -> str:
            return f"{base}/{Path(path).parent.name}/{Path(path).name}{signed}"

        _write_scene(out, "good", [LANDSCAPE], "crop", rng)
        _write_scene(out, "signed", [LANDSCAPE, PORTRAIT], "crop", rng, stored_uri=presigned)
        assert sorted(export_scenes(str(out), str(dest), "nerfstudio")["exported"]) == ["good", "signed"]
        server.forbidden = {"/signed/frame_01.png"}
        result = export_scenes(str(out), str(tmp_path / "again"), "nerfstudio")
    assert list(result["exported"]) == ["good"]
    message = result["failed"]["signed"]
    assert message.startswith(f"photo {base}/signed/frame_01.png?X-Amz-Credential=") and "\n" not in message
    assert message.endswith("is needed for the point colours: PermissionError: HTTP 403 Forbidden"), message
    assert message.count("frame_01.png") == 1 and "0123456789abcdef" not in message and "AKIA" not in message


def test_format_1_mode_comes_from_the_run_summary_or_fails_clearly(tmp_path):
    rng = np.random.default_rng(4)
    out, dest = tmp_path / "out", tmp_path / "ns"
    _write_scene(out, "p", [PORTRAIT, LANDSCAPE], "pad", rng, run_id="r1")
    _as_format_1(out, "p")
    result = export_scenes(str(out), str(dest), "nerfstudio")
    assert "--image-mode" in result["failed"]["p"] and not result["exported"]
    ResultStore(str(out)).write_run_summary(RunSummary(run_id="r1", config={"image": {"mode": "pad", "size": TARGET}}))
    result = export_scenes(str(out), str(dest), "nerfstudio")
    assert list(result["exported"]) == ["p"]
    frames = {}
    for mode in ("pad", "crop"):
        export_scenes(str(out), str(tmp_path / mode), "nerfstudio", image_mode=mode)
        frames[mode] = json.loads((tmp_path / mode / "p" / "transforms.json").read_text())["frames"]
    assert json.loads((dest / "p" / "transforms.json").read_text())["frames"] == frames["pad"]
    # the portrait frame 0: pad mode resized it 42x56 (x4 wide, x4.5 high), crop mode 56x84 (x3)
    assert frames["pad"][0]["fl_x"] / frames["crop"][0]["fl_x"] == pytest.approx(4 / 3, rel=1e-6)
    assert frames["pad"][0]["fl_y"] / frames["crop"][0]["fl_y"] == pytest.approx(4.5 / 3, rel=1e-6)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_derived_frame_geometry_is_the_loaders(tmp_path, mode):
    # odd sizes whose resize rounds up and down, portrait and landscape, in one batch
    sizes = [(251, 167), (167, 251), (200, 61), (99, 240), (140, 140)]
    uris = []
    for i, size in enumerate(sizes):
        uris.append(str(tmp_path / f"{i}.png"))
        _coord_photo(Path(uris[-1]), size)
    images, geometry = load_and_preprocess_frames(uris, mode=mode, target_size=TARGET)
    input_hw = [tuple(images.shape[-2:])] * len(sizes)
    assert derive_frames([g.orig_hw for g in geometry], input_hw, mode) == geometry


def test_geometry_rejects_impossible_sizes():
    g = derive_geometry([(252, 168)], [(56, 56)], "crop")  # resized 56x84, rows 14..70 kept
    np.testing.assert_allclose(g.input_to_original[0], [[3, 0, 0], [0, 3, 42], [0, 0, 1]])
    np.testing.assert_array_equal(g.valid_box[0], [0, 0, 56, 56])
    with pytest.raises(ValueError, match="not square"):
        derive_geometry([(252, 168)], [(42, 56)], "pad")
    with pytest.raises(ValueError, match="larger than the stored input"):
        derive_geometry([(252, 168)], [(42, 56)], "crop")  # a portrait fills 56 rows, not 42
    with pytest.raises(ValueError, match="cannot be resized"):
        derive_geometry([(10, 1000)], [(42, 56)], "crop")
    with pytest.raises(ValueError, match="mode"):
        derive_geometry([(10, 10)], [(14, 14)], "stretch")


@pytest.mark.parametrize("mode, sizes, exif_rotated", CASES[:3])
def test_stored_and_derived_geometry_export_the_same(tmp_path, mode, sizes, exif_rotated):
    rng = np.random.default_rng(21)
    out = tmp_path / "out"
    _write_scene(out, "v", sizes, mode, rng)
    models = {}
    for version in (2, 1):
        if version == 1:
            _as_format_1(out, "v")
        dest = tmp_path / f"v{version}"
        assert list(export_scenes(str(out), str(dest), "colmap", image_mode=mode, max_points=400)["exported"]) == ["v"]
        models[version] = pycolmap.Reconstruction(str(dest / "v" / "sparse" / "0"))
    new, old = models[2], models[1]
    assert sorted(new.cameras) == sorted(old.cameras) and new.num_points3D() == old.num_points3D() == 400
    for cid in new.cameras:
        assert (new.cameras[cid].width, new.cameras[cid].height) == (old.cameras[cid].width, old.cameras[cid].height)
        np.testing.assert_allclose(new.cameras[cid].params, old.cameras[cid].params, rtol=1e-6)
    for pid in new.points3D:
        a, b = new.points3D[pid], old.points3D[pid]
        np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-12)
        np.testing.assert_array_equal(a.color, b.color)
        ea, eb = a.track.elements[0], b.track.elements[0]
        assert ea.image_id == eb.image_id
        np.testing.assert_allclose(new.images[ea.image_id].points2D[ea.point2D_idx].xy,
                                   old.images[eb.image_id].points2D[eb.point2D_idx].xy, atol=1e-4)


def test_unproject_pixels_is_the_geometry_helper_at_pixel_centres():
    rng = np.random.default_rng(8)
    s, h, w = 2, 5, 7
    depth = rng.uniform(0.5, 4, (s, h, w))
    extr = np.concatenate([np.stack([_rotation(rng) for _ in range(s)]), rng.normal(size=(s, 3, 1))], -1)
    intr = np.tile(np.eye(3), (s, 1, 1))
    intr[:, 0, 0], intr[:, 1, 1], intr[:, 0, 2], intr[:, 1, 2] = 9, 11, w / 2, h / 2
    shifted = intr.copy()
    shifted[:, :2, 2] -= 0.5
    ref = unproject_depth_map_to_point_map(depth, extr, shifted)
    f, r, c = np.unravel_index(np.arange(s * h * w), (s, h, w))
    xyz = unproject_pixels(depth[f, r, c], extr, intr, f, np.stack([c + 0.5, r + 0.5], -1))
    np.testing.assert_allclose(xyz, ref[f, r, c], rtol=1e-12, atol=1e-12)


def test_image_names():
    assert image_names(["/d/s/a.png", "/d/s/b.png"]) == ["a.png", "b.png"]
    assert image_names(["s3://b/s/x/a.png", "s3://b/s/y/a.png"]) == ["x/a.png", "y/a.png"]
    assert image_names(["tar://f1.jpg::s3://b/s.tar", "tar://f2.jpg::s3://b/s.tar"]) == ["f1.jpg", "f2.jpg"]
    with pytest.raises(SceneError, match="same"):
        image_names(["tar://f1.jpg::s3://b/s.tar", "tar://f1.jpg::s3://b/t.tar"])


def test_text_option_and_any_fsspec_urls(tmp_path):
    rng = np.random.default_rng(6)
    out = tmp_path / "out"
    _write_scene(out, "t", [LANDSCAPE, LANDSCAPE], "crop", rng)
    fs = fsspec.filesystem("memory")
    fs.put(str(out), "/export-test/out", recursive=True)  # results on another filesystem
    src, dest = "memory://export-test/out", "memory://export-test/dest"
    try:
        export_scenes(src, dest, "colmap", max_points=500)
        export_scenes(src, dest, "colmap", max_points=500, text=True)  # replaces the .bin files
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/export-test/dest/t/sparse/0", detail=False))
        assert names == sorted(f"{n}.txt" for n in ("cameras", "images", "points3D", "rigs", "frames"))
        local = tmp_path / "copy"
        local.mkdir()
        for n in names:
            (local / n).write_bytes(fs.cat_file(f"/export-test/dest/t/sparse/0/{n}"))
        rec = pycolmap.Reconstruction(str(local))
        assert rec.num_images() == 2 and rec.num_points3D() == 500
    finally:
        fsspec.filesystem("memory").rm("/export-test", recursive=True)


def test_options_are_checked():
    for kwargs, match in [
        ({"format": "ply"}, "format"),
        ({"format": "colmap", "conf_percentile": 100}, "percentile"),
        ({"format": "colmap", "max_points": 0}, "max points"),
        ({"format": "nerfstudio", "text": True}, "COLMAP option"),
        ({"format": "colmap", "image_mode": "stretch"}, "image mode"),
    ]:
        fmt = kwargs.pop("format")
        with pytest.raises(ConfigError, match=match):
            export_scenes("/nonexistent", "/nowhere", fmt, **kwargs)


def test_cli_export_and_missing_pycolmap(tmp_path, monkeypatch, capsys):
    from httm_dist.cli import main

    rng = np.random.default_rng(9)
    out = tmp_path / "out"
    _write_scene(out, "c", [LANDSCAPE], "crop", rng)
    assert main(["export", str(out), "--format", "colmap", "--to", str(tmp_path / "d"), "--scene", "c",
                 "--max-points", "100"]) == 0
    assert (tmp_path / "d" / "c" / "sparse" / "0" / "images.bin").exists()
    assert main(["export", str(out), "--format", "nerfstudio", "--to", str(tmp_path / "e"), "--scene", "nope"]) == 2
    assert "'nope' is not committed" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pycolmap", None)  # import pycolmap now raises ImportError
    assert main(["export", str(out), "--format", "colmap", "--to", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'httm-dist[export]'" in err[0]
