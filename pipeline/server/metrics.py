"""Server counters and their Prometheus text exposition (``GET /metrics``)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from pipeline.model.prometheus import Exposition
from pipeline.model.stats import Window
from pipeline.wire.close import CloseCode

TRANSPORTS: tuple[str, ...] = ("websocket", "webrtc")
#: relay latency samples kept per transport (the percentiles' window)
LATENCY_WINDOW = 2048


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
    rtc_peers: int = 0
    """Open WebRTC links (both channels open), a gauge kept by :mod:`pipeline.server.rtc`."""
    rtc_offers: int = 0
    rtc_open: int = 0
    rtc_dead: int = 0
    """Links closed because nothing arrived for ``server.webrtc.dead_after_ms``."""
    rtc_dropped_stale: int = 0
    """Delta packets not sent on a pose channel holding more than the watermark."""
    audio_packets_in: int = 0
    """Audio packets accepted (relayed like lossy deltas, never stored)."""
    audio_packets_out: int = 0
    audio_bad_packets: int = 0
    """Malformed audio packets (the sender is closed, like for a malformed pose packet)."""
    audio_late_packets: int = 0
    """Audio packets dropped as late or duplicate (not after the stream's last one)."""
    late_packets: int = 0
    """Packets from a data channel dropped as late, duplicate or an old keyframe."""
    keyframe_repairs: int = 0
    """Stored keyframes re-sent to a WebRTC member that asked for one."""
    keyframe_repairs_skipped: int = 0
    """Keyframe requests of WebRTC members that were already sent the keyframe (reliably)."""
    nack_repairs: int = 0
    """Stored packets sent again to a WebRTC member that named them as missing (NACK)."""
    nacks_sent: int = 0
    """Packets asked again of WebRTC publishers (a delta that predicts from them came first)."""
    by_transport: dict[str, Counter[str]] = field(
        default_factory=lambda: {t: Counter() for t in TRANSPORTS}
    )
    """Per transport (``websocket``, ``webrtc``): messages_in/out, bytes_in/out."""
    latency: dict[str, Window] = field(
        default_factory=lambda: {t: Window(LATENCY_WINDOW) for t in TRANSPORTS}
    )
    """Relay latency per transport (ms): received -> handed to the subscriber's socket/channel."""

    def reject(self, reason: str) -> None:
        self.rejections[reason] += 1

    def count_in(self, transport: str, size: int) -> None:
        """One message received from a member over ``transport``."""
        self.messages_in += 1
        self.bytes_in += size
        c = self.by_transport[transport]
        c["messages_in"] += 1
        c["bytes_in"] += size

    def count_out(self, transport: str, size: int) -> None:
        """One message handed to a member's socket or channel."""
        self.messages_out += 1
        self.bytes_out += size
        c = self.by_transport[transport]
        c["messages_out"] += 1
        c["bytes_out"] += size

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
        out.add(f"{PREFIX}rtc_peers", self.rtc_peers)
        out.add(f"{PREFIX}rtc_offers_total", self.rtc_offers)
        out.add(f"{PREFIX}rtc_open_total", self.rtc_open)
        out.add(f"{PREFIX}rtc_dead_total", self.rtc_dead)
        out.add(f"{PREFIX}rtc_dropped_stale_total", self.rtc_dropped_stale)
        out.add(f"{PREFIX}late_packets_total", self.late_packets)
        out.add(f"{PREFIX}audio_packets_in_total", self.audio_packets_in)
        out.add(f"{PREFIX}audio_packets_out_total", self.audio_packets_out)
        out.add(f"{PREFIX}audio_bad_packets_total", self.audio_bad_packets)
        out.add(f"{PREFIX}audio_late_packets_total", self.audio_late_packets)
        out.add(f"{PREFIX}keyframe_repairs_total", self.keyframe_repairs)
        out.add(f"{PREFIX}keyframe_repairs_skipped_total", self.keyframe_repairs_skipped)
        out.add(f"{PREFIX}nack_repairs_total", self.nack_repairs)
        out.add(f"{PREFIX}nacks_sent_total", self.nacks_sent)
        for transport in TRANSPORTS:
            c = self.by_transport[transport]
            for what in ("messages_in", "messages_out", "bytes_in", "bytes_out"):
                out.add(f"{PREFIX}transport_{what}_total", c[what], transport=transport)
            window = self.latency[transport]
            summary = window.summary("p") if len(window) else {}
            for q, key in (("0.5", "p_p50"), ("0.95", "p_p95"), ("0.99", "p_p99")):
                out.add(
                    f"{PREFIX}relay_latency_ms", summary.get(key), transport=transport, quantile=q
                )
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
        ("rtc_peers", "gauge", "Open WebRTC links (both data channels open)."),
        ("rtc_offers_total", "counter", "WebRTC offers received."),
        ("rtc_open_total", "counter", "WebRTC links that opened."),
        ("rtc_dead_total", "counter", "WebRTC links closed as dead (heartbeat silence)."),
        (
            "rtc_dropped_stale_total",
            "counter",
            "Delta packets dropped at the pose channel's watermark.",
        ),
        (
            "late_packets_total",
            "counter",
            "Data-channel packets dropped as late, duplicate or an old keyframe.",
        ),
        ("audio_packets_in_total", "counter", "Audio packets accepted."),
        ("audio_packets_out_total", "counter", "Audio packets relayed."),
        ("audio_bad_packets_total", "counter", "Malformed audio packets (sender closed)."),
        ("audio_late_packets_total", "counter", "Audio packets dropped as late or duplicate."),
        ("keyframe_repairs_total", "counter", "Stored keyframes re-sent to WebRTC members."),
        (
            "keyframe_repairs_skipped_total",
            "counter",
            "Keyframe requests of WebRTC members already sent the keyframe on control.",
        ),
        ("nack_repairs_total", "counter", "Stored packets re-sent to WebRTC members (NACK)."),
        ("nacks_sent_total", "counter", "Packets asked again of WebRTC publishers (NACK)."),
        ("transport_messages_in_total", "counter", "Messages received, per transport."),
        ("transport_messages_out_total", "counter", "Messages sent, per transport."),
        ("transport_bytes_in_total", "counter", "Bytes received, per transport."),
        ("transport_bytes_out_total", "counter", "Bytes sent, per transport."),
        (
            "relay_latency_ms",
            "gauge",
            "Relay latency (received -> handed to the subscriber's socket or channel), "
            "percentiles over the last packets, per transport.",
        ),
    )
}


CLUSTER: Final = "posewire_server_cluster_"

#: The cluster families (``server.redis``): name -> (type, help).
CLUSTER_FAMILIES: dict[str, tuple[str, str]] = {
    f"{CLUSTER}{name}": (kind, text)
    for name, kind, text in (
        ("redis_up", "gauge", "1 while this node is connected to Redis."),
        ("packets_out_total", "counter", "Packets of this node's publishers sent to Redis."),
        ("packets_in_total", "counter", "Packets of other nodes received from Redis."),
        ("packets_dropped_total", "counter", "Packets not sent to Redis (it was away)."),
        ("resyncs_total", "counter", "Rooms synced again after a lost subscription."),
        ("reconnects_total", "counter", "Connections to Redis lost and made again."),
        ("pubsub_cuts_total", "counter", "Subscriptions cut while Redis answered (buffer limit)."),
        ("dead_nodes_total", "counter", "Nodes found dead (heartbeat expired)."),
        ("bad_messages_total", "counter", "Malformed messages on a room channel, skipped."),
        ("queued_writes", "gauge", "Store writes waiting for Redis."),
        ("send_buffer_bytes", "gauge", "Packet/event bytes waiting for the socket to Redis."),
        ("redis_rtt_ms", "gauge", "Redis round trip (heartbeat SET), percentiles."),
    )
}


@dataclass
class ClusterMetrics:
    """Counters of one cluster node's Redis backplane (:mod:`pipeline.server.backplane`)."""

    packets_out: int = 0
    packets_in: int = 0
    dropped: int = 0
    resyncs: int = 0
    reconnects: int = 0
    pubsub_cuts: int = 0
    dead_nodes: int = 0
    bad_messages: int = 0
    rtt_ms: Window = field(default_factory=lambda: Window(256))

    def render(self, *, node: str, connected: bool, queued: int, buffered: int) -> str:
        out = Exposition(CLUSTER_FAMILIES)
        out.add(f"{CLUSTER}redis_up", 1 if connected else 0, node=node)
        out.add(f"{CLUSTER}packets_out_total", self.packets_out)
        out.add(f"{CLUSTER}packets_in_total", self.packets_in)
        out.add(f"{CLUSTER}packets_dropped_total", self.dropped)
        out.add(f"{CLUSTER}resyncs_total", self.resyncs)
        out.add(f"{CLUSTER}reconnects_total", self.reconnects)
        out.add(f"{CLUSTER}pubsub_cuts_total", self.pubsub_cuts)
        out.add(f"{CLUSTER}dead_nodes_total", self.dead_nodes)
        out.add(f"{CLUSTER}bad_messages_total", self.bad_messages)
        out.add(f"{CLUSTER}queued_writes", queued)
        out.add(f"{CLUSTER}send_buffer_bytes", buffered)
        summary = self.rtt_ms.summary("p") if len(self.rtt_ms) else {}
        for q, key in (("0.5", "p_p50"), ("0.99", "p_p99")):
            out.add(f"{CLUSTER}redis_rtt_ms", summary.get(key), quantile=q)
        return out.render()


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
