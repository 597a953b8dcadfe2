"""One scene (or chunk) from frame URIs to committed results; knows nothing of Ray.

- ``unit``: units of work (:class:`WorkUnit`, :func:`plan_units`) and what travels between
  their steps (:class:`LoadedUnit`), plus the failure record of a unit;
- ``runner``: :class:`ModelRunner`, which owns the model (load images -> run the model);
- ``publish``: :class:`ResultPublisher` (commit, and the assembly of chunked scenes) and
  :func:`process_unit` (a whole unit in one call);
- ``chunks`` / ``align``: long scenes as overlapping chunks aligned by robust Sim(3);
- ``preview``: a finished scene's PNG contact sheet and PLY point cloud.
"""

from httm_dist.pipeline.publish import ResultPublisher, process_unit
from httm_dist.pipeline.runner import ModelRunner, resolve_device
from httm_dist.pipeline.unit import LoadedUnit, WorkUnit, assemble_unit, failure_record, plan_units

__all__ = [
    "LoadedUnit",
    "ModelRunner",
    "ResultPublisher",
    "WorkUnit",
    "assemble_unit",
    "failure_record",
    "plan_units",
    "process_unit",
    "resolve_device",
]
