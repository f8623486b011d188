"""Building blocks of the monitor's samples: the stage view, time series, process figures."""

from __future__ import annotations

from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import psutil

from pipeline.monitor.alerts import round_figure


class StageView(Protocol):
    """What the monitor reads of a stage (the supervisor's ``StageState``)."""

    proc: BaseProcess | None
    restarts: int
    hung: int
    state: str

    def all_metrics(self) -> dict[str, float]:
        """The last heartbeat's metrics with ``*_total`` counters summed over restarts."""
        ...


# --------------------------------------------------------------------------- time series


class Series:
    """Columnar time series with ``None`` for missing values, thinned by halving."""

    def __init__(self, max_points: int) -> None:
        self.max_points = max_points
        self.every = 1
        self._calls = 0
        self.t: list[float] = []
        self.cols: dict[str, list[float | None]] = {}

    def append(self, t: float, values: Mapping[str, float | None]) -> None:
        self._calls += 1
        if (self._calls - 1) % self.every:
            return
        n = len(self.t)
        self.t.append(round(t, 3))
        for key, v in values.items():
            col = self.cols.get(key)
            if col is None:
                col = self.cols[key] = [None] * n
            col.append(round_figure(v))
        for col in self.cols.values():
            if len(col) < n + 1:
                col.append(None)
        if len(self.t) > self.max_points:
            self.t = self.t[::2]
            for key in self.cols:
                self.cols[key] = self.cols[key][::2]
            self.every *= 2

    def as_dict(self, interval_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {"interval_s": interval_s * self.every, "t_s": list(self.t)}
        for key, col in sorted(self.cols.items()):
            group, _, leaf = key.partition(".")
            if leaf:
                out.setdefault(group, {})[leaf] = list(col)
            else:
                out[group] = list(col)
        return out


# --------------------------------------------------------------------------- processes


class ProcessSampler:
    """CPU % (since the previous sample) and RSS of processes by pid (psutil)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pid: int) -> tuple[float | None, float | None]:
        """``(cpu_percent, rss_bytes)``; cpu is ``None`` on a pid's first sample."""
        proc = self._procs.get(pid)
        first = proc is None
        try:
            if proc is None:
                proc = psutil.Process(pid)
                self._procs[pid] = proc
            with proc.oneshot():
                cpu = proc.cpu_percent(None)
                rss = float(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            return None, None
        return (None if first else cpu), rss

    def forget_except(self, pids: set[int]) -> None:
        for pid in [p for p in self._procs if p not in pids]:
            del self._procs[pid]


def occupancy(s: Mapping[str, int]) -> int:
    return max(
        0,
        int(s.get("written", 0))
        - int(s.get("read", 0))
        - int(s.get("skipped", 0))
        - int(s.get("dropped", 0)),
    )


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mb(value: float | None) -> float | None:
    return None if value is None else round(value / (1024 * 1024), 2)
