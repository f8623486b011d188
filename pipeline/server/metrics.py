"""Server counters and their Prometheus text exposition (``GET /metrics``)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field


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
    """Refused or closed connections by reason (see :mod:`pipeline.server.limits`)."""

    def reject(self, reason: str) -> None:
        self.rejections[reason] += 1

    def render(self, *, rooms: int, members: int, connections: int, ready: bool) -> str:
        """Prometheus text format 0.0.4 (plus the process's asyncio tasks and open fds)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, value: int) -> None:
            full = f"posewire_server_{name}"
            out.append(f"# HELP {full} {help_}")
            out.append(f"# TYPE {full} {kind}")
            out.append(f"{full} {value}")

        metric("rooms", "gauge", "Open rooms.", rooms)
        metric("members", "gauge", "Joined members in all rooms.", members)
        metric("connections", "gauge", "Open WebSocket connections.", connections)
        metric("ready", "gauge", "1 when accepting members.", 1 if ready else 0)
        metric("tasks", "gauge", "asyncio tasks in the server process.", _tasks())
        metric("open_fds", "gauge", "Open file descriptors of the server process.", _fds())
        metric(
            "connections_total",
            "counter",
            "WebSocket connections accepted.",
            self.connections_total,
        )
        metric("messages_in_total", "counter", "Messages received from members.", self.messages_in)
        metric("messages_out_total", "counter", "Messages sent to members.", self.messages_out)
        metric("packets_in_total", "counter", "Pose packets accepted.", self.packets_in)
        metric("packets_out_total", "counter", "Pose packets relayed.", self.packets_out)
        metric("bytes_in_total", "counter", "Bytes received from members.", self.bytes_in)
        metric("bytes_out_total", "counter", "Bytes sent to members.", self.bytes_out)
        metric("drops_total", "counter", "Pose packets dropped for slow subscribers.", self.drops)
        metric(
            "skipped_undecodable_total",
            "counter",
            "Packets withheld from a subscriber lacking their reference.",
            self.skipped_undecodable,
        )
        metric(
            "keyframe_requests_total",
            "counter",
            "Keyframe requests sent to publishers.",
            self.keyframe_requests,
        )
        name = "posewire_server_rejections_total"
        out.append(f"# HELP {name} Refused or closed connections by reason.")
        out.append(f"# TYPE {name} counter")
        for reason in sorted(self.rejections):
            out.append(f'{name}{{reason="{reason}"}} {self.rejections[reason]}')
        return "\n".join(out) + "\n"


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
