"""The shipped ``tiny-synthetic`` checkpoint: loads strictly and predicts real geometry.

Two held-out synthetic scenes (seeds never used in training, nor in its monitoring) are
rendered here; the trained model must beat the untrained one (same architecture, seeded random
initialisation) by the margins stated below, not merely be different from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import httm_dist
from httm_dist.model.weights import load_vggt
from httm_dist.train.data import HELD_OUT_SEED_BASE, held_out_scenes
from httm_dist.train.loop import build_model, evaluate

WEIGHTS_DIR = Path(httm_dist.__file__).parent / "weights"
CHECKPOINT = WEIGHTS_DIR / "tiny_synthetic.safetensors"
METADATA = WEIGHTS_DIR / "tiny_synthetic.json"
TEST_SEED_OFFSET = 100  # held-out seeds HELD_OUT_SEED_BASE + 100, + 101: unseen in training


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads(METADATA.read_text())


@pytest.fixture(scope="module")
def trained(metadata):
    # The registered preset: its packaged weights load strictly with no network.
    return load_vggt("tiny-synthetic", device="cpu")


@pytest.fixture(scope="module")
def scenes(metadata):
    training = metadata["training"]
    return held_out_scenes(
        2, num_frames=4, height=training["height"], width=training["width"], first_seed_offset=TEST_SEED_OFFSET
    )


def test_checkpoint_is_small_and_loads_strictly(trained, metadata):
    assert CHECKPOINT.stat().st_size < 20 * 2**20
    state = trained.state_dict()
    from safetensors import safe_open

    with safe_open(str(CHECKPOINT), "pt") as f:
        assert set(f.keys()) == {k for k, v in state.items() if v.is_floating_point()}
        key = next(iter(f.keys()))
        torch.testing.assert_close(state[key], f.get_tensor(key).float())
    assert metadata["steps_done"] >= 1 and metadata["name"] == "tiny-synthetic"


def test_trained_model_beats_untrained_on_held_out_scenes(trained, metadata, scenes):
    assert all(int(s.scale.numel()) == 1 for s in scenes)
    untrained = build_model(metadata["config"], seed=0).eval()
    got = evaluate(trained, scenes)
    base = evaluate(untrained, scenes)
    # Margins (measured when shipped: AbsRel 0.285 vs 0.500, delta<1.25 0.587 vs 0.333, rotation
    # error 9.5 vs 47.4 degrees): depth AbsRel at most 0.62 of the untrained model's, delta<1.25
    # at least 0.2 higher, relative rotation error at most half. (On 8 held-out scenes the AbsRel
    # ratio is 0.46 to 0.59, docs/training.md. The rotation error only matches "every camera =
    # the first": see docs/training.md, Limitations.)
    assert got["abs_rel"] <= 0.62 * base["abs_rel"], (got, base)
    assert got["delta_1.25"] >= base["delta_1.25"] + 0.2, (got, base)
    assert got["rot_err_deg"] <= 0.5 * base["rot_err_deg"], (got, base)


def test_trained_depth_correlates_with_ground_truth(trained, scenes):
    corrs = []
    for batch in scenes:
        with torch.no_grad():
            depth = trained(batch.images)["depth"][0, ..., 0]
        valid = batch.valid[0]
        corrs.append(np.corrcoef(depth[valid].numpy(), batch.depth[0][valid].numpy())[0, 1])
    # Measured when shipped: 0.60 and 0.93 (Pearson, per scene over valid pixels).
    assert min(corrs) > 0.45 and np.mean(corrs) > 0.65, corrs
