"""Training code: target normalisation, the VGGT-style losses, and that training steps learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from httm_dist.errors import ConfigError
from httm_dist.model.geometry import unproject_depth_map_to_point_map
from httm_dist.train.data import HELD_OUT_SEED_BASE, ScenePool, normalize_to_first_camera
from httm_dist.train.losses import LossWeights, camera_errors, camera_loss, conf_regression_loss
from httm_dist.train.loop import TrainConfig, build_model, lr_factor, train_step


def _random_rotations(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q))[:, None, None]


def test_normalisation_puts_scene_in_first_camera_at_unit_mean_distance():
    gen = torch.Generator().manual_seed(0)
    B, S, H, W = 2, 3, 5, 6
    R = _random_rotations(B * S, gen).reshape(B, S, 3, 3)
    t = torch.randn(B, S, 3, 1, generator=gen, dtype=torch.float64)
    extrinsic = torch.cat([R, t], -1)
    depth = torch.rand(B, S, H, W, generator=gen, dtype=torch.float64) * 4 + 1
    intrinsic = torch.tensor([[5.0, 0, W / 2], [0, 5.0, H / 2], [0, 0, 1]], dtype=torch.float64).expand(B, S, 3, 3)
    points = unproject_depth_map_to_point_map(depth, extrinsic, intrinsic)
    depth[0, 1, 0, 0] = float("inf")  # an invalid pixel must be masked, not poison the scale
    n_depth, n_points, n_ext, valid, scale = normalize_to_first_camera(depth, points, extrinsic)

    assert not valid[0, 1, 0, 0] and valid.sum() == B * S * H * W - 1
    eye = torch.eye(3, 4, dtype=torch.float64).expand(B, 3, 4)
    torch.testing.assert_close(n_ext[:, 0], eye, atol=1e-9, rtol=0)
    mean_dist = (n_points.norm(dim=-1) * valid).flatten(1).sum(1) / valid.flatten(1).sum(1)
    torch.testing.assert_close(mean_dist, torch.ones(B, dtype=torch.float64), atol=1e-9, rtol=0)
    # The normalised depth and cameras still unproject to the normalised points (a similarity
    # transform of the whole scene), and the depth was divided by the returned scale.
    again = unproject_depth_map_to_point_map(n_depth, n_ext, intrinsic)
    torch.testing.assert_close(again[valid], n_points[valid], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(n_depth[valid], (depth / scale[:, None, None, None])[valid])


def test_normalisation_rejects_mismatched_shapes():
    with pytest.raises(ConfigError, match="extrinsic"):
        normalize_to_first_camera(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 4, 4, 3), torch.ones(1, 3, 3, 4))


def test_pool_samples_are_seeded_and_normalised():
    pool = ScenePool(size=2, frames_per_scene=5, height=28, width=42, seed=3)
    a = pool.sample(np.random.default_rng(7), batch_size=2, num_frames=3)
    b = ScenePool(size=2, frames_per_scene=5, height=28, width=42, seed=3).sample(np.random.default_rng(7), 2, 3)
    assert a.images.shape == (2, 3, 3, 28, 42) and a.pose_enc.shape == (2, 3, 9)
    torch.testing.assert_close(a.world_points, b.world_points)
    # First camera is the identity: zero translation, identity quaternion (x, y, z, w).
    torch.testing.assert_close(a.pose_enc[:, 0, :7], torch.tensor([0.0] * 6 + [1.0]).expand(2, 7), atol=1e-5, rtol=0)
    assert pool._next_seed < HELD_OUT_SEED_BASE
    with pytest.raises(ConfigError, match="frames_per_scene"):
        pool.sample(np.random.default_rng(0), 1, 6)


def test_conf_regression_loss_values():
    gen = torch.Generator().manual_seed(1)
    gt = torch.randn(1, 2, 4, 5, 3, generator=gen)
    conf = 1 + torch.rand(1, 2, 4, 5, generator=gen)
    valid = torch.ones(1, 2, 4, 5, dtype=torch.bool)
    valid[0, 0, 0, 0] = False
    alpha = 0.3
    # Perfect prediction: only the -alpha log(conf) term, averaged over valid pixels.
    reg, grad = conf_regression_loss(gt.clone(), conf, gt, valid, alpha=alpha)
    torch.testing.assert_close(reg, -alpha * torch.log(conf)[valid].mean())
    assert float(grad) == 0.0
    # A constant offset has a zero spatial gradient of the error; the regression term is
    # conf * |offset| - alpha log conf, and an invalid pixel's huge error is ignored.
    offset = torch.tensor([0.3, -0.4, 0.0])  # norm 0.5
    pred = gt + offset
    pred[0, 0, 0, 0] += 1e6
    reg, grad = conf_regression_loss(pred, conf, gt, valid, alpha=alpha)
    torch.testing.assert_close(reg, (conf * 0.5 - alpha * torch.log(conf))[valid].mean())
    assert float(grad) < 1e-6
    # A non-constant error has a positive gradient term.
    _, grad = conf_regression_loss(gt + torch.randn(gt.shape, generator=gen), conf, gt, valid)
    assert float(grad) > 0.1


def test_camera_loss_weights_later_iterations_more():
    gt = torch.zeros(1, 2, 9)
    off = torch.full((1, 2, 9), 0.05)  # inside the Huber quadratic zone: 0.5 * 0.05^2 per part
    part = 3 * 0.5 * 0.05**2
    ones = (1.0, 1.0, 1.0)
    assert float(camera_loss([gt, gt], gt)) == 0.0
    # weights gamma^(n-1-i) normalised: for n=2, gamma=0.5 -> [1/3, 2/3]
    assert float(camera_loss([off, gt], gt, gamma=0.5, kind="huber", part_weights=ones)) == pytest.approx(part / 3, rel=1e-5)
    assert float(camera_loss([gt, off], gt, gamma=0.5, kind="huber", part_weights=ones)) == pytest.approx(2 * part / 3, rel=1e-5)
    with pytest.raises(ConfigError):
        camera_loss([], gt)
    with pytest.raises(ConfigError, match="kind"):
        camera_loss([gt], gt, kind="l2")


def test_camera_errors_split_by_part():
    gt = torch.zeros(1, 2, 9)
    pred = gt.clone()
    pred[..., 3:7] = 0.25  # quaternion only
    assert camera_errors(pred, gt) == {"cam_trans_l1": 0.0, "cam_quat_l1": 0.25, "cam_fov_l1": 0.0}


def test_camera_l1_loss_keeps_its_gradient_on_small_rotations():
    """Why L1 is the default: at a few degrees of relative rotation (quaternion parts ~0.03)
    Huber(0.1) is quadratic and its gradient is ~0.03/0.1 of L1's, so the camera head can ignore
    rotations; L1's gradient is the same at any error size."""
    gen = torch.Generator().manual_seed(3)
    gt = torch.randn(2, 4, 9, generator=gen)
    pred = (gt + 0.03 * torch.randn(2, 4, 9, generator=gen).sign()).requires_grad_(True)
    l1 = camera_loss([pred], gt, kind="l1", part_weights=(1.0, 2.0, 0.5))
    # Per-part means with the part weights: |error| is exactly 0.03 everywhere.
    assert float(l1) == pytest.approx(0.03 * (1.0 + 2.0 + 0.5), rel=1e-4)
    (g_l1,) = torch.autograd.grad(l1, pred)
    (g_huber,) = torch.autograd.grad(camera_loss([pred], gt, kind="huber", part_weights=(1.0, 2.0, 0.5)), pred)
    quat = slice(3, 7)
    assert torch.allclose(g_l1[..., quat].abs(), torch.full_like(g_l1[..., quat], 2.0 / (2 * 4 * 4)))
    assert float(g_huber[..., quat].abs().max()) < 0.31 * float(g_l1[..., quat].abs().min())


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=1e-3)


def test_config_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="multiples of 14"):
        TrainConfig(height=100, width=112)
    with pytest.raises(ConfigError, match="min_frames"):
        TrainConfig(min_frames=3, max_frames=2)


@pytest.fixture(scope="module")
def tiny_config(fixtures_dir):
    return json.loads((fixtures_dir / "vggt_tiny" / "config.json").read_text())


def test_training_steps_reduce_the_loss_on_a_fixed_batch(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config, seed=0)
    batch = ScenePool(size=1, frames_per_scene=2, height=42, width=42, seed=0).sample(np.random.default_rng(0), 1, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [train_step(model, batch, optimizer, LossWeights()) for _ in range(6)]
    assert set(losses[0]) >= {"loss", "grad_norm", "camera", "depth", "points", "cam_quat_l1", "cam_fov_l1"}
    assert all(np.isfinite(s["loss"]) for s in losses)
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"], [round(s["loss"], 4) for s in losses]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_writes_a_loadable_checkpoint_curve_and_metadata(tiny_config, tmp_path):
    """A whole (tiny) run: the checkpoint loads strictly into the config it records, the curve
    has the untrained row plus one per evaluation, and the metadata records the training
    scenes' options; a run stopped by the time cap still checkpoints."""
    from httm_dist.train.loop import load_checkpoint, train

    options = {"step_deg": [2.0, 10.0]}
    config = TrainConfig(
        height=28, width=42, model=tiny_config, steps=3, frames_per_batch=4, min_frames=2, max_frames=3,
        pool_size=2, frames_per_scene=4, max_stride=3, render_options=options, eval_every=2, eval_scenes=1,
        eval_frames=2, ckpt_every=2, warmup_steps=1, threads=1,
    )
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["steps"] == 3
    model, meta = load_checkpoint(tmp_path / "run")  # strict load into the config it records
    assert meta["steps_done"] == 3 and meta["training"]["render_options"] == options
    assert meta["training"]["loss"]["camera_kind"] == "l1" and meta["training"]["max_stride"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [row["step"] for row in curve] == [0, 2, 3]
    assert all(np.isfinite(row["abs_rel"]) for row in curve)

    capped = TrainConfig(**{**config.__dict__, "loss": config.loss, "max_minutes": 0.0})
    assert train(capped, tmp_path / "capped", progress=False)["steps"] == 1
    assert json.loads((tmp_path / "capped" / "tiny_synthetic.json").read_text())["steps_done"] == 1
    with pytest.raises(ConfigError, match="max_stride"):
        TrainConfig(max_stride=0)


def test_camera_probe_recovers_exact_poses_from_ground_truth_outputs():
    """jobs/camera_probe.py (the cameras analysis in docs/training.md): a model that outputs the
    ground truth gets zero error from its camera head and from its point maps, while the
    identity-pose baseline gets the scene's real relative rotations."""
    import runpy
    from pathlib import Path

    from httm_dist.train.data import held_out_scenes

    probe = runpy.run_path(str(Path(__file__).parents[1] / "jobs" / "camera_probe.py"))["probe"]
    batch = held_out_scenes(1, 4, 42, 56, first_seed_offset=300)[0]

    class Oracle(torch.nn.Module):
        def aggregator(self, images):
            return [torch.randn(1, 4, 5, 8, generator=torch.Generator().manual_seed(0))], 0

        def forward(self, images):
            return {"pose_enc": batch.pose_enc, "depth": batch.depth[..., None], "world_points": batch.world_points}

    got = probe(Oracle(), batch)
    assert got["head_rot"] < 1e-3 and got["points_rot"] < 1e-3, got
    assert got["identity_rot"] > 1.0 and got["token_var"] > 0.1, got
