"""A member's output: one bounded queue, one writer task, two sinks (WebSocket, WebRTC).

:class:`MemberOutput` is the base of :class:`pipeline.server.rooms.Member`; the
relay rules it applies (what a subscriber can decode, back-pressure, snapshots)
are described in :mod:`pipeline.server.rooms`.

The sink is chosen when an item is written, so whatever is queued when a link
opens or dies goes out on the path that works then. On an open WebRTC link
(``link``, set by :mod:`pipeline.server.rtc`): delta packets that decode on their
own (:attr:`StoredPacket.lossy <pipeline.server.streams.StoredPacket.lossy>`:
keyframe-anchored streams) on the lossy ``pose`` channel (dropped at its
watermark, counted ``rtc_dropped_stale``); keyframes, snapshot packets, deltas of
streams that predict from the previous packet (one loss would break their chain)
and control text on the reliable ``control`` channel.
Signaling (:class:`WsText`) always goes on the WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from pipeline.server.metrics import ServerMetrics
from pipeline.server.streams import Have, Snapshot, StoredPacket
from pipeline.wire.close import CloseCode
from pipeline.wire.messages import Backfill, dumps

if TYPE_CHECKING:  # aiortc is imported at the first offer, not at start-up
    from pipeline.rtc.link import PeerLink

MAX_CONTROL_BACKLOG: Final = 1024


class WsText(str):
    """A queued text message that goes on the WebSocket even while a link is open
    (signaling: ``rtc_answer``, ``rtc_state``)."""

    __slots__ = ()


class MemberOutput:
    """What is sent to one member, in order, over its WebSocket or its WebRTC link."""

    def __init__(
        self,
        metrics: ServerMetrics,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        *,
        bound: int,
        name: str,
    ) -> None:
        self.metrics = metrics
        self.ws = ws
        self.transport = transport
        self.closed = False
        self.sent = 0
        self.dropped = 0
        self.link: PeerLink | None = None
        """The open WebRTC link the output goes to (:mod:`pipeline.server.rtc`), or None."""
        self._queue: deque[StoredPacket | str | Snapshot] = deque()
        self._queued_packets = 0
        self._bound = bound
        self._busy = False
        self._wake = asyncio.Event()
        self._have: dict[int, Have] = {}
        self._high_water = 64 * 1024
        if transport is not None:
            self._high_water = max(transport.get_write_buffer_limits()[1], 4096)
        self._writer = asyncio.get_running_loop().create_task(self._writer_loop(), name=name)

    def abort(self, code: CloseCode, message: str) -> None:
        """Close the member from synchronous code (a control backlog too large)."""
        raise NotImplementedError

    def _undecodable(self, stream_id: int) -> None:
        """A packet of ``stream_id`` was withheld: its reference is missing here."""

    @property
    def on_link(self) -> bool:
        link = self.link
        return link is not None and link.is_open

    @property
    def transport_name(self) -> str:
        return "webrtc" if self.on_link else "websocket"

    def _writable(self, n: int) -> bool:
        if self.on_link:
            return True  # the lossy channel has its own watermark, control is reliable
        t = self.transport
        if t is None or t.is_closing():
            return False
        return t.get_write_buffer_size() + n + 16 < self._high_water

    def _admit(self, pkt: StoredPacket) -> bool:
        """Whether this member can decode ``pkt``; records it as received if so."""
        if pkt.audio:
            return True
        have = self._have.get(pkt.stream_id)
        if pkt.keyframe:
            if have is None:
                have = self._have[pkt.stream_id] = Have()
            have.reset(pkt.epoch)
            have.add(pkt.seq)
            return True
        if (
            have is not None
            and pkt.ref_seq is not None
            and pkt.epoch == have.epoch
            and (pkt.ref_seq in have.seqs or (pkt.early and pkt.ref_seq > have.newest))
        ):
            # (a packet that overtook its reference on the publisher leg: the reference
            # follows, and the subscriber holds the packet until then; docs/webrtc.md)
            have.add(pkt.seq)
            return True
        self.metrics.skipped_undecodable += 1
        self._undecodable(pkt.stream_id)
        return False

    def repair(self, pkt: StoredPacket) -> bool:
        """Send a stored packet again at a subscriber's request (its ``keyframe_request``
        named it as a missing reference), on the lossy channel: a copy there never waits
        behind the reliable channel's retransmission of the original. False when the
        member is not on an open link (the caller falls back to a keyframe repair)."""
        link = self.link
        if self.closed or link is None or not link.is_open:
            return False
        if not link.send_pose(pkt.data):
            self.metrics.rtc_dropped_stale += 1
            return True
        have = self._have.get(pkt.stream_id)
        if have is not None and have.epoch == pkt.epoch:
            have.add(pkt.seq)
        self._sent(pkt, "webrtc", False)
        return True

    def holds_keyframe(self, kf: StoredPacket) -> bool:
        """Whether keyframe ``kf`` was written to this member (on a reliable path)."""
        have = self._have.get(kf.stream_id)
        return have is not None and have.epoch == kf.epoch and kf.seq in have.seqs

    async def send_packet(self, pkt: StoredPacket) -> None:
        """Relay one packet: straight to the socket when it has room, else via the queue."""
        if self.closed:
            return
        if self._queue or self._busy or not self._writable(len(pkt.data)):
            self._post_packet(pkt)
            return
        if self._admit(pkt):
            await self._write_packet(pkt, live=True)

    def _post_packet(self, pkt: StoredPacket) -> None:
        self._queue.append(pkt)
        self._queued_packets += 1
        if self._queued_packets > self._bound:
            for i, item in enumerate(self._queue):
                if isinstance(item, StoredPacket):
                    del self._queue[i]
                    break
            self._queued_packets -= 1
            self.dropped += 1
            self.metrics.drops += 1
        self._wake.set()

    def post_text(self, text: str) -> None:
        """Queue one control message (never dropped; too large a backlog closes the member)."""
        if self.closed:
            return
        self._queue.append(text)
        if len(self._queue) - self._queued_packets > MAX_CONTROL_BACKLOG:  # snapshots: at most 1
            self.abort(CloseCode.TOO_SLOW, "control messages to this member backed up")
            return
        self._wake.set()

    def post(self, obj: dict[str, Any]) -> None:
        self.post_text(dumps(obj))

    def post_ws(self, obj: dict[str, Any]) -> None:
        """Queue a signaling message: always written on the WebSocket."""
        self.post_text(WsText(dumps(obj)))

    def post_snapshot(self, packets: list[StoredPacket]) -> None:
        """Queue a late-join snapshot: never dropped, outside the bound, chained by construction.

        Per stream, a ``backfill`` message announces the packets that follow it.
        """
        by_stream: dict[int, list[StoredPacket]] = {}
        for pkt in packets:
            by_stream.setdefault(pkt.stream_id, []).append(pkt)
        for sid, pkts in by_stream.items():
            self.post(Backfill(sid, len(pkts), pkts[0].seq, pkts[-1].seq).message())
            self._queue.append(Snapshot(pkts))
            self._wake.set()

    async def _write_packet(self, pkt: StoredPacket, *, live: bool) -> None:
        """Write one admitted packet on the current sink; ``live``: not from a snapshot
        (its relay latency is measured; snapshot packets go on the reliable channel)."""
        link = self.link
        if link is not None and link.is_open:
            data = pkt.data
            if not (live and pkt.lossy):  # keyframes, snapshots, chained deltas
                link.send_control(data)
            elif not link.send_pose(data):
                self.metrics.rtc_dropped_stale += 1
                if pkt.audio:
                    return
                have = self._have.get(pkt.stream_id)
                if have is not None:
                    have.discard(pkt.seq)
                return
            self._sent(pkt, "webrtc", live)
            return
        try:
            await self.ws.send_bytes(pkt.data)
        except ConnectionError:
            self.closed = True
            return
        self._sent(pkt, "websocket", live)

    def _sent(self, pkt: StoredPacket, transport: str, live: bool) -> None:
        self.sent += 1
        if pkt.audio:
            self.metrics.audio_packets_out += 1
        else:
            self.metrics.packets_out += 1
        self.metrics.count_out(transport, len(pkt.data))
        if live and pkt.t_recv_ns:
            self.metrics.latency[transport].add((time.monotonic_ns() - pkt.t_recv_ns) / 1e6)

    async def _write_text(self, text: str) -> None:
        link = self.link
        if link is not None and link.is_open and not isinstance(text, WsText):
            link.send_control(text)
            self.metrics.count_out("webrtc", len(text))
            return
        try:
            await self.ws.send_str(text)
        except ConnectionError:
            self.closed = True
            return
        self.metrics.count_out("websocket", len(text))

    async def _writer_loop(self) -> None:
        queue = self._queue
        while not self.closed:
            await self._wake.wait()
            self._wake.clear()
            self._busy = True
            try:
                while queue and not self.closed:
                    item = queue.popleft()
                    if isinstance(item, StoredPacket):
                        self._queued_packets -= 1
                        if self._admit(item):
                            await self._write_packet(item, live=True)
                    elif isinstance(item, Snapshot):
                        for pkt in item.packets:
                            if self.closed:
                                break
                            if self._admit(pkt):
                                await self._write_packet(pkt, live=False)
                    else:
                        await self._write_text(item)
            finally:
                self._busy = False

    async def stop_writer(self) -> None:
        self.closed = True
        self._wake.set()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
