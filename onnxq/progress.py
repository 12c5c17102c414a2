"""Progress of long work: a tqdm bar on a terminal, periodic log lines everywhere else.

A bar redrawn with carriage returns is unreadable in a CI log or a ``nohup`` file, and a run
that prints nothing for an hour looks hung. Off a terminal, a line with the count, the rate and
the time left is logged every :data:`LOG_INTERVAL_SECONDS` instead (``ONNXQ_PROGRESS_SECONDS``
in the environment sets another interval).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import TracebackType

from tqdm import tqdm

__all__ = ["LOG_INTERVAL_SECONDS", "Progress"]

logger = logging.getLogger(__name__)

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL_SECONDS = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("ONNXQ_PROGRESS_SECONDS", LOG_INTERVAL_SECONDS)))
    except ValueError:
        return LOG_INTERVAL_SECONDS


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class Progress:
    """Counts ``total`` units of work called ``unit``; shows them only when ``enabled``.

    Use as a context manager or call :meth:`close`; :meth:`update` is cheap enough to call per unit.
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True,
                 interval: float | None = None) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.interval = _interval() if interval is None else interval
        self._started = self._logged = time.monotonic()
        self._bar = None
        self._log = False
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False)
        else:
            self._log = enabled

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if self._log and now - self._logged >= self.interval:
            self._logged = now
            logger.info("%s", self.line(now - self._started))

    def line(self, elapsed: float) -> str:
        """``desc: done/total unit, rate, time left`` after ``elapsed`` seconds."""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = _duration(left) if left != float("inf") else "unknown"
        pace = f"{rate:.2f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/{self.unit}"
        units = self.unit + ("es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s")
        return f"{self.desc}: {self.done}/{self.total} {units}, {pace}, about {eta} left"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
