"""Token merging in VGGT's global-attention blocks: ``dense``, ``uniform`` and ``httm``.

``apply_merging(model, MergeConfig(...))`` installs a strategy on the model's attention hooks
(``httm_dist.model.hooks``); ``merge_stats(model)`` reports what the last forward merged and
how long it took. See docs/HTTM.md for the method and its decisions.
"""

from httm_dist.merging.config import MergeConfig
from httm_dist.merging.patch import apply_merging, merge_stats

__all__ = ["MergeConfig", "apply_merging", "merge_stats"]
