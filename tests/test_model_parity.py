"""Parity with the official VGGT: the fixtures were produced by the official code (fp32, CPU).

Every output and the aggregated tokens of every layer must match with relative error
‖a − b‖ / ‖b‖ below 1e-4, loading the fixture weights strictly through ``load_vggt``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from httm_dist.model import VGGT, VGGTConfig, load_vggt

TOL = 1e-4
OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
CASES = ("case_a_s3_42x56", "case_b_s2_70x70", "case_c_s1_56x42")


def rel_err(a: torch.Tensor, b: np.ndarray) -> float:
    b = torch.from_numpy(np.asarray(b))
    return float((a.detach().float() - b).norm() / b.norm())


@pytest.fixture(scope="module")
def model(fixtures_dir) -> VGGT:
    return load_vggt("tiny", weights=fixtures_dir / "vggt_tiny" / "weights.safetensors", device="cpu")


def load_case(fixtures_dir, name: str) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "vggt_tiny" / f"{name}.npz") as d:
        return dict(d)


@pytest.mark.parametrize("name", CASES)
def test_outputs_and_tokens_match_official(model, fixtures_dir, name):
    case = load_case(fixtures_dir, name)
    images = torch.from_numpy(case["images"])
    with torch.inference_mode():
        out = model(images)
        model.aggregator.output_layers = None  # keep every layer to compare all of them
        try:
            tokens, patch_start_idx = model.aggregator(images)
        finally:
            model.aggregator.output_layers = model.config.head_layers

    assert patch_start_idx == int(case["patch_start_idx"])
    for key in OUTPUTS:
        assert out[key].shape == (1, *case[key].shape), key  # [S,...] input gets B = 1
        assert out[key].dtype == torch.float32
        assert rel_err(out[key][0], case[key]) < TOL, key
    assert len(out["pose_enc_list"]) == 4
    assert rel_err(torch.stack(out["pose_enc_list"])[:, 0], case["pose_enc_list"]) < TOL
    assert len(tokens) == case["aggregated_tokens"].shape[0]
    for i, layer in enumerate(tokens):
        assert rel_err(layer[0], case["aggregated_tokens"][i]) < TOL, f"layer {i}"


def test_batch_of_scenes_matches_each_scene_alone(model, fixtures_dir):
    """[B,S,...] input: each scene gets its own first-frame tokens and is independent."""
    case = load_case(fixtures_dir, "case_b_s2_70x70")
    first = torch.from_numpy(case["images"])
    second = first.flip(0).roll(7, dims=-1)  # a different scene of the same size
    with torch.inference_mode():
        batched = model(torch.stack([first, second]))
        alone = model(second)
    for key in OUTPUTS:
        assert batched[key].shape[:2] == (2, 2)
        assert rel_err(batched[key][0], case[key]) < TOL, key
        assert rel_err(batched[key][1], alone[key][0].numpy()) < TOL, key


def test_frame_chunking_in_dense_heads_changes_nothing(model, fixtures_dir):
    case = load_case(fixtures_dir, "case_a_s3_42x56")
    heads = (model.depth_head, model.point_head)
    try:
        for head in heads:
            head.frames_chunk_size = 2  # S = 3: chunks of 2 and 1 frames
        with torch.inference_mode():
            out = model(torch.from_numpy(case["images"]))
    finally:
        for head in heads:
            head.frames_chunk_size = 8
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        assert rel_err(out[key][0], case[key]) < TOL, key


def test_memory_trim_keeps_only_the_layers_heads_read(model, fixtures_dir):
    case = load_case(fixtures_dir, "case_c_s1_56x42")
    with torch.device("meta"):
        big = VGGT(VGGTConfig.preset("vggt-1b"))
    assert big.aggregator.output_layers == (4, 11, 17, 23)
    model.aggregator.output_layers = (2,)
    try:
        with torch.inference_mode():
            tokens, _ = model.aggregator(torch.from_numpy(case["images"]))
    finally:
        model.aggregator.output_layers = model.config.head_layers
    assert [t is None for t in tokens] == [True, True, False, True]
    assert rel_err(tokens[2][0], case["aggregated_tokens"][2]) < TOL
