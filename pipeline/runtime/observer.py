"""What the supervisor shows an observer (the performance monitor), and the stage state.

The runtime does not import the monitor: whoever starts the supervisor (the
``run`` command) hands it an :data:`ObserverFactory`, which is called with the
run directory and run id once they exist. The supervisor then calls
:meth:`Observer.start`, on every loop turn :meth:`Observer.take_commands` and,
when :meth:`Observer.due`, :meth:`Observer.observe`; at the end
:meth:`Observer.report_section` (merged into the run report with
:func:`merge_report`) and :meth:`Observer.close` on every exit path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from pipeline.runtime.stage import StageSpec


@dataclass
class StageState:
    """The supervisor's view of one stage."""

    spec: StageSpec
    proc: BaseProcess | None = None
    started_at: float = 0.0
    last_seen: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    carried: dict[str, float] = field(default_factory=dict)
    """``*_total`` counters of earlier incarnations (a restart resets the stage's own)."""
    restarts: int = 0
    hung: int = 0
    done: bool = False
    stop_sent: bool = False
    state: str = "starting"
    last_error: str | None = None
    term_sent_at: float | None = None
    killed_for: str | None = None

    def counter(self, name: str) -> float:
        return self.carried.get(name, 0.0) + self.metrics.get(name, 0.0)

    def all_metrics(self) -> dict[str, float]:
        out = dict(self.metrics)
        for k, v in self.carried.items():
            out[k] = out.get(k, 0.0) + v
        return out


class CommandRequest(Protocol):
    """A command for a stage that arrived outside the control plane (over HTTP, say)."""

    stage: str
    cmd: str
    args: dict[str, Any]

    def resolve(self, cmd_id: int) -> None:
        """Called by the supervisor once the command is sent."""
        ...


class Observer(Protocol):
    """Watches the run from the supervisor's loop (the performance monitor)."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def due(self, now: float | None = None) -> bool: ...

    def take_commands(self) -> list[Any]: ...

    def observe(
        self,
        stages: Mapping[str, StageState],
        frames: Mapping[str, int],
        rings: Mapping[str, Mapping[str, int]],
        now: float | None = None,
    ) -> None: ...

    def report_section(
        self,
        stages: Mapping[str, StageState],
        frames: Mapping[str, int],
        rings: Mapping[str, Mapping[str, int]],
    ) -> dict[str, Any]: ...


#: ``(run_dir, run_id) -> Observer``
ObserverFactory = Callable[[Path, str], Observer]


def merge_report(base: dict[str, Any], section: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``section`` into ``base`` (dicts merge, anything else replaces); returns
    ``base``."""
    for key, value in section.items():
        mine = base.get(key)
        if isinstance(mine, dict) and isinstance(value, Mapping):
            merge_report(mine, value)
        else:
            base[key] = value
    return base
