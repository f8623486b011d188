"""Rooms, members, publisher streams and the relay (the SFU for pose packets).

Relay rules
-----------
* A member publishes on one or more *stream ids* (the ``stream_id`` of the
  packet header). A stream id is bound to the token subject that first
  publishes on it until that token expires (kept in the server's store,
  :mod:`pipeline.server.store`: it outlives the connection and a restart); a
  packet on a stream id held by or bound to another subject closes the sender
  (``stream_spoof``); a newer connection of the bound subject takes the id
  over (:meth:`Room.claim`). Member ids are bound the same way: only their
  subject resumes them (:meth:`RoomManager.new_member_id`). Sequence numbers
  only go forward (:mod:`pipeline.server.streams`: ``stale_packet``).
* The server acknowledges every packet it accepts (``{"type": "ack"}`` to the
  publisher): over WebSocket every subscriber receives every accepted packet in
  order, unless the server drops it for a slow subscriber, and it then knows
  exactly what that subscriber lacks. So the encoder may predict from any
  acknowledged frame.
* Per subscriber and stream the server tracks which sequence numbers it has
  written since the last keyframe. A packet whose reference the subscriber
  lacks (after a drop, or right after a join) is withheld (it could not be
  decoded anyway) and the publisher is asked for a keyframe (at most every
  ``KEYFRAME_REQUEST_INTERVAL_S`` per stream). A subscriber therefore never
  receives a packet it cannot decode, and its decoder never sees a wrong
  reference.
* Back-pressure: a packet goes straight to the subscriber's socket when that
  socket's write buffer has room; otherwise it waits in a bounded per-member
  queue from which the *oldest pose packet* is dropped (and counted) when full.
  Control messages in the queue are never dropped; a member whose control
  backlog exceeds ``MAX_CONTROL_BACKLOG`` is closed (``too_slow``). The relay
  never awaits a slow member.
* Late join: per stream the server keeps the latest keyframe and up to
  ``server.history_packets - 1`` packets after it. A joining subscriber gets
  the member list and then, for every stream, a ``backfill`` message
  (:class:`~pipeline.wire.messages.Backfill`: stream id, count, first and last
  sequence number) followed by exactly that many packets, the keyframe and
  the packets of the history that chain from it, before any live packet. So
  a receiver tells stored history from live packets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from pipeline.config import ServerConfig
from pipeline.errors import ConfigError
from pipeline.server.limits import RateLimiter
from pipeline.server.metrics import ServerMetrics
from pipeline.server.store import RoomStore, open_store
from pipeline.server.streams import Have, Snapshot, StoredPacket, StreamState
from pipeline.server.tokens import KickList
from pipeline.wire.close import CloseCode, close_code, refusal
from pipeline.wire.messages import Backfill, dumps, error, valid_member_id, valid_room_name
from pipeline.wire.tokens import Claims, resolve_secret

if TYPE_CHECKING:  # aiortc is imported at the first offer, not at start-up
    from pipeline.rtc.link import PeerLink

log = logging.getLogger("posewire.server")

MAX_CONTROL_BACKLOG: Final = 1024
KEYFRAME_REQUEST_INTERVAL_S: Final = 0.1
BROADCASTS_PER_S: Final = 5.0
"""Broadcasts one member may send per second (a burst of :data:`BROADCAST_BURST`)."""
BROADCAST_BURST: Final = 10.0


def now_ns() -> int:
    return time.time_ns()


class WsText(str):
    """A queued text message that goes on the WebSocket even while a link is open
    (signaling: ``rtc_answer``, ``rtc_state``)."""

    __slots__ = ()


class Member:
    """One joined WebSocket connection (and its WebRTC link, when one is open)."""

    def __init__(
        self,
        manager: RoomManager,
        room: Room,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        claims: Claims,
        *,
        member_id: str,
        publish: bool,
        subscribe: bool,
        name: str | None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = manager.metrics
        self.room = room
        self.ws = ws
        self.transport = transport
        self.claims = claims
        self.id = member_id
        self.publish = publish
        self.subscribe = subscribe
        self.name = name
        self.streams: set[int] = set()
        self.clock_offset_ns: int | None = None
        self.joined_ns = now_ns()
        self.serial = next(manager.serials)
        """Join order: a newer connection of a subject takes its streams over."""
        self.closed = False
        self.sent = 0
        self.dropped = 0
        self._queue: deque[StoredPacket | str | Snapshot] = deque()
        self._queued_packets = 0
        self._bound = manager.config.subscriber_queue
        self._busy = False
        self._wake = asyncio.Event()
        self._have: dict[int, Have] = {}
        self.broadcasts = RateLimiter(BROADCASTS_PER_S, BROADCAST_BURST)
        self.limiter = limiter or RateLimiter(manager.config.max_messages_per_s)
        """Messages from this member, WebSocket and data channels together."""
        self.link: PeerLink | None = None
        """The open WebRTC link the output goes to (:mod:`pipeline.server.rtc`), or None."""
        self.repaired: dict[int, float] = {}
        """Per stream: when a stored keyframe was last re-sent to this member (monotonic)."""
        self._high_water = 64 * 1024
        if transport is not None:
            self._high_water = max(transport.get_write_buffer_limits()[1], 4096)
        self._writer = asyncio.get_running_loop().create_task(
            self._writer_loop(), name=f"posewire-member-{member_id}"
        )

    # ------------------------------------------------------------------ info

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.claims.subject,
            "role": self.claims.role,
            "name": self.name,
            "publish": self.publish,
            "subscribe": self.subscribe,
            "streams": sorted(self.streams),
            "clock_offset_ns": self.clock_offset_ns,
            "joined_ns": self.joined_ns,
            "packets_sent": self.sent,
            "packets_dropped": self.dropped,
        }

    # ------------------------------------------------------------------ output
    #
    # One queue and one writer, two sinks: the WebSocket, or the member's open
    # WebRTC link (``self.link``, set by :mod:`pipeline.server.rtc`). The sink is
    # chosen when an item is written, so whatever is queued when a link opens or
    # dies goes out on the path that works then. On the link: delta packets on
    # the lossy ``pose`` channel (dropped at its watermark), keyframes, snapshot
    # packets and control text on the reliable ``control`` channel. Signaling
    # (:class:`WsText`) always goes on the WebSocket.

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
            and pkt.ref_seq in have.seqs
            and pkt.epoch == have.epoch
        ):
            have.add(pkt.seq)
            return True
        self.metrics.skipped_undecodable += 1
        self.room.request_keyframe(pkt.stream_id)
        return False

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
            if pkt.keyframe or not live:
                link.send_control(data)
            elif not link.send_pose(data):
                self.metrics.rtc_dropped_stale += 1
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

    # ------------------------------------------------------------------ closing

    async def close(self, code: int, message: str = "") -> None:
        """Send an error message for 4xxx codes, then close the socket with ``code``."""
        if self.ws.closed:
            self.closed = True
            return
        self.closed = True
        await close_ws(self.ws, code, message)

    def abort(self, code: CloseCode, message: str) -> None:
        """Close from synchronous code (limits, kicks): counted as a rejection."""
        if self.closed:
            return
        self.metrics.reject(code.reason)
        self.manager.spawn(self.close(code, message))

    async def stop_writer(self) -> None:
        self.closed = True
        self._wake.set()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer


async def close_ws(ws: web.WebSocketResponse, code: int, message: str = "") -> None:
    """Close ``ws`` with ``code``; for 4000-4999 first send ``{"type": "error", ...}``."""
    if ws.closed:
        return
    cc = close_code(code)
    reason = cc.reason if cc is not None else ""
    try:
        if cc is not None:
            await ws.send_str(dumps(error(cc, reason, message)))
        await ws.close(code=code, message=reason.encode())
    except ConnectionError:
        pass


class Room:
    """Members and publisher streams of one room."""

    def __init__(self, manager: RoomManager, name: str, *, created_by: str | None) -> None:
        self.manager = manager
        self.name = name
        self.created_ns = now_ns()
        self.created_by = created_by
        self.members: dict[str, Member] = {}
        self.streams: dict[int, StreamState[Member]] = {}
        self.subscribers: tuple[Member, ...] = ()
        self.closed = False
        self._cleanup: asyncio.TimerHandle | None = None
        self._history = manager.config.history_packets

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_ns": self.created_ns,
            "created_by": self.created_by,
            "members": [m.info() for m in self.members.values()],
            "publishers": sorted(m.id for m in self.members.values() if m.streams),
            "streams": {
                str(s.stream_id): {
                    "owner": s.owner.id if s.owner is not None else None,
                    "packets": s.packets,
                    "history": len(s.snapshot()),
                }
                for s in self.streams.values()
            },
        }

    def _refresh(self) -> None:
        self.subscribers = tuple(m for m in self.members.values() if m.subscribe)

    def broadcast(self, obj: dict[str, Any], *, exclude: Member | None = None) -> None:
        text = dumps(obj)
        for m in tuple(self.members.values()):
            if m is not exclude:
                m.post_text(text)

    def add(self, member: Member) -> None:
        if self._cleanup is not None:
            self._cleanup.cancel()
            self._cleanup = None
        self.broadcast({"type": "presence", "event": "join", "member": member.info()})
        self.members[member.id] = member
        self._refresh()

    def snapshot_for(self, member: Member) -> list[StoredPacket]:
        out: list[StoredPacket] = []
        for stream in self.streams.values():
            if stream.owner is not None and stream.owner is not member:
                out.extend(stream.snapshot())
        return out

    def remove(self, member: Member) -> None:
        if self.members.get(member.id) is not member:
            return
        del self.members[member.id]
        for sid in member.streams:
            stream = self.streams.get(sid)
            if stream is not None and stream.owner is member:
                del self.streams[sid]
        self._refresh()
        self.broadcast({"type": "presence", "event": "leave", "member": member.info()})
        if not self.members and not self.closed:
            self.schedule_cleanup()

    def schedule_cleanup(self) -> None:
        if self._cleanup is not None:
            self._cleanup.cancel()
        loop = asyncio.get_running_loop()
        self._cleanup = loop.call_later(
            self.manager.config.empty_room_grace_s, self.manager.cleanup_if_empty, self.name
        )

    def cancel_cleanup(self) -> None:
        if self._cleanup is not None:
            self._cleanup.cancel()
            self._cleanup = None

    def request_keyframe(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.owner is None:
            return
        t = time.monotonic()
        if t - stream.last_keyframe_request < KEYFRAME_REQUEST_INTERVAL_S:
            return
        stream.last_keyframe_request = t
        self.manager.metrics.keyframe_requests += 1
        stream.owner.post({"type": "keyframe_request", "stream_id": stream_id})

    def claim(self, member: Member, stream_id: int) -> StreamState[Member]:
        """Give ``stream_id`` to ``member``, or refuse (``stream_spoof``).

        The stream id is bound to the member's subject (in the store, until its
        token expires): while the binding lives no other subject gets it, also
        after the owner left or the server restarted. The bound subject always
        wins: a newer connection of it takes the stream from whoever holds it
        (an older connection of the same subject, e.g. one not yet known to be
        dead; never the other way round), and that holder is closed with
        ``stream_spoof``.
        """
        subject = member.claims.subject
        key = f"stream:{stream_id}"
        bound = self.manager.store.bound_subject(self.name, key, time.time())
        if bound is not None and bound != subject:
            raise refusal(
                CloseCode.STREAM_SPOOF,
                f"stream {stream_id} belongs to another subject in room {self.name!r}",
            )
        old = self.streams.get(stream_id)
        holder = old.owner if old is not None else None
        if holder is not None and holder is not member:
            same = holder.claims.subject == subject
            if not ((same and member.serial > holder.serial) or (bound == subject and not same)):
                raise refusal(
                    CloseCode.STREAM_SPOOF,
                    f"stream {stream_id} belongs to another member of the room",
                )
            holder.streams.discard(stream_id)
            holder.abort(
                CloseCode.STREAM_SPOOF,
                f"stream {stream_id} was taken over by a newer connection of {subject!r}",
            )
        self.manager.store.bind(self.name, key, subject, member.claims.exp)
        stream = StreamState[Member](stream_id, self._history)
        stream.owner = member
        self.streams[stream_id] = stream
        member.streams.add(stream_id)
        self.broadcast({"type": "presence", "event": "update", "member": member.info()})
        return stream

    async def relay(self, sender: Member, pkt: StoredPacket) -> None:
        for m in self.subscribers:
            if m is not sender:
                await m.send_packet(pkt)


class RoomManager:
    """Every room of one server, the kick list and the limits on rooms and members.

    What must survive a restart (kicks, closed rooms, stream-id and member-id
    bindings) is in ``store`` (:mod:`pipeline.server.store`); without one given,
    the manager opens the server's store from ``config`` (``server.data_dir``;
    in memory when the token secret is random) and attaches ``kicks`` to it.
    """

    def __init__(
        self,
        config: ServerConfig,
        metrics: ServerMetrics,
        kicks: KickList,
        store: RoomStore | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.kicks = kicks
        if store is None:
            try:
                secret = resolve_secret(config)
            except ConfigError:  # no secret: a dev server's random one dies with it
                store = open_store(config, "", persistent=False)
            else:
                store = open_store(config, secret)
        self.store = store
        kicks.attach(store)
        self.rooms: dict[str, Room] = {}
        self.serials = itertools.count()
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_change: Callable[[], None] | None = None

    @property
    def members(self) -> int:
        return sum(len(r.members) for r in self.rooms.values())

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def create(self, name: str, *, created_by: str | None = None) -> Room:
        """Create a room (API): a closed room is open again."""
        if not valid_room_name(name):
            raise refusal(CloseCode.ROOM_NOT_FOUND, f"invalid room name {name!r}")
        room = self.rooms.get(name)
        if room is not None:
            return room
        if len(self.rooms) >= self.config.max_rooms:
            raise refusal(
                CloseCode.TOO_MANY_ROOMS, f"server has {len(self.rooms)} rooms, the maximum"
            )
        self.store.reopen_room(name)
        room = Room(self, name, created_by=created_by)
        self.rooms[name] = room
        room.schedule_cleanup()
        log.info("room %s created", name)
        return room

    def room_for_join(self, name: str) -> Room:
        if not valid_room_name(name):
            raise refusal(
                CloseCode.MALFORMED_MESSAGE,
                f"invalid room name {name!r}: 1-64 of letters, digits, '_', '.', '-'",
            )
        if self.store.is_closed(name):
            raise refusal(CloseCode.ROOM_CLOSED, f"room {name!r} was closed by a moderator")
        room = self.rooms.get(name)
        if room is None:
            if not self.config.auto_create_rooms:
                raise refusal(CloseCode.ROOM_NOT_FOUND, f"no room {name!r} on this server")
            room = self.create(name)
        if len(room.members) >= self.config.max_members_per_room:
            raise refusal(
                CloseCode.ROOM_FULL, f"room {name!r} has {len(room.members)} members, the maximum"
            )
        return room

    def new_member_id(self, room: Room, resume: str | None, claims: Claims) -> tuple[str, bool]:
        """The member id of a joining member, and whether it resumes ``resume``.

        Every member id is bound to its subject (store, until the token
        expires): only the same subject resumes it, also after a restart.
        """
        now = time.time()
        subject = claims.subject
        if (
            resume is not None
            and valid_member_id(resume)
            and resume not in room.members
            and self.store.bound_subject(room.name, f"member:{resume}", now) == subject
        ):
            mid, resumed = resume, True
        else:
            while True:
                mid = "m" + secrets.token_hex(5)
                if mid not in room.members and (
                    self.store.bound_subject(room.name, f"member:{mid}", now) is None
                ):
                    break
            resumed = False
        self.store.bind(room.name, f"member:{mid}", subject, claims.exp)
        return mid, resumed

    def cleanup_if_empty(self, name: str) -> None:
        room = self.rooms.get(name)
        if room is not None and not room.members:
            del self.rooms[name]
            log.info("room %s removed after %.1fs empty", name, self.config.empty_room_grace_s)

    async def close_room(self, name: str) -> bool:
        """Close a room: its members are disconnected (``room_closed``) and joins refused."""
        room = self.rooms.pop(name, None)
        if room is None:
            return False
        room.closed = True
        room.cancel_cleanup()
        self.store.close_room(name, now_ns())
        members = list(room.members.values())
        for _m in members:
            self.metrics.reject(CloseCode.ROOM_CLOSED.reason)
        await asyncio.gather(
            *(m.close(CloseCode.ROOM_CLOSED, f"room {name!r} was closed") for m in members)
        )
        log.info("room %s closed (%d members disconnected)", name, len(members))
        return True

    def kick(self, room: Room, member_id: str, by: str) -> bool:
        target = room.members.get(member_id)
        if target is None:
            return False
        self.kicks.kick(target.claims, room.name)
        target.abort(CloseCode.KICKED, f"kicked from room {room.name!r} by {by}")
        log.info(
            "member %s (%s) kicked from %s by %s", member_id, target.claims.subject, room.name, by
        )
        return True

    async def shutdown(self) -> None:
        members = [m for r in self.rooms.values() for m in r.members.values()]
        await asyncio.gather(
            *(close_ws(m.ws, 1001, "server shutting down") for m in members),
            return_exceptions=True,
        )
        for room in self.rooms.values():
            room.cancel_cleanup()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.close()
