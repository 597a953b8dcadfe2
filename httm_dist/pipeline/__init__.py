"""One scene (or chunk) from frame URIs to committed results; knows nothing of Ray.

- ``unit``: units of work (:class:`WorkUnit`, :func:`plan_units`) and :class:`UnitRunner`
  (load -> run -> commit, and the assembly of chunked scenes);
- ``chunks`` / ``align``: long scenes as overlapping chunks aligned by robust Sim(3);
- ``preview``: a finished scene's PNG contact sheet and PLY point cloud.
"""

from httm_dist.pipeline.unit import (
    LoadedUnit,
    UnitRunner,
    WorkUnit,
    assemble_unit,
    failure_record,
    plan_units,
    resolve_device,
)

__all__ = [
    "LoadedUnit",
    "UnitRunner",
    "WorkUnit",
    "assemble_unit",
    "failure_record",
    "plan_units",
    "resolve_device",
]
