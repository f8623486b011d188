"""Room-server nodes sharing rooms through Redis (``server.redis``; docs/scaling.md).

Imported only when ``server.redis`` is configured. :class:`Backplane` is the
room manager's :class:`~pipeline.server.rooms.Cluster`: a packet a member of
this node published goes to Redis once (``PUBLISH`` on ``P:pkt:<room>``:
``b"P"``, origin node, flags byte, the packet bytes unchanged) and into the
stream's history list; every node with subscribers in the room is subscribed,
relays it to them (WebSocket and WebRTC alike) and keeps the stream in
:attr:`Room.remote <pipeline.server.rooms.Room.remote>`. Presence, moderator
broadcasts, keyframe requests, kicks and closes cross as events (``b"E"`` +
JSON on ``P:room:<room>``). One task keeps the connection: on a loss it
reconnects, loads the store, subscribes again (redis-py's PubSub does not:
redis-py#2089) and resyncs every room (members, streams, history re-sent to
local subscribers). Local relaying never waits for Redis. Key layout and
failure behaviour: docs/scaling.md; the wire format: :mod:`.roomsync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from pipeline.config import RedisConfig
from pipeline.server.metrics import ClusterMetrics
from pipeline.server.redisstore import Command, RedisStore
from pipeline.server.resp import Subscriber, Writer, encode
from pipeline.server.rooms import Room, RoomManager
from pipeline.server.roomsync import EVENT, LOSSY, PACKET, RoomSync
from pipeline.server.streams import StoredPacket

log = logging.getLogger("posewire.server")

RETRY_S: Final = 0.1
"""Pause between two connection attempts."""
SYNC_WAIT_S: Final = 1.0
"""A join waits at most this long for its room's first sync (Redis away: it goes on)."""
HISTORY_TTL_MS: Final = 300_000
TRIM_EVERY: Final = 8
MAX_DURABLE: Final = 100_000
BATCH: Final = 512


class Backplane:
    """This node's link to the others (see the module docstring)."""

    def __init__(self, cfg: RedisConfig, manager: RoomManager, store: RedisStore) -> None:
        self.cfg = cfg
        self.node = f"{cfg.node_id}.{secrets.token_hex(3)}"
        """This process's id in Redis: the node id and an incarnation, so that the members
        of a killed process are not taken for alive when its node id starts again."""
        self.p = cfg.key_prefix
        self.manager = manager
        self.store = store
        self.history = manager.config.history_packets
        self.metrics = ClusterMetrics()
        self.connected = False
        self.loaded = False
        self.rooms: dict[str, RoomSync] = {}
        self._origin = bytes([len(self.node)]) + self.node.encode()
        self._durable: deque[Command] = deque()
        self._wake = asyncio.Event()
        self._durable_in = self._durable_out = 0
        self._progress = asyncio.Event()
        self._redis: aioredis.Redis | None = None
        self._sub: Subscriber | None = None
        self._wr: Writer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[None]] = set()
        store.sink = self._durable_cmds
        manager.cluster = self

    # ------------------------------------------------------------------ keys

    def _ch(self, room: str) -> str:
        return f"{self.p}:room:{room}"

    def _pkt(self, room: str) -> str:
        return f"{self.p}:pkt:{room}"

    def _key(self, kind: str, room: str) -> str:
        return f"{self.p}:{kind}:{room}"

    def _hist(self, room: str, sid: int) -> str:
        return f"{self.p}:hist:{room}:{sid}"

    def _node_key(self, node: str) -> str:
        return f"{self.p}:node:{node}"

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="posewire-redis"),
            loop.create_task(self._writer(), name="posewire-redis-writer"),
            loop.create_task(self._heartbeat(), name="posewire-redis-heartbeat"),
        ]

    async def stop(self) -> None:
        """Flush what is queued (briefly), remove this node's heartbeat, disconnect."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                while self.connected and self._durable:
                    await asyncio.sleep(0.01)
        r = self._redis
        if r is not None and self.connected:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(0.5):
                    await r.delete(self._node_key(self.node))
        for task in [*self._tasks, *self._spawned]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._spawned, return_exceptions=True)
        await self._disconnect()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    def _client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.cfg.url,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    async def _disconnect(self) -> None:
        sub, wr, r = self._sub, self._wr, self._redis
        self._sub, self._wr, self._redis = None, None, None
        for conn in (sub, wr):
            if conn is not None:
                conn.close()
        if r is not None:
            with contextlib.suppress(RedisError, OSError):
                await r.aclose()

    async def _run(self) -> None:
        first = True
        while True:
            listener: asyncio.Task[None] | None = None
            try:
                r = self._client()
                self._redis = r
                await r.ping()
                sub = self._sub = await Subscriber.connect(self.cfg.url)
                sub.subscribe(self.store.channel)
                self._wr = await Writer.connect(self.cfg.url)
                await self.store.load(r)
                self.connected = self.loaded = True  # before the heartbeat others wait for
                await r.set(self._node_key(self.node), b"1", px=int(self.cfg.node_ttl_s * 1000))
                if not first:
                    log.info("redis: connected again, resubscribing %d rooms", len(self.rooms))
                first = False
                self._wake.set()
                listener = asyncio.get_running_loop().create_task(self._listen(sub))
                for name, sync in self.rooms.items():
                    sync.subscribed.clear()
                    sync.pkt_subscribed.clear()
                    self._spawn(self._open_room(name, again=True))
                await listener
            except (RedisError, OSError, TimeoutError) as exc:
                if self.connected:
                    log.warning("redis: connection lost (%s)", exc)
                    if await self._still_answers():
                        self.metrics.pubsub_cuts += 1
                        log.warning("redis: the subscription was cut (output-buffer limit?)")
            finally:
                was = self.connected
                self.connected = False
                if listener is not None:
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                        await listener
                await self._disconnect()
                if was:
                    self.metrics.reconnects += 1
            await asyncio.sleep(RETRY_S)

    async def _still_answers(self) -> bool:
        r = self._redis
        if r is None:
            return False
        try:
            async with asyncio.timeout(0.3):
                await r.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        return True

    # ------------------------------------------------------------------ writes

    def _durable_cmds(self, cmds: list[Command]) -> None:
        """Store writes: kept until Redis took them (also across an outage)."""
        if len(self._durable) + len(cmds) > MAX_DURABLE:
            log.warning("redis: %d store writes queued, dropping the oldest", MAX_DURABLE)
            for _ in cmds:
                self._durable.popleft()
        self._durable.extend(cmds)
        self._durable_in += len(cmds)
        self._wake.set()

    def _send(self, *cmds: Command) -> bool:
        """Volatile commands (packets, events, presence), written at once (no task switch,
        no reply: ``CLIENT REPLY OFF``); dropped while Redis is away or too far behind."""
        wr = self._wr
        if not self.connected or wr is None:
            return False
        return wr.write(b"".join([encode(*cmd) for cmd in cmds]))

    async def _writer(self) -> None:
        """Store writes: acknowledged (redis-py), kept until Redis took them."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.connected and self._durable and (r := self._redis) is not None:
                durable = [self._durable.popleft() for _ in range(min(BATCH, len(self._durable)))]
                pipe = r.pipeline(transaction=False)
                for cmd in durable:
                    pipe.execute_command(*cmd)
                try:
                    await pipe.execute(raise_on_error=False)
                except (RedisError, OSError):
                    self._durable.extendleft(reversed(durable))
                    break
                self._durable_out += len(durable)
                self._progress.set()

    async def flushed(self, limit_s: float = 1.0) -> bool:
        """Wait until Redis took every store write queued so far (at most ``limit_s``)."""
        target = self._durable_in
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                while self._durable_out < target:
                    self._progress.clear()
                    await self._progress.wait()
        return self._durable_out >= target

    def _event(self, room: Room, obj: dict[str, Any]) -> None:
        msg = EVENT + self._origin + json.dumps(obj).encode()
        self._send(("PUBLISH", self._ch(room.name), msg))

    # ------------------------------------------------------------------ Cluster (rooms.py)

    def room_opened(self, room: Room) -> None:
        if room.name in self.rooms:
            return
        self.rooms[room.name] = RoomSync()
        info = json.dumps({"created_ns": room.created_ns, "created_by": room.created_by})
        self._send(("HSETNX", f"{self.p}:rooms", room.name, info))
        if self.connected:
            self._spawn(self._open_room(room.name))

    def room_gone(self, room: Room, *, closed: bool) -> None:
        if closed:
            self._event(room, {"t": "close"})
        sync = self.rooms.pop(room.name, None)
        if sync is not None:
            for sid in sync.announced:
                self._send(("HDEL", self._key("streams", room.name), sid))
        if self._sub is not None and self.connected:
            self._sub.unsubscribe(self._ch(room.name), self._pkt(room.name))

    def subscribers_changed(self, room: Room) -> None:
        """The last subscriber here left: no more packets of the room for this node."""
        sync = self.rooms.get(room.name)
        if sync is None or room.subscribers or not sync.packets:
            return
        sync.packets = False
        sync.pkt_subscribed.clear()
        room.remote.clear()
        sync.stream_nodes.clear()
        if self._sub is not None and self.connected:
            self._sub.unsubscribe(self._pkt(room.name))

    def broadcast(self, room: Room, obj: dict[str, Any]) -> None:
        sync = self.rooms.get(room.name)
        if obj.get("type") == "presence" and sync is not None:
            info = obj["member"]
            mid = str(info["id"])
            key = self._key("members", room.name)
            if obj.get("event") == "leave":
                self._send(("HDEL", key, mid))
                for sid in info.get("streams", ()):
                    if sync.announced.pop(sid, None) is not None and sid not in room.streams:
                        self._send(("HDEL", self._key("streams", room.name), sid))
            else:
                self._send(("HSET", key, mid, json.dumps([self.node, info])))
                sync.members.pop(mid, None)  # resumed here from another node
        self._event(room, {"t": "b", "obj": obj})

    def published(self, room: Room, pkt: StoredPacket) -> None:
        sync = self.rooms.get(room.name)
        if sync is None or not self.connected:
            self.metrics.dropped += 1
            return
        msg = PACKET + self._origin + bytes([LOSSY if pkt.lossy else 0]) + pkt.data
        if pkt.audio:  # relayed to the other nodes, never kept in the history
            self._send(("PUBLISH", self._pkt(room.name), msg))
            return
        hist = self._hist(room.name, pkt.stream_id)
        n = sync.announced.get(pkt.stream_id)
        cmds: list[Command] = [("PUBLISH", self._pkt(room.name), msg)]
        if n is None:
            cmds.append(("HSET", self._key("streams", room.name), pkt.stream_id, self.node))
            n = 0
        cmds += history_cmds(hist, msg, n, keyframe=pkt.keyframe, keep=self.history)
        sync.announced[pkt.stream_id] = n + 1
        if self._send(*cmds):
            self.metrics.packets_out += 1
        else:
            self.metrics.dropped += 1

    def keyframe_request(self, room: Room, stream_id: int) -> None:
        self._event(room, {"t": "kf", "sid": stream_id})

    def kick(self, room: Room, member_id: str, by: str) -> bool:
        sync = self.rooms.get(room.name)
        if sync is None or member_id not in sync.members:
            return False
        self._event(room, {"t": "kick", "member": member_id, "by": by})
        return True

    def remote_members(self, room: Room) -> list[dict[str, Any]]:
        sync = self.rooms.get(room.name)
        if sync is None:
            return []
        return [info for mid, (_, info) in sync.members.items() if mid not in room.members]

    async def synced(self, room: Room, *, subscriber: bool) -> None:
        """Wait (at most :data:`SYNC_WAIT_S`) until ``room``'s remote state is known; a
        ``subscriber`` joining: also the other nodes' streams (their packets from now on)."""
        sync = self.rooms.get(room.name)
        if sync is None:
            return
        if subscriber and not sync.packets:
            sync.packets = True
            sync.ready.clear()
            if self.connected:
                self._spawn(self._open_room(room.name))
        if sync.ready.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SYNC_WAIT_S):
                await sync.ready.wait()

    # ------------------------------------------------------------------ receiving

    async def _listen(self, sub: Subscriber) -> None:
        store_ch = self.store.channel.encode()
        events, packets = f"{self.p}:room:".encode(), f"{self.p}:pkt:".encode()
        while True:
            for push in await sub.pushes():
                kind, channel = push[0], push[1]
                pkt = channel.startswith(packets)
                name = channel[len(packets if pkt else events) :].decode()
                if kind == b"message":
                    if channel == store_ch:
                        self.store.apply(push[2])
                    else:
                        await self._on_room_message(name, push[2])
                elif kind == b"subscribe" and (sync := self.rooms.get(name)) is not None:
                    (sync.pkt_subscribed if pkt else sync.subscribed).set()

    async def _on_room_message(self, name: str, data: bytes) -> None:
        """One message of a room channel; a malformed one (anything may publish to Redis)
        is counted and skipped, and the listener goes on."""
        try:
            await self._room_message(name, data)
        except (IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self.metrics.bad_messages += 1
            if self.metrics.bad_messages == 1:
                log.warning("redis: malformed message on room %r skipped (%s)", name, exc)

    async def _room_message(self, name: str, data: bytes) -> None:
        n = data[1]
        origin = data[2 : 2 + n].decode()
        if origin == self.node:
            return
        room, sync = self.manager.rooms.get(name), self.rooms.get(name)
        if room is None or sync is None:
            return
        body = data[2 + n :]
        if data[:1] == PACKET:
            if not sync.packets:
                return  # in flight when this node unsubscribed
            self.metrics.packets_in += 1
            if sync.buffer is not None:
                sync.buffer.append((origin, body))
            else:
                pkt = sync.apply_packet(room, origin, body, self.history)
                if pkt is not None:
                    await room.relay(None, pkt)
        elif data[:1] == EVENT:
            self._on_event(room, sync, origin, json.loads(body))

    def _on_event(self, room: Room, sync: RoomSync, origin: str, ev: dict[str, Any]) -> None:
        kind = ev.get("t")
        if kind == "b":
            obj = ev["obj"]
            if obj.get("type") != "presence" or sync.presence(room, origin, obj):
                room.broadcast(obj, remote=True)
        elif kind == "hello":  # a node (re)synced: its members, in case they were missed
            sync.hello(room, origin, ev["members"])
        elif kind == "kf":
            sid = int(ev["sid"])
            if sid in room.streams:
                room.request_keyframe(sid)
        elif kind == "kick":
            target = room.members.get(str(ev["member"]))
            if target is not None:  # recorded in Redis (every node) before it is closed
                self.manager.kicks.kick(target.claims, room.name)
                self._spawn(self._kick_after_flush(room, target.id, str(ev["by"])))
        elif kind == "close":
            self.manager.spawn(self.manager.close_room(room.name, remote=True))

    async def _kick_after_flush(self, room: Room, member_id: str, by: str) -> None:
        await self.flushed()
        self.manager.kick(room, member_id, by)

    # ------------------------------------------------------------------ sync

    async def _open_room(self, name: str, *, again: bool = False) -> None:
        """Subscribe to the room's events (and packets, while it has subscribers here),
        then sync; ``again``: after a lost connection (a *resync*)."""
        sub, sync = self._sub, self.rooms.get(name)
        if sub is None or sync is None or sync.opening:
            return
        sync.opening = True
        try:
            while True:
                want = sync.packets
                sync.buffer = [] if want else None
                if not sync.subscribed.is_set():
                    sub.subscribe(self._ch(name))
                if want and not sync.pkt_subscribed.is_set():
                    sub.subscribe(self._pkt(name))
                async with asyncio.timeout(2.0):
                    await sync.subscribed.wait()
                    if want:
                        await sync.pkt_subscribed.wait()
                await self._sync(name, sync, packets=want, again=again)
                if sync.packets == want or not self.connected:
                    break
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis: room %s not synced (%s)", name, exc)
            sync.buffer = None
        finally:
            sync.opening = False

    async def _sync(self, name: str, sync: RoomSync, *, packets: bool, again: bool) -> None:
        """Members (and, for ``packets``, streams and histories) of the other nodes; this
        node's members again."""
        r = self._redis
        room = self.manager.rooms.get(name)
        if r is None or room is None:
            return
        members = await r.hgetall(self._key("members", name))
        streams = await r.hgetall(self._key("streams", name))
        found = {_text(k): json.loads(v) for k, v in members.items()}
        owners = {int(k): _text(v) for k, v in streams.items()}
        alive = await self._alive({n for n, _ in found.values()} | set(owners.values()))
        fresh = {m: (n, i) for m, (n, i) in found.items() if n != self.node and n in alive}
        histories: dict[int, tuple[str, list[bytes]]] = {}
        for sid, node in owners.items() if packets else ():
            if node != self.node and node in alive and sid not in room.streams:
                raw = await r.lrange(self._hist(name, sid), 0, -1)
                histories[sid] = (node, [m if isinstance(m, bytes) else m.encode() for m in raw])
        # nothing awaited from here on: the state is swapped in one go
        old, sync.members = sync.members, fresh
        if again:
            self.metrics.resyncs += 1
        if sync.synced_once:
            for mid in old.keys() - fresh.keys():
                room.broadcast({"type": "presence", "event": "leave", "member": old[mid][1]},
                               remote=True)  # fmt: skip
            for mid in fresh.keys() - old.keys():
                room.broadcast({"type": "presence", "event": "join", "member": fresh[mid][1]},
                               remote=True)  # fmt: skip
        if packets:
            room.remote.clear()
            sync.stream_nodes.clear()
        for node, msgs in histories.values():
            for msg in msgs:
                n = msg[1]
                sync.apply_packet(room, node, msg[2 + n :], self.history)
        pending, sync.buffer = sync.buffer or [], None
        for origin, body in pending:
            pkt = sync.apply_packet(room, origin, body, self.history)
            if pkt is not None:
                await room.relay(None, pkt)
        if again:  # missed packets: the stored keyframe and history again
            snaps = [s.snapshot() for s in room.remote.values()]
            for m in room.subscribers:
                for snap in snaps:
                    m.post_snapshot(snap)
        sync.synced_once = True
        sync.ready.set()
        key = self._key("members", name)
        for m in room.members.values():
            self._send(("HSET", key, m.id, json.dumps([self.node, m.info()])))
        for sid in room.streams:
            self._send(("HSET", self._key("streams", name), sid, self.node))
        if room.members:
            self._event(room, {"t": "hello", "members": [m.info() for m in room.members.values()]})

    async def _alive(self, nodes: set[str]) -> set[str]:
        r = self._redis
        if not nodes or r is None:
            return set()
        order = sorted(nodes)
        values = await r.mget([self._node_key(n) for n in order])
        return {n for n, v in zip(order, values, strict=True) if v is not None}

    async def _heartbeat(self) -> None:
        period = self.cfg.node_ttl_s / 3
        while True:
            await asyncio.sleep(period)
            r = self._redis
            if r is None or not self.connected:
                continue
            try:
                t0 = time.perf_counter()
                await r.set(self._node_key(self.node), b"1", px=int(self.cfg.node_ttl_s * 1000))
                self.metrics.rtt_ms.add((time.perf_counter() - t0) * 1000)
                nodes = {n for s in self.rooms.values() for n, _ in s.members.values()}
                nodes |= {n for s in self.rooms.values() for n in s.stream_nodes.values()}
                alive = await self._alive(nodes)
            except (RedisError, OSError):
                continue
            for dead in nodes - alive:
                self._forget_node(dead)

    def _forget_node(self, dead: str) -> None:
        """``dead``'s heartbeat expired: its members leave, its streams end."""
        self.metrics.dead_nodes += 1
        log.warning("redis: node %s is gone (no heartbeat for %.1fs)", dead, self.cfg.node_ttl_s)
        for name, sync in self.rooms.items():
            room = self.manager.rooms.get(name)
            if room is None:
                continue
            members, streams = sync.forget(room, dead)
            for mid in members:
                self._send(("HDEL", self._key("members", name), mid))
            for sid in streams:
                self._send(("HDEL", self._key("streams", name), sid))
                self._send(("DEL", self._hist(name, sid)))

    def render(self) -> str:
        wr = self._wr
        buffered = wr.buffered() if wr is not None else 0
        return self.metrics.render(
            node=self.cfg.node_id,
            connected=self.connected,
            queued=len(self._durable),
            buffered=buffered,
        )


def history_cmds(hist: str, msg: bytes, n: int, *, keyframe: bool, keep: int) -> list[Command]:
    """The history list's commands for the ``n``-th message (from 0) of a stream: a
    keyframe starts the list again (and its expiry), every :data:`TRIM_EVERY`-th delta
    trims it to ``keep`` (``bench redisbus`` sends the same)."""
    if keyframe:
        return [("DEL", hist), ("RPUSH", hist, msg), ("PEXPIRE", hist, HISTORY_TTL_MS)]
    if n % TRIM_EVERY == 0:
        return [("RPUSH", hist, msg), ("LTRIM", hist, -keep, -1)]
    return [("RPUSH", hist, msg)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
