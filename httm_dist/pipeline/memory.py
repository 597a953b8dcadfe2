"""Peak GPU memory of one forward pass, and the largest chunk that fits (``chunk.max_frames: auto``).

The model (bytes, one batch element, frames of ``height x width``):

    peak(S) = weights + S * (P * per_token + pixels * per_pixel) + head_work
    per_token = kept_layers * 2C * 4          the aggregator outputs the heads read (fp32)
              + WORK_BYTES_PER_CHANNEL * C    the transient working set of one block
              + merge maps (httm: 3 int64 [H] maps per token, uniform: 3 [1])
    per_pixel = 48 (whole model: input, normalised copy, depth + points maps with confidences,
              all fp32) or 24 (aggregator only: input and its normalised copy)

with ``P = 1 + registers + (height/14)(width/14)`` tokens per frame and ``C`` the width. Every
term but ``WORK_BYTES_PER_CHANNEL`` and ``HEAD_WORK_BYTES`` follows from the architecture.
Attention itself is linear in S here (flash / memory-efficient / cuDNN kernels keep no S x S
matrix), and merging does not raise the peak (issue 14: 57 GB for dense and httm alike).

CALIBRATION (not measured in this project, which has no GPU): ``WORK_BYTES_PER_CHANNEL`` is
fitted to the one H200 data point of issue 14: the whole VGGT-1B aggregator (its 4 head
layers kept), 1000 frames of 294x518 (782 tokens each), bf16 autocast, peak 57 GB (read as
57e9 bytes) for both dense and httm: (57e9 - 3.64e9 weights - 1000 * 152,292 px * 24) /
782,000 tokens - 4 * 2048 * 4 = 30,794 B per token, / 1024 = 30.1 bytes per channel.
``HEAD_WORK_BYTES`` (the DPT heads' working set, 8 frames at a time, so constant in S) is an
estimate. ``jobs/bench_gpu.py`` prints the measured peaks next to this model and the refitted
constants; replace them here when it has run.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from httm_dist.config import JobConfig
from httm_dist.errors import ConfigError
from httm_dist.model import VGGTConfig
from httm_dist.model.weights import expected_shapes

log = logging.getLogger(__name__)

WORK_BYTES_PER_CHANNEL = 30.1
"""Transient bytes per token per model channel at the peak (fitted, see the module docstring)."""
HEAD_WORK_BYTES = 4 * 2**30
"""Working set of the heads (DPT, 8 frames per step): an estimate, constant in frames."""
SAFETY_FRACTION = 0.15
"""Share of the free memory left unused: allocator fragmentation and the model's error."""
RESERVE_BYTES = 2 * 2**30
"""Left unused besides: the worker's CUDA context and library workspaces (cuDNN, cuBLAS)."""
CPU_MAX_FRAMES = 64
"""``auto`` on a CPU worker: memory is rarely the limit there, time is; 64-frame chunks keep
several CPU workers busy on one long scene (the value the GPU config used before ``auto``)."""


@dataclass(frozen=True)
class MemoryModel:
    """``peak_bytes(S) = fixed_bytes + S * per_frame_bytes`` for one frame size and setup."""

    fixed_bytes: float
    per_frame_bytes: float

    def peak_bytes(self, frames: int) -> float:
        """Predicted peak allocated bytes of one forward pass over ``frames`` frames."""
        return self.fixed_bytes + frames * self.per_frame_bytes

    def max_frames(self, free_bytes: float) -> int:
        """The most frames whose predicted peak, with the safety margin, fits ``free_bytes``
        (0 when not even one frame does)."""
        usable = free_bytes * (1.0 - SAFETY_FRACTION) - RESERVE_BYTES - self.fixed_bytes
        return max(0, math.floor(usable / self.per_frame_bytes))


def memory_model(
    arch: Any,
    height: int,
    width: int,
    strategy: str = "httm",
    whole_model: bool = True,
    weight_bytes: int = 4,
) -> MemoryModel:
    """The :class:`MemoryModel` of ``arch`` (a ``VGGTConfig``) on ``height x width`` frames.

    ``strategy``: the merging strategy (``dense``, ``uniform``, ``httm``); ``whole_model``:
    aggregator and heads (else the aggregator alone, as its outputs are consumed);
    ``weight_bytes``: bytes per parameter (4: fp32 weights under autocast).
    Raises ``ValueError`` for a frame size that is not a positive multiple of the patch size.
    """
    p = arch.patch_size
    if height < p or width < p or height % p or width % p:
        raise ValueError(f"memory_model: frames of {height}x{width} are not multiples of the patch size {p}")
    tokens = 1 + arch.num_register_tokens + (height // p) * (width // p)
    C = arch.embed_dim
    kept = len(arch.head_layers)
    maps = {"httm": 3 * arch.num_heads * 8, "uniform": 3 * 8}.get(strategy, 0)
    per_token = kept * 2 * C * 4 + WORK_BYTES_PER_CHANNEL * C + maps
    per_pixel = 48 if whole_model else 24
    weights = parameter_count(arch, whole_model) * weight_bytes
    fixed = weights + (HEAD_WORK_BYTES if whole_model else 0)
    return MemoryModel(float(fixed), float(tokens * per_token + height * width * per_pixel))


@functools.lru_cache(maxsize=8)
def parameter_count(arch: Any, whole_model: bool) -> int:
    """Parameters of the model (or its aggregator), counted from the checkpoint shape map the
    weights check builds anyway (:func:`~httm_dist.model.weights.expected_shapes`, cached, on the
    meta device: no memory); VGGT has no buffers, so its state dict is its parameters."""
    return sum(math.prod(shape) for key, shape in expected_shapes(arch).items()
               if whole_model or key.startswith("aggregator."))


def frame_bound(image: Any, patch_size: int) -> tuple[int, int]:
    """The largest frame ``(height, width)`` preprocessing can produce under ``image`` (the
    job's ``image`` section): ``size x size`` in both modes (crop keeps the width and crops a
    taller frame to a square; pad makes a square). ``auto`` plans for it, so every scene fits."""
    size = int(image.size)
    return size - size % patch_size, size - size % patch_size


def resolve_max_frames(cfg: JobConfig, free_bytes: Optional[float]) -> int:
    """``chunk.max_frames`` for ``auto``: the most frames one worker's GPU fits, or
    :data:`CPU_MAX_FRAMES` when ``free_bytes`` is None (a CPU worker).

    ``cfg`` is the job config; ``free_bytes`` the free memory of the GPU one worker will use
    (before its model is loaded: the weights are part of the model). Raises ``ConfigError``
    when the GPU cannot fit more frames than ``chunk.overlap`` (chunks could not overlap).
    """
    if free_bytes is None:
        frames = CPU_MAX_FRAMES
    else:
        arch = VGGTConfig.preset(cfg.model.preset)
        height, width = frame_bound(cfg.image, arch.patch_size)
        mm = memory_model(arch, height, width, cfg.merging.strategy)
        frames = mm.max_frames(free_bytes)
        log.info("chunk.max_frames auto: %d frames of up to %dx%d fit %.1f GiB free (model peak "
                 "%.1f GiB)", frames, height, width, free_bytes / 2**30,
                 mm.peak_bytes(frames) / 2**30)
    if frames <= cfg.chunk.overlap:
        raise ConfigError(
            f"chunk.max_frames auto: the worker's GPU ({(free_bytes or 0) / 2**30:.1f} GiB free) "
            f"fits only {frames} frames, not more than chunk.overlap ({cfg.chunk.overlap}); lower "
            "chunk.overlap or image.size, or set chunk.max_frames to a number"
        )
    return frames


def local_free_bytes(device: str) -> Optional[int]:
    """Free bytes of the GPU this process would use for ``model.device`` (None on CPU)."""
    if device == "cpu" or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    # mem_get_info() alone reads the current device, not the one ``device`` names (cuda:1)
    free, _total = torch.cuda.mem_get_info(dev) if dev.type == "cuda" and dev.index is not None else torch.cuda.mem_get_info()
    return int(free)


def with_max_frames(cfg: JobConfig, max_frames: int) -> JobConfig:
    """A copy of the job config with ``chunk.max_frames`` set (the rest shared)."""
    return cfg.model_copy(update={"chunk": cfg.chunk.model_copy(update={"max_frames": int(max_frames)})})
