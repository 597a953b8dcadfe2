"""Image loading and preprocessing, bit-exact with the official VGGT ``load_and_preprocess_images``
on the inputs where that loader is consistent (8-bit RGB, L or RGBA without an EXIF orientation).

Two modes, as in the official code:

- ``crop`` (default): RGBA is composited on white, then RGB; width -> ``target_size``, height
  -> ``round(h * target_size / w / 14) * 14`` (Python round), PIL bicubic, values k/255 in [0, 1];
  the height is centre-cropped to ``target_size`` when larger.
- ``pad``: the longest side -> ``target_size``, the other side rounded to a multiple of 14, then
  padded with white (1.0) to ``target_size`` x ``target_size`` with top/left = pad // 2.

Images of different shapes in one batch are padded white, centred, to the largest H and W.
Where each frame lands (resize, crop, padding offsets) is computed once, by :func:`frame_geometry`.

Where httm-dist deliberately differs from the official loader (which gets these wrong):

- high-bit-depth images (16-bit grey ``I;16*``, 32-bit ``I``, float ``F``) are scaled to 8 bits
  by their real range (65535 for 16-bit, see :func:`_to_8bit`) instead of being clipped at 255;
- every image with transparency (palette ``tRNS``, ``LA``, ``PA``, grey/RGB colour keys) is
  composited on white like RGBA, instead of showing the hidden colour;
- the EXIF orientation is applied (``exif_orientation=True``, the default), so a phone photo
  is fed the way every viewer shows it; ``False`` ignores it, as the official loader does.

Each frame's :class:`FrameGeometry` records how its input pixels map back to the (oriented)
original image and which input pixels are real content rather than padding.

Sources may be paths (``str`` / ``os.PathLike``), raw ``bytes`` or binary file objects, so an
fsspec stream (``fs.open(url, "rb")``) feeds straight in without a temporary file.
"""

from __future__ import annotations

import io
import logging
import os
import re
import dataclasses
from dataclasses import dataclass
from typing import BinaryIO, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from httm_dist.errors import SceneError
from httm_dist.model.config import PATCH_SIZE
from httm_dist.storage import redact

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

MODES = ("crop", "pad")
DEFAULT_TARGET_SIZE = 518
DEFAULT_MAX_PIXELS = 2 * 89_478_485
"""Pillow's own decompression-bomb error threshold (2 x ``PIL.Image.MAX_IMAGE_PIXELS``'s default)."""
EXIF_ORIENTATION_TAG = 0x0112


class ImageDecodeError(SceneError, ValueError):
    """An image cannot be read or decoded; the message names the image.

    A ``SceneError`` so the batch driver records the scene as failed and goes on, and a
    ``ValueError`` because it is bad input rather than a bug.
    """


_OBJECT_REPR = re.compile(r"<[^<>]* object at 0x[0-9A-Fa-f]+>")
"""A Python object's default repr, which names a memory address (different on every run)."""


def _describe(source: ImageSource) -> str:
    """A short human name for a source, for error messages (secrets redacted)."""
    if isinstance(source, (str, os.PathLike)):
        return redact(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of image data>"
    name = getattr(source, "path", None) or getattr(source, "name", None)
    return redact(str(name)) if name else f"<file object {type(source).__name__}>"


def _source_size(source: ImageSource) -> int | None:
    """The size in bytes of an image source (None when it cannot be told without reading)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            return os.path.getsize(source)
        if isinstance(source, io.BytesIO):
            return source.getbuffer().nbytes
        if hasattr(source, "seek") and hasattr(source, "tell"):
            source.seek(0, io.SEEK_END)
            return source.tell()
    except (OSError, ValueError):
        pass
    return None


def _validate_options(mode: str, target_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"preprocessing mode must be one of {MODES}, got {mode!r}")
    if (
        not isinstance(target_size, (int, np.integer))
        or isinstance(target_size, bool)
        or target_size <= 0
        or target_size % PATCH_SIZE != 0
    ):
        raise ValueError(
            f"target_size must be a positive multiple of the patch size {PATCH_SIZE} "
            f"(e.g. 518), got {target_size!r}"
        )


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth single-channel images as 8-bit ``L``, scaled by their real range.

    ``I;16``/``I;16B``/``I;16L``/``I;16N`` (16-bit PNG/TIFF): ``v / 65535``. ``I`` (32-bit
    integer; Pillow's mode for some 16-bit files): ``v / 65535`` when every value fits 16 bits,
    else by the image's own min..max. ``F`` (float): as is when within [0, 1], else by its
    min..max. The result is ``round(255 * x)``, the quantisation of every 8-bit input. Other
    modes are returned unchanged (Pillow already reduces 16-bit RGB/RGBA PNGs by their top byte).
    """
    mode = img.mode
    if not (mode.startswith("I") or mode == "F"):
        return img
    a = np.asarray(img).astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        scaled = a / 65535.0
    elif mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
        scaled = a
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8))


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded to 8-bit RGB, with what was done to get there."""

    image: Image.Image
    exif_orientation: int
    """The file's EXIF Orientation tag (1-8; 1 when absent)."""
    orientation_applied: bool
    """True when a non-identity orientation was applied (the image is as viewers show it)."""


def decode_image(
    source: ImageSource, exif_orientation: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode ``source`` fully into an RGB PIL image, the way a viewer shows it.

    EXIF orientation applied (unless ``exif_orientation=False``), high bit depths scaled by
    their range (:func:`_to_8bit`), any transparency composited on white. Raises
    :class:`ImageDecodeError` naming the image when it is missing, corrupt, or has more than
    ``max_pixels`` pixels (``None``: no limit; config key ``image.max_pixels``).
    """
    name = _describe(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        if max_pixels is not None and (Image.MAX_IMAGE_PIXELS or 0) and max_pixels > Image.MAX_IMAGE_PIXELS:
            # Pillow refuses images over twice its own limit before we can look: let ours decide.
            Image.MAX_IMAGE_PIXELS = int(max_pixels)
        img = Image.open(source)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                f"image {name} is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,} (a decompression-bomb guard): downscale it, or raise "
                "'image.max_pixels' if the image is trusted"
            )
        img.load()  # decode now so truncated files fail here, naming the image
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(
            f"image {name} does not exist; check the scene's image list and paths"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"image {name} is over Pillow's decompression-bomb limit ({exc}): downscale it, or "
            "raise 'image.max_pixels' if the image is trusted"
        ) from exc
    except UnidentifiedImageError as exc:  # its text is the stream's repr: "<_io.BytesIO object at 0x...>"
        size = _source_size(source)
        what = ("the file is empty (0 bytes)" if size == 0 else
                f"no format Pillow reads recognises its {'' if size is None else f'{size:,} '}bytes")
        raise ImageDecodeError(
            f"image {name} cannot be decoded: {what}; it is corrupt or not an image: replace or "
            "remove it from the scene"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            f"image {name} cannot be decoded ({type(exc).__name__}: {_OBJECT_REPR.sub('the file', str(exc))}); "
            "it is corrupt or not an image: replace or remove it from the scene"
        ) from exc
    orientation = 1
    applied = False
    try:
        orientation = int(img.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not lose the image
        logger.warning("image %s: unreadable EXIF block ignored (%s)", name, exc)
    if exif_orientation and orientation in range(2, 9):
        img = ImageOps.exif_transpose(img)
        applied = True
    img = _to_8bit(img)
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return DecodedImage(img.convert("RGB"), orientation, applied)


def _resized_size(width: int, height: int, mode: str, target_size: int) -> tuple[int, int]:
    """(new_width, new_height) exactly as the official code computes them."""
    if mode == "pad" and height > width:
        new_height = target_size
        new_width = round(width * (new_height / height) / PATCH_SIZE) * PATCH_SIZE
    else:
        new_width = target_size
        new_height = round(height * (new_width / width) / PATCH_SIZE) * PATCH_SIZE
    return new_width, new_height


def _pad_white(img: torch.Tensor, height: int, width: int, top: int, left: int) -> torch.Tensor:
    """Pad [3,h,w] with 1.0 to [3,height,width], its top-left pixel at (``top``, ``left``)
    (offsets from :func:`frame_geometry`)."""
    h_pad = height - img.shape[1]
    w_pad = width - img.shape[2]
    if h_pad <= 0 and w_pad <= 0:
        return img
    return F.pad(img, (left, w_pad - left, top, h_pad - top), mode="constant", value=1.0)


@dataclass(frozen=True)
class FrameGeometry:
    """How one frame's model input relates to its original image.

    The *original* image is the decoded image as viewers show it (EXIF orientation applied
    unless disabled): ``orig_hw`` is its (height, width). It was resized to ``resized_hw``,
    ``crop_top`` rows were cut from the top of the resized image (crop mode), and the content
    (``content_hw``) sits at ``(pad_top, pad_left)`` in the input (white padding around it, in
    pad mode or to match the batch's largest frame).
    """

    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_top: int = 0
    pad_top: int = 0
    pad_left: int = 0
    content_hw: tuple[int, int] | None = None
    exif_orientation: int = 1
    orientation_applied: bool = False

    def __post_init__(self) -> None:
        if self.content_hw is None:
            object.__setattr__(self, "content_hw", tuple(self.resized_hw))

    def padded(self, top: int, left: int) -> "FrameGeometry":
        """The same frame with ``top``/``left`` more padding before its content."""
        return dataclasses.replace(self, pad_top=self.pad_top + top, pad_left=self.pad_left + left)

    def input_to_original(self) -> np.ndarray:
        """3x3 float64 affine ``A`` with ``[x_o, y_o, 1] = A @ [x_i, y_i, 1]``.

        Continuous pixel coordinates with the origin at the top-left corner of the top-left
        pixel (a pixel's centre is at +0.5), the convention of VGGT's intrinsics (principal
        point at W/2, H/2): ``x_o = sx * (x_i - pad_left)``, ``y_o = sy * (y_i - pad_top +
        crop_top)`` with ``sx = W_orig / W_resized``, ``sy = H_orig / H_resized``.
        """
        (oh, ow), (rh, rw) = self.orig_hw, self.resized_hw
        sx, sy = ow / rw, oh / rh
        return np.array(
            [[sx, 0.0, -sx * self.pad_left], [0.0, sy, sy * (self.crop_top - self.pad_top)], [0.0, 0.0, 1.0]]
        )

    def valid_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the real content in input pixels, ``x1``/``y1`` exclusive."""
        h, w = self.content_hw
        return (self.pad_left, self.pad_top, self.pad_left + w, self.pad_top + h)

    def as_dict(self) -> dict:
        """JSON-friendly form (for chunk metadata); :meth:`from_dict` reverses it."""
        return {
            "orig_hw": list(self.orig_hw), "resized_hw": list(self.resized_hw),
            "crop_top": self.crop_top, "pad_top": self.pad_top, "pad_left": self.pad_left,
            "content_hw": list(self.content_hw), "exif_orientation": self.exif_orientation,
            "orientation_applied": self.orientation_applied,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FrameGeometry":
        return cls(
            tuple(d["orig_hw"]), tuple(d["resized_hw"]), int(d["crop_top"]), int(d["pad_top"]),
            int(d["pad_left"]), tuple(d["content_hw"]), int(d["exif_orientation"]),
            bool(d["orientation_applied"]),
        )


def _own_input_hw(mode: str, target_size: int, content_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of one frame's model input before batching: ``target_size`` square in
    pad mode, the (resized, cropped) content itself in crop mode."""
    return (target_size, target_size) if mode == "pad" else content_hw


def frame_geometry(
    orig_hw: tuple[int, int],
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
    input_hw: tuple[int, int] | None = None,
    *,
    exif_orientation: int = 1,
    orientation_applied: bool = False,
) -> FrameGeometry:
    """Where the loader puts an image of ``orig_hw`` = (height, width) pixels in its model input:
    the official ``load_and_preprocess_images`` arithmetic, the one place it is computed (the
    loader and :mod:`httm_dist.export` both use it).

    In order: resize (crop: width -> ``target_size``, height -> ``round(h * target_size / w /
    14) * 14``; pad: the longest side -> ``target_size``, the other rounded the same way); in
    crop mode keep the middle ``target_size`` rows of a taller image (``crop_top`` = excess //
    2); in pad mode centre the content in a ``target_size`` square (top/left = pad // 2); then
    centre that frame input (top/left = pad // 2) in ``input_hw``, the (height, width) of the
    input it is stored in (a batch's largest H and W; default: the frame's own input, no
    batch padding). ``exif_orientation``/``orientation_applied`` are recorded as given.

    Raises ``ValueError`` for an unknown mode or a ``target_size`` that is not a positive
    multiple of 14, an image too elongated to resize (a side would round to 0 pixels), or an
    ``input_hw`` smaller than the frame's own input.
    """
    _validate_options(mode, target_size)
    height, width = (int(v) for v in orig_hw)
    new_width, new_height = _resized_size(width, height, mode, target_size)
    if new_width <= 0 or new_height <= 0:
        raise ValueError(
            f"a {width}x{height} image cannot be resized to size {target_size} ({mode} mode): it is "
            f"too elongated for a side that is a multiple of {PATCH_SIZE} pixels"
        )
    cropped = mode == "crop" and new_height > target_size
    crop_top = (new_height - target_size) // 2 if cropped else 0
    content_hw = (target_size if cropped else new_height, new_width)
    own_h, own_w = _own_input_hw(mode, target_size, content_hw)
    geometry = FrameGeometry(
        (height, width), (new_height, new_width), crop_top,
        (own_h - content_hw[0]) // 2, (own_w - content_hw[1]) // 2, content_hw,
        exif_orientation, orientation_applied,
    )
    if input_hw is None:
        return geometry
    in_h, in_w = (int(v) for v in input_hw)
    if own_h > in_h or own_w > in_w:
        raise ValueError(
            f"a {width}x{height} image in {mode} mode at size {target_size} gives {own_w}x{own_h}, "
            f"larger than the stored input {in_w}x{in_h}"
        )
    return geometry.padded((in_h - own_h) // 2, (in_w - own_w) // 2)


def preprocess_frame(
    source: ImageSource,
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
    exif_orientation: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, FrameGeometry]:
    """Load one image and preprocess it: the float32 tensor [3, h, w] in [0, 1] (values k/255)
    and its :class:`FrameGeometry` (:func:`frame_geometry`). Options as in :func:`decode_image`."""
    _validate_options(mode, target_size)
    decoded = decode_image(source, exif_orientation, max_pixels)
    width, height = decoded.image.size
    try:
        geometry = frame_geometry(
            (height, width), mode, target_size,
            exif_orientation=decoded.exif_orientation, orientation_applied=decoded.orientation_applied,
        )
    except ValueError as exc:
        raise ImageDecodeError(f"image {_describe(source)}: {exc}; crop it first") from None
    (new_height, new_width), (content_h, _) = geometry.resized_hw, geometry.content_hw
    img = decoded.image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.float32).div(255)
    tensor = tensor[:, geometry.crop_top : geometry.crop_top + content_h, :]
    input_h, input_w = _own_input_hw(mode, target_size, geometry.content_hw)
    return _pad_white(tensor, input_h, input_w, geometry.pad_top, geometry.pad_left), geometry


def preprocess_image(
    source: ImageSource, mode: str = "crop", target_size: int = DEFAULT_TARGET_SIZE
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load one image and preprocess it (defaults of :func:`preprocess_frame`).

    Returns the float32 tensor [3, h, w] in [0, 1] (values k/255) and the original
    ``(height, width)`` of the decoded (oriented) image.
    """
    tensor, geometry = preprocess_frame(source, mode, target_size)
    return tensor, geometry.orig_hw


def load_and_preprocess_frames(
    sources: Sequence[ImageSource],
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
    exif_orientation: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, list[FrameGeometry]]:
    """Like :func:`load_and_preprocess_images`, also returning each frame's :class:`FrameGeometry`
    (batch padding included). ``exif_orientation``/``max_pixels`` as in :func:`decode_image`."""
    _validate_options(mode, target_size)
    if isinstance(sources, (str, bytes, os.PathLike)) or not len(sources):
        raise ValueError(
            "load_and_preprocess_images needs a non-empty list of images (paths, bytes or "
            f"binary file objects), got {type(sources).__name__}"
            + ("" if isinstance(sources, (str, bytes, os.PathLike)) else " of length 0")
        )
    images: list[torch.Tensor] = []
    geometries: list[FrameGeometry] = []
    for source in sources:
        tensor, geometry = preprocess_frame(source, mode, target_size, exif_orientation, max_pixels)
        images.append(tensor)
        geometries.append(geometry)
    shapes = {tuple(img.shape[1:]) for img in images}
    if len(shapes) > 1:
        max_h = max(h for h, _ in shapes)
        max_w = max(w for _, w in shapes)
        logger.info("images of different shapes %s padded white to %dx%d", sorted(shapes), max_h, max_w)
        batched = [
            frame_geometry(g.orig_hw, mode, target_size, (max_h, max_w), exif_orientation=g.exif_orientation,
                           orientation_applied=g.orientation_applied)
            for g in geometries
        ]
        # each frame's input moves by what batching added to its content's offsets
        images = [
            _pad_white(img, max_h, max_w, b.pad_top - g.pad_top, b.pad_left - g.pad_left)
            for img, g, b in zip(images, geometries, batched)
        ]
        geometries = batched
    return torch.stack(images), geometries


def load_and_preprocess_images_with_sizes(
    sources: Sequence[ImageSource],
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Like :func:`load_and_preprocess_images`, also returning each original ``(H, W)``."""
    images, geometries = load_and_preprocess_frames(sources, mode, target_size)
    return images, [g.orig_hw for g in geometries]


def load_and_preprocess_images(
    sources: Sequence[ImageSource],
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
) -> torch.Tensor:
    """Load and preprocess images into the model input [S, 3, H, W], float32 in [0, 1].

    Raises ``ValueError`` for an empty list, an unknown mode or a ``target_size`` that is not a
    multiple of 14, and :class:`ImageDecodeError` (naming the image) for an unreadable one.
    """
    return load_and_preprocess_frames(sources, mode, target_size)[0]
