"""Units of work: what a worker is asked to do, and what travels between its steps.

A *unit* (:class:`WorkUnit`, identified by :attr:`WorkUnit.unit_id`) is a whole scene, one
chunk of a long scene, or the final assembly of a chunked scene (see :func:`plan_units`). A
worker runs it in three steps, so it can overlap them across units:
:meth:`~httm_dist.pipeline.runner.ModelRunner.load` (I/O + decode, into a :class:`LoadedUnit`),
:meth:`~httm_dist.pipeline.runner.ModelRunner.run` (the model) and
:meth:`~httm_dist.pipeline.publish.ResultPublisher.commit` (the store). Knows nothing of Ray.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from httm_dist.config import JobConfig
from httm_dist.data import SceneSpec
from httm_dist.errors import SceneError
from httm_dist.pipeline.chunks import plan_chunks
from httm_dist.pipeline.memory import local_free_bytes, resolve_max_frames
from httm_dist.results.record import SceneRecord, UnitKind


@dataclass(frozen=True)
class WorkUnit:
    """What a worker is asked to do.

    ``kind="scene"``: the whole scene in one forward pass. ``kind="chunk"``: frames
    ``frame_range = (start, end)`` (end exclusive) of the scene, chunk ``chunk_index`` of
    ``num_chunks``. ``kind="assemble"``: align the scene's ``num_chunks`` stored chunks into
    one reconstruction and commit it.
    """

    scene: SceneSpec
    kind: UnitKind = "scene"
    chunk_index: Optional[int] = None
    frame_range: Optional[tuple[int, int]] = None
    num_chunks: int = 1

    @property
    def scene_id(self) -> str:
        return self.scene.scene_id

    @property
    def chunks(self) -> int:
        """How many chunks the scene's reconstruction comes from (1 for a whole-scene unit),
        as records count it."""
        return 1 if self.kind == "scene" else self.num_chunks

    @property
    def unit_id(self) -> str:
        """Stable, readable id: ``scene``, ``scene#chunk-002`` or ``scene#assemble``."""
        if self.kind == "chunk":
            return f"{self.scene_id}#chunk-{self.chunk_index:03d}"
        if self.kind == "assemble":
            return f"{self.scene_id}#assemble"
        return self.scene_id

    def describe(self) -> str:
        """Human-readable name for logs and errors, e.g. ``scene 'a' chunk 2/5``."""
        text = f"scene {self.scene_id!r}"
        if self.kind == "chunk":
            text += f" chunk {self.chunk_index + 1}/{self.num_chunks}"
        elif self.kind == "assemble":
            text += " (assembling chunks)"
        return text

    def frames(self) -> tuple:
        """The FrameRefs this unit reads (all of the scene's unless it is a chunk)."""
        if self.frame_range is None:
            return tuple(self.scene.frames)
        start, end = self.frame_range
        return tuple(self.scene.frames[start:end])


def check_scene(scene: SceneSpec, cfg: JobConfig) -> None:
    """Raises SceneError, naming the scene, when it cannot be processed whatever the worker:
    discovery found it unreadable (``scene.error``, e.g. a corrupt archive), it has no image
    frame, or fewer than ``min_frames``. Run by the driver (through :func:`plan_units`), so
    such scenes fail without a worker or Ray, and again by the worker before it reads."""
    n = len(scene.frames)
    if scene.error:
        raise SceneError(scene.error)
    if n == 0:
        raise SceneError(f"scene '{scene.scene_id}' is empty: no image frames found at {scene.source}")
    if n < cfg.min_frames:
        raise SceneError(f"scene '{scene.scene_id}' has {n} frame(s), fewer than min_frames={cfg.min_frames}")


def plan_units(scene: SceneSpec, cfg: JobConfig) -> list[WorkUnit]:
    """The units that process ``scene``: one ``scene`` unit, or, when ``chunk.max_frames`` is
    set and the scene is longer, one ``chunk`` unit per overlapping chunk (run them anywhere,
    then :func:`assemble_unit`). ``auto`` not yet resolved by the driver is resolved here for
    this process's device (``pipeline.memory``). Raises SceneError for a scene that
    :func:`check_scene` refuses."""
    check_scene(scene, cfg)
    n = len(scene.frames)
    max_frames = cfg.chunk.max_frames
    if max_frames == "auto":
        max_frames = resolve_max_frames(cfg, local_free_bytes(cfg.model.device))
    if max_frames is None or n <= max_frames:
        return [WorkUnit(scene, "scene")]
    ranges = plan_chunks(n, max_frames, cfg.chunk.overlap)
    return [
        WorkUnit(scene, "chunk", i, (int(a), int(b)), len(ranges)) for i, (a, b) in enumerate(ranges)
    ]


def chunk_is_current(meta: Optional[dict], model_hash: str, merge_hash: str, fingerprint: str) -> bool:
    """Whether a saved chunk (its marker ``meta``) was made under this model/merge config from
    the same input frames (``fingerprint``: :func:`~httm_dist.data.scene_fingerprint`); a marker
    without a fingerprint, from an older run, counts as the same input."""
    meta = meta or {}
    return (meta.get("model_hash") == model_hash and meta.get("merge_hash") == merge_hash
            and meta.get("input_fingerprint", fingerprint) == fingerprint)


def assemble_unit(scene: SceneSpec, num_chunks: int) -> WorkUnit:
    """The unit that assembles ``scene`` once its ``num_chunks`` chunk units are done."""
    return WorkUnit(scene, "assemble", None, None, num_chunks)


@dataclass
class LoadedUnit:
    """A unit's preprocessed input, ready for the model."""

    unit: WorkUnit
    images: torch.Tensor
    """[S, 3, H, W] float32 in [0, 1], on the CPU."""
    original_hw: list[tuple[int, int]]
    frame_uris: list[str]
    frame_indices: list[int]
    geometry: list = field(default_factory=list)
    """Per frame, its :class:`~httm_dist.model.preprocess.FrameGeometry` (input -> original
    pixels, valid box, EXIF orientation)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per step (``load``, ``run``, ``commit``)."""
    fp32_retry: bool = False
    """The first forward pass gave non-finite values and the unit was rerun in fp32."""

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])


def failure_line(name: str, scene_id: str, error: str) -> str:
    """The log line saying that ``name`` (a unit's :meth:`WorkUnit.describe`, e.g.
    ``scene 'b' chunk 2/5``, or ``scene 'b'``) of scene ``scene_id`` failed with ``error`` (a
    record's ``error``), naming the scene once.

    A record's error names its scene for readers of the record alone (``scene 'b': image ...
    cannot be decoded``); the line drops that prefix (``scene 'b' failed: image ...``), words an
    error whose subject is the scene with "it" (``scene 'b' failed: it has no image frames
    ...``), and keeps an error that already says what failed (``scene 'b' chunk 2/5 failed:
    its worker died ...``) as it is. Any other error follows ``<name> failed: ``.
    """
    prefix = f"scene {scene_id!r}"
    rest = error[len(prefix):] if error.startswith(prefix) else ""
    if not rest.startswith((":", " ")):
        return f"{name} failed: {error}"
    if error.split(":", 1)[0].endswith(" failed"):  # scene ids hold no ':' (see safe_name)
        return error
    if rest.startswith(":"):
        return f"{name} failed: {rest[1:].lstrip()}"
    return f"{name} failed: {'it' if name == prefix else 'the scene'}{rest}"


def failure_record(
    unit: WorkUnit, error: BaseException | str, cfg: JobConfig, attempts: int = 1,
    **optional: Any,
) -> SceneRecord:
    """The record of a unit that failed (see :meth:`SceneRecord.failed`), for
    ``ResultStore.write_failure``: the unit's identity, the config's hashes and ``attempts``.
    ``optional``: further :class:`SceneRecord` fields (``run_id``, ``worker``, ...)."""
    optional.setdefault("worker_host", socket.gethostname())
    return SceneRecord.failed(
        unit.scene_id, error, unit=unit.kind,
        chunk_index=unit.chunk_index,
        num_frames=len(unit.frames()), chunks=unit.chunks,
        model_hash=cfg.model_hash(), merge_hash=cfg.merge_hash(), attempts=attempts,
        **optional,
    )
