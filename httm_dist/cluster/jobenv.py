"""What the driver's process environment asks of a run: a ``ray job submit --working-dir``
copy that relative paths would land in, and SIGTERM (``ray job stop``, a batch scheduler's
preemption, ``timeout``), which must unwind the run like Ctrl-C.

Used by :mod:`~httm_dist.cluster.driver`; no Ray calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from typing import Iterator


from httm_dist.config import JobConfig
from httm_dist.errors import ConfigError
from httm_dist.storage import redact

#: Set by Ray in the entrypoint of a ``ray job submit``: the job's runtime_env, as JSON.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_paths_in_job_working_dir(cfg: JobConfig) -> None:
    """Inside a Ray job started with ``--working-dir`` the job (driver and workers) runs in
    Ray's temporary copy of that folder (``/tmp/ray/session_*/runtime_resources/
    working_dir_files/...``, one per node, deleted with the Ray session; files git ignores are
    not copied). Raises ConfigError, before anything is touched, when ``output`` is a relative
    local path (the results would be written into that copy) or ``input`` is a relative local
    path missing from it. Does nothing outside such a job."""
    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return
    if not runtime_env.get("working_dir"):
        return
    where = f"this Ray job runs in Ray's temporary copy of its --working-dir ({os.getcwd()})"
    output = _relative_local_path(cfg.output)
    if output is not None:
        raise ConfigError(
            f"output {redact(cfg.output)!r} is a relative path, and {where}, deleted with the Ray "
            "session: give an absolute path on storage every node shares, or a bucket URL")
    input_path = _relative_local_path(cfg.input)
    if input_path is not None and not os.path.exists(input_path):
        raise ConfigError(
            f"input {redact(cfg.input)!r} is a relative path missing from the copy: {where}, "
            "which leaves out what git ignores: give an absolute path or a bucket URL")


def _relative_local_path(url: str) -> str | None:
    """The path of ``url`` when it is a relative local path (plain or ``file://``), else None."""
    if "://" in url and not url.startswith("file://"):
        return None  # a bucket or other remote URL
    path = url[len("file://"):] if url.startswith("file://") else url
    return None if os.path.isabs(os.path.expanduser(path)) else path


class JobStopped(KeyboardInterrupt):
    """SIGTERM reached the driver (``ray job stop``, a batch scheduler's preemption,
    ``timeout``): the run unwinds like Ctrl-C, stopping its workers and the Ray it started.
    ``how`` and ``exit_status`` (128 + SIGTERM) are what the CLI reports. Ray's blocking calls
    (``ray.wait``, ``ray.get``) turn any KeyboardInterrupt into a bare one: :func:`sigterm_unwinds`
    raises this again in its place when a SIGTERM caused it."""

    how = "stopped (SIGTERM)"
    exit_status = 128 + signal.SIGTERM


_active = threading.Event()  # inside sigterm_unwinds (main thread only)
_stopped = threading.Event()  # a SIGTERM reached the current run


def _on_sigterm(signum: int, frame: object) -> None:
    if _stopped.is_set():
        return  # already unwinding: a second SIGTERM must not cut its cleanup short
    _stopped.set()
    raise JobStopped(f"stopped by signal {signum}")


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """For the duration of a run: SIGTERM raises :class:`JobStopped` in the main thread, so the
    run unwinds like Ctrl-C (workers killed and the Ray it started shut down by the usual
    ``finally`` blocks; the CLI prints one line on how to resume, exit 143) instead of dying
    silently or with Ray's native stack dump. Further SIGTERMs during the unwind are ignored.
    The handler that was there before is restored on exit. Outside the main thread (where no
    handler can be installed) it changes nothing."""
    if threading.current_thread() is not threading.main_thread() or _active.is_set():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    _stopped.clear()
    _active.set()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except KeyboardInterrupt as exc:
        if _stopped.is_set() and not isinstance(exc, JobStopped):  # Ray re-raised it bare
            raise JobStopped(f"stopped by signal {int(signal.SIGTERM)}") from exc
        raise
    finally:
        _stopped.clear()
        _active.clear()
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def reinstall_after_ray_init() -> None:
    """``ray.init`` installs Ray's own SIGTERM handler (a native stack dump, then exit): put
    :func:`sigterm_unwinds`' back when a run is inside it."""
    if _active.is_set() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
