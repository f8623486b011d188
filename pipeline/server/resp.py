"""The backplane's hot path to Redis: raw RESP2 on two plain asyncio connections.

redis-py's pipeline and PubSub objects cost a few hundred microseconds of
Python per packet (measured: docs/scaling.md); the relay sends one ``PUBLISH``
(and a history ``RPUSH``) per packet and receives one message per packet, so
these two connections speak the protocol directly:

* :class:`Writer`: the packets and events (``PUBLISH``, the history ``RPUSH``,
  presence ``HSET``...), written at once by the caller with Redis' replies
  switched off (``CLIENT REPLY OFF``): no task switch, nothing to wait for or
  read per packet. Store writes, which must be acknowledged, go through redis-py.
* :class:`Subscriber`: ``SUBSCRIBE``/``UNSUBSCRIBE`` and the pushed
  ``message`` / ``subscribe`` arrays, parsed from one buffer.

Both raise :class:`ConnectionError` when the connection is lost. Everything
else (loading the store, syncing a room) uses redis-py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.connection import parse_url

MAX_BUFFERED = 4 << 20
"""Bytes a :class:`Writer` lets wait for its socket before it drops (Redis too slow)."""
Push = list[Any]
"""A pushed array: ``[b"message", channel, data]``, ``[b"subscribe", channel, count]``."""


def encode(*args: Any) -> bytes:
    """One command in RESP2 (bulk strings; ints and strs encoded)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def open_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the Redis of ``url`` (redis:// or unix://), authenticated, with
    its database selected."""
    kw: dict[str, Any] = dict(parse_url(url))
    if "connection_class" in kw and "path" not in kw:
        raise ConnectionError("the backplane's fast path does not speak TLS (rediss://)")
    async with asyncio.timeout(2.0):
        if "path" in kw:
            reader, writer = await asyncio.open_unix_connection(kw["path"], limit=1 << 20)
        else:
            host, port = kw.get("host", "127.0.0.1"), kw.get("port", 6379)
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        hello = b""
        if kw.get("password"):
            user = kw.get("username")
            hello += encode("AUTH", *([user] if user else []), kw["password"])
        if kw.get("db"):
            hello += encode("SELECT", kw["db"])
        if hello:
            writer.write(hello)
            for _ in range(hello.count(b"*")):
                line = await reader.readline()
                if not line.startswith(b"+"):
                    writer.close()
                    raise ConnectionError(f"redis refused: {line.decode(errors='replace')}")
    return reader, writer


class Writer:
    """Commands on one connection whose replies are switched off (``CLIENT REPLY OFF``):
    writing never waits for Redis, and nothing comes back to read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, url: str) -> Writer:
        reader, writer = await open_connection(url)
        writer.write(encode("CLIENT", "REPLY", "OFF"))
        return cls(reader, writer)

    def write(self, payload: bytes) -> bool:
        """Write ``payload`` (encoded commands) now; False: not written (the connection is
        closing, or more than :data:`MAX_BUFFERED` bytes wait for the socket)."""
        w = self._writer
        if w.is_closing() or w.transport.get_write_buffer_size() > MAX_BUFFERED:
            return False
        w.write(payload)
        return True

    def buffered(self) -> int:
        """Bytes waiting for the socket."""
        return self._writer.transport.get_write_buffer_size()

    def close(self) -> None:
        self._writer.close()


class Subscriber:
    """A subscribed connection: :meth:`subscribe` / :meth:`unsubscribe`, then
    :meth:`pushes` yields every pushed array."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buf = b""

    @classmethod
    async def connect(cls, url: str) -> Subscriber:
        return cls(*await open_connection(url))

    def subscribe(self, *channels: str) -> None:
        if channels:
            self._writer.write(encode("SUBSCRIBE", *channels))

    def unsubscribe(self, *channels: str) -> None:
        if channels:
            self._writer.write(encode("UNSUBSCRIBE", *channels))

    async def pushes(self) -> list[Push]:
        """The next pushed arrays (at least one); :class:`ConnectionError` when cut."""
        while True:
            out: list[Push] = []
            pos = 0
            buf = self._buf
            while True:
                got = _array(buf, pos)
                if got is None:
                    break
                item, pos = got
                out.append(item)
            self._buf = buf[pos:]
            if out:
                return out
            chunk = await self._reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the subscription")
            self._buf += chunk

    def close(self) -> None:
        self._writer.close()


def _array(buf: bytes, pos: int) -> tuple[Push, int] | None:
    """One array of bulk strings and integers at ``pos``, or None (incomplete)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    if buf[pos : pos + 1] != b"*":
        raise ConnectionError(f"unexpected RESP from redis: {buf[pos : pos + 32]!r}")
    n = int(buf[pos + 1 : end])
    pos = end + 2
    items: Push = []
    for _ in range(n):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        kind = buf[pos : pos + 1]
        if kind == b"$":
            size = int(buf[pos + 1 : end])
            start = end + 2
            if len(buf) < start + size + 2:
                return None
            items.append(buf[start : start + size])
            pos = start + size + 2
        elif kind == b":":
            items.append(int(buf[pos + 1 : end]))
            pos = end + 2
        else:
            raise ConnectionError(f"unexpected RESP from redis: {buf[pos : pos + 32]!r}")
    return items, pos


def reply(buf: bytes, pos: int = 0) -> tuple[Any, int] | None:
    """Any one RESP2 reply at ``pos`` (nested arrays: ``XREAD``'s), and the position after
    it, or None (incomplete). Bulk strings are bytes, a null bulk string or array None,
    simple strings str; an error reply raises :class:`ConnectionError`."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, head, pos = buf[pos : pos + 1], buf[pos + 1 : end], end + 2
    if kind == b"$":
        size = int(head)
        if size < 0:
            return None, pos
        return (buf[pos : pos + size], pos + size + 2) if len(buf) >= pos + size + 2 else None
    if kind == b"*":
        n = int(head)
        if n < 0:
            return None, pos
        items: list[Any] = []
        for _ in range(n):
            got = reply(buf, pos)
            if got is None:
                return None
            item, pos = got
            items.append(item)
        return items, pos
    if kind == b":":
        return int(head), pos
    if kind == b"+":
        return head.decode(), pos
    raise ConnectionError(f"redis replied {kind.decode(errors='replace')}{head!r}")
