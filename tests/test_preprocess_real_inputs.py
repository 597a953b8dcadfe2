"""Real-world images (issue 11, items 1-3, 5, 6 and the decompression-bomb guard): high bit
depths, transparency in any storage mode, EXIF orientation, and the input -> original pixel map."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from httm_dist.model.preprocess import (
    ImageDecodeError,
    decode_image,
    load_and_preprocess_frames,
    load_and_preprocess_images,
)

SIZE = 56


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _rgb8(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data).image)


# ---------------------------------------------------------------- item 1: high bit depth


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grey_is_scaled_by_its_range_not_clipped(fmt):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(20, 30), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format=fmt)
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.mode.startswith("I")  # the reported case: Pillow gives a 16-bit mode
    out = np.asarray(decode_image(buf.getvalue()).image)
    expected = np.round(values / 65535 * 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)
    # the reported symptom was 99% white; a uniform 16-bit image is ~half white at most
    assert (out == 255).mean() < 0.01


def test_16bit_rgb_png_keeps_its_range():
    rng = np.random.default_rng(1)
    rgb16 = rng.integers(0, 65536, size=(12, 16, 3), dtype=np.uint16)
    # Pillow cannot write 16-bit RGB; a minimal PNG writer with bit depth 16 does
    import struct
    import zlib

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 12, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    out = _rgb8(png).astype(int)
    # within one 8-bit level of the exact scaling (Pillow reduces by the top byte)
    assert np.abs(out - rgb16 / 65535 * 255).max() <= 1.0


def test_float_and_32bit_images_are_scaled_into_range():
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(ramp * 4000.0).save(buf, format="TIFF")
    out = _rgb8(buf.getvalue())[..., 0]
    np.testing.assert_array_equal(out, np.round(ramp * 255).astype(np.uint8))


# ---------------------------------------------------------------- item 2: transparency


def _hidden_colour_picture() -> Image.Image:
    """A 12x10 RGBA: left half opaque blue, right half fully transparent (hidden colour black)."""
    a = np.zeros((10, 12, 4), np.uint8)
    a[:, :6] = (0, 0, 255, 255)
    a[:, 6:] = (0, 0, 0, 0)
    return Image.fromarray(a)


def test_palette_png_with_transparent_index_matches_rgba():
    rgba = _hidden_colour_picture()
    reference = _rgb8(_png(rgba))
    assert (reference[:, 6:] == 255).all() and (reference[:, :6] == (0, 0, 255)).all()
    pal = Image.fromarray(np.asarray(rgba)[..., :3]).quantize(2)
    black = [i for i, c in enumerate(np.asarray(pal.getpalette()).reshape(-1, 3)[:2]) if tuple(c) == (0, 0, 0)][0]
    data = _png(pal, transparency=black)
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(_rgb8(data), reference)


@pytest.mark.parametrize("kind", ["LA", "L-colour-key"])
def test_grey_transparency_is_composited_on_white(kind):
    a = np.full((10, 12), 40, np.uint8)
    alpha = np.zeros((10, 12), np.uint8)
    alpha[:, :6] = 255
    if kind == "LA":
        data = _png(Image.fromarray(np.stack([a, alpha], -1), "LA"))
    else:
        a[:, 6:] = 0
        data = _png(Image.fromarray(a), transparency=0)
    out = _rgb8(data)
    assert (out[:, :6] == 40).all() and (out[:, 6:] == 255).all()


# ---------------------------------------------------------------- item 3: EXIF orientation


def _oriented_jpeg(size_wh, orientation: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(orientation)
    a = (rng.integers(0, 4, size=(size_wh[1] // 10, size_wh[0] // 10, 3)) * 80).astype(np.uint8)
    a = np.kron(a, np.ones((10, 10, 1), np.uint8))  # blocks, so JPEG keeps them
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue(), a


@pytest.mark.parametrize("orientation,rot", [(6, -90), (8, 90), (3, 180)])
def test_exif_orientation_is_applied_and_recorded(orientation, rot):
    data, stored = _oriented_jpeg((300, 200), orientation)
    decoded = decode_image(data)
    as_stored = np.asarray(decode_image(data, exif_orientation=False).image)
    assert np.abs(as_stored.astype(int) - stored).mean() < 10  # JPEG: close to what was saved
    upright = np.rot90(as_stored, k=rot // 90)  # what a viewer shows (Orientation 6: 90 deg clockwise)
    assert decoded.exif_orientation == orientation and decoded.orientation_applied
    np.testing.assert_array_equal(np.asarray(decoded.image), upright)
    _, geometry = load_and_preprocess_frames([data], target_size=SIZE)
    assert geometry[0].orig_hw == upright.shape[:2]
    assert geometry[0].orientation_applied


def test_exif_orientation_can_be_ignored():
    data, stored = _oriented_jpeg((300, 200), 6)
    decoded = decode_image(data, exif_orientation=False)
    assert decoded.exif_orientation == 6 and not decoded.orientation_applied
    assert decoded.image.size == (300, 200)
    _, geometry = load_and_preprocess_frames([data], target_size=SIZE, exif_orientation=False)
    assert geometry[0].orig_hw == (200, 300) and not geometry[0].orientation_applied


def test_plain_images_report_no_orientation():
    decoded = decode_image(_png(Image.new("RGB", (20, 10), (1, 2, 3))))
    assert decoded.exif_orientation == 1 and not decoded.orientation_applied


# ---------------------------------------------------------------- decompression bomb (issue 16)


def test_too_large_image_fails_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "huge_frame.png"
    Image.new("L", (400, 300)).save(path)
    with pytest.raises(ImageDecodeError, match=r"huge_frame\.png.*120,000 pixels.*image\.max_pixels"):
        load_and_preprocess_frames([path], target_size=SIZE, max_pixels=100_000)
    # the limit is the key's value, not Pillow's: just above it, the same image decodes
    images, _ = load_and_preprocess_frames([path], target_size=SIZE, max_pixels=120_000)
    assert images.shape == (1, 3, 42, SIZE)


def test_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2000 pixels
    path = tmp_path / "big.png"
    Image.new("L", (60, 50)).save(path)
    images, _ = load_and_preprocess_frames([path], target_size=SIZE, max_pixels=5000)
    assert images.shape[0] == 1


# ---------------------------------------------------------------- items 5-6: geometry


def _ramp(w: int, h: int) -> bytes:
    """R = x, G = y of each pixel (so a pixel's colour says where it came from)."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return _png(Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)))


@pytest.mark.parametrize(
    "mode,sizes",
    [("crop", [(150, 250)]), ("crop", [(220, 140), (140, 220)]), ("pad", [(220, 140)]), ("pad", [(90, 200)])],
)
def test_input_pixels_map_back_to_original_pixels(mode, sizes):
    """A pixel centre of the input, mapped by input_to_original, lands where its colour came from."""
    images, geometries = load_and_preprocess_frames([_ramp(w, h) for w, h in sizes], mode, 112)
    for img, g, (w, h) in zip(images.numpy(), geometries, sizes):
        x0, y0, x1, y1 = g.valid_box()
        assert g.orig_hw == (h, w)
        v, u = np.mgrid[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3]  # interior (bicubic edges aside)
        xo, yo, _ = np.einsum("ij,jhw->ihw", g.input_to_original(), np.stack([u + 0.5, v + 0.5, np.ones_like(u)]))
        # ramp value at continuous coordinate x is x - 0.5; 8-bit rounding and bicubic: < 1 level
        np.testing.assert_allclose(img[0][v, u] * 255, xo - 0.5, atol=1.0)
        np.testing.assert_allclose(img[1][v, u] * 255, yo - 0.5, atol=1.0)
        # outside the valid box: white padding only
        mask = np.zeros(img.shape[1:], bool)
        mask[y0:y1, x0:x1] = True
        assert (img[:, ~mask] == 1.0).all()
