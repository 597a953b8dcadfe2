"""Training a small VGGT from scratch on the project's synthetic scenes.

The official VGGT weights cannot be fetched here and random weights make both the demo and
every merging-fidelity number meaningless, so the project trains its own small model
(the ``tiny-synthetic`` preset). ``data`` turns rendered scenes into normalised training
batches, ``losses`` holds the VGGT-style objectives, ``loop`` the optimiser, evaluation and
checkpointing. ``jobs/train_tiny.py`` is the one command that reproduces the shipped weights.
"""

from httm_dist.train.data import SceneBatch, ScenePool, normalize_to_first_camera
from httm_dist.train.losses import LossWeights, camera_loss, conf_regression_loss, vggt_loss
from httm_dist.train.loop import TrainConfig, evaluate, train, train_step

__all__ = [
    "SceneBatch",
    "ScenePool",
    "normalize_to_first_camera",
    "LossWeights",
    "camera_loss",
    "conf_regression_loss",
    "vggt_loss",
    "TrainConfig",
    "evaluate",
    "train",
    "train_step",
]
