"""Clean-room, weight-compatible VGGT (facebookresearch/vggt) for httm-dist.

    from httm_dist.model import load_vggt
    model = load_vggt("vggt-1b", weights="hf://facebook/VGGT-1B/model.safetensors")
    out = model(images)  # images [S,3,H,W] or [B,S,3,H,W] in [0,1]

Layout (one file per part, read top to bottom): ``config`` (architecture + presets),
``layers`` / ``rope`` (transformer blocks, 2-D RoPE), ``dinov2`` (patch embed),
``aggregator`` (frame/global alternating attention), ``camera_head``, ``dpt_head``, ``vggt``
(the whole model), ``weights`` (checkpoint loading), ``hooks`` (the token-merging seam).
"""

from httm_dist.model.config import PRESETS, VGGTConfig, register_preset
from httm_dist.model.hooks import AttentionContext
from httm_dist.model.vggt import VGGT, count_parameters
from httm_dist.model.weights import WeightsMismatchError, load_vggt

__all__ = [
    "PRESETS",
    "AttentionContext",
    "VGGT",
    "VGGTConfig",
    "WeightsMismatchError",
    "count_parameters",
    "load_vggt",
    "register_preset",
]
