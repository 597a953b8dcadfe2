"""Evaluation: synthetic scenes with exact ground truth, ground-truth scene folders, metrics
and the merging fidelity benchmark (previews of finished scenes live in
``httm_dist.pipeline.preview``).

Submodules are imported on use (``from httm_dist.eval import synthetic``) so that importing
the package stays cheap: ``synthetic``, ``gt_loader``, ``metrics`` need numpy/scipy/PIL only;
``fidelity`` needs torch and the model.
"""

from __future__ import annotations

__all__ = ["synthetic", "gt_loader", "metrics", "fidelity"]
