"""Per-transport health of a publisher with a hot standby, and what a switch needs.

:class:`PathHealth` keeps, for one transport of the :class:`~pipeline.transports.sender.Sender`,
the figures the supervisor's transport policy (:mod:`pipeline.runtime.policy`) judges, over
``transmit.window_s``: the ack round trip (send time of a sequence number to the server's
ack of it, or the standby's probe; the median of the per-slot minima,
:meth:`PathHealth.rtt_ms`), the failure rate (failed sends / sends), the dead-path state (the
transport's ``StateChange``) and the buffered bytes. They are exported as stage metrics
``path_<kind>_<figure>`` (:meth:`PathHealth.metrics`).

:class:`Recent` keeps the packets sent in the last moment: after a switch they are sent
again on the new transport, so that what was in flight on the old one (or lost in a
dead path before it was detected) still arrives; the server drops what it already has
as late (a stream shared by a hot-standby pair, docs/room-protocol.md).

:class:`SwitchCap` is the cap on automatic switches per minute.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TypeVar

from pipeline.transports.base import Transport

#: sequence numbers waiting for their ack, per transport (the oldest are forgotten)
MAX_PENDING_ACKS = 512
#: the ack round trip is judged on the smallest sample of each slot this long
RTT_SLOT_S = 0.5
#: the hot standby's latency probe period (4 samples a second: enough for window_s >= 1)
PROBE_S = 0.25

K = TypeVar("K")


def metric_name(reason: str) -> str:
    """``reason`` as a metric-name suffix: lower-case letters, digits and ``_``, short."""
    return re.sub(r"[^a-z0-9_]+", "_", reason.lower()).strip("_")[:40] or "unknown"


class PathHealth:
    """The health figures of one transport over a sliding window of ``window_s``."""

    def __init__(self, kind: str, window_s: float) -> None:
        self.kind = kind
        self.window_s = window_s
        self._rtts: deque[tuple[float, float]] = deque()
        self._sends: deque[tuple[float, bool]] = deque()
        self._pending: dict[int, float] = {}
        self.dead: str | None = None
        """Why the path is dead (its last ``StateChange(False)``), None while alive."""

    def on_send(self, seq: int | None, ok: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._sends.append((now, ok))
        if ok and seq is not None:
            if len(self._pending) >= MAX_PENDING_ACKS:
                del self._pending[next(iter(self._pending))]
            self._pending[seq] = now

    def on_ack(self, seq: int, now: float | None = None) -> None:
        sent = self._pending.pop(seq, None)
        if sent is not None:
            now = time.monotonic() if now is None else now
            self._rtts.append((now, (now - sent) * 1000.0))

    def _trim(self, now: float) -> None:
        edge = now - self.window_s
        while self._rtts and self._rtts[0][0] < edge:
            self._rtts.popleft()
        while self._sends and self._sends[0][0] < edge:
            self._sends.popleft()

    def on_rtt(self, ms: float, now: float | None = None) -> None:
        """A round trip measured otherwise (the standby's probe: it carries no stream)."""
        self._rtts.append((time.monotonic() if now is None else now, ms))

    def rtt_ms(self, now: float | None = None) -> float | None:
        """The path's latency: the median over the window of the smallest round trip of
        each :data:`RTT_SLOT_S`. Acks ride the reliable, ordered control channel: a lost
        one holds the next ones back until SCTP retransmits it, so under random loss whole
        slots of acks come late although the path did not slow down (at 10 % loss the p95
        of the per-slot minima reached 135 ms on a 1 ms path in a clean-clone CI run); the
        minimum sees through one held-back ack, the median through a held-back slot, while
        a real added delay moves every slot's minimum, and so the median, at once."""
        self._trim(time.monotonic() if now is None else now)
        if not self._rtts:
            return None
        slots: dict[int, float] = {}
        for t, v in self._rtts:
            key = math.floor(t / RTT_SLOT_S)
            slots[key] = min(v, slots.get(key, v))
        values = sorted(slots.values())
        return values[(len(values) - 1) // 2]

    def failure_rate(self, now: float | None = None) -> float:
        self._trim(time.monotonic() if now is None else now)
        if not self._sends:
            return 0.0
        return sum(1 for _, ok in self._sends if not ok) / len(self._sends)

    def metrics(self, transport: Transport | None, *, standby: bool) -> dict[str, float]:
        now = time.monotonic()
        p = f"path_{self.kind}_"
        connected = transport is not None and transport.connected
        out = {
            p + "connected": float(connected),
            p + "standby": float(standby),
            p + "dead": float(self.dead is not None),
            p + "failure_rate": self.failure_rate(now),
            p + "sends": float(len(self._sends)),
        }
        rtt = self.rtt_ms(now)
        if rtt is not None:
            out[p + "rtt_ms"] = rtt
        if transport is not None:
            stats = transport.statistics()
            out[p + "buffered_bytes"] = float(stats.buffered_bytes or 0)
            if stats.clock_rtt_ms is not None:  # the probe of a standby: its clock pings
                out[p + "clock_rtt_ms"] = stats.clock_rtt_ms
        return out


class Recent:
    """The packets sent in the last ``keep_s`` seconds (at most ``limit``), oldest first."""

    def __init__(self, keep_s: float, limit: int = 64) -> None:
        self.keep_s = keep_s
        self._items: deque[tuple[float, bytes]] = deque(maxlen=limit)

    def add(self, packet: bytes) -> None:
        self._items.append((time.monotonic(), packet))

    def take(self) -> list[bytes]:
        """What was sent within ``keep_s``, oldest first."""
        edge = time.monotonic() - self.keep_s
        return [p for t, p in self._items if t >= edge]


class SwitchCap:
    """At most ``per_min`` automatic switches in any 60 s."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self._times: deque[float] = deque()

    def allowed(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > 60.0:
            self._times.popleft()
        return len(self._times) < self.per_min

    def note(self, now: float | None = None) -> None:
        self._times.append(time.monotonic() if now is None else now)


async def probe_standby(
    standby: Callable[[], tuple[Transport | None, K | None]], health: Mapping[K, PathHealth]
) -> None:
    """Every :data:`PROBE_S` one probe on the standby (``standby()``: it and its kind, if
    any) into its :class:`PathHealth`: its round trip, as it has no acks. Runs until
    cancelled."""
    while True:
        await asyncio.sleep(PROBE_S)
        transport, kind = standby()
        if transport is None or kind is None or not transport.connected:
            continue
        ms = await transport.probe_rtt_ms()
        if ms is not None and standby()[0] is transport:
            health[kind].on_rtt(ms)
