"""Server counters and their Prometheus text exposition (``GET /metrics``)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field

from pipeline.model.prometheus import Exposition
from pipeline.wire.close import CloseCode


@dataclass
class ServerMetrics:
    """Counters of one server process (gauges are read from the room manager)."""

    messages_in: int = 0
    """Messages received from members (binary and text)."""
    messages_out: int = 0
    """Messages written to members (binary and text)."""
    packets_in: int = 0
    """Pose packets accepted from publishers."""
    packets_out: int = 0
    """Pose packets written to subscribers (the relay's delivered messages)."""
    bytes_in: int = 0
    bytes_out: int = 0
    drops: int = 0
    """Pose packets dropped from a slow subscriber's queue (oldest first)."""
    skipped_undecodable: int = 0
    """Packets not sent to a subscriber that lacks their reference (it waits for a keyframe)."""
    keyframe_requests: int = 0
    """Keyframe requests forwarded to publishers."""
    connections_total: int = 0
    rejections: Counter[str] = field(default_factory=Counter)
    """Refused or closed connections by reason (see :mod:`pipeline.wire.close`)."""
    header_timeouts: Counter[str] = field(default_factory=Counter)
    """Connections closed for a request too slow (``slow_headers``, ``slow_request``)."""
    idle_closed: int = 0
    """Idle keep-alive connections closed (nothing sent within the header timeout)."""
    pending_refused: int = 0
    """Connections closed at once: the pending cap was reached, all being answered."""
    pending_evicted: int = 0
    """Connections still waiting for their headers closed to make room at the cap."""
    pending_peak: int = 0
    """Most connections pending at once (accepted, not yet upgraded)."""
    accept_errors: int = 0
    """``accept()`` failures for lack of descriptors (EMFILE/ENFILE)."""
    log_suppressed: int = 0
    """Log lines suppressed by the rate limit."""

    def reject(self, reason: str) -> None:
        self.rejections[reason] += 1

    def render(
        self, *, rooms: int, members: int, connections: int, ready: bool, pending: int = 0
    ) -> str:
        """Prometheus text format 0.0.4 (plus the process's asyncio tasks and open fds).

        ``rejections_total`` has a sample for every close-code reason (0 until
        one happens) and for any other reason counted.
        """
        out = Exposition(FAMILIES)
        out.add(f"{PREFIX}rooms", rooms)
        out.add(f"{PREFIX}members", members)
        out.add(f"{PREFIX}connections", connections)
        out.add(f"{PREFIX}pending_connections", pending)
        out.add(f"{PREFIX}pending_connections_peak", self.pending_peak)
        out.add(f"{PREFIX}ready", 1 if ready else 0)
        out.add(f"{PREFIX}tasks", _tasks())
        out.add(f"{PREFIX}open_fds", _fds())
        out.add(f"{PREFIX}connections_total", self.connections_total)
        out.add(f"{PREFIX}messages_in_total", self.messages_in)
        out.add(f"{PREFIX}messages_out_total", self.messages_out)
        out.add(f"{PREFIX}packets_in_total", self.packets_in)
        out.add(f"{PREFIX}packets_out_total", self.packets_out)
        out.add(f"{PREFIX}bytes_in_total", self.bytes_in)
        out.add(f"{PREFIX}bytes_out_total", self.bytes_out)
        out.add(f"{PREFIX}drops_total", self.drops)
        out.add(f"{PREFIX}skipped_undecodable_total", self.skipped_undecodable)
        out.add(f"{PREFIX}keyframe_requests_total", self.keyframe_requests)
        for what in ("slow_headers", "slow_request"):
            out.add(f"{PREFIX}header_timeouts_total", self.header_timeouts[what], reason=what)
        out.add(f"{PREFIX}idle_closed_total", self.idle_closed)
        out.add(f"{PREFIX}pending_refused_total", self.pending_refused)
        out.add(f"{PREFIX}pending_evicted_total", self.pending_evicted)
        out.add(f"{PREFIX}accept_errors_total", self.accept_errors)
        out.add(f"{PREFIX}log_suppressed_total", self.log_suppressed)
        counts = {cc.reason: 0 for cc in CloseCode} | dict(self.rejections)
        for reason in sorted(counts):
            out.add(f"{PREFIX}rejections_total", counts[reason], reason=reason)
        return out.render()


PREFIX = "posewire_server_"

#: Every exported family: name -> (type, help).
FAMILIES: dict[str, tuple[str, str]] = {
    f"{PREFIX}{name}": (kind, help_text)
    for name, kind, help_text in (
        ("rooms", "gauge", "Open rooms."),
        ("members", "gauge", "Joined members in all rooms."),
        ("connections", "gauge", "Open WebSocket connections."),
        ("pending_connections", "gauge", "Connections accepted and not yet upgraded."),
        ("pending_connections_peak", "gauge", "Most pending connections at once."),
        (
            "header_timeouts_total",
            "counter",
            "Connections closed for a request not complete or answered in time.",
        ),
        ("idle_closed_total", "counter", "Idle keep-alive connections closed."),
        ("pending_refused_total", "counter", "Connections closed at once at the pending cap."),
        ("pending_evicted_total", "counter", "Waiting connections closed to make room."),
        ("accept_errors_total", "counter", "accept() failures for lack of descriptors."),
        ("log_suppressed_total", "counter", "Log lines suppressed by the rate limit."),
        ("ready", "gauge", "1 when accepting members."),
        ("tasks", "gauge", "asyncio tasks in the server process."),
        ("open_fds", "gauge", "Open file descriptors of the server process."),
        ("connections_total", "counter", "WebSocket connections accepted."),
        ("messages_in_total", "counter", "Messages received from members."),
        ("messages_out_total", "counter", "Messages sent to members."),
        ("packets_in_total", "counter", "Pose packets accepted."),
        ("packets_out_total", "counter", "Pose packets relayed."),
        ("bytes_in_total", "counter", "Bytes received from members."),
        ("bytes_out_total", "counter", "Bytes sent to members."),
        ("drops_total", "counter", "Pose packets dropped for slow subscribers."),
        (
            "skipped_undecodable_total",
            "counter",
            "Packets withheld from a subscriber lacking their reference.",
        ),
        ("keyframe_requests_total", "counter", "Keyframe requests sent to publishers."),
        ("rejections_total", "counter", "Refused or closed connections by reason."),
    )
}


def _tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def _fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1
