"""The synthetic renderer: ground truth consistent with itself and with the VGGT conventions,
deterministic, smooth camera paths, and the ground-truth folder format round trip."""

from __future__ import annotations

import time

import numpy as np
import pytest

from httm_dist.errors import SceneError
from httm_dist.eval.gt_loader import load_gt_scene
from httm_dist.eval.metrics import camera_centers, unproject_depth
from httm_dist.eval.synthetic import make_synthetic_dataset, render_scene, write_scene_folder


@pytest.fixture(scope="module")
def scene():
    return render_scene(num_frames=6, height=56, width=84, seed=3)


def test_shapes_dtypes_and_closed_room(scene):
    S, H, W = 6, 56, 84
    assert scene.images.shape == (S, H, W, 3) and scene.images.dtype == np.uint8
    assert scene.depth.shape == (S, H, W) and scene.depth.dtype == np.float32
    assert scene.extrinsic.shape == (S, 3, 4) and scene.intrinsic.shape == (S, 3, 3)
    assert scene.world_points.shape == (S, H, W, 3)
    assert np.isfinite(scene.depth).all() and scene.depth.min() > 0.05  # every ray hits a wall
    # Enough texture to match: every frame has contrast.
    assert scene.images.reshape(S, -1).std(axis=1).min() > 20
    # Principal point at (W/2, H/2), square pixels, rotations proper.
    np.testing.assert_allclose(scene.intrinsic[:, 0, 2], W / 2)
    np.testing.assert_allclose(scene.intrinsic[:, 1, 2], H / 2)
    np.testing.assert_allclose(scene.intrinsic[:, 0, 0], scene.intrinsic[:, 1, 1])
    R = scene.extrinsic[:, :, :3].astype(np.float64)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-6)


def test_world_points_equal_unprojected_depth(scene):
    wp = unproject_depth(scene.depth, scene.extrinsic, scene.intrinsic)
    np.testing.assert_allclose(wp, scene.world_points, atol=1e-4 * np.abs(scene.world_points).max())


def test_projection_returns_each_pixel_without_half_pixel_offset(scene):
    """x = K (R X + t) maps each pixel's world point back to (u, v) and z to its depth."""
    S, H, W = scene.depth.shape
    E, K = scene.extrinsic.astype(np.float64), scene.intrinsic.astype(np.float64)
    cam = np.einsum("sij,shwj->shwi", E[:, :, :3], scene.world_points.astype(np.float64)) + E[:, None, None, :, 3]
    pix = np.einsum("sij,shwj->shwi", K, cam)
    v, u = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    np.testing.assert_allclose(pix[..., 0] / pix[..., 2], np.broadcast_to(u, (S, H, W)), atol=2e-3)
    np.testing.assert_allclose(pix[..., 1] / pix[..., 2], np.broadcast_to(v, (S, H, W)), atol=2e-3)
    np.testing.assert_allclose(cam[..., 2], scene.depth, rtol=1e-5)


def test_depth_and_cameras_agree_across_frames(scene):
    """Frame 0's points projected into frame j land on frame j's own surface points:
    the distance to frame j's point at the nearest pixel is within a few pixel footprints
    for most pixels (occlusion edges and grazing surfaces allow a small tail)."""
    E, K = scene.extrinsic.astype(np.float64), scene.intrinsic.astype(np.float64)
    X = scene.world_points[0].reshape(-1, 3).astype(np.float64)
    S, H, W = scene.depth.shape
    for j in range(1, S):
        cam = X @ E[j, :, :3].T + E[j, :, 3]
        u = K[j, 0, 0] * cam[:, 0] / cam[:, 2] + K[j, 0, 2]
        v = K[j, 1, 1] * cam[:, 1] / cam[:, 2] + K[j, 1, 2]
        inside = (cam[:, 2] > 0) & (u > 0.5) & (u < W - 1.5) & (v > 0.5) & (v < H - 1.5)
        assert inside.mean() > 0.4, f"frame {j} overlaps frame 0 on only {inside.mean():.0%}"
        ui, vi = np.rint(u[inside]).astype(int), np.rint(v[inside]).astype(int)
        Y = scene.world_points[j][vi, ui].astype(np.float64)
        footprint = cam[inside, 2] / K[j, 0, 0]
        ratio = np.linalg.norm(X[inside] - Y, axis=1) / footprint
        assert np.median(ratio) < 1.0, (j, np.median(ratio))
        assert np.quantile(ratio, 0.8) < 3.0, (j, np.quantile(ratio, 0.8))


def test_exact_match_with_reprojected_rays(scene):
    """Rendering frame 1's camera exactly through frame 0's points (a 1x1 image whose
    principal point puts the point at pixel 0) returns the same point when it is visible."""
    from httm_dist.eval.synthetic import render_views

    rng = np.random.default_rng(0)
    E, K = scene.extrinsic.astype(np.float64), scene.intrinsic.astype(np.float64)
    X = scene.world_points[0].reshape(-1, 3)[rng.choice(56 * 84, 200, replace=False)].astype(np.float64)
    cam = X @ E[1, :, :3].T + E[1, :, 3]
    u = K[1, 0, 0] * cam[:, 0] / cam[:, 2] + K[1, 0, 2]
    v = K[1, 1, 1] * cam[:, 1] / cam[:, 2] + K[1, 1, 2]
    Ks = np.repeat(K[1:2], len(X), 0)
    Ks[:, 0, 2] -= u
    Ks[:, 1, 2] -= v
    _, depth, points = render_views(scene.room, np.repeat(E[1:2], len(X), 0), Ks, 1, 1)
    visible = np.abs(depth[:, 0, 0] - cam[:, 2]) < 1e-3 * cam[:, 2]
    assert visible.mean() > 0.3
    np.testing.assert_allclose(points[visible, 0, 0], X[visible], atol=1e-3)
    # Occluded points are behind what the camera sees, never in front of it.
    assert np.all(depth[~visible, 0, 0] < cam[~visible, 2])


def test_camera_path_is_smooth():
    sc = render_scene(num_frames=10, height=28, width=42, seed=11, path="random")
    C = camera_centers(sc.extrinsic)
    steps = np.linalg.norm(np.diff(C, axis=0), axis=1)
    assert steps.max() < 0.4 and steps.min() > 1e-3
    R = sc.extrinsic[:, :, :3].astype(np.float64)
    rel = np.einsum("sij,skj->sik", R[1:], R[:-1])
    angles = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angles.max() < 10.0


def test_deterministic_and_seed_dependent():
    a = render_scene(3, 28, 42, seed=5)
    b = render_scene(3, 28, 42, seed=5)
    c = render_scene(3, 28, 42, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.depth, b.depth)
    assert not np.array_equal(a.images, c.images)


def test_first_camera_frame_is_a_rigid_change_of_world():
    room = render_scene(4, 28, 42, seed=2)
    first = render_scene(4, 28, 42, seed=2, world_frame="first_camera")
    np.testing.assert_allclose(first.extrinsic[0], np.eye(3, 4), atol=1e-6)
    np.testing.assert_array_equal(first.depth, room.depth)
    R0, t0 = room.extrinsic[0, :, :3].astype(np.float64), room.extrinsic[0, :, 3].astype(np.float64)
    np.testing.assert_allclose(first.world_points, room.world_points @ R0.T + t0, atol=1e-4)


def test_supersampling_keeps_depth_and_smooths_colour():
    a = render_scene(2, 28, 42, seed=4)
    b = render_scene(2, 28, 42, seed=4, supersample=3)
    np.testing.assert_array_equal(a.depth, b.depth)
    assert not np.array_equal(a.images, b.images)


def test_render_is_fast():
    t = time.perf_counter()
    render_scene(8, 126, 168, seed=0)
    # Well under a second on a free core; generous for a shared CI machine.
    assert time.perf_counter() - t < 3.0


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="unknown synthetic scene option"):
        render_scene(2, 28, 42, colour="red")
    with pytest.raises(ValueError, match="path"):
        render_scene(2, 28, 42, path="spiral")
    with pytest.raises(ValueError, match="texture_kinds"):
        render_scene(2, 28, 42, texture_kinds=("marble",))


def _check_round_trip(url, storage_options, sc):
    uris, gt = load_gt_scene(url, storage_options)
    assert [u.rsplit("/", 1)[-1] for u in uris] == [f"frame_{i:04d}.png" for i in range(sc.num_frames)]
    np.testing.assert_array_equal(gt.depth, sc.depth)
    np.testing.assert_allclose(gt.extrinsic, sc.extrinsic, atol=1e-7)
    np.testing.assert_allclose(gt.intrinsic, sc.intrinsic, atol=1e-5)
    np.testing.assert_allclose(gt.world_points(), sc.world_points, atol=1e-4)
    return uris


def test_scene_folder_round_trip_local(tmp_path):
    from PIL import Image

    sc = render_scene(3, 28, 42, seed=1)
    url = write_scene_folder(sc, str(tmp_path / "s"))
    uris = _check_round_trip(url, None, sc)
    np.testing.assert_array_equal(np.asarray(Image.open(uris[2])), sc.images[2])


@pytest.mark.s3
def test_scene_folder_round_trip_s3(s3_bucket):
    bucket, so = s3_bucket
    sc = render_scene(2, 28, 42, seed=1)
    url = write_scene_folder(sc, f"{bucket}/scenes/a", storage_options=so)
    uris = _check_round_trip(url, so, sc)
    assert uris[0].startswith("s3://")


def test_make_synthetic_dataset(tmp_path):
    dirs = make_synthetic_dataset(str(tmp_path / "data"), num_scenes=2, num_frames=3, height=28, width=42, seed=7)
    assert len(dirs) == 2
    for d in dirs:
        names = sorted(p.name for p in (tmp_path / "data" / d.rsplit("/", 1)[-1]).iterdir())
        assert names == ["cameras.json", "depth", "frame_0000.png", "frame_0001.png", "frame_0002.png"]


def test_gt_loader_cam_to_world_depth_scale_and_resize(tmp_path):
    """A 7-Scenes style folder: cam_to_world poses, millimetre 16-bit PNG depth with 0 invalid;
    and GroundTruth.resized reproduces a direct render at the smaller size exactly."""
    import json

    from PIL import Image

    big = render_scene(2, 280, 336, seed=9)
    small = render_scene(2, 126, 168, seed=9)
    root = tmp_path / "seven"
    (root / "depth").mkdir(parents=True)
    frames = []
    for i in range(2):
        Image.fromarray(big.images[i]).save(root / f"img{i}.png")
        mm = np.rint(big.depth[i] * 1000).astype(np.uint16)
        mm[0, 0] = 0
        mm[0, 1] = 65535  # 7-Scenes' hole marker
        Image.fromarray(mm).save(root / "depth" / f"d{i}.png")
        R, t = big.extrinsic[i, :, :3].astype(np.float64), big.extrinsic[i, :, 3].astype(np.float64)
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = R.T, -R.T @ t
        frames.append({"image": f"img{i}.png", "depth": f"depth/d{i}.png", "cam_to_world": c2w.tolist(), "intrinsic": big.intrinsic[i].tolist()})
    (root / "cameras.json").write_text(json.dumps({"format": "httm-dist-gt", "version": 1, "depth_scale": 1000, "max_depth": 60, "frames": frames}))
    uris, gt = load_gt_scene(str(root))
    assert uris[1].endswith("img1.png")
    np.testing.assert_allclose(gt.extrinsic, big.extrinsic, atol=1e-6)
    assert not gt.valid[0, 0, 0] and not gt.valid[0, 0, 1] and gt.valid[0, 0, 2]
    np.testing.assert_allclose(gt.depth[:, 1:], big.depth[:, 1:], atol=6e-4)
    small_gt = gt.resized(126, 168, mode="crop")
    np.testing.assert_allclose(small_gt.intrinsic, small.intrinsic, rtol=1e-5)
    np.testing.assert_allclose(small_gt.depth, small.depth, atol=6e-4)


def test_gt_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(SceneError, match="cameras.json"):
        load_gt_scene(str(tmp_path))
    (tmp_path / "cameras.json").write_text('{"frames": [{"image": "a.png", "intrinsic": [[1,0,0],[0,1,0],[0,0,1]]}]}')
    with pytest.raises(SceneError, match="extrinsic"):
        load_gt_scene(str(tmp_path))
