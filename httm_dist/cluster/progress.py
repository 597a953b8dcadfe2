"""Driver-side progress: a tqdm bar on a terminal, periodic log lines elsewhere.

Batch jobs mostly run with stderr redirected to a file (``ray job submit``, cron, CI), where
a redrawn bar becomes megabytes of carriage returns; there the same figures (scenes done and
failed, frames, frames/s) go to the log every ``interval_s`` seconds instead.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class JobProgress:
    """Counts finished scenes and frames for one run and reports them.

    ``enabled=False`` keeps the counters (the summary needs them) but shows nothing.
    ``failed_at_start``: scenes of ``total_scenes`` that failed before any work (at planning):
    counted as failed, but not in the pace the time-left estimate is made from.
    """

    def __init__(self, total_scenes: int, *, failed_at_start: int = 0, enabled: bool = True,
                 interval_s: float = 10.0, stream: TextIO | None = None) -> None:
        self.total = total_scenes
        self.done = 0
        self.failed = self.failed_at_start = failed_at_start
        self.frames = 0
        self.started = time.monotonic()
        self.interval_s = interval_s
        self._last_log = self.started
        self._bar = None
        stream = stream if stream is not None else sys.stderr
        self._log_lines = enabled and not _is_tty(stream)
        if enabled and not self._log_lines:
            # tqdm leaves ``initial`` out of its rate, as _eta does
            self._bar = tqdm(total=total_scenes, initial=failed_at_start, unit="scene", desc="scenes",
                             file=stream, dynamic_ncols=True)
            self._bar.set_postfix(failed=self.failed, refresh=False)

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    @property
    def frames_per_s(self) -> float:
        """Frames of finished scenes per second of wall time, over the whole run."""
        return self.frames / max(self.elapsed, 1e-9)

    def scene_finished(self, ok: bool, frames: int = 0) -> None:
        """Counts one scene as done (with its frame count) or failed, and reports."""
        if ok:
            self.done += 1
            self.frames += int(frames)
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(frames=self.frames, fps=f"{self.frames_per_s:.2f}",
                                  failed=self.failed, refresh=False)
        self.tick(force=self.done + self.failed == self.total)

    def tick(self, force: bool = False) -> None:
        """Emits a log line when not on a terminal and ``interval_s`` has passed (or forced)."""
        if not self._log_lines:
            return
        now = time.monotonic()
        if force or now - self._last_log >= self.interval_s:
            self._last_log = now
            log.info("progress: %d/%d scenes done, %d failed, %d frames, %.2f frames/s, %.0f s%s",
                     self.done, self.total, self.failed, self.frames, self.frames_per_s,
                     self.elapsed, self._eta())

    def _eta(self) -> str:
        """``", about 1.5 h left"`` at the run's pace so far in scenes finished by the workers
        (the bar's estimate); empty before the first such scene or once none is left."""
        finished = self.done + self.failed - self.failed_at_start
        left = self.total - self.done - self.failed
        if not finished or left <= 0:
            return ""
        seconds = self.elapsed / finished * left
        shown = (f"{seconds / 3600:.1f} h" if seconds >= 5400 else
                 f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s")
        return f", about {shown} left"

    def close(self) -> None:
        """Closes the bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
