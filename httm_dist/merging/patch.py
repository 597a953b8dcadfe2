"""Install, replace and remove merging strategies on a VGGT model, and read their stats.

The model's only seam is ``aggregator.global_blocks[i].attn.attn_fn`` (``httm_dist.model.hooks``):
``None`` runs the plain kernel; a strategy instance replaces it. ``apply_merging`` always clears
every global block first, so applying again replaces the previous strategy and ``dense`` leaves
the model exactly as unpatched.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Union

import torch.nn as nn

from httm_dist.errors import ConfigError
from httm_dist.merging.base import MergedAttention, SharedState
from httm_dist.merging.config import MergeConfig
from httm_dist.merging.httm import HttmAttention
from httm_dist.merging.uniform import UniformAttention

log = logging.getLogger(__name__)

_STRATEGIES = {"httm": HttmAttention, "uniform": UniformAttention}


def _global_blocks(model: nn.Module) -> Any:
    agg = getattr(model, "aggregator", model)
    blocks = getattr(agg, "global_blocks", None)
    if blocks is None:
        raise TypeError(
            f"apply_merging: {type(model).__name__} has no aggregator.global_blocks; pass a VGGT "
            "model (or its aggregator)"
        )
    return blocks


def apply_merging(model: nn.Module, cfg: Union[MergeConfig, Mapping[str, Any]]) -> nn.Module:
    """Patch ``model``'s global-attention blocks in place with ``cfg``'s strategy; return it.

    ``cfg`` may be a mapping (read with ``MergeConfig.from_dict``). Previous patches are removed
    first; ``strategy="dense"`` only removes them. ``cfg.layers`` is checked against the depth.
    """
    if not isinstance(cfg, MergeConfig):
        cfg = MergeConfig.from_dict(cfg)
    blocks = _global_blocks(model)
    layers = cfg.layer_indices(len(blocks))
    for block in blocks:
        block.attn.attn_fn = None
    if cfg.strategy == "dense":
        return model
    if cfg.strategy not in _STRATEGIES:  # pragma: no cover - MergeConfig validates
        raise ConfigError(f"merging.strategy: {cfg.strategy!r} has no implementation")
    shared = SharedState(cfg)
    cls = _STRATEGIES[cfg.strategy]
    for position, i in enumerate(layers):
        blocks[i].attn.attn_fn = cls(cfg, i, position, shared)
    log.info("merging: %s on global blocks %s", cfg.strategy, layers)
    return model


def merge_stats(model: nn.Module) -> list[dict[str, Any]]:
    """Per patched layer, what its last call recorded (empty for dense / never run).

    Each dict: ``layer``, ``strategy``, ``merged`` (False where the layer ran dense because
    its sequence was under ``MergeConfig.min_tokens``), ``tokens`` (N), ``q_kept`` (query tokens kept per head,
    averaged over the batch), ``q_len`` (padded query length the kernel saw: static per sequence shape), ``kv_kept``,
    ``plan_reused``, ``match_s``, ``aggregate_s`` (merge, outlier filtering and unmerge),
    ``attention_s``. On CUDA the times are real only with ``MergeConfig.profile``.
    """
    out = []
    for block in _global_blocks(model):
        fn = block.attn.attn_fn
        if isinstance(fn, MergedAttention) and fn.last_stats is not None:
            out.append(dict(fn.last_stats))
    return out
