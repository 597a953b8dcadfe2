"""Preprocessing reproduces the official ``load_and_preprocess_images`` exactly."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from httm_dist.errors import SceneError
from httm_dist.model.preprocess import (
    ImageDecodeError,
    load_and_preprocess_images,
    load_and_preprocess_images_with_sizes,
    preprocess_image,
)


@pytest.fixture(scope="module")
def expected(fixtures_dir):
    with np.load(fixtures_dir / "preprocess" / "expected_uint8.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def order(fixtures_dir):
    return json.loads((fixtures_dir / "preprocess" / "order.json").read_text())["order"]


def _as_uint8(t: torch.Tensor) -> np.ndarray:
    arr = t.numpy() * 255
    # the official output is exactly k/255, so scaling back lands on integers
    np.testing.assert_allclose(arr, np.round(arr), atol=1e-3)
    return np.round(arr).astype(np.uint8)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_single_images_match_official(fixtures_dir, expected, order, mode):
    for name in order:
        out = load_and_preprocess_images([fixtures_dir / "preprocess" / name], mode=mode)
        assert out.dtype == torch.float32 and out.shape[0] == 1
        np.testing.assert_array_equal(_as_uint8(out[0]), expected[f"{mode}/{name}"], err_msg=name)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_batch_matches_official(fixtures_dir, expected, order, mode):
    paths = [str(fixtures_dir / "preprocess" / name) for name in order]
    out, sizes = load_and_preprocess_images_with_sizes(paths, mode=mode)
    np.testing.assert_array_equal(_as_uint8(out), expected[f"{mode}/ALL_IN_ORDER"])
    for path, (h, w) in zip(paths, sizes):
        assert Image.open(path).size == (w, h)


def test_bytes_and_file_objects_equal_paths(fixtures_dir, order):
    paths = [fixtures_dir / "preprocess" / name for name in order[:3]]
    raw = [p.read_bytes() for p in paths]
    from_paths = load_and_preprocess_images(paths)
    from_bytes = load_and_preprocess_images(raw)
    from_files = load_and_preprocess_images([io.BytesIO(b) for b in raw])
    assert torch.equal(from_paths, from_bytes) and torch.equal(from_paths, from_files)


def test_preprocess_image_reports_original_size(fixtures_dir):
    tensor, size = preprocess_image(fixtures_dir / "preprocess" / "odd_333x187.jpg", "crop")
    assert size == (187, 333)
    assert tensor.shape == (3, 294, 518)


def test_other_target_size_keeps_multiples_of_14(fixtures_dir, order):
    out = load_and_preprocess_images(
        [fixtures_dir / "preprocess" / n for n in order], mode="pad", target_size=56
    )
    assert out.shape == (len(order), 3, 56, 56)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_corrupt_image_names_the_source(tmp_path, fixtures_dir):
    good = (fixtures_dir / "preprocess" / "landscape_320x240.png").read_bytes()
    truncated = tmp_path / "broken.png"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    for bad in (truncated, garbage):
        with pytest.raises(ImageDecodeError, match=bad.name) as info:
            load_and_preprocess_images([fixtures_dir / "preprocess" / "landscape_320x240.png", bad])
        assert isinstance(info.value, SceneError) and isinstance(info.value, ValueError)
    with pytest.raises(ImageDecodeError, match="missing.png"):
        load_and_preprocess_images([tmp_path / "missing.png"])
    with pytest.raises(ImageDecodeError, match="bytes"):
        load_and_preprocess_images([b"\x00\x01garbage"])


def test_bad_arguments(fixtures_dir):
    path = fixtures_dir / "preprocess" / "landscape_320x240.png"
    with pytest.raises(ValueError, match="non-empty"):
        load_and_preprocess_images([])
    with pytest.raises(ValueError, match="mode"):
        load_and_preprocess_images([path], mode="stretch")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_and_preprocess_images([path], target_size=500)


@pytest.mark.parametrize("data, what", [(b"", "the file is empty (0 bytes)"),
                                        (b"plain text, no image", "no format Pillow reads recognises its 20 bytes")])
def test_an_empty_or_foreign_file_names_the_file_not_a_memory_address(data, what, tmp_path):
    """The runner hands frames over as named streams: the message names the frame's URI and
    says what to do, the same on every run (Pillow's own text is the stream's repr,
    ``<_io.BytesIO object at 0x7f...>``)."""
    from httm_dist.storage import redact

    uri = "s3://bucket/scenes/a/frame_0001.png?X-Amz-Signature=secret"
    messages = set()
    for _ in range(2):
        stream = io.BytesIO(data)
        stream.name = uri
        with pytest.raises(ImageDecodeError) as info:
            load_and_preprocess_images([stream])
        messages.add(str(info.value))
    (message,) = messages
    assert "secret" not in message and "0x" not in message
    assert message == (f"image {redact(uri)} cannot be decoded: "
                       f"{what}; it is corrupt or not an image: replace or remove it from the scene")
    path = tmp_path / "frame.png"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match=rf"^image {path} cannot be decoded: {re.escape(what)};"):
        load_and_preprocess_images([path])
    with pytest.raises(ImageDecodeError, match=rf"^image <{len(data)} bytes of image data> cannot be decoded: "):
        load_and_preprocess_images([data])


def test_other_decode_errors_lose_object_reprs_too(monkeypatch):
    from httm_dist.model import preprocess

    def broken_open(fp):
        raise OSError(f"broken data stream when reading image file {fp!r}")

    monkeypatch.setattr(preprocess.Image, "open", broken_open)
    with pytest.raises(ImageDecodeError, match=r"^image <3 bytes of image data> cannot be decoded \(OSError: broken "
                                               r"data stream when reading image file the file\); it is corrupt") as info:
        load_and_preprocess_images([b"abc"])
    assert "0x" not in str(info.value)
