"""Every metric against a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest

from httm_dist.eval.metrics import (
    apply_sim3,
    ate,
    auc,
    camera_metrics,
    depth_metrics,
    evaluate_scene,
    pointcloud_metrics,
    relative_pose_errors,
    umeyama_sim3,
)
from httm_dist.eval.synthetic import render_scene


def _rot(axis, deg):
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    a = np.radians(deg)
    Kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * Kx + (1 - np.cos(a)) * Kx @ Kx


def _random_sim3(rng):
    return float(rng.uniform(0.3, 3.0)), _rot(rng.normal(size=3), rng.uniform(10, 170)), rng.normal(size=3) * 2


def _sim3_cameras(extrinsic, depth, points, s, Ra, ta):
    """The same scene expressed in the world X' = s Ra X + ta (camera coordinates scale by s)."""
    R, t = extrinsic[:, :, :3].astype(np.float64), extrinsic[:, :, 3].astype(np.float64)
    R2 = R @ Ra.T
    t2 = s * t - np.einsum("sij,j->si", R2, ta)
    return np.concatenate([R2, t2[..., None]], -1), depth * s, apply_sim3(points, s, Ra, ta)


def test_umeyama_recovers_known_sim3_and_ignores_zero_weights():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(100, 3))
    s, R, t = _random_sim3(rng)
    dst = apply_sim3(src, s, R, t)
    dst_out = dst.copy()
    dst_out[:10] += rng.normal(size=(10, 3)) * 5  # outliers, weight 0
    w = np.ones(100)
    w[:10] = 0
    for d, weights in ((dst, None), (dst_out, w)):
        s2, R2, t2 = umeyama_sim3(src, d, weights)
        assert s2 == pytest.approx(s, rel=1e-9)
        np.testing.assert_allclose(R2, R, atol=1e-9)
        np.testing.assert_allclose(t2, t, atol=1e-9)


def test_depth_median_scaling_hand_cases():
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.5, 5, size=(2, 7, 9))
    m = depth_metrics(gt * 3.7, gt)
    assert m["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert m["delta_1.25"] == 1.0
    assert m["depth_scale"] == pytest.approx(1 / 3.7)
    # gt [1,1,1,1,0], pred [2,2,2,4,9]: the 0 is invalid; s = 1/2; errors 0,0,0,1 -> 0.25;
    # ratios 1,1,1,2 -> delta 0.75.
    m = depth_metrics(np.array([2, 2, 2, 4, 9.0]).reshape(1, 1, 5), np.array([1, 1, 1, 1, 0.0]).reshape(1, 1, 5))
    assert m["abs_rel"] == pytest.approx(0.25)
    assert m["delta_1.25"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="differ in shape"):
        depth_metrics(np.ones((1, 2, 3)), np.ones((1, 3, 2)))


def test_pointcloud_after_sim3_is_zero_and_hand_offset_case():
    rng = np.random.default_rng(2)
    gt = rng.normal(size=(500, 3))
    s, R, t = _random_sim3(rng)
    pred = apply_sim3(gt, s, R, t)  # the prediction lives in another Sim(3) frame
    m = pointcloud_metrics(pred, gt)
    for key in ("accuracy", "accuracy_median", "completeness", "completeness_median"):
        assert m[key] < 1e-9, key
    assert m["points_scale"] == pytest.approx(1 / s)
    assert pointcloud_metrics(pred, gt, align=False)["accuracy"] > 0.1
    # A grid of spacing 1 shifted by 0.1 along z (no alignment): every NN distance is 0.1.
    g = np.stack(np.meshgrid(np.arange(5.0), np.arange(5.0), np.arange(5.0)), -1).reshape(-1, 3)
    m = pointcloud_metrics(g + [0, 0, 0.1], g, align=False)
    assert m["accuracy"] == pytest.approx(0.1) and m["completeness"] == pytest.approx(0.1)
    assert m["accuracy_median"] == pytest.approx(0.1)
    # Masked points take no part: a wild point outside the mask changes nothing.
    wild = g + [0, 0, 0.1]
    wild[0] = 1e3
    valid = np.ones(len(g), bool)
    valid[0] = False
    assert pointcloud_metrics(wild, g, valid=valid, align=False)["accuracy"] == pytest.approx(0.1)


def _cams(Rs, centers):
    Rs = np.asarray(Rs, dtype=np.float64)
    C = np.asarray(centers, dtype=np.float64)
    t = -np.einsum("sij,sj->si", Rs, C)
    return np.concatenate([Rs, t[..., None]], -1)


def test_known_rotation_error():
    rng = np.random.default_rng(3)
    Rs = np.stack([_rot(rng.normal(size=3), rng.uniform(0, 90)) for _ in range(3)])
    C = rng.normal(size=(3, 3))
    gt = _cams(Rs, C)
    Rp = Rs.copy()
    Rp[1] = _rot([0.2, 1, -0.3], 10.0) @ Rs[1]  # frame 1 turned by 10 degrees, same centre
    rot, trans = relative_pose_errors(_cams(Rp, C), gt)
    np.testing.assert_allclose(rot, [10.0, 0.0, 10.0], atol=1e-6)  # pairs (0,1) (0,2) (1,2)


def test_known_translation_direction_error():
    I = np.stack([np.eye(3)] * 2)
    gt = _cams(I, [[0, 0, 0], [1, 0, 0]])
    pred = _cams(I, [[0, 0, 0], [2 * np.cos(np.radians(20)), 2 * np.sin(np.radians(20)), 0]])  # scale is free
    rot, trans = relative_pose_errors(pred, gt)
    assert rot[0] == pytest.approx(0.0, abs=1e-6)
    assert trans[0] == pytest.approx(20.0, abs=1e-6)
    # 160 degrees off is 20 with the sign ambiguity of VGGT's evaluation, 160 without.
    pred = _cams(I, [[0, 0, 0], [np.cos(np.radians(160)), np.sin(np.radians(160)), 0]])
    assert relative_pose_errors(pred, gt)[1][0] == pytest.approx(20.0, abs=1e-6)
    assert relative_pose_errors(pred, gt, translation_ambiguity=False)[1][0] == pytest.approx(160.0, abs=1e-6)


def test_auc_hand_cases():
    assert auc(np.zeros(5)) == 1.0
    # 0.5 is below every threshold 1..30; 15.5 below 16..30 -> (15 * 0.5 + 15 * 1) / 30.
    assert auc(np.array([0.5, 15.5])) == pytest.approx(0.75)
    assert auc(np.array([31.0, 90.0])) == 0.0


def test_ate_zero_under_sim3_and_hand_case():
    rng = np.random.default_rng(4)
    Rs = np.stack([_rot(rng.normal(size=3), 30) for _ in range(5)])
    C = rng.normal(size=(5, 3))
    gt = _cams(Rs, C)
    s, Ra, ta = _random_sim3(rng)
    pred, _, _ = _sim3_cameras(gt, np.ones(1), np.zeros(3), s, Ra, ta)
    assert ate(pred, gt) < 1e-9
    # Square of centres with a checkerboard z offset e: the best Sim(3) is the pure scale
    # s = 2 / (2 + e^2), so ATE^2 = 2 (s - 1)^2 + s^2 e^2.
    e = 0.1
    Cg = np.array([[1, 1, 0], [-1, -1, 0], [1, -1, 0], [-1, 1, 0.0]])
    Cp = Cg + np.array([[0, 0, e], [0, 0, e], [0, 0, -e], [0, 0, -e]])
    I4 = np.stack([np.eye(3)] * 4)
    sc = 2 / (2 + e**2)
    assert ate(_cams(I4, Cp), _cams(I4, Cg)) == pytest.approx(np.sqrt(2 * (sc - 1) ** 2 + sc**2 * e**2), rel=1e-9)


def test_camera_metrics_perfect_prediction():
    sc = render_scene(4, 28, 42, seed=0)
    m = camera_metrics(sc.extrinsic, sc.extrinsic)
    assert m["rot_err_mean"] < 1e-3 and m["trans_err_mean"] < 1e-2 and m["auc@30"] == 1.0 and m["ate"] < 1e-5


def test_evaluate_scene_sim3_prediction_is_perfect():
    """The ground truth re-expressed in a random Sim(3) world (what a model predicts at
    best) scores perfectly on every metric, with both point sources."""
    sc = render_scene(4, 42, 56, seed=1)
    rng = np.random.default_rng(5)
    s, Ra, ta = _random_sim3(rng)
    E, D, P = _sim3_cameras(sc.extrinsic, sc.depth.astype(np.float64), sc.world_points, s, Ra, ta)
    pred = {"depth": D[..., None], "extrinsic": E, "intrinsic": sc.intrinsic, "world_points": P}
    for source in ("world_points", "depth"):
        m = evaluate_scene(pred, sc.depth, sc.extrinsic, sc.intrinsic, point_source=source)
        assert m["abs_rel"] < 1e-6 and m["delta_1.25"] == 1.0
        assert m["accuracy"] < 1e-4 and m["completeness"] < 1e-4
        assert m["rot_err_mean"] < 1e-2 and m["ate"] < 1e-4 and m["auc@30"] == 1.0
    noisy = dict(pred, depth=D[..., None] * rng.uniform(0.8, 1.25, D.shape)[..., None])
    assert evaluate_scene(noisy, sc.depth, sc.extrinsic, sc.intrinsic)["abs_rel"] > 0.05
    with pytest.raises(ValueError, match="resize the ground truth"):
        evaluate_scene(pred, sc.depth[:, :-1], sc.extrinsic, sc.intrinsic)
