"""The world frame and scale as docs/output-format.md describes them (issue 11, item 10)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def _centres(extrinsic: np.ndarray) -> np.ndarray:
    """Camera centres C = -R^T t of [N, 3, 4] camera-from-world extrinsics."""
    return -np.einsum("nji,nj->ni", extrinsic[:, :, :3], extrinsic[:, :, 3])


def test_metric_scale_from_one_known_distance_keeps_every_projection():
    """The documented recipe: s = d_metres / d_model on translations, points and depth, no
    change to rotations or intrinsics, makes the known distance right and the images equal."""
    rng = np.random.default_rng(11)
    n = 4
    rot = Rotation.random(n, random_state=3).as_matrix()
    rot[0] = np.eye(3)  # the world is the first camera's frame
    t = rng.normal(size=(n, 3))
    t[0] = 0.0
    extrinsic = np.concatenate([rot, t[:, :, None]], axis=2)
    k = np.array([[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]])
    points = rng.normal(size=(50, 3)) + np.array([0, 0, 6.0])

    d_model = np.linalg.norm(_centres(extrinsic)[1] - _centres(extrinsic)[0])
    baseline = 0.12  # metres between cameras 0 and 1
    s = baseline / d_model
    scaled = extrinsic.copy()
    scaled[:, :, 3] *= s
    assert abs(np.linalg.norm(_centres(scaled)[1] - _centres(scaled)[0]) - baseline) < 1e-12
    for e_model, e_metric in zip(extrinsic, scaled):
        cam_model = points @ e_model[:, :3].T + e_model[:, 3]
        cam_metric = (s * points) @ e_metric[:, :3].T + e_metric[:, 3]
        np.testing.assert_allclose(cam_metric[:, 2], s * cam_model[:, 2], rtol=1e-12)  # depth scales
        pix = lambda c: (c @ k.T)[:, :2] / c[:, 2:]  # noqa: E731
        np.testing.assert_allclose(pix(cam_metric), pix(cam_model), rtol=1e-10)
    # frame 0 stays the origin at any scale
    np.testing.assert_allclose(_centres(scaled)[0], 0.0, atol=1e-15)


def test_first_frame_is_the_world_origin_for_the_shipped_model():
    """Frame 0's predicted extrinsic is [I | 0] (what the docs tell users to rely on)."""
    import torch

    from httm_dist.model import load_vggt
    from httm_dist.model.geometry import pose_encoding_to_extri_intri

    model = load_vggt("tiny-synthetic", device="cpu").eval()
    images = torch.rand(3, 3, 98, 126, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out = model(images)
    extrinsic, _ = pose_encoding_to_extri_intri(out["pose_enc"], (98, 126))
    np.testing.assert_allclose(extrinsic[0, 0].numpy(), np.eye(3, 4), atol=0.02)
