"""Camera geometry reproduces the official utilities and is self-consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from httm_dist.model.geometry import (
    closed_form_inverse_se3,
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
    unproject_depth_map_to_point_map,
)

RTOL = 1e-5


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    with np.load(fixtures_dir / "geometry" / "pose_and_unproject.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_matches_official_fixture(ref, kind):
    conv = (lambda x: x) if kind == "numpy" else torch.from_numpy
    back = (lambda x: x) if kind == "numpy" else (lambda x: x.numpy())
    array_type = np.ndarray if kind == "numpy" else torch.Tensor
    ext, intr = pose_encoding_to_extri_intri(conv(ref["pose_enc"]), ref["image_hw"])
    assert isinstance(ext, array_type) and isinstance(intr, array_type)
    assert _rel(back(ext), ref["extrinsic"]) < RTOL
    assert _rel(back(intr), ref["intrinsic"]) < RTOL
    enc = extri_intri_to_pose_encoding(conv(ref["extrinsic"]), conv(ref["intrinsic"]), ref["image_hw"])
    assert isinstance(enc, array_type)
    assert _rel(back(enc), ref["pose_enc_roundtrip"]) < RTOL
    pts = unproject_depth_map_to_point_map(conv(ref["depth"]), conv(ref["extrinsic"]), conv(ref["intrinsic"]))
    assert isinstance(pts, array_type) and tuple(pts.shape) == ref["world_points"].shape
    assert _rel(back(pts), ref["world_points"]) < RTOL


def test_batched_leading_dims_equal_flat(ref):
    enc = torch.from_numpy(ref["pose_enc"])
    ext_flat, intr_flat = pose_encoding_to_extri_intri(enc, (28, 42))
    ext_b, intr_b = pose_encoding_to_extri_intri(enc.reshape(1, 5, 9), (28, 42))
    assert ext_b.shape == (1, 5, 3, 4) and intr_b.shape == (1, 5, 3, 3)
    assert torch.equal(ext_b[0], ext_flat) and torch.equal(intr_b[0], intr_flat)
    enc_b = extri_intri_to_pose_encoding(ext_b, intr_b, (28, 42))
    assert enc_b.shape == (1, 5, 9)
    depth = torch.from_numpy(ref["depth"])
    pts = unproject_depth_map_to_point_map(depth[..., 0], ext_flat, intr_flat)
    pts_b = unproject_depth_map_to_point_map(depth[None], ext_b, intr_b)
    torch.testing.assert_close(pts_b[0], pts)


def test_quaternion_round_trip_on_random_rotations():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(500, 4, generator=gen, dtype=torch.float64) * 3  # not unit: norm is ignored
    R = quat_to_mat(q)
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(500, dtype=torch.float64))
    q_back = mat_to_quat(R)
    assert bool((q_back[:, 3] >= 0).all())
    unit = q / q.norm(dim=-1, keepdim=True)
    unit = torch.where(unit[:, 3:4] < 0, -unit, unit)
    torch.testing.assert_close(q_back, unit, atol=1e-10, rtol=0)


def test_closed_form_inverse_matches_general_inverse():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(7, 4))
    R = quat_to_mat(torch.from_numpy(q)).numpy()
    se3 = np.concatenate([R, rng.normal(size=(7, 3, 1))], axis=-1)
    inv = closed_form_inverse_se3(se3)
    full = np.concatenate([se3, np.tile([[[0, 0, 0, 1.0]]], (7, 1, 1))], axis=1)
    np.testing.assert_allclose(inv, np.linalg.inv(full), atol=1e-12)
    inv_t = closed_form_inverse_se3(torch.from_numpy(full))
    np.testing.assert_allclose(inv_t.numpy(), inv, atol=1e-12)


def test_unprojected_points_project_back_to_their_pixels():
    rng = np.random.default_rng(2)
    S, H, W = 3, 6, 9
    enc = np.concatenate(
        [rng.normal(size=(S, 3)), rng.normal(size=(S, 4)), rng.uniform(0.6, 1.2, size=(S, 2))], axis=-1
    )
    ext, intr = pose_encoding_to_extri_intri(enc, (H, W))
    depth = rng.uniform(0.5, 4.0, size=(S, H, W))
    world = unproject_depth_map_to_point_map(depth, ext, intr)
    cam = np.einsum("sij,shwj->shwi", ext[..., :3], world) + ext[:, None, None, :, 3]
    np.testing.assert_allclose(cam[..., 2], depth, rtol=1e-10)
    pix = np.einsum("sij,shwj->shwi", intr, cam)
    u, v = pix[..., 0] / pix[..., 2], pix[..., 1] / pix[..., 2]
    np.testing.assert_allclose(u, np.broadcast_to(np.arange(W), (S, H, W)), atol=1e-9)
    np.testing.assert_allclose(v, np.broadcast_to(np.arange(H)[:, None], (S, H, W)), atol=1e-9)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="9 values"):
        pose_encoding_to_extri_intri(np.zeros((2, 8)), (14, 14))
    with pytest.raises(ValueError, match="image_size_hw"):
        pose_encoding_to_extri_intri(np.zeros((2, 9)), (14,))
    with pytest.raises(ValueError, match="pose_encoding_type"):
        pose_encoding_to_extri_intri(np.zeros((2, 9)), (14, 14), pose_encoding_type="relT")
    with pytest.raises(ValueError, match="one camera per depth map"):
        unproject_depth_map_to_point_map(np.ones((3, 4, 5)), np.zeros((2, 3, 4)), np.zeros((2, 3, 3)))
    with pytest.raises(TypeError, match="pose_encoding"):
        pose_encoding_to_extri_intri([[0.0] * 9], (14, 14))
