"""The rolling window the consumer's monitoring gauges are computed over.

Drift (`service.stream.drift`) and shadow-model agreement look at the most recent alerts
of a survey, not at everything since start-up: a change of the sky or the pipeline shows
within one window and is not averaged away by months of history. The window holds either
the last N alerts (``--monitor-window 1000``) or the alerts of the last N minutes
(``--monitor-window 30m``).
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

_SPEC = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(m|min|minutes?)?\s*$")


@dataclass(frozen=True)
class WindowSize:
    """How much a `RollingWindow` holds: ``alerts`` most recent entries, or ``minutes`` of them."""

    alerts: int | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        if (self.alerts is None) == (self.minutes is None):
            raise ValueError("a window is sized by alerts or by minutes, not both or neither")

    def __str__(self) -> str:
        return f"{self.alerts} alerts" if self.alerts is not None else f"{self.minutes:g} minutes"


def parse_window(text: str | int) -> WindowSize:
    """``1000`` (alerts) or ``30m`` (minutes) as a `WindowSize`; the type of ``--monitor-window``."""
    match = _SPEC.match(str(text))
    if match is None:
        raise ValueError(f"not a window size: {text!r}; give a number of alerts (1000) or of minutes (30m)")
    number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise ValueError(f"a window must hold something, got {text!r}")
    if unit:
        return WindowSize(minutes=number)
    if not number.is_integer():
        raise ValueError(f"a window of alerts holds a whole number of them, got {text!r}")
    return WindowSize(alerts=int(number))


class RollingWindow:
    """The latest rows of ``columns`` floats each (NaN where a row has no value), by count or by age.

    Not thread-safe: the consumer feeds and reads it from its scoring thread only.

    Parameters
    ----------
    size : WindowSize
    columns : int
        Floats per row (1 for a score; 2 for a primary and a shadow score).
    clock : callable
        Seconds, monotonic; for a window sized in minutes.
    """

    def __init__(self, size: WindowSize, columns: int = 1, clock=time.monotonic):
        self.size = size
        self.columns = columns
        self._clock = clock
        self._rows: deque[tuple[float, tuple[float, ...]]] = deque(
            maxlen=size.alerts if size.alerts is not None else None)

    def extend(self, rows: Iterable[float | Sequence[float]]) -> None:
        """Add rows (a float each, or ``columns`` floats each), then drop what fell out of the window."""
        now = self._clock()
        for row in rows:
            values = (float(row),) if np.isscalar(row) or row is None else tuple(map(float, row))
            if len(values) != self.columns:
                raise ValueError(f"a row of this window holds {self.columns} values, got {len(values)}")
            self._rows.append((now, values))
        self._expire(now)

    def _expire(self, now: float) -> None:
        if self.size.minutes is None:
            return
        oldest = now - 60.0 * self.size.minutes
        while self._rows and self._rows[0][0] < oldest:
            self._rows.popleft()

    def values(self) -> np.ndarray:
        """The rows in the window, oldest first, as a ``[rows, columns]`` float array."""
        self._expire(self._clock())
        if not self._rows:
            return np.empty((0, self.columns))
        return np.array([values for _, values in self._rows], dtype=np.float64)

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._rows)
