"""Adapter for httm-dist's own VGGT (``httm_dist.model.VGGT`` or its ``Aggregator``).

The model has a seam built in (``httm_dist.model.hooks``): every global block's
``attn.attn_fn``, ``None`` for the plain kernel, called with an ``AttentionContext`` that the
aggregator fills in. Patching sets it; clearing sets it back to ``None``.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch.nn as nn

from httm_dist.merging.base import MergedAttention
from httm_dist.model.aggregator import Aggregator
from httm_dist.model.vggt import VGGT


class Adapter:
    """The global blocks of an httm-dist ``VGGT`` or ``Aggregator`` (see ``ModelAdapter``)."""

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, VGGT):
            model = model.aggregator
        if not isinstance(model, Aggregator):  # pragma: no cover - patch.py dispatches by class
            raise TypeError(f"expected httm_dist.model.VGGT or its Aggregator, got {type(model).__name__}")
        self.blocks = list(model.global_blocks)
        self.depth = len(self.blocks)

    def clear(self) -> None:
        for block in self.blocks:
            block.attn.attn_fn = None

    def install(self, strategies: Mapping[int, MergedAttention]) -> None:
        for i, fn in strategies.items():
            self.blocks[i].attn.attn_fn = fn

    def installed(self) -> list[Optional[MergedAttention]]:
        return [block.attn.attn_fn for block in self.blocks]
