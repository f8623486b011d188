"""Small rolling statistics used by every stage's metrics (one implementation)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt


def percentiles(values: Iterable[float] | npt.NDArray[Any], qs: Sequence[float]) -> list[float]:
    """The ``qs`` percentiles (0..100, linear interpolation) of ``values``; [] when empty.

    The one percentile implementation of posewire: stage windows, the monitor's
    samples, receivers and benchmarks all call this.
    """
    arr = (
        np.fromiter(values, np.float64)
        if not isinstance(values, np.ndarray)
        else values.astype(np.float64, copy=False)
    )
    if arr.size == 0:
        return []
    return [float(v) for v in np.percentile(arr, list(qs))]


class Window:
    """The last ``size`` samples (with ``max_age_s``: of the last ``max_age_s`` seconds
    only), with percentiles."""

    def __init__(self, size: int = 512, max_age_s: float | None = None) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._times: deque[float] = deque(maxlen=size)
        self.max_age_s = max_age_s

    def add(self, value: float) -> None:
        self._values.append(value)
        if self.max_age_s is not None:
            self._times.append(time.monotonic())

    def _trim(self) -> None:
        if self.max_age_s is None:
            return
        edge = time.monotonic() - self.max_age_s
        while self._times and self._times[0] < edge:
            self._times.popleft()
            self._values.popleft()

    def __len__(self) -> int:
        self._trim()
        return len(self._values)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100) of the window; 0.0 when empty."""
        self._trim()
        if not self._values:
            return 0.0
        return percentiles(self._values, (q,))[0]

    def mean(self) -> float:
        self._trim()
        return float(np.mean(np.fromiter(self._values, float))) if self._values else 0.0

    def summary(self, prefix: str) -> dict[str, float]:
        """``{prefix_p50: .., prefix_p95: .., prefix_p99: ..}`` for a metrics dict."""
        self._trim()
        if not self._values:
            return {}
        p50, p95, p99 = percentiles(self._values, (50, 95, 99))
        return {
            f"{prefix}_p50": p50,
            f"{prefix}_p95": p95,
            f"{prefix}_p99": p99,
        }


class Rate:
    """Events per second over a sliding time window (monotonic clock)."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-9)
