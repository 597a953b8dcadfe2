"""Install, replace and remove merging strategies on a VGGT model, and read their stats.

Which models: httm-dist's own ``VGGT`` (or its ``Aggregator``) and the official
``vggt.models.vggt.VGGT`` (facebookresearch/vggt, or its ``Aggregator``). Each family has an
adapter module in ``httm_dist.merging.adapters`` that knows where its global blocks are and how
to route their attention kernel through a strategy; the strategies are shared. The family is
recognised by the model's class names (its class or a base class), so the official ``vggt``
package is never imported unless such a model is passed. Any other model is refused with a
``TypeError`` listing the supported classes: a call never silently patches nothing.

``apply_merging`` always clears every global block first, so applying again replaces the
previous strategy and ``dense`` leaves the model exactly as unpatched.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Mapping, Optional, Union

import torch.nn as nn

from httm_dist.errors import ConfigError
from httm_dist.merging.adapters import ModelAdapter
from httm_dist.merging.base import MergedAttention, SharedState
from httm_dist.merging.config import MergeConfig
from httm_dist.merging.httm import HttmAttention
from httm_dist.merging.uniform import UniformAttention

log = logging.getLogger(__name__)

_STRATEGIES = {"httm": HttmAttention, "uniform": UniformAttention}

FAMILIES: dict[str, tuple[str, ...]] = {
    "httm_dist.merging.adapters.httm_vggt": (
        "httm_dist.model.vggt.VGGT",
        "httm_dist.model.aggregator.Aggregator",
    ),
    "httm_dist.merging.adapters.official_vggt": (
        "vggt.models.vggt.VGGT",
        "vggt.models.aggregator.Aggregator",
    ),
}
"""Adapter module -> the fully qualified classes it patches (instances of subclasses too)."""


def _adapter(model: Any, caller: str) -> ModelAdapter:
    """The adapter of ``model``'s family; ``TypeError`` naming the supported classes if none."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}
    for module, classes in FAMILIES.items():
        if names.intersection(classes):
            return importlib.import_module(module).Adapter(model)
    expected = ", ".join(c for classes in FAMILIES.values() for c in classes)
    raise TypeError(
        f"{caller}: cannot patch a {type(model).__module__}.{type(model).__qualname__}; "
        f"expected one of {expected} (or a subclass)"
    )


def apply_merging(model: nn.Module, cfg: Union[MergeConfig, Mapping[str, Any]]) -> nn.Module:
    """Patch ``model``'s global-attention blocks in place with ``cfg``'s strategy; return it.

    ``model``: httm-dist's ``VGGT`` or ``Aggregator``, or the official
    ``vggt.models.vggt.VGGT`` or ``vggt.models.aggregator.Aggregator`` (anything else raises
    ``TypeError``). ``cfg`` may be a mapping (read with ``MergeConfig.from_dict``). Previous
    patches are removed first; ``strategy="dense"`` only removes them. ``cfg.layers`` is
    checked against the depth.
    """
    if not isinstance(cfg, MergeConfig):
        cfg = MergeConfig.from_dict(cfg)
    adapter = _adapter(model, "apply_merging")
    layers = cfg.layer_indices(adapter.depth)
    adapter.clear()
    if cfg.strategy == "dense":
        return model
    if cfg.strategy not in _STRATEGIES:  # pragma: no cover - MergeConfig validates
        raise ConfigError(f"merging.strategy: {cfg.strategy!r} has no implementation")
    shared = SharedState(cfg)
    cls = _STRATEGIES[cfg.strategy]
    adapter.install({i: cls(cfg, i, position, shared) for position, i in enumerate(layers)})
    log.info("merging: %s on global blocks %s of %s", cfg.strategy, layers, type(model).__name__)
    return model


def installed(model: nn.Module) -> list[Optional[MergedAttention]]:
    """The strategy installed on each of ``model``'s global blocks, ``None`` where a block runs
    dense (all ``None`` after ``apply_merging(model, {"strategy": "dense"})``). What a block
    holds is returned as is: a callable put there by other code than :func:`apply_merging`
    (e.g. a benchmark's timing wrapper) is returned too.

    ``model``: as for :func:`apply_merging` (anything else raises ``TypeError``). For callers
    that need the strategies themselves, e.g. to build their plans for a sequence shape ahead
    of the first forward (``MergedAttention.prepare``).
    """
    return _adapter(model, "installed").installed()


def merge_stats(model: nn.Module) -> list[dict[str, Any]]:
    """Per patched layer, what its last call recorded (empty for dense / never run).

    ``model``: as for :func:`apply_merging` (anything else raises ``TypeError``).
    Each dict: ``layer``, ``strategy``, ``merged`` (False where the layer ran dense because its
    sequence was under ``MergeConfig.min_tokens``), ``tokens`` (N), ``q_kept`` (query tokens
    kept per head, averaged over the batch), ``q_len`` (padded query length the kernel saw:
    static per sequence shape), ``kv_kept``,
    ``plan_reused``, ``match_s``, ``aggregate_s`` (merge, outlier filtering and unmerge),
    ``attention_s``. On CUDA the times are real only with ``MergeConfig.profile``.
    """
    out = []
    for fn in _adapter(model, "merge_stats").installed():
        stats = fn.last_stats if isinstance(fn, MergedAttention) else None  # a fresh dict, one host read
        if stats is not None:
            out.append(stats)
    return out
