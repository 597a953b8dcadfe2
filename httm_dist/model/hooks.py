"""The one seam between the model and token merging.

Every global-attention block's ``Attention`` module has an ``attn_fn`` attribute, ``None`` by
default. When it is set, the block calls ``attn_fn(q, k, v, ctx)`` instead of
``torch.nn.functional.scaled_dot_product_attention(q, k, v)``. Nothing else in the model knows
about merging: ``httm_dist.merging`` installs and removes these callables.

Where: ``model.aggregator.global_blocks[i].attn.attn_fn`` (``layer_idx == i``). Every
``Attention`` module has the attribute, but only global blocks pass a context: setting it on a
frame block or a camera-head block raises ``RuntimeError`` at the next forward.

Dtypes: ``q``, ``k`` and ``v`` arrive in the dtype the dense kernel computes in: fp32 on CPU,
the autocast dtype (bf16, or fp16 below compute capability 8) on CUDA. ``ctx.x`` is the
``norm1`` output (fp32 under autocast). Return the shape of ``q`` (ideally its dtype too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class AttentionContext:
    """What a merging strategy needs to know about the token sequence of one global block.

    The sequence is ``num_frames`` frames of ``tokens_per_frame`` tokens each, frame-major:
    token ``s * tokens_per_frame + t`` is token ``t`` of frame ``s``. Within a frame the first
    ``patch_start_idx`` tokens are special (camera, registers); the rest are the
    ``patch_grid = (rows, cols)`` patches in row-major order.
    """

    num_frames: int
    tokens_per_frame: int
    patch_grid: tuple[int, int]
    patch_start_idx: int
    layer_idx: int
    x: Optional[torch.Tensor] = None
    """The attention module's input (the block's ``norm1`` output), ``[B, N, C]``, for
    strategies that plan merges on the block input rather than on q/k (e.g. ``uniform``)."""


AttentionHook = Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext], torch.Tensor]]
"""An ``attn_fn``: ``(q, k, v, ctx)`` with q/k/v ``[B, heads, N, head_dim]`` (after the q/k
norm and RoPE) -> ``[B, heads, N, head_dim]``, what the dense kernel would return; or None."""
