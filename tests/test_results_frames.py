"""Frame table and per-scene arrays: schema, statistics, dtypes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from httm_dist.results import FRAME_SCHEMA, build_frame_table, column_matrices, load_npz, npz_bytes, scene_arrays


def random_prediction(s: int = 3, h: int = 6, w: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "extrinsic": rng.normal(size=(s, 3, 4)).astype(np.float32),
        "intrinsic": rng.normal(size=(s, 3, 3)).astype(np.float32),
        "depth": rng.uniform(0.5, 5.0, size=(s, h, w, 1)).astype(np.float32),
        "depth_conf": rng.uniform(1.0, 3.0, size=(s, h, w)).astype(np.float32),
        "world_points": rng.normal(size=(s, h, w, 3)).astype(np.float32),
        "world_points_conf": rng.uniform(1.0, 3.0, size=(s, h, w)).astype(np.float32),
        "frame_uris": [f"s3://b/scene/{i}.jpg" for i in range(s)],
    }


def table_of(pred: dict, scene_id: str = "sc", frame_indices=None) -> pa.Table:
    s, h, w = pred["depth_conf"].shape
    return build_frame_table(
        scene_id,
        pred["frame_uris"],
        [(480 + i, 640) for i in range(s)],
        (h, w),
        pred["extrinsic"],
        pred["intrinsic"],
        pred["depth"],
        pred["depth_conf"],
        frame_indices=frame_indices,
    )


def test_frame_table_values():
    pred = random_prediction()
    pred["depth"][1, 0, 0, 0] = np.nan  # non-finite pixels are ignored by the statistics
    t = table_of(pred, frame_indices=[0, 5, 10])
    assert t.schema.equals(FRAME_SCHEMA, check_metadata=True)
    assert t.column("frame_index").to_pylist() == [0, 5, 10]
    assert t.column("orig_height").to_pylist() == [480, 481, 482]
    assert t.column("input_width").to_pylist() == [8, 8, 8]
    assert t.column("image_uri").to_pylist() == pred["frame_uris"]
    np.testing.assert_array_equal(column_matrices(t, "extrinsic"), pred["extrinsic"])
    np.testing.assert_array_equal(column_matrices(t, "intrinsic"), pred["intrinsic"])
    depth = pred["depth"][..., 0].reshape(3, -1).astype(np.float64)
    conf = pred["depth_conf"].reshape(3, -1)
    for name, fn, src in [
        ("depth_min", np.nanmin, depth), ("depth_max", np.nanmax, depth),
        ("depth_mean", np.nanmean, depth), ("depth_median", np.nanmedian, depth),
        ("conf_mean", np.mean, conf), ("conf_median", np.median, conf),
    ]:
        np.testing.assert_allclose(t.column(name).to_numpy(), fn(src, axis=1), rtol=1e-6, err_msg=name)
    assert np.isfinite(t.column("depth_mean").to_numpy()).all()


def test_frame_table_accepts_torch_and_default_indices():
    pred = random_prediction(s=2)
    t = build_frame_table(
        "x", pred["frame_uris"], [(1, 2), (3, 4)], (6, 8),
        torch.from_numpy(pred["extrinsic"]), torch.from_numpy(pred["intrinsic"]).double(),
        torch.from_numpy(pred["depth"]).to(torch.bfloat16), torch.from_numpy(pred["depth_conf"]),
    )
    assert t.column("frame_index").to_pylist() == [0, 1]
    np.testing.assert_allclose(column_matrices(t, "intrinsic"), pred["intrinsic"], rtol=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [({"extrinsic": np.zeros((3, 4, 4))}, "extrinsic"), ({"depth": np.zeros((2, 6, 8))}, "depth"),
     ({"intrinsic": np.zeros((3, 3, 4))}, "intrinsic")],
)
def test_frame_table_rejects_bad_shapes(bad, match):
    pred = {**random_prediction(), **bad}
    with pytest.raises(ValueError, match=match):
        table_of(pred)


@pytest.mark.parametrize("dense", ["float16", "float32"])
def test_scene_arrays_dtypes_and_npz_round_trip(dense):
    pred = random_prediction()
    pred["extrinsic"] = torch.from_numpy(pred["extrinsic"]).double()
    arrays = scene_arrays(pred, dense_dtype=dense)
    for key in ("depth", "world_points"):
        assert arrays[key].dtype == np.dtype(dense)
    assert arrays["depth_conf"].dtype == arrays["world_points_conf"].dtype == np.float32
    assert arrays["extrinsic"].dtype == np.float32 and arrays["intrinsic"].dtype == np.float32
    back = load_npz(npz_bytes(arrays))  # allow_pickle=False inside: str arrays must not need it
    assert back["frame_uris"].tolist() == pred["frame_uris"]
    tol = 1e-3 if dense == "float16" else 0
    np.testing.assert_allclose(back["world_points"], pred["world_points"], rtol=tol, atol=tol)
    assert back["depth"].shape == (3, 6, 8, 1)
    with pytest.raises(ValueError, match="dense_dtype"):
        scene_arrays(pred, dense_dtype="int8")


@pytest.mark.parametrize("key,logit,f16_unique", [
    ("depth_conf", (-12.0, -4.0), 0.5),        # the reported case: most within 0.02 of 1
    ("world_points_conf", (-3.0, 6.0), 0.9),   # a second kind: a wide spread, ties above 1 too
])
def test_confidence_ranking_survives_float16_outputs(key, logit, f16_unique):
    """Confidence is 1 + exp(x); stored from a float16 job, "drop the lowest 20%" still drops 20%."""
    rng = np.random.default_rng(7)
    pred = random_prediction(s=2, h=40, w=50, seed=3)
    x = rng.uniform(*logit, size=pred[key].shape)
    pred[key] = (1.0 + np.exp(x)).astype(np.float32)
    stored = load_npz(npz_bytes(scene_arrays(pred, dense_dtype="float16")))[key]
    assert len(np.unique(stored)) == len(np.unique(pred[key]))  # no ties made by storage
    np.testing.assert_array_equal(np.argsort(stored, axis=None), np.argsort(pred[key], axis=None))
    threshold = np.quantile(stored, 0.2)
    assert (stored > threshold).mean() == pytest.approx(0.8, abs=1e-3)
    # what float16 did: a large share tied at the bottom, so the 20% cut kept far more or less
    f16 = pred[key].astype(np.float16)
    assert len(np.unique(f16)) < f16_unique * f16.size
