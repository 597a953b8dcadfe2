"""``MergeConfig``: which token-merging strategy runs in the global-attention blocks, and how.

One frozen config shared by the three strategies so that a run picks one by name in its YAML
(``MergeConfig.from_dict``) and records exactly what it ran (``to_dict``). It is the
``merging`` section of the job config and follows the rules of :mod:`httm_dist.configbase`:
every invalid value raises :class:`httm_dist.errors.ConfigError` (a ``ValueError``) naming
the key, e.g. ``'merging.q_keep' must be > 0 and <= 1, got 1.5``.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from httm_dist.configbase import Invalid, Section
from httm_dist.errors import ConfigError

Strategy = Literal["httm", "uniform", "dense"]

LayersSpec = Union[Literal["all"], tuple[int, ...]]


class MergeConfig(Section):
    """Token merging around the attention kernel of VGGT's global blocks (see docs/HTTM.md
    for the method and its DECISIONs)."""

    root = "merging"

    strategy: Strategy = "httm"
    """``httm`` (head-wise temporal merging), ``uniform`` (one plan for all heads computed on
    the block input, FastVGGT/ToMe style) or ``dense`` (no merging)."""
    q_keep: float = Field(0.2, gt=0, le=1)
    """Fraction of query tokens kept per head (httm). Destinations are ``q_keep - outlier_frac``
    of each block; outlier filtering restores ``outlier_frac``."""
    kv_keep: float = Field(0.3, gt=0, le=1)
    """Fraction of key/value tokens kept (httm), and the one keep ratio of the shared
    ``uniform`` plan (which merges q, k and v alike)."""
    block_spatial: int = Field(128, ge=1)
    """Patches per spatial tile (a 2-D tile shaped like the patch grid)."""
    block_frames: int = Field(30, ge=1)
    """Frames per temporal run; a merging block is one tile x one run."""
    outlier_frac: float = Field(0.1, ge=0)
    """Fraction of all ``heads * N`` queries restored as their own tokens (the largest
    distances to their merged token, across all heads); must be < ``q_keep``."""
    anchor_first_frame: bool = True
    """Frame 0 is entirely kept and is a destination of every block."""
    protect_special_tokens: bool = True
    """Camera and register tokens never merge."""
    layers: LayersSpec = "all"
    """``all`` or the global-block indices to patch (validated against the model depth by
    ``apply_merging``)."""
    proportional_attention: bool = False
    """Add log(cluster size) of each merged key to the logits."""
    plan_reuse: int = Field(1, ge=1)
    """Compute the merge plan (matches, outliers) in one patched layer and reuse it for the
    next ``plan_reuse - 1`` patched layers (1 = off); the merged tokens are always recomputed
    from the current layer's q/k/v."""
    outlier_cap: float = Field(1.5, ge=1)
    """The most outliers one head may restore, as a multiple of the mean per head
    (``outlier_frac * N``). It bounds the padded query length (``num_kept + cap``) by the shape
    and config alone, so the kernel sees one static length (issue 14); a head past its cap
    leaves its budget to the other heads' next-farthest queries. Default 1.5: not measured
    (docs/benchmarks.md, GPU section)."""
    min_tokens: int = Field(40000, ge=0)
    """A patched layer whose sequence (frames x tokens per frame) is shorter runs the plain
    dense kernel, exactly as unpatched: below it merging does not pay. 0 = always merge.
    Default 40000 (~51 frames of 294x518): NOT measured on a GPU in this project; it is the
    crossover of a per-layer cost model fitted to the H200 figures in issue 14 (one 1000-frame
    layer: dense 6.40 s, httm 0.161 s linear + 0.382 s quadratic; the whole aggregator lost at
    32 frames even with static shapes, 0.89x, and won at 100, 1.68x), with a margin. Re-measure
    with ``jobs/bench_gpu.py`` (docs/benchmarks.md, GPU section)."""
    profile: bool = False
    """On CUDA, synchronise around each timed phase so ``merge_stats`` times are real GPU
    times (adds syncs; off by default, when the CUDA times only cover launches)."""

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: LayersSpec) -> LayersSpec:
        if value == "all":
            return value
        bad = [i for i in value if i < 0]
        if bad:
            raise Invalid("", f"lists {bad[0]}, not a non-negative global-block index")
        if len(set(value)) != len(value):
            raise Invalid("", f"{list(value)} lists an index twice")
        if not value:
            raise Invalid("", "is an empty list; use strategy 'dense' to merge nothing")
        return value

    @model_validator(mode="after")
    def _check_outliers(self) -> "MergeConfig":
        if self.outlier_frac >= self.q_keep:
            raise Invalid(
                "outlier_frac",
                f"({self.outlier_frac}) must be smaller than q_keep ({self.q_keep}), since "
                "q_keep - outlier_frac of the queries are destinations",
            )
        return self

    def layer_indices(self, depth: int) -> list[int]:
        """The patched global-block indices for a model of ``depth`` global blocks.

        Raises ConfigError when ``layers`` names a block at or beyond ``depth``."""
        if self.layers == "all":
            return list(range(depth))
        bad = [i for i in self.layers if i >= depth]
        if bad:
            raise ConfigError(
                f"'merging.layers' {bad} out of range for a model with {depth} global blocks"
            )
        return sorted(self.layers)
