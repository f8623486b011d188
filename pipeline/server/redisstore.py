"""The server store of a cluster: :class:`RedisStore`, the records of every node in Redis.

Reads stay in this process's memory (:class:`~pipeline.server.store.MemoryStore`:
no Redis round trip on a join or a packet); every write goes to Redis as one
key with the record's own expiry (``PXAT``) and is announced on the store
channel, where every other node applies it to its memory. On every
(re)connection the node loads all records from Redis (:meth:`RedisStore.load`)
before it accepts members. Writes made while Redis is away are kept and sent
when it is back (:class:`~pipeline.server.backplane.Backplane` owns the queue).

Keys (``P`` = ``server.redis.key_prefix``; docs/scaling.md):
``P:rvj:<jti>`` (value: until), ``P:rvs:<room>\\0<subject>`` (value: JSON
``[room, subject, until]``), ``P:bind:<room>\\0<key>`` (JSON ``[room, key,
subject, until]``), the hash ``P:closed`` (room -> closed_ns); channel ``P:store``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pipeline.server.store import MemoryStore

Command = tuple[Any, ...]
"""One Redis command (its arguments)."""


class RedisStore(MemoryStore):
    """A :class:`MemoryStore` whose writes reach Redis and every other node."""

    def __init__(self, prefix: str, node_id: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.node_id = node_id
        self.channel = f"{prefix}:store"
        self.sink: Callable[[list[Command]], None] = lambda cmds: None
        """Where the writes go (the backplane's durable queue)."""
        self._applying = False

    # ------------------------------------------------------------------ writes

    def _send(self, op: str, args: list[Any], *cmds: Command) -> None:
        if self._applying:
            return
        note = json.dumps({"node": self.node_id, "op": op, "args": args})
        self.sink([*cmds, ("PUBLISH", self.channel, note)])

    def _pxat(self, until: float) -> int:
        return max(int(until * 1000), int(time.time() * 1000) + 1000)

    def revoke(self, room: str, subject: str, jti: str, until: float) -> None:
        super().revoke(room, subject, jti, until)
        j, s = self._jti[jti], self._subject[(room, subject)]
        self._send(
            "revoke",
            [room, subject, jti, until],
            ("SET", f"{self.prefix}:rvj:{jti}", repr(j), "PXAT", self._pxat(j)),
            ("SET", f"{self.prefix}:rvs:{room}\0{subject}", json.dumps([room, subject, s]),
             "PXAT", self._pxat(s)),
        )  # fmt: skip

    def close_room(self, room: str, at_ns: int) -> None:
        super().close_room(room, at_ns)
        self._send("close", [room, at_ns], ("HSET", f"{self.prefix}:closed", room, at_ns))

    def reopen_room(self, room: str) -> None:
        was = self.is_closed(room)
        super().reopen_room(room)
        if was:
            self._send("reopen", [room], ("HDEL", f"{self.prefix}:closed", room))

    def bind(self, room: str, key: str, subject: str, until: float) -> None:
        super().bind(room, key, subject, until)
        b = self._bindings.get((room, key))
        if b is not None:
            rec = json.dumps([room, key, b[0], b[1]])
            self._send(
                "bind",
                [room, key, b[0], b[1]],
                ("SET", f"{self.prefix}:bind:{room}\0{key}", rec, "PXAT", self._pxat(b[1])),
            )

    def _deleted(self, room: str, key: str) -> None:
        self._send("unbind", [room, key], ("DEL", f"{self.prefix}:bind:{room}\0{key}"))

    # ------------------------------------------------------------------ other nodes

    def apply(self, data: bytes) -> None:
        """A write of another node, from the store channel, into this node's memory."""
        try:
            note = json.loads(data)
            if note["node"] == self.node_id:
                return
            op, args = note["op"], note["args"]
            self._applying = True
            if op == "revoke":
                MemoryStore.revoke(self, str(args[0]), str(args[1]), str(args[2]), float(args[3]))
            elif op == "close":
                MemoryStore.close_room(self, str(args[0]), int(args[1]))
            elif op == "reopen":
                MemoryStore.reopen_room(self, str(args[0]))
            elif op == "bind":
                MemoryStore.bind(self, str(args[0]), str(args[1]), str(args[2]), float(args[3]))
            elif op == "unbind":
                MemoryStore._unbind(self, str(args[0]), str(args[1]))
        except (ValueError, KeyError, IndexError, TypeError):
            pass  # not a note of this version: the next load has the record
        finally:
            self._applying = False

    async def load(self, redis: Any) -> int:
        """Every record in Redis into memory (after each (re)connection); returns the
        number of records read."""
        n = 0
        self._applying = True
        try:
            closed = await redis.hgetall(f"{self.prefix}:closed")
            for room, at_ns in sorted(closed.items(), key=lambda kv: int(kv[1])):
                MemoryStore.close_room(self, room.decode(), int(at_ns))
                n += 1
            for kind in ("rvj", "rvs", "bind"):
                keys = [k async for k in redis.scan_iter(f"{self.prefix}:{kind}:*", count=1000)]
                for i in range(0, len(keys), 500):
                    chunk = keys[i : i + 500]
                    for key, value in zip(chunk, await redis.mget(chunk), strict=True):
                        if value is not None:
                            self._load_one(kind, key, value)
                            n += 1
        finally:
            self._applying = False
        return n

    def _load_one(self, kind: str, key: bytes, value: bytes) -> None:
        if kind == "rvj":
            jti = key.decode().split(":", 2)[2]
            self._jti[jti] = max(self._jti.get(jti, 0.0), float(value))
        elif kind == "rvs":
            room, subject, until = json.loads(value)
            k = (str(room), str(subject))
            self._subject[k] = max(self._subject.get(k, 0.0), float(until))
        else:
            room, key_, subject, until = json.loads(value)
            MemoryStore.bind(self, str(room), str(key_), str(subject), float(until))
