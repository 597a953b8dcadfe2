"""Image loading and preprocessing, bit-exact with the official VGGT ``load_and_preprocess_images``.

Two modes, as in the official code:

- ``crop`` (default): RGBA is composited on white, then RGB; width -> ``target_size``, height
  -> ``round(h * target_size / w / 14) * 14`` (Python round), PIL bicubic, values k/255 in [0, 1];
  the height is centre-cropped to ``target_size`` when larger.
- ``pad``: the longest side -> ``target_size``, the other side rounded to a multiple of 14, then
  padded with white (1.0) to ``target_size`` x ``target_size`` with top/left = pad // 2.

Images of different shapes in one batch are padded white, centred, to the largest H and W.

Sources may be paths (``str`` / ``os.PathLike``), raw ``bytes`` or binary file objects, so an
fsspec stream (``fs.open(url, "rb")``) feeds straight in without a temporary file.
"""

from __future__ import annotations

import io
import logging
import os
from typing import BinaryIO, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from httm_dist.errors import SceneError

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

MODES = ("crop", "pad")
PATCH_SIZE = 14
DEFAULT_TARGET_SIZE = 518


class ImageDecodeError(SceneError, ValueError):
    """An image cannot be read or decoded; the message names the image.

    A ``SceneError`` so the batch driver records the scene as failed and goes on, and a
    ``ValueError`` because it is bad input rather than a bug.
    """


def _describe(source: ImageSource) -> str:
    """A short human name for a source, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of image data>"
    name = getattr(source, "path", None) or getattr(source, "name", None)
    return str(name) if name else f"<file object {type(source).__name__}>"


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


def _open_rgb(source: ImageSource) -> Image.Image:
    """Decode ``source`` fully into an RGB PIL image (RGBA composited on white first)."""
    name = _describe(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(source)))
        else:
            img = Image.open(source)
        img.load()  # decode now so truncated files fail here, naming the image
    except FileNotFoundError as exc:
        raise ImageDecodeError(
            f"image {name} does not exist; check the scene's image list and paths"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            f"image {name} cannot be decoded ({type(exc).__name__}: {exc}); it is corrupt or "
            "not an image: replace or remove it from the scene"
        ) from exc
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _resized_size(width: int, height: int, mode: str, target_size: int) -> tuple[int, int]:
    """(new_width, new_height) exactly as the official code computes them."""
    if mode == "pad" and height > width:
        new_height = target_size
        new_width = round(width * (new_height / height) / PATCH_SIZE) * PATCH_SIZE
    else:
        new_width = target_size
        new_height = round(height * (new_width / width) / PATCH_SIZE) * PATCH_SIZE
    return new_width, new_height


def _pad_white(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad [3,h,w] with 1.0 to [3,height,width], top/left = pad // 2."""
    h_pad = height - img.shape[1]
    w_pad = width - img.shape[2]
    if h_pad <= 0 and w_pad <= 0:
        return img
    top, left = h_pad // 2, w_pad // 2
    return F.pad(img, (left, w_pad - left, top, h_pad - top), mode="constant", value=1.0)


def preprocess_image(
    source: ImageSource, mode: str = "crop", target_size: int = DEFAULT_TARGET_SIZE
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load one image and preprocess it.

    Returns the float32 tensor [3, h, w] in [0, 1] (values k/255) and the original
    ``(height, width)`` of the decoded image.
    """
    _validate_options(mode, target_size)
    img = _open_rgb(source)
    width, height = img.size
    new_width, new_height = _resized_size(width, height, mode, target_size)
    if new_width <= 0 or new_height <= 0:
        raise ImageDecodeError(
            f"image {_describe(source)} is {width}x{height}: too elongated to resize to "
            f"{target_size} pixels with a side that is a multiple of {PATCH_SIZE}; crop it first"
        )
    img = img.resize((new_width, new_height), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.float32).div(255)
    if mode == "crop" and new_height > target_size:
        start = (new_height - target_size) // 2
        tensor = tensor[:, start : start + target_size, :]
    if mode == "pad":
        tensor = _pad_white(tensor, target_size, target_size)
    return tensor, (height, width)


def load_and_preprocess_images_with_sizes(
    sources: Sequence[ImageSource],
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Like :func:`load_and_preprocess_images`, also returning each original ``(H, W)``."""
    _validate_options(mode, target_size)
    if isinstance(sources, (str, bytes, os.PathLike)) or not len(sources):
        raise ValueError(
            "load_and_preprocess_images needs a non-empty list of images (paths, bytes or "
            f"binary file objects), got {type(sources).__name__}"
            + ("" if isinstance(sources, (str, bytes, os.PathLike)) else " of length 0")
        )
    images: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for source in sources:
        tensor, size = preprocess_image(source, mode, target_size)
        images.append(tensor)
        sizes.append(size)
    shapes = {tuple(img.shape[1:]) for img in images}
    if len(shapes) > 1:
        max_h = max(h for h, _ in shapes)
        max_w = max(w for _, w in shapes)
        logger.info("images of different shapes %s padded white to %dx%d", sorted(shapes), max_h, max_w)
        images = [_pad_white(img, max_h, max_w) for img in images]
    return torch.stack(images), sizes


def load_and_preprocess_images(
    sources: Sequence[ImageSource],
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
) -> torch.Tensor:
    """Load and preprocess images into the model input [S, 3, H, W], float32 in [0, 1].

    Raises ``ValueError`` for an empty list, an unknown mode or a ``target_size`` that is not a
    multiple of 14, and :class:`ImageDecodeError` (naming the image) for an unreadable one.
    """
    return load_and_preprocess_images_with_sizes(sources, mode, target_size)[0]
