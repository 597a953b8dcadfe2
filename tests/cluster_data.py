"""Shared data and helpers of the cluster tests (``test_cluster_jobs.py`` runs them on Ray,
``test_cluster_local.py`` without): tiny synthetic scenes, the job config, and readers.

Import the fixtures (``dataset``, ``reference``) into a test module to use them there.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import httm_dist.results as results
from httm_dist.cluster.driver import run_job
from httm_dist.config import load_config
from httm_dist.eval.synthetic import render_scene
from httm_dist.merging import apply_merging
from httm_dist.model import load_vggt
from httm_dist.model.geometry import pose_encoding_to_extri_intri
from httm_dist.model.preprocess import load_and_preprocess_images

H, W, SIZE = 42, 56, 56  # frames 56x42 -> model input 56x42 (4x3 patches)
FRAMES = 3
GOOD = ("a", "b", "c")  # c is a .tar archive
LONG, LONG_FRAMES = "l_long", 10  # with CHUNK: 4 overlapping chunks of 4 frames
CHUNK = {"max_frames": 4, "overlap": 2}
NUM_CHUNKS = 4
REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "tests" / "fixtures" / "vggt_tiny" / "weights.safetensors"
DELAY_ENV = "HTTM_DIST_TEST_UNIT_DELAY_S"
KILL_ENV = "HTTM_DIST_TEST_KILL_SCENE"


# --------------------------------------------------------------------------- data


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def scene_frames(seed: int, n: int = FRAMES) -> list[bytes]:
    return [encode(im) for im in render_scene(n, H, W, seed=seed).images]


def write_folder(path: Path, blobs: list[bytes], ext: str = "png") -> None:
    path.mkdir(parents=True)
    for i, blob in enumerate(blobs):
        (path / f"frame_{i:02d}.{ext}").write_bytes(blob)


def write_tar(path: Path, blobs: list[bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"c/frame_{i:02d}.png")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Scenes a, b (folders), c (.tar), a corrupt image, an empty scene, a long scene."""
    root = tmp_path_factory.mktemp("cluster") / "scenes"
    blobs = {sid: scene_frames(seed) for seed, sid in enumerate(GOOD)}
    write_folder(root / "a", blobs["a"])
    write_folder(root / "b", blobs["b"])
    root.mkdir(exist_ok=True)
    write_tar(root / "c.tar", blobs["c"])
    bad = scene_frames(7)
    bad[1] = b"\x89PNG\r\n\x1a\n this is not an image"
    write_folder(root / "d_corrupt", bad)
    (root / "e_empty").mkdir()
    (root / "e_empty" / "notes.txt").write_text("no images here")
    write_folder(root / LONG, scene_frames(11, n=LONG_FRAMES))
    return {"root": root, "blobs": blobs}


@pytest.fixture(scope="module")
def reference(dataset) -> dict:
    """The tiny model run directly (no Ray, no pipeline) on each good scene's images."""
    cfg = load_config(cfg_dict("in", "out"))
    model = apply_merging(load_vggt("tiny", weights=str(WEIGHTS), device="cpu"), cfg.merging)
    model.eval()
    out = {}
    for sid, blobs in dataset["blobs"].items():
        images = load_and_preprocess_images(blobs, mode="crop", target_size=SIZE)
        out[sid] = direct_arrays(model, images)
    return out


def direct_arrays(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The arrays a scene's outputs hold, from ``model`` called directly on ``images``
    ([S, 3, H, W]) with no pipeline in between: the reference the pipeline must reproduce."""
    with torch.inference_mode():
        pred = model(images)
        ext, intr = pose_encoding_to_extri_intri(pred["pose_enc"], images.shape[-2:])
    return {
        "depth": pred["depth"][0, ..., 0].numpy(),
        "depth_conf": pred["depth_conf"][0].numpy(),
        "world_points": pred["world_points"][0].numpy(),
        "world_points_conf": pred["world_points_conf"][0].numpy(),
        "extrinsic": ext[0].numpy(),
        "intrinsic": intr[0].numpy(),
    }


def cfg_dict(input_url: str, output_url: str, storage_options: dict | None = None,
              weights: str | None = None, **top) -> dict:
    data = {
        "input": str(input_url),
        "output": str(output_url),
        "storage_options": storage_options or {},
        "model": {"preset": "tiny", "weights": weights or str(WEIGHTS), "device": "cpu"},
        "image": {"mode": "crop", "size": SIZE},
        "cpus_per_worker": 1,
        "max_attempts": 3,
    }
    data.update(top)
    return data


def job(input_url, output_url, **kw):
    """The job config of :func:`cfg_dict`, loaded."""
    return load_config(cfg_dict(input_url, output_url, **kw))


def run(cfg, **kw) -> dict:
    """``run_job`` without the progress bar; returns the summary."""
    return run_job(cfg, progress=False, **kw)


def open_output(output_url, storage_options=None) -> results.ResultsReader:
    return results.open(str(output_url), storage_options or {})


def records(output_url, storage_options=None) -> dict:
    """Every scene record of the output (dicts, as users read them), by scene id."""
    return open_output(output_url, storage_options).records()


def frame_rows(output_url, storage_options=None) -> list[tuple[str, int]]:
    """(scene_id, frame_index) of every row of the frame table."""
    table = open_output(output_url, storage_options).frames(columns=["scene_id", "frame_index"])
    return list(zip(table.column("scene_id").to_pylist(), table.column("frame_index").to_pylist()))


def frames_of(rows: list[tuple[str, int]], scene_id: str) -> list[int]:
    return sorted(i for s, i in rows if s == scene_id)


def assert_outputs(output_url, storage_options, reference, long_scene: bool = False) -> None:
    """Right rows and shapes; arrays equal the direct model within float16 precision; the
    long (chunked) scene, if any, has every frame exactly once."""
    reader = open_output(output_url, storage_options)
    assert sorted(reader.scene_ids) == sorted(GOOD + ((LONG,) if long_scene else ()))
    rows = frame_rows(output_url, storage_options)
    assert len(rows) == FRAMES * len(GOOD) + (LONG_FRAMES if long_scene else 0)
    assert len(set(rows)) == len(rows)  # no duplicate (scene, frame)
    if long_scene:
        assert frames_of(rows, LONG) == list(range(LONG_FRAMES))
        assert reader.arrays(LONG)["depth"].shape == (LONG_FRAMES, H, W)
    for sid in GOOD:
        assert frames_of(rows, sid) == list(range(FRAMES)), sid
        arrays = reader.arrays(sid)
        ref = reference[sid]
        assert arrays["depth"].shape == (FRAMES, H, W)
        assert arrays["world_points"].shape == (FRAMES, H, W, 3)
        assert arrays["extrinsic"].shape == (FRAMES, 3, 4)
        assert arrays["intrinsic"].shape == (FRAMES, 3, 3)
        for key, value in ref.items():
            got = np.asarray(arrays[key], dtype=np.float32)
            # float16 storage: relative rounding <= 2**-11; allow for it plus tiny fp noise.
            # (the untrained tiny model may predict a zero fov: an infinite focal, on both
            # sides; assert_allclose requires infinities to match exactly)
            scale = float(np.abs(value[np.isfinite(value)]).max())
            np.testing.assert_allclose(got, value, rtol=2e-3, atol=1e-4 * scale + 1e-6,
                                       err_msg=f"{sid}/{key}")


