"""Evaluation: synthetic scenes with exact ground truth, ground-truth scene folders, metrics,
previews (PNG contact sheet, PLY point cloud) and the merging fidelity benchmark.

Submodules are imported on use (``from httm_dist.eval import synthetic``) so that importing
the package stays cheap: ``synthetic``, ``gt_loader``, ``metrics`` need numpy/scipy/PIL only;
``preview`` needs matplotlib and the results reader; ``fidelity`` needs torch and the model.
"""

from __future__ import annotations

__all__ = ["synthetic", "gt_loader", "metrics", "preview", "fidelity"]
