"""Token merging in VGGT's global-attention blocks: ``dense``, ``uniform`` and ``httm``.

``apply_merging(model, MergeConfig(...))`` installs a strategy in the model's global blocks;
``merge_stats(model)`` reports what the last forward merged and how long it took. The model is
httm-dist's VGGT (through its attention hooks, ``httm_dist.model.hooks``) or the official
``vggt`` package's (``adapters.official_vggt``); see ``patch`` and ``adapters`` for the
families, docs/HTTM.md for the method and its decisions.
"""

from httm_dist.merging.config import MergeConfig
from httm_dist.merging.patch import apply_merging, merge_stats

__all__ = ["MergeConfig", "apply_merging", "merge_stats"]
