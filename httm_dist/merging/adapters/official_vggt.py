"""Adapter for the official VGGT (facebookresearch/vggt): ``vggt.models.vggt.VGGT`` or its
``vggt.models.aggregator.Aggregator``, unmodified (checked against commit 44b3afb).

The official ``Attention`` has no seam: it calls ``F.scaled_dot_product_attention`` inline.
As ToMe patches timm, each patched global block's ``attn`` gets its class swapped to
:class:`MergingAttention`, a subclass whose ``forward`` repeats the official one (qkv, q/k
norm, RoPE, proj) but hands q, k, v to the block's merging strategy instead of the kernel.
Clearing swaps the class back and deletes what patching added, so ``dense`` leaves every
module exactly as it was (same class, same ``__dict__``, no hooks).

What the strategies need to know about the sequence comes from the official aggregator
itself: a forward pre-hook on it reads the images ``[B, S, 3, H, W]`` and takes the frames
``S``, the patch grid ``(H // patch_size, W // patch_size)`` and the special tokens
``patch_start_idx`` (camera + registers) from the aggregator's own attributes, as its
``forward`` does. The last forward's values stay recorded (a global block recomputed later by
gradient checkpointing sees the same sequence).

Dtypes: the official forward lets ``F.scaled_dot_product_attention`` reconcile q/k (fp32 out
of LayerNorm under autocast) with v (the autocast dtype out of ``qkv``); here q and k are cast
to v's dtype explicitly before the strategy, which is what autocast's SDPA does (and a no-op
without autocast), and the strategy's output is cast back to it. Attention dropout is not
applied by the merged path: patching a block whose ``attn_drop`` is non-zero is refused.

This module imports ``vggt``; ``httm_dist.merging.patch`` imports it only when the model's
class is one of the official ones.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from vggt.layers.attention import Attention as OfficialAttention
from vggt.models.aggregator import Aggregator as OfficialAggregator

from httm_dist.merging.base import MergedAttention
from httm_dist.model.hooks import AttentionContext

_PATCH = "_httm_patch"
"""Attribute holding the patch state, on the aggregator and on every patched attention."""
_FN = "_httm_fn"
_LAYER = "_httm_layer"


class _Patch:
    """State shared by one aggregator's patched blocks: the pre-hook and the sequence seen."""

    def __init__(self) -> None:
        self.sequence: Optional[AttentionContext] = None  # layer_idx -1: filled per block
        self.handle: Any = None


def _record_sequence(patch: _Patch, agg: OfficialAggregator, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the aggregator: the token layout of the coming forward."""
    images = args[0] if args else kwargs.get("images")
    if not isinstance(images, torch.Tensor) or images.ndim != 5:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"merging (official VGGT): the aggregator got images {shape}; it takes [B, S, 3, H, W] "
            "(the official VGGT adds B to [S, 3, H, W] input before calling it)"
        )
    _, S, _, H, W = images.shape
    grid = (H // agg.patch_size, W // agg.patch_size)
    patch.sequence = AttentionContext(
        num_frames=S,
        tokens_per_frame=agg.patch_start_idx + grid[0] * grid[1],
        patch_grid=grid,
        patch_start_idx=agg.patch_start_idx,
        layer_idx=-1,
    )


class MergingAttention(OfficialAttention):
    """The official ``Attention`` of a patched global block: the kernel call goes through the
    block's merging strategy (``self._httm_fn``) with an ``AttentionContext`` for the current
    sequence. Set only by :class:`Adapter`; everything else is the official module's."""

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` (the block's ``norm1`` output), ``pos`` ``[B, N, 2]`` RoPE
        positions, as the official forward; returns ``[B, N, C]``."""
        patch: _Patch = getattr(self, _PATCH)
        layer = getattr(self, _LAYER)
        if patch.sequence is None:
            raise RuntimeError(
                f"merging (official VGGT): global block {layer} ran before its aggregator; call the "
                "patched VGGT or Aggregator (the aggregator's forward tells the blocks the frame layout)"
            )
        B, N, C = x.shape
        # the official forward, up to the kernel
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        q, k = q.to(v.dtype), k.to(v.dtype)  # what autocast's SDPA does; a no-op without it
        ctx = dataclasses.replace(patch.sequence, layer_idx=layer, x=x)
        out = getattr(self, _FN)(q, k, v, ctx).to(v.dtype)
        # the official forward, after the kernel
        x = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Adapter:
    """The 24 (``depth``) global blocks of an official ``VGGT`` or ``Aggregator``.

    Raises ``TypeError`` naming the block when a global block's attention is not the official
    ``vggt.layers.attention.Attention`` (a fork that replaced it needs its own adapter), and
    ``ValueError`` when one has attention dropout.
    """

    def __init__(self, model: nn.Module) -> None:
        vggt_module = sys.modules.get("vggt.models.vggt")  # loaded if model is an official VGGT
        is_vggt = vggt_module is not None and isinstance(model, vggt_module.VGGT)
        agg = model.aggregator if is_vggt else model
        if not isinstance(agg, OfficialAggregator):
            where = f"{type(model).__name__}.aggregator" if is_vggt else "the model"
            raise TypeError(
                f"merging (official VGGT): {where} is {type(agg).__module__}.{type(agg).__qualname__}; "
                "expected vggt.models.aggregator.Aggregator"
            )
        self.aggregator = agg
        self.blocks = list(agg.global_blocks)
        self.depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            attn = getattr(block, "attn", None)
            if type(attn) not in (OfficialAttention, MergingAttention):
                raise TypeError(
                    f"merging (official VGGT): global_blocks[{i}].attn is {type(attn).__module__}."
                    f"{type(attn).__qualname__}; the adapter patches the official "
                    "vggt.layers.attention.Attention only"
                )
            if attn.attn_drop.p > 0:
                raise ValueError(
                    f"merging (official VGGT): global_blocks[{i}].attn has attention dropout "
                    f"{attn.attn_drop.p}, which merged attention does not apply; set it to 0"
                )

    def clear(self) -> None:
        for block in self.blocks:
            attn = block.attn
            if type(attn) is MergingAttention:
                attn.__class__ = OfficialAttention
                for name in (_PATCH, _FN, _LAYER):
                    delattr(attn, name)
        patch: Optional[_Patch] = self.aggregator.__dict__.pop(_PATCH, None)
        if patch is not None:
            patch.handle.remove()

    def install(self, strategies: Mapping[int, MergedAttention]) -> None:
        patch = _Patch()
        patch.handle = self.aggregator.register_forward_pre_hook(
            functools.partial(_record_sequence, patch), with_kwargs=True
        )
        setattr(self.aggregator, _PATCH, patch)
        for i, fn in strategies.items():
            attn = self.blocks[i].attn
            attn.__class__ = MergingAttention
            setattr(attn, _PATCH, patch)
            setattr(attn, _FN, fn)
            setattr(attn, _LAYER, i)

    def installed(self) -> list[Optional[MergedAttention]]:
        return [getattr(block.attn, _FN, None) for block in self.blocks]
