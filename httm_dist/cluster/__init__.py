"""Ray runtime: the worker actor that owns a model for its life, and the resumable driver.

``run_job(cfg)`` runs (or resumes) a job and returns its summary; ``ReconstructionWorker`` is
the actor it starts, one per GPU by default. See ``driver`` and ``worker`` for the details.
"""

from httm_dist.cluster.driver import run_job
from httm_dist.cluster.worker import ReconstructionWorker, WorkerFault

__all__ = ["ReconstructionWorker", "WorkerFault", "run_job"]
