"""httm-dist: cluster-scale VGGT reconstruction accelerated by head-wise temporal token merging."""

__version__ = "0.1.0"
