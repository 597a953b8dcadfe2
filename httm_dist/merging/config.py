"""``MergeConfig``: which token-merging strategy runs in the global-attention blocks, and how.

One frozen dataclass shared by the three strategies so that a run picks one by name in its
YAML (``MergeConfig.from_dict``) and records exactly what it ran (``to_dict``). Every invalid
value raises :class:`httm_dist.errors.ConfigError` (a ``ValueError``) naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence, Union

from httm_dist.errors import ConfigError

STRATEGIES = ("httm", "uniform", "dense")

LayersSpec = Union[str, tuple[int, ...]]


@dataclass(frozen=True)
class MergeConfig:
    """Token merging around the attention kernel of VGGT's global blocks.

    Fields (see docs/HTTM.md for the method and its DECISIONs):

    - ``strategy``: ``"httm"`` (head-wise temporal merging), ``"uniform"`` (one plan for all
      heads computed on the block input, FastVGGT/ToMe style) or ``"dense"`` (no merging).
    - ``q_keep``: fraction of query tokens kept per head (httm). Destinations are
      ``q_keep - outlier_frac`` of each block; outlier filtering restores ``outlier_frac``.
    - ``kv_keep``: fraction of key/value tokens kept (httm), and the one keep ratio of the
      shared ``uniform`` plan (which merges q, k and v alike).
    - ``block_spatial``: patches per spatial tile (a 2-D tile shaped like the patch grid).
    - ``block_frames``: frames per temporal run; a merging block is one tile x one run.
    - ``outlier_frac``: fraction of all ``heads * N`` queries restored as their own tokens
      (the largest distances to their merged token, across all heads); must be < ``q_keep``.
    - ``anchor_first_frame``: frame 0 is entirely kept and is a destination of every block.
    - ``protect_special_tokens``: camera and register tokens never merge.
    - ``layers``: ``"all"`` or the global-block indices to patch (validated against the model
      depth by ``apply_merging``).
    - ``proportional_attention``: add log(cluster size) of each merged key to the logits.
    - ``plan_reuse``: compute the merge plan (matches, outliers) in one patched layer and reuse
      it for the next ``plan_reuse - 1`` patched layers (1 = off); the merged tokens are always
      recomputed from the current layer's q/k/v.
    - ``outlier_cap``: the most outliers one head may restore, as a multiple of the mean per
      head (``outlier_frac * N``); it bounds the padded query length (``num_kept + cap``) by
      the shape and config alone, so the kernel sees one static length (issue 14). A head
      past its cap leaves its budget to the other heads' next-farthest queries. >= 1.
    - ``min_tokens``: a patched layer whose sequence (frames x tokens per frame) is shorter
      runs the plain dense kernel, exactly as unpatched: below it merging does not pay.
      Default 40000 (~51 frames of 294x518): NOT measured on a GPU in this project; it is the
      crossover of a per-layer cost model fitted to the H200 figures in issue 14 (one 1000-frame
      layer: dense 6.40 s, httm 0.161 s linear + 0.382 s quadratic; the whole aggregator lost at
      32 frames even with static shapes, 0.89x, and won at 100, 1.68x), with a margin. 0 = always
      merge. Re-measure with ``jobs/bench_gpu.py`` (docs/benchmarks.md, GPU section).
    - ``profile``: on CUDA, synchronise around each timed phase so ``merge_stats`` times are
      real GPU times (adds syncs; off by default, when the CUDA times only cover launches).
    """

    strategy: str = "httm"
    q_keep: float = 0.2
    kv_keep: float = 0.3
    block_spatial: int = 128
    block_frames: int = 30
    outlier_frac: float = 0.1
    anchor_first_frame: bool = True
    protect_special_tokens: bool = True
    layers: LayersSpec = "all"
    proportional_attention: bool = False
    plan_reuse: int = 1
    outlier_cap: float = 1.5
    min_tokens: int = 40000
    profile: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"merging.strategy: {self.strategy!r} is not one of {STRATEGIES}")
        for name in ("q_keep", "kv_keep"):
            value = _number(name, getattr(self, name))
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"merging.{name}: {value} must be in (0, 1]")
        outlier = _number("outlier_frac", self.outlier_frac)
        if not 0.0 <= outlier < self.q_keep:
            raise ConfigError(
                f"merging.outlier_frac: {outlier} must be >= 0 and smaller than q_keep "
                f"({self.q_keep}), since q_keep - outlier_frac of the queries are destinations"
            )
        cap = _number("outlier_cap", self.outlier_cap)
        if cap < 1.0:
            raise ConfigError(f"merging.outlier_cap: {cap} must be >= 1 (a multiple of the mean outliers per head)")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ConfigError(f"merging.min_tokens: {self.min_tokens!r} must be an integer >= 0 (0 = always merge)")
        for name in ("block_spatial", "block_frames", "plan_reuse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"merging.{name}: {value!r} must be an integer >= 1")
        for name in ("anchor_first_frame", "protect_special_tokens", "proportional_attention", "profile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"merging.{name}: {getattr(self, name)!r} must be true or false")
        object.__setattr__(self, "layers", _layers(self.layers))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MergeConfig":
        """Build from a YAML mapping; an unknown key is an error naming it."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"merging: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"merging: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain-type mapping (``layers`` as a list or ``"all"``) that ``from_dict`` reads back."""
        d = asdict(self)
        if d["layers"] != "all":
            d["layers"] = list(d["layers"])
        return d

    def layer_indices(self, depth: int) -> list[int]:
        """The patched global-block indices for a model of ``depth`` global blocks."""
        if self.layers == "all":
            return list(range(depth))
        bad = [i for i in self.layers if i >= depth]
        if bad:
            raise ConfigError(f"merging.layers: {bad} out of range for a model with {depth} global blocks")
        return sorted(self.layers)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"merging.{name}: {value!r} must be a finite number")
    return float(value)


def _layers(value: Any) -> LayersSpec:
    if value == "all":
        return "all"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"merging.layers: {value!r} must be 'all' or a list of global-block indices")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ConfigError(f"merging.layers: {i!r} is not a non-negative integer block index")
        out.append(i)
    if len(set(out)) != len(out):
        raise ConfigError(f"merging.layers: {list(value)} lists an index twice")
    if not out:
        raise ConfigError("merging.layers: empty list; use strategy 'dense' to merge nothing")
    return tuple(out)
