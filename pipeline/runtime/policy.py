"""The transport policy: when the stream leaves the primary transport, and when it returns.

The supervisor sees every stage's metrics; the stage with a hot standby
(``transport_hot_standby`` 1: the transmit stage with a ``transmit.fallback``) exports
per transport ``path_<kind>_connected``, ``_dead``, ``_rtt_ms`` (server acks, or
the standby's probe, over ``transmit.window_s``:
:meth:`~pipeline.transports.health.PathHealth.rtt_ms`), ``_failure_rate`` (failed
sends / sends over the window), ``_buffered_bytes`` (:mod:`pipeline.transports.health`).
:class:`TransportPolicy` judges them at every heartbeat:

* on the primary: switch to the fallback when its ack RTT (the median of per-slot minima)
  exceeds
  ``max_latency_ms`` (``reason=latency``), its failure rate exceeds ``switch_threshold``
  (``failure_rate``) or it is dead (``dead``: the stage already failed over by itself at
  the moment it saw the dead path, a round trip through here would cost heartbeats; the
  policy records that decision from the stage's ``transport_switches_dead_total``);
* on the fallback: back to the primary (``recovered``) once ``recovery_interval_s``
  passed since the switch and the primary then stayed healthy (connected, alive, RTT and
  failure rate under the thresholds) for ``hold_s``;
* at most ``max_switches_per_min`` automatic switches (the stage enforces it too);
  nothing while the stage is pinned (``pin``/``unpin`` commands).

A decision is sent as ``switch_transport`` with ``reason`` and ``auto``; it is logged
once with its reason and figures and kept in :attr:`TransportPolicy.decisions` (the run
report's ``transport_policy``); the stage counts it per reason
(``transport_switches_<reason>_total``, /metrics ``posewire_transport_switches_total{reason}``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.config import TransmitConfig

log = logging.getLogger("posewire.policy")

#: a command sent is taken as under way this long (the stage's metrics then show it)
PENDING_S = 1.0

Command = Callable[[str, str, dict[str, Any]], int]


class TransportPolicy:
    """Decides the switches of one stage with a hot standby (see the module docstring)."""

    def __init__(self, cfg: TransmitConfig, command: Command) -> None:
        assert cfg.fallback is not None
        self.cfg = cfg
        self.primary = cfg.primary.value
        self.fallback = cfg.fallback.value
        self.command = command
        self.decisions: list[dict[str, Any]] = []
        self._times: deque[float] = deque()
        self._pending_until = 0.0
        self._left_primary: float | None = None
        self._healthy_since: float | None = None
        self._dead_seen = 0.0

    def _figures(self, m: Mapping[str, float], kind: str) -> dict[str, float | None]:
        p = f"path_{kind}_"
        return {
            "connected": m.get(p + "connected"),
            "dead": m.get(p + "dead"),
            "rtt_ms": m.get(p + "rtt_ms"),
            "failure_rate": m.get(p + "failure_rate"),
            "buffered_bytes": m.get(p + "buffered_bytes"),
        }

    def _allowed(self, now: float) -> bool:
        while self._times and now - self._times[0] > 60.0:
            self._times.popleft()
        return len(self._times) < self.cfg.max_switches_per_min

    def _record(
        self,
        now: float,
        to: str,
        reason: str,
        figures: dict[str, Any],
        by: str,
        t_wall: float | None = None,
    ) -> None:
        self._times.append(now)
        entry = {"t_wall": t_wall or time.time(), "from": self._other(to), "to": to,
                 "reason": reason, "by": by, "figures": figures}  # fmt: skip
        self.decisions.append(entry)
        log.warning(
            "transport switch %s -> %s (%s, by %s): %s",
            entry["from"],
            to,
            reason,
            by,
            ", ".join(f"{k}={v:g}" for k, v in figures.items() if isinstance(v, int | float)),
        )

    def _other(self, kind: str) -> str:
        return self.fallback if kind == self.primary else self.primary

    def step(self, stage: str, m: Mapping[str, float], now: float | None = None) -> None:
        """Judge the last metrics of ``stage``; send a switch when one is due."""
        if not m.get("transport_hot_standby"):
            return
        now = time.monotonic() if now is None else now
        dead = m.get("transport_switches_dead_total", 0.0)
        if dead > self._dead_seen:  # the stage failed over by itself: record it
            self._dead_seen = dead
            self._left_primary, self._healthy_since = now, None
            at_ns = m.get("transport_last_switch_dead_ns")  # when the stage switched
            to = self.primary if m.get(f"transport_active_{self.primary}") else self.fallback
            self._record(now, to, "dead", self._figures(m, self._other(to)), stage,
                         at_ns / 1e9 if at_ns else None)  # fmt: skip
        active = self.primary if m.get(f"transport_active_{self.primary}") else self.fallback
        pinned = any(m.get(f"transport_pinned_{k}") for k in (self.primary, self.fallback))
        if pinned or now < self._pending_until:
            return
        prim = self._figures(m, self.primary)
        if not m.get(f"path_{self._other(active)}_connected"):
            self._healthy_since = None
            return  # no standby to go to
        cfg = self.cfg
        rtt, fail = prim["rtt_ms"], prim["failure_rate"] or 0.0
        if active == self.primary:
            # a dead primary: the stage fails over by itself (recorded above)
            if rtt is not None and rtt > cfg.max_latency_ms:
                reason = "latency"
            elif fail > cfg.switch_threshold:
                reason = "failure_rate"
            else:
                return
            self._switch(stage, now, self.fallback, reason, prim)
            self._left_primary = now
            return
        if self._left_primary is None:
            self._left_primary = now
        healthy = (
            bool(prim["connected"])
            and not prim["dead"]
            and (rtt is None or rtt <= cfg.max_latency_ms)
            and fail <= cfg.switch_threshold
        )
        if not healthy or now - self._left_primary < cfg.recovery_interval_s:
            self._healthy_since = None
            return
        if self._healthy_since is None:
            self._healthy_since = now
        if now - self._healthy_since >= cfg.hold_s:
            self._switch(stage, now, self.primary, "recovered", prim)
            self._healthy_since = None

    def _switch(
        self, stage: str, now: float, to: str, reason: str, figures: dict[str, Any]
    ) -> None:
        if not self._allowed(now):
            return
        self._pending_until = now + PENDING_S
        self._record(now, to, reason, figures, "supervisor")
        self.command(stage, "switch_transport", {"to": to, "reason": reason, "auto": True})

    def report(self) -> dict[str, Any]:
        return {"primary": self.primary, "fallback": self.fallback, "decisions": self.decisions}
