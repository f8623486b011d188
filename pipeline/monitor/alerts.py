"""The monitor's alerts: a value over its threshold raises one, a quiet hold clears it.

An alert is *entered* when its value exceeds its threshold and *cleared* once
the value stayed at or under the threshold for ``monitor.alert_hold_s``; each
transition is logged once and every episode is kept for the run report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("posewire.monitor")

ALERTS: dict[str, str] = {
    "latency": "end-to-end latency in ms (capture to send: monitor.alert_latency_percentile "
    "of the egress stage's rolling window)",
    "drop_rate": "frames dropped / frames captured over monitor.alert_window_s",
    "switch_rate": "transport switches / packets sent over monitor.alert_window_s",
    "compression_ratio": "bytes per frame on the wire / 528 (raw float32) over "
    "monitor.alert_window_s",
    "transport_refused": "1 while the room server refuses the sender (kicked, token refused, "
    "room closed...: the egress stage's transport_refused metric)",
}

#: threshold of the ``transport_refused`` alert (the metric is 0 or 1)
TRANSPORT_REFUSED_THRESHOLD = 0.5


def round_figure(v: float | None, digits: int = 4) -> float | None:
    """A figure for reports and ``/status``: ``digits`` significant digits; ``None`` for
    a missing or non-finite value."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}") if abs(v) < 1e6 else round(v, 1)


@dataclass
class AlertEpisode:
    """One time an alert was raised (and perhaps cleared)."""

    name: str
    threshold: float
    value: float
    """The worst value seen while the alert was raised."""
    entered_at: float
    """Wall clock (Unix seconds)."""
    entered_after_s: float
    """Seconds since the run started."""
    cleared_at: float | None = None
    cleared_after_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round_figure(self.value),
            "threshold": self.threshold,
            "entered_at": round(self.entered_at, 3),
            "entered_after_s": round(self.entered_after_s, 3),
            "cleared_at": None if self.cleared_at is None else round(self.cleared_at, 3),
            "cleared_after_s": (
                None if self.cleared_after_s is None else round(self.cleared_after_s, 3)
            ),
            "active_at_exit": self.cleared_at is None,
        }


@dataclass
class _Alert:
    name: str
    threshold: float
    value: float | None = None
    episode: AlertEpisode | None = None
    below_since: float | None = None
    raised: int = 0

    @property
    def active(self) -> bool:
        return self.episode is not None


class AlertBook:
    """The alerts' state machine: enter above the threshold, clear after a quiet hold."""

    def __init__(self, thresholds: Mapping[str, float], hold_s: float) -> None:
        self.hold_s = hold_s
        self.alerts = {name: _Alert(name, t) for name, t in thresholds.items()}
        self.episodes: list[AlertEpisode] = []

    def update(self, name: str, value: float | None, mono: float, since_start: float) -> None:
        """Feed the alert's current value; ``None`` (no data) changes nothing."""
        a = self.alerts[name]
        a.value = value
        if value is None or not math.isfinite(value):
            return
        if value > a.threshold:
            a.below_since = None
            if a.episode is None:
                a.episode = AlertEpisode(name, a.threshold, value, time.time(), since_start)
                a.raised += 1
                self.episodes.append(a.episode)
                log.warning(
                    "alert %s raised: %s = %.4g exceeds %.4g", name, name, value, a.threshold
                )
            else:
                a.episode.value = max(a.episode.value, value)
            return
        if a.episode is None:
            return
        if a.below_since is None:
            a.below_since = mono
        if mono - a.below_since >= self.hold_s:
            a.episode.cleared_at = time.time()
            a.episode.cleared_after_s = since_start
            log.info(
                "alert %s cleared: %s = %.4g within %.4g (worst %.4g)",
                name,
                name,
                value,
                a.threshold,
                a.episode.value,
            )
            a.episode = None
            a.below_since = None

    def active(self) -> list[str]:
        return [n for n, a in self.alerts.items() if a.active]
