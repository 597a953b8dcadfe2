"""Sim(3) estimation and the camera/point/depth transforms that go with it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from httm_dist.errors import SceneError
from httm_dist.model.geometry import unproject_depth_map_to_point_map
from httm_dist.pipeline.align import (
    AlignmentError,
    Sim3,
    robust_sim3,
    scale_depth,
    transform_extrinsics,
    transform_points,
    umeyama_sim3,
)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_sim3(rng: np.random.Generator) -> Sim3:
    return Sim3(float(np.exp(rng.uniform(-1.5, 1.5))), random_rotation(rng), rng.normal(scale=3.0, size=3))


def assert_sim3_close(a: Sim3, b: Sim3, atol: float) -> None:
    assert abs(a.scale - b.scale) <= atol * b.scale, (a.scale, b.scale)
    np.testing.assert_allclose(a.rotation, b.rotation, atol=atol)
    np.testing.assert_allclose(a.translation, b.translation, atol=atol * max(1.0, np.abs(b.translation).max()))


@pytest.mark.parametrize("seed", range(5))
def test_noise_free_recovery_is_exact(seed):
    rng = np.random.default_rng(seed)
    truth = random_sim3(rng)
    src = rng.normal(size=(400, 3)) * rng.uniform(0.1, 10.0)
    dst = truth.apply(src)
    weights = rng.uniform(0.1, 5.0, size=400)
    assert_sim3_close(umeyama_sim3(src, dst), truth, 1e-9)
    assert_sim3_close(umeyama_sim3(src, dst, weights), truth, 1e-9)
    for ransac in (True, False):
        est, report = robust_sim3(src, dst, weights, ransac=ransac)
        assert_sim3_close(est, truth, 1e-9)
        assert report.residual_median < 1e-9 and report.inlier_fraction == 1.0
        assert report.num_points == 400


@pytest.mark.parametrize("outlier_kind", ["scattered", "structured"])
@pytest.mark.parametrize("loss", ["cauchy", "huber"])
@pytest.mark.parametrize("seed", range(3))
def test_noise_and_20_percent_outliers(seed, loss, outlier_kind):
    rng = np.random.default_rng(100 + seed)
    truth = random_sim3(rng)
    n = 2000
    src = rng.uniform(-2.0, 2.0, size=(n, 3))
    dst = truth.apply(src)
    extent = np.median(np.linalg.norm(dst - np.median(dst, 0), axis=1))
    dst = dst + rng.normal(scale=0.01 * extent, size=dst.shape)
    outliers = rng.choice(n, size=n // 5, replace=False)
    if outlier_kind == "scattered":  # gross errors of about the scene extent, random directions
        dst[outliers] += rng.normal(size=(len(outliers), 3)) * extent
    else:  # a consistent wrong motion (e.g. a moving object): a second, competing Sim(3)
        dst[outliers] = random_sim3(rng).apply(src[outliers])
    weights = rng.uniform(1.0, 3.0, size=n)

    est, report = robust_sim3(src, dst, weights, loss=loss, ransac=(loss == "cauchy"))
    tol = 0.003 if loss == "cauchy" else 0.015  # huber keeps a bounded pull from every outlier
    assert abs(est.scale / truth.scale - 1) < tol
    angle = np.arccos(np.clip((np.trace(est.rotation.T @ truth.rotation) - 1) / 2, -1, 1))
    assert angle < tol
    inliers = np.setdiff1d(np.arange(n), outliers)
    err = np.linalg.norm(est.apply(src[inliers]) - truth.apply(src[inliers]), axis=1)
    assert np.median(err) < tol * extent
    assert 0.7 < report.inlier_fraction < 0.85
    assert report.residual_median < 0.05

    # the plain least-squares fit is visibly pulled away: the robust path is what fixes it
    plain = umeyama_sim3(src, dst, weights)
    plain_err = np.linalg.norm(plain.apply(src[inliers]) - truth.apply(src[inliers]), axis=1)
    assert np.median(plain_err) > 3 * np.median(err)


def test_reflected_points_still_give_a_proper_rotation():
    rng = np.random.default_rng(7)
    src = rng.normal(size=(50, 3))
    dst = src * np.array([1.0, 1.0, -1.0])
    est = umeyama_sim3(src, dst)
    assert np.linalg.det(est.rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(est.rotation @ est.rotation.T, np.eye(3), atol=1e-12)


def test_zero_weights_and_non_finite_points_are_ignored():
    rng = np.random.default_rng(8)
    truth = random_sim3(rng)
    src = rng.normal(size=(100, 3))
    dst = truth.apply(src)
    dst[:10] = rng.normal(size=(10, 3)) * 50
    dst[10:15] = np.nan
    weights = np.ones(100)
    weights[:10] = 0.0
    est, report = robust_sim3(src, dst, weights, ransac=False)
    assert_sim3_close(est, truth, 1e-9)
    assert report.num_points == 85


def test_sim3_algebra():
    rng = np.random.default_rng(9)
    a, b = random_sim3(rng), random_sim3(rng)
    pts = rng.normal(size=(20, 3))
    np.testing.assert_allclose(a.compose(b).apply(pts), a.apply(b.apply(pts)), atol=1e-10)
    np.testing.assert_allclose(a.inverse().apply(a.apply(pts)), pts, atol=1e-10)
    np.testing.assert_allclose(a.compose(b).as_matrix(), a.as_matrix() @ b.as_matrix(), atol=1e-10)
    assert_sim3_close(Sim3.from_matrix(a.as_matrix()), a, 1e-12)
    homog = np.concatenate([pts, np.ones((20, 1))], axis=1) @ a.as_matrix().T
    np.testing.assert_allclose(homog[:, :3], transform_points(pts, a), atol=1e-10)
    assert a.apply(pts.astype(np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match="scale"):
        Sim3(-1.0, np.eye(3), np.zeros(3))


def test_cameras_depth_and_points_move_together():
    rng = np.random.default_rng(10)
    S, H, W = 4, 5, 7
    Rc = np.stack([random_rotation(rng) for _ in range(S)])
    extrinsic = np.concatenate([Rc, rng.normal(size=(S, 3, 1))], axis=-1)
    intrinsic = np.tile(np.array([[6.0, 0, 3.5], [0, 6.0, 2.5], [0, 0, 1]]), (S, 1, 1))
    depth = rng.uniform(1.0, 3.0, size=(S, H, W))
    sim = random_sim3(rng)

    points = unproject_depth_map_to_point_map(depth, extrinsic, intrinsic)
    new_ext = transform_extrinsics(extrinsic, sim)
    new_depth = scale_depth(depth, sim)
    np.testing.assert_allclose(new_depth, depth * sim.scale)
    # the same pixels and the transformed depth reproduce the transformed points
    np.testing.assert_allclose(
        unproject_depth_map_to_point_map(new_depth, new_ext, intrinsic), sim.apply(points), atol=1e-9
    )
    # rotations stay rotations; camera centres move like points
    np.testing.assert_allclose(new_ext[:, :, :3] @ new_ext[:, :, :3].transpose(0, 2, 1), np.tile(np.eye(3), (S, 1, 1)), atol=1e-12)
    centres = -np.einsum("sji,sj->si", extrinsic[:, :, :3], extrinsic[:, :, 3])
    new_centres = -np.einsum("sji,sj->si", new_ext[:, :, :3], new_ext[:, :, 3])
    np.testing.assert_allclose(new_centres, sim.apply(centres), atol=1e-9)
    # 4x4 input keeps its shape and bottom row
    ext44 = np.concatenate([extrinsic, np.tile([[[0, 0, 0, 1.0]]], (S, 1, 1))], axis=1)
    out44 = transform_extrinsics(ext44, sim)
    np.testing.assert_allclose(out44[:, :3], new_ext)
    np.testing.assert_allclose(out44[:, 3], ext44[:, 3])


def test_errors_name_the_problem():
    pts = np.zeros((5, 3))
    with pytest.raises(AlignmentError, match="degenerate") as info:
        umeyama_sim3(pts, pts + 1)
    assert isinstance(info.value, SceneError)
    with pytest.raises(AlignmentError, match="at least 3"):
        robust_sim3(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        umeyama_sim3(np.ones((4, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="loss"):
        robust_sim3(np.eye(3), np.eye(3), loss="l1")
    with pytest.raises(ValueError, match="non-negative"):
        umeyama_sim3(np.eye(3), np.eye(3), -np.ones(3))


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("iters", -1, "iters must be an integer >= 0, got -1"),
        ("iters", 2.5, "iters must be an integer >= 0, got 2.5"),
        ("ransac_hypotheses", 0, "ransac_hypotheses must be an integer >= 1, got 0"),
        ("ransac_sample_points", True, "ransac_sample_points must be an integer >= 3, got True"),
        ("threshold", 0.0, "threshold must be a positive finite number"),
        ("inlier_threshold", np.inf, "inlier_threshold must be a positive finite number"),
        ("inlier_threshold", None, "inlier_threshold must be a positive finite number"),
        ("tol", -1e-9, "tol must be a number >= 0 and < 1"),
        ("ransac", "no", "ransac must be true or false, got 'no'"),
    ],
)
def test_each_bad_option_is_named(option, value, needle):
    """Checked before any work, one option at a time (the job config checks them at load)."""
    pts = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=re.escape(needle)):
        robust_sim3(pts, pts, **{option: value})


def test_zero_iters_returns_the_start_unrefined():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(200, 3))
    dst = 2.0 * src + 0.01 * rng.normal(size=src.shape)
    sim, report = robust_sim3(src, dst, iters=0, ransac=False)
    assert report.iterations == 0 and not report.converged
    plain = umeyama_sim3(src, dst)
    np.testing.assert_allclose(sim.as_matrix(), plain.as_matrix(), rtol=0, atol=1e-12)
