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
  never awaits a slow member. (The queue and writer: :mod:`pipeline.server.output`.)
* WebRTC members (``docs/webrtc.md``, :mod:`pipeline.server.rtc`): the same rules;
  on an open link deltas go on the lossy channel (dropped at its watermark rather
  than queued), everything else on the reliable one. A WebRTC subscriber that asks
  for a keyframe gets the stored one again (a *repair*, at most every 100 ms per
  stream) instead of the publisher being asked.
* Late join: per stream the server keeps the latest keyframe and up to
  ``server.history_packets - 1`` packets after it. A joining subscriber gets
  the member list and then, for every stream, a ``backfill`` message
  (:class:`~pipeline.wire.messages.Backfill`: stream id, count, first and last
  sequence number) followed by exactly that many packets, the keyframe and
  the packets of the history that chain from it, before any live packet. So
  a receiver tells stored history from live packets.
* A cluster (``server.redis``, :mod:`pipeline.server.backplane`): the manager's
  :class:`Cluster` hears of every accepted packet, presence event, keyframe
  request, kick and room; streams of publishers on other nodes are kept in
  :attr:`Room.remote` and relayed and backfilled like local ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from aiohttp import web

from pipeline.config import ServerConfig
from pipeline.errors import ConfigError
from pipeline.server.limits import RateLimiter
from pipeline.server.metrics import ServerMetrics
from pipeline.server.output import MemberOutput
from pipeline.server.store import RoomStore, open_store
from pipeline.server.streams import StoredPacket, StreamState
from pipeline.server.tokens import KickList
from pipeline.wire.close import CloseCode, close_code, refusal
from pipeline.wire.messages import dumps, error, valid_member_id, valid_room_name
from pipeline.wire.tokens import Claims, resolve_secret

log = logging.getLogger("posewire.server")

KEYFRAME_REQUEST_INTERVAL_S: Final = 0.1
BROADCASTS_PER_S: Final = 5.0
"""Broadcasts one member may send per second (a burst of :data:`BROADCAST_BURST`)."""
BROADCAST_BURST: Final = 10.0


def now_ns() -> int:
    return time.time_ns()


class Cluster(Protocol):
    """The other nodes of a cluster (:class:`pipeline.server.backplane.Backplane`)."""

    def room_opened(self, room: Room) -> None: ...

    def room_gone(self, room: Room, *, closed: bool) -> None: ...

    def broadcast(self, room: Room, obj: dict[str, Any]) -> None:
        """A presence event or a moderator broadcast of this node, for the other nodes."""

    def published(self, room: Room, pkt: StoredPacket) -> None:
        """A packet a member of this node published (once per packet and node)."""

    def keyframe_request(self, room: Room, stream_id: int) -> None: ...

    def kick(self, room: Room, member_id: str, by: str) -> bool:
        """Kick a member of another node; False: no such member."""

    def remote_members(self, room: Room) -> list[dict[str, Any]]: ...

    def subscribers_changed(self, room: Room) -> None: ...


class Member(MemberOutput):
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
        pair: bool = False,
    ) -> None:
        self.manager = manager
        self.pair = pair
        """Joined as one of a publisher's two hot-standby connections (Room.paired)."""
        self.room = room
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
        self.broadcasts = RateLimiter(BROADCASTS_PER_S, BROADCAST_BURST)
        self.limiter = limiter or RateLimiter(manager.config.max_messages_per_s)
        """Messages from this member, WebSocket and data channels together."""
        self.repaired: dict[int, float] = {}
        self.nacked: dict[tuple[int, int], float] = {}
        """(stream, seq) -> when it was last sent again at this member's request."""
        """Per stream: when a stored keyframe was last re-sent to this member (monotonic)."""
        super().__init__(
            manager.metrics,
            ws,
            transport,
            bound=manager.config.subscriber_queue,
            name=f"posewire-member-{member_id}",
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

    def _undecodable(self, stream_id: int) -> None:
        self.room.request_keyframe(stream_id)

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
        self.remote: dict[int, StreamState[Member]] = {}
        """Streams of publishers on other nodes (owner None), kept by the cluster."""
        self.closed = False
        self._cleanup: asyncio.TimerHandle | None = None
        self._history = manager.config.history_packets

    def member_infos(self) -> list[dict[str, Any]]:
        """Every member's info: this node's, then the other nodes' (a cluster)."""
        cluster = self.manager.cluster
        local = [m.info() for m in self.members.values()]
        return local + (cluster.remote_members(self) if cluster is not None else [])

    def info(self) -> dict[str, Any]:
        infos = self.member_infos()
        return {
            "name": self.name,
            "created_ns": self.created_ns,
            "created_by": self.created_by,
            "members": infos,
            "publishers": sorted(i["id"] for i in infos if i.get("streams")),
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
        if self.manager.cluster is not None:
            self.manager.cluster.subscribers_changed(self)

    def broadcast(
        self, obj: dict[str, Any], *, exclude: Member | None = None, remote: bool = False
    ) -> None:
        """To every member but ``exclude``, and to the other nodes unless ``remote`` (it
        came from one)."""
        text = dumps(obj)
        for m in tuple(self.members.values()):
            if m is not exclude:
                m.post_text(text)
        cluster = self.manager.cluster
        if cluster is not None and not remote:
            cluster.broadcast(self, obj)

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
        for sid, stream in self.remote.items():
            if sid not in self.streams:
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
        owner = stream.owner if stream is not None else None
        cluster = self.manager.cluster
        if owner is None:
            stream = self.remote.get(stream_id)
            if stream is None or cluster is None:
                return
        assert stream is not None
        t = time.monotonic()
        if t - stream.last_keyframe_request < KEYFRAME_REQUEST_INTERVAL_S:
            return
        stream.last_keyframe_request = t
        self.manager.metrics.keyframe_requests += 1
        if owner is not None:
            owner.post({"type": "keyframe_request", "stream_id": stream_id})
        elif cluster is not None:
            cluster.keyframe_request(self, stream_id)

    def paired(self, a: Member | None, b: Member) -> bool:
        """``a`` and ``b`` are the two live hot-standby connections of one publisher: both
        joined with ``pair``, same subject, both members of this room now. Such a pair
        publishes one stream: the partner of the owner sends into the owner's stream
        (duplicates of the other path are dropped as late) without taking it over, and
        nobody is closed (docs/room-protocol.md)."""
        return (
            a is not None
            and a is not b
            and a.pair
            and b.pair
            and a.claims.subject == b.claims.subject
            and self.members.get(a.id) is a
            and self.members.get(b.id) is b
        )

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
        self.remote.pop(stream_id, None)
        member.streams.add(stream_id)
        self.broadcast({"type": "presence", "event": "update", "member": member.info()})
        return stream

    async def relay(self, sender: Member | None, pkt: StoredPacket) -> None:
        """To every subscriber but ``sender`` (None: a packet from another node), and,
        for a packet of this node's, to the other nodes."""
        cluster = self.manager.cluster
        if cluster is not None and sender is not None:
            cluster.published(self, pkt)
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
        self.cluster: Cluster | None = None
        """The other nodes (``server.redis``), set by the app before it accepts members."""

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
        if self.cluster is not None:
            self.cluster.room_opened(room)
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
            if self.cluster is not None:
                self.cluster.room_gone(room, closed=False)
            log.info("room %s removed after %.1fs empty", name, self.config.empty_room_grace_s)

    async def close_room(self, name: str, *, remote: bool = False) -> bool:
        """Close a room: its members are disconnected (``room_closed``) and joins refused
        (``remote``: another node closed it, and already recorded it)."""
        room = self.rooms.pop(name, None)
        if room is None:
            return False
        room.closed = True
        room.cancel_cleanup()
        if not remote:
            self.store.close_room(name, now_ns())
        if self.cluster is not None:
            self.cluster.room_gone(room, closed=not remote)
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
            return self.cluster is not None and self.cluster.kick(room, member_id, by)
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
