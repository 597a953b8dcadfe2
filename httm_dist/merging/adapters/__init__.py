"""One adapter per model family that ``apply_merging`` can patch (as ToMe keeps
``tome/patch/<family>.py``): each knows where its family's global-attention blocks are and how
to route their attention kernel through a merging strategy; the strategies themselves
(``httm_dist.merging.{httm,uniform,base}``) are shared by every family.

An adapter module defines ``Adapter(model)`` with the interface of :class:`ModelAdapter`.
``httm_dist.merging.patch`` picks the module by the model's class name (without importing
the family's package) and imports it only then, so ``httm_vggt`` serves httm-dist's own VGGT
and ``official_vggt`` (which imports the official ``vggt`` package) is only loaded when an
official model is patched.
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol

from httm_dist.merging.base import MergedAttention


class ModelAdapter(Protocol):
    """What ``apply_merging`` / ``merge_stats`` need from a model family.

    ``Adapter(model)`` validates the model's structure (raising ``TypeError`` that names what
    it expected) and holds the global-attention blocks; ``depth`` is their count.
    """

    depth: int

    def clear(self) -> None:
        """Remove every merging patch: the blocks behave exactly as before any patch."""
        ...

    def install(self, strategies: Mapping[int, MergedAttention]) -> None:
        """Route global block ``i``'s attention through ``strategies[i]`` (after ``clear``)."""
        ...

    def installed(self) -> list[Optional[MergedAttention]]:
        """The strategy of each global block, ``None`` where the block runs dense."""
        ...
