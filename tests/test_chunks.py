"""Chunk planning, and re-assembly of chunks predicted in different Sim(3) frames into one scene."""

from __future__ import annotations

import math

import numpy as np
import pytest

from httm_dist.errors import ConfigError, SceneError
from httm_dist.model.geometry import extri_intri_to_pose_encoding, unproject_depth_map_to_point_map
from httm_dist.pipeline.align import Sim3, transform_extrinsics, umeyama_sim3
from httm_dist.pipeline.chunks import ChunkPrediction, assemble_chunks, plan_chunks


# --------------------------------------------------------------------------- planning


def test_plan_chunks_properties_over_many_sizes():
    for max_frames in range(2, 26):
        for overlap in range(1, max_frames):
            for num_frames in range(1, 90):
                ranges = plan_chunks(num_frames, max_frames, overlap)
                if num_frames <= max_frames:
                    assert ranges == [(0, num_frames)]
                    continue
                lengths = [e - s for s, e in ranges]
                assert ranges[0][0] == 0 and ranges[-1][1] == num_frames
                assert max(lengths) <= max_frames
                assert max(lengths) - min(lengths) <= 1, (num_frames, max_frames, overlap, ranges)
                for (s0, e0), (s1, e1) in zip(ranges, ranges[1:]):
                    assert s1 > s0 and e1 > e0
                    assert e0 - s1 == overlap
                # the fewest chunks that can cover the scene with these limits
                assert len(ranges) == math.ceil((num_frames - overlap) / (max_frames - overlap))
                covered = np.zeros(num_frames, int)
                for s, e in ranges:
                    covered[s:e] += 1
                assert covered.min() >= 1


def test_plan_chunks_example_from_vggt_long():
    ranges = plan_chunks(200, 75, 30)
    assert ranges == [(0, 73), (43, 116), (86, 158), (128, 200)]


def test_plan_chunks_rejects_bad_settings():
    with pytest.raises(ConfigError, match="chunk.overlap"):
        plan_chunks(100, 10, 10)
    with pytest.raises(ConfigError, match="chunk.overlap"):
        plan_chunks(100, 10, 0)
    with pytest.raises(ConfigError, match="chunk.max_frames"):
        plan_chunks(100, 0, 0)
    with pytest.raises(SceneError, match="at least one frame"):
        plan_chunks(0, 10, 2)
    assert plan_chunks(10, 10, 10) == [(0, 10)]  # no chunking: overlap unused


# --------------------------------------------------------------------------- assembly


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _random_sim3(rng) -> Sim3:
    return Sim3(float(np.exp(rng.uniform(-1.0, 1.0))), _rotation(rng), rng.normal(scale=2.0, size=3))


def make_scene(rng, num_frames=23, H=6, W=8):
    """Ground truth: cameras walking around a scene, positive depth, points = unproject(depth, cams)."""
    angles = np.linspace(0, 1.5, num_frames)
    c, s, zero, one = np.cos(angles), np.sin(angles), np.zeros(num_frames), np.ones(num_frames)
    yaw = np.stack([np.stack([c, zero, -s], -1), np.stack([zero, one, zero], -1), np.stack([s, zero, c], -1)], 1)
    tilt, _ = np.linalg.qr(np.eye(3) + 0.05 * rng.normal(size=(num_frames, 3, 3)))  # small jitter
    tilt = tilt * np.sign(np.diagonal(tilt, axis1=1, axis2=2))[:, None, :]
    R = tilt @ yaw
    centres = np.stack([np.sin(angles) * 3, 0.1 * rng.normal(size=num_frames), -np.cos(angles) * 3 + 3], -1)
    t = -np.einsum("sij,sj->si", R, centres)
    extrinsic = np.concatenate([R, t[..., None]], -1)
    intrinsic = np.tile(np.array([[7.0, 0, W / 2], [0, 7.0, H / 2], [0, 0, 1]]), (num_frames, 1, 1))
    depth = rng.uniform(2.0, 5.0, size=(num_frames, H, W))
    points = unproject_depth_map_to_point_map(depth, extrinsic, intrinsic)
    return depth, extrinsic, intrinsic, points


def chunk_in_frame(gt, sl, sim: Sim3, rng, noise=0.0) -> ChunkPrediction:
    depth, extrinsic, intrinsic, points = (a[sl] for a in gt)
    pts = sim.apply(points)
    if noise:
        pts = pts + rng.normal(scale=noise * sim.scale, size=pts.shape)
    return ChunkPrediction(
        depth=(depth * sim.scale)[..., None],
        depth_conf=rng.uniform(1.0, 3.0, size=depth.shape),
        world_points=pts,
        world_points_conf=rng.uniform(1.0, 3.0, size=depth.shape),
        extrinsic=transform_extrinsics(extrinsic, sim),
        intrinsic=intrinsic,
    )


def assert_matches_up_to_one_sim3(scene, gt, atol):
    depth, extrinsic, intrinsic, points = gt
    g = umeyama_sim3(points.reshape(-1, 3), scene.world_points.reshape(-1, 3))
    np.testing.assert_allclose(scene.world_points, g.apply(points), atol=atol * g.scale)
    np.testing.assert_allclose(scene.extrinsic, transform_extrinsics(extrinsic, g), atol=atol * max(1, g.scale))
    np.testing.assert_allclose(scene.depth, depth * g.scale, atol=atol * g.scale)
    np.testing.assert_allclose(scene.intrinsic, intrinsic)
    # the assembled depth + cameras describe the same points as the assembled point map
    np.testing.assert_allclose(
        unproject_depth_map_to_point_map(scene.depth, scene.extrinsic, scene.intrinsic),
        scene.world_points,
        atol=atol * g.scale,
    )
    return g


@pytest.mark.parametrize("points_source", ["depth", "point_head"])
@pytest.mark.parametrize("seed", range(3))
def test_chunks_in_random_frames_reassemble_exactly(seed, points_source):
    rng = np.random.default_rng(seed)
    gt = make_scene(rng)
    ranges = plan_chunks(23, 8, 3)
    sims = [_random_sim3(rng) for _ in ranges]
    chunks = [chunk_in_frame(gt, slice(s, e), sim, rng) for (s, e), sim in zip(ranges, sims)]
    scene = assemble_chunks(chunks, ranges, points_source=points_source)

    assert scene.num_frames == 23 and len(scene.source_chunk) == 23
    for frame, k in enumerate(scene.source_chunk):
        assert ranges[k][0] <= frame < ranges[k][1]
    g = assert_matches_up_to_one_sim3(scene, gt, atol=1e-8)
    # the global frame is chunk 0's
    assert abs(g.scale - sims[0].scale) < 1e-9 * sims[0].scale
    np.testing.assert_allclose(g.rotation, sims[0].rotation, atol=1e-9)
    assert not scene.flagged
    record = scene.record()
    assert record["chunk_count"] == len(ranges) and len(record["alignments"]) == len(ranges) - 1
    for pair, (a, b) in zip(record["alignments"], zip(sims, sims[1:])):
        assert pair["residual"] < 1e-9 and not pair["flagged"]
        assert pair["scale"] == pytest.approx(a.scale / b.scale, rel=1e-9)


def test_overlap_frames_come_from_the_more_confident_chunk():
    rng = np.random.default_rng(5)
    gt = make_scene(rng, num_frames=12)
    ranges = plan_chunks(12, 8, 4)
    assert ranges == [(0, 8), (4, 12)]
    chunks = [chunk_in_frame(gt, slice(s, e), _random_sim3(rng), rng) for s, e in ranges]
    chunks[0].depth_conf[4:6] = 10.0  # global frames 4, 5: chunk 0 is surer
    chunks[1].depth_conf[2:4] = 10.0  # global frames 6, 7: chunk 1 is surer
    scene = assemble_chunks(chunks, ranges)
    np.testing.assert_array_equal(scene.source_chunk, [0] * 6 + [1] * 6)
    np.testing.assert_array_equal(scene.depth_conf[4:6], 10.0)
    np.testing.assert_array_equal(scene.depth_conf[6:8], 10.0)
    assert_matches_up_to_one_sim3(scene, gt, atol=1e-8)


def test_noisy_chunks_with_outliers_stay_consistent():
    rng = np.random.default_rng(6)
    gt = make_scene(rng, num_frames=30, H=10, W=12)
    ranges = plan_chunks(30, 12, 4)
    chunks = []
    for s, e in ranges:
        chunk = chunk_in_frame(gt, slice(s, e), _random_sim3(rng), rng, noise=0.01)
        bad = rng.random(chunk.world_points.shape[:3]) < 0.2  # 20% of pixels badly wrong
        chunk.world_points[bad] += rng.normal(size=(bad.sum(), 3)) * 2.0 * np.abs(chunk.world_points).mean()
        chunks.append(chunk)
    scene = assemble_chunks(chunks, ranges, points_source="point_head")
    assert not scene.flagged
    depth, extrinsic, intrinsic, points = gt
    g = umeyama_sim3(
        unproject_depth_map_to_point_map(depth, extrinsic, intrinsic).reshape(-1, 3),
        unproject_depth_map_to_point_map(scene.depth, scene.extrinsic, scene.intrinsic).reshape(-1, 3),
    )
    # cameras are exact per chunk, so their error is the alignment error alone
    centres = -np.einsum("sji,sj->si", extrinsic[..., :3], extrinsic[..., 3])
    got = -np.einsum("sji,sj->si", scene.extrinsic[..., :3], scene.extrinsic[..., 3])
    extent = np.linalg.norm(centres - centres.mean(0), axis=1).max()
    err = np.abs(got - g.apply(centres)).max() / (extent * g.scale)
    assert err < 0.02, err


def test_inconsistent_overlap_is_flagged():
    rng = np.random.default_rng(7)
    gt = make_scene(rng, num_frames=20)
    ranges = plan_chunks(20, 8, 3)
    chunks = [chunk_in_frame(gt, slice(s, e), Sim3.identity(), rng) for s, e in ranges]
    chunks[2].world_points[:] = rng.normal(size=chunks[2].world_points.shape)  # garbage
    scene = assemble_chunks(chunks, ranges, points_source="point_head")
    flags = [a.flagged for a in scene.alignments]
    assert flags[1] is True and flags[0] is False and scene.flagged
    assert scene.record()["alignment_flagged"] is True


def test_single_chunk_is_returned_as_is():
    rng = np.random.default_rng(8)
    gt = make_scene(rng, num_frames=5)
    chunk = chunk_in_frame(gt, slice(0, 5), _random_sim3(rng), rng)
    scene = assemble_chunks([chunk], [(0, 5)])
    np.testing.assert_array_equal(scene.world_points, chunk.world_points)
    np.testing.assert_array_equal(scene.extrinsic, chunk.extrinsic)
    assert scene.alignments == [] and scene.record()["chunk_count"] == 1


def test_from_predictions_accepts_model_output():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    depth, extrinsic, intrinsic, points = make_scene(rng, num_frames=4, H=14, W=28)
    enc = extri_intri_to_pose_encoding(extrinsic.astype(np.float32), intrinsic.astype(np.float32), (14, 28))
    preds = {
        "pose_enc": torch.from_numpy(enc)[None],
        "pose_enc_list": [torch.from_numpy(enc)[None]],
        "depth": torch.from_numpy(depth[None, ..., None]).float(),
        "depth_conf": torch.ones(1, 4, 14, 28),
        "world_points": torch.from_numpy(points[None]).float(),
        "world_points_conf": torch.ones(1, 4, 14, 28),
    }
    chunk = ChunkPrediction.from_predictions(preds)
    assert chunk.depth.shape == (4, 14, 28)
    np.testing.assert_allclose(chunk.extrinsic, extrinsic, atol=1e-5)
    np.testing.assert_allclose(chunk.intrinsic, intrinsic, rtol=1e-5)


def test_bad_chunk_inputs_are_named():
    rng = np.random.default_rng(10)
    gt = make_scene(rng, num_frames=10)
    a = chunk_in_frame(gt, slice(0, 6), Sim3.identity(), rng)
    b = chunk_in_frame(gt, slice(4, 10), Sim3.identity(), rng)
    with pytest.raises(ValueError, match="2 chunk predictions but 1"):
        assemble_chunks([a, b], [(0, 6)])
    with pytest.raises(ValueError, match="overlap by at least one frame"):
        assemble_chunks([a, b], [(0, 6), (6, 12)])
    with pytest.raises(ValueError, match="range"):
        assemble_chunks([a, b], [(0, 6), (4, 11)])
    with pytest.raises(ConfigError, match="points_source"):
        assemble_chunks([a, b], [(0, 6), (4, 10)], points_source="mesh")
    with pytest.raises(ValueError, match="world_points"):
        ChunkPrediction(a.depth, a.depth_conf, a.world_points[..., :2], a.world_points_conf, a.extrinsic, a.intrinsic)
