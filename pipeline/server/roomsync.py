"""What a cluster node knows of one room's other nodes (:class:`RoomSync`), and the
backplane's message format (docs/scaling.md).

A message on a room's channels is ``kind | u8 len(origin) | origin | body``:
kind :data:`PACKET` (body: a flags byte, :data:`LOSSY` for a delta that may go
on a lossy channel, then the packet bytes unchanged; an audio packet too, but it is
never in a history list) or :data:`EVENT` (body:
JSON). The stream history lists in Redis hold the same packet messages.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.codec import peek_header
from pipeline.codec.audio import is_audio, parse_audio
from pipeline.errors import ProtocolError
from pipeline.server.rooms import Room
from pipeline.server.streams import StoredPacket, StreamState

PACKET: Final = b"P"
EVENT: Final = b"E"
LOSSY: Final = 0x01


@dataclass
class RoomSync:
    """What this node knows of one room's other nodes."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    members: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Members on other nodes: id -> (node, info)."""
    stream_nodes: dict[int, str] = field(default_factory=dict)
    announced: dict[int, int] = field(default_factory=dict)
    """Streams of this node's publishers announced in Redis -> packets sent."""
    packets: bool = False
    """Subscribed (or subscribing) to the room's packets: it has subscribers here."""
    pkt_subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    opening: bool = False
    buffer: list[tuple[str, bytes]] | None = None
    """Packets that arrived while the room is being synced (applied after)."""
    synced_once: bool = False

    def apply_packet(
        self, room: Room, origin: str, body: bytes, history: int
    ) -> StoredPacket | None:
        """A packet of node ``origin`` into the room's remote stream: the packet to relay,
        or None (late, duplicate, not a packet, or a stream published here now)."""
        data = body[1:]
        if is_audio(data):
            return self._apply_audio(room, origin, data, history)
        try:
            h = peek_header(data)
        except ProtocolError:
            return None
        sid = h.stream_id
        if sid in room.streams:
            return None  # a publisher of this node owns it now
        stream = room.remote.get(sid)
        if stream is None:
            stream = room.remote[sid] = StreamState[Any](sid, history)
        self.stream_nodes[sid] = origin
        if stream.unordered(h.seq, h.epoch, h.keyframe, time.monotonic()) is not None:
            return None
        pkt = StoredPacket(sid, h.seq, h.ref_seq, h.keyframe, data, h.epoch, time.monotonic_ns())
        pkt.early = stream.lacks(h.ref_seq)  # its reference is being repaired at the origin
        stream.add(pkt)
        pkt.lossy = bool(body[0] & LOSSY) and not h.keyframe
        return pkt

    def _apply_audio(
        self, room: Room, origin: str, data: bytes, history: int
    ) -> StoredPacket | None:
        """An audio packet of node ``origin``: relayed like a lossy delta, never stored
        (the origin checked it; a malformed one here is dropped)."""
        try:
            a = parse_audio(data)
        except ProtocolError:
            return None
        if a.stream_id in room.streams:
            return None
        stream = room.remote.get(a.stream_id)
        if stream is None:
            stream = room.remote[a.stream_id] = StreamState[Any](a.stream_id, history)
        self.stream_nodes[a.stream_id] = origin
        if a.seq <= stream.audio_last_seq:
            return None
        stream.audio_last_seq = a.seq
        t = time.monotonic_ns()
        return StoredPacket(a.stream_id, a.seq, None, False, data, 0, t, lossy=True, audio=True)

    def presence(self, room: Room, origin: str, obj: dict[str, Any]) -> bool:
        """A presence event of node ``origin``; False: stale (the member resumed on
        another node meanwhile), not to be passed on."""
        info = obj["member"]
        mid = str(info["id"])
        if obj.get("event") != "leave":
            self.members[mid] = (origin, info)
            return True
        if self.members.get(mid, (origin,))[0] != origin:
            return False
        self.members.pop(mid, None)
        for sid in info.get("streams", ()):
            if self.stream_nodes.get(sid) == origin:
                room.remote.pop(sid, None)
                self.stream_nodes.pop(sid, None)
        return True

    def hello(self, room: Room, origin: str, members: list[dict[str, Any]]) -> None:
        """Node ``origin`` (re)synced: its members joined, for those who missed them."""
        for info in members:
            mid = str(info["id"])
            if mid not in self.members and mid not in room.members:
                self.members[mid] = (origin, info)
                room.broadcast({"type": "presence", "event": "join", "member": info},
                               remote=True)  # fmt: skip

    def forget(self, room: Room, dead: str) -> tuple[list[str], list[int]]:
        """Node ``dead`` is gone: its members leave (presence), its streams end; returns
        their ids (to remove from Redis)."""
        members = [mid for mid, (node, _) in self.members.items() if node == dead]
        for mid in members:
            info = self.members.pop(mid)[1]
            room.broadcast({"type": "presence", "event": "leave", "member": info},
                           remote=True)  # fmt: skip
        streams = [sid for sid, node in self.stream_nodes.items() if node == dead]
        for sid in streams:
            del self.stream_nodes[sid]
            room.remote.pop(sid, None)
        return members, streams
