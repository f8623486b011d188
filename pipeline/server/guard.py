"""The server's guard in front of aiohttp: connections before the WebSocket upgrade.

aiohttp reads a request's line and headers without a deadline of its own (its
keep-alive timer defaults to an hour), accepts any number of connections, and
logs a traceback for every malformed request. :class:`HttpGuard` wraps the
protocol factory of the aiohttp server (a thin proxy protocol per connection,
public asyncio and aiohttp API only) and adds:

* a **deadline**: a connection must send a request (line, headers and body)
  and be answered within ``server.header_timeout_s`` of its accept or of the
  first byte after its previous answer, else it is closed (``slow_headers``:
  bytes came but no end of headers; ``slow_request``: headers came but no
  answer); an idle keep-alive connection is closed after :data:`KEEPALIVE_S`
  (at least the header timeout) without a byte (``idle``);
* a **cap** on *pending* connections (accepted, not upgraded to a WebSocket):
  ``server.max_pending_connections``, lowered to what the process's file
  descriptor limit leaves (:func:`fd_budget`). At the cap the oldest
  connection still waiting for its request headers is closed to make room
  (``evicted``); when every pending connection is being answered the new one
  is closed at once (``refused``). Upgraded WebSockets are bounded by
  ``server.max_connections`` and the join deadline of the member protocol;
* **masked frames**: after the upgrade every client frame header is checked
  (RFC 6455 5.1: a server MUST close on an unmasked client frame; aiohttp's
  reader accepts them): an unmasked frame closes the connection with 1002;
* **log rate limiting** (:class:`RateLimitFilter`): aiohttp's per-request
  errors become one line each (no traceback), at most a few per key and
  window; asyncio's ``socket.accept() out of system resource`` (EMFILE) is
  counted and logged the same way (:func:`install_loop_handler`).

The counts are in :class:`~pipeline.server.metrics.ServerMetrics` (``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import struct
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pipeline.server.metrics import ServerMetrics

log = logging.getLogger("posewire.server")
#: aiohttp's per-request error logger is replaced by this one (see :func:`handler_args`)
HTTP_LOG: Final = logging.getLogger("posewire.server.http")

#: an answered connection may stay idle this long (longer than aiohttp's client
#: keep-alive of 15 s, so that clients, not the server, close idle connections)
KEEPALIVE_S: Final = 20.0
#: descriptors kept free for everything but connections (listening socket, logs, ...)
FD_RESERVE: Final = 32
#: request line and header limits passed to aiohttp (a longer line answers 400)
MAX_LINE_BYTES: Final = 8190
MAX_FIELD_BYTES: Final = 8190
MAX_HEADERS: Final = 64
#: bytes after the end of the upgrade request kept to stay in step with the frames
MAX_EARLY_BYTES: Final = 65536

# connection states
_WAITING: Final = 0  # waiting for a request (its line and headers)
_HANDLING: Final = 1  # headers came, no answer yet
_UPGRADED: Final = 2  # a WebSocket: no longer pending
_CLOSED: Final = 3  # refused, evicted or timed out: nothing reaches aiohttp any more

#: close frame 1002 (protocol error) as a server sends it (unmasked)
_CLOSE_1002: Final = b"\x88\x10" + struct.pack("!H", 1002) + b"unmasked frame"


def fd_budget() -> int | None:
    """Connections the process can still open: RLIMIT_NOFILE minus open fds and a reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 64
    return max(8, soft - used - FD_RESERVE)


class FrameChecker:
    """Walks the frame headers of a client's WebSocket byte stream (payloads skipped)."""

    __slots__ = ("_head", "_skip")

    def __init__(self) -> None:
        self._head = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> bool:
        """False as soon as a frame without the mask bit is seen."""
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            head = self._head
            if not head:
                # fast path: a whole header in this chunk
                need = _header_len(data, i, n)
                if need is not None and i + need <= n:
                    if not data[i + 1] & 0x80:
                        return False
                    self._skip = _payload_len(data, i)
                    i += need
                    continue
            head.append(data[i])
            i += 1
            need = _header_len(head, 0, len(head))
            if need is not None and len(head) >= need:
                if not head[1] & 0x80:
                    return False
                self._skip = _payload_len(head, 0)
                head.clear()
        return True


def _header_len(buf: bytes | bytearray, i: int, n: int) -> int | None:
    if n - i < 2:
        return None
    flag = buf[i + 1] & 0x7F
    ext = 2 if flag == 126 else 8 if flag == 127 else 0
    return 2 + ext + (4 if buf[i + 1] & 0x80 else 0)


def _payload_len(buf: bytes | bytearray, i: int) -> int:
    flag = buf[i + 1] & 0x7F
    if flag == 126:
        return int(struct.unpack_from("!H", buf, i + 2)[0])
    if flag == 127:
        return int(struct.unpack_from("!Q", buf, i + 2)[0])
    return flag


class GuardedProtocol(asyncio.Protocol):
    """Proxy in front of one aiohttp ``RequestHandler`` (see :class:`HttpGuard`)."""

    def __init__(self, guard: HttpGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.state = _WAITING
        self.got_bytes = False
        self.idle = False  # answered, nothing of a next request yet
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""  # last bytes seen while waiting (an end of headers split in two)
        self.early = bytearray()  # bytes after the end of headers, until the answer
        self.frames: FrameChecker | None = None
        self.counted: int | None = None  # _WAITING (pending) or _UPGRADED while the guard counts it
        self.forwarded = False  # the aiohttp handler saw connection_made

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.guard.admit(self):
            self.state = _CLOSED
            transport.abort()
            return
        self.forwarded = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _UPGRADED:
            if self.frames is not None and not self.frames.feed(data):
                self.guard.unmasked(self)
                return
        elif state == _WAITING:
            if not self.got_bytes:
                self.got_bytes = True
                self.guard.first_bytes(self)
            seen = self.tail + data
            end = seen.find(b"\r\n\r\n")
            if end >= 0:
                self.guard.headers_done(self)
                self._keep_early(seen[end + 4 :])
            else:
                self.tail = seen[-3:]
        elif state == _HANDLING:
            self._keep_early(data)
        else:
            return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.state == _CLOSED:
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self)
        self.state = _CLOSED
        if self.forwarded:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- helpers
    def _keep_early(self, data: bytes) -> None:
        if data:
            if len(self.early) + len(data) > MAX_EARLY_BYTES:
                self.early = bytearray()  # a body, not frames: nothing to stay in step with
            else:
                self.early += data

    def close(self, *, abort: bool) -> None:
        self.guard.release(self)  # counted free now: the fd goes with this tick
        self.state = _CLOSED
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


class HttpGuard:
    """Deadline and cap for connections before the upgrade; see the module docstring."""

    def __init__(
        self,
        *,
        header_timeout_s: float,
        max_pending: int,
        metrics: ServerMetrics,
        fd_limit: int | None = None,
    ) -> None:
        self.header_timeout_s = float(header_timeout_s)
        budget = fd_budget() if fd_limit is None else fd_limit
        self.max_pending = max_pending if budget is None else max(1, min(max_pending, budget))
        self.fd_budget = budget
        self.metrics = metrics
        self.pending = 0
        self.upgraded = 0
        # waiting for request headers, oldest first (the ones evicted at the cap)
        self._waiting: dict[GuardedProtocol, None] = {}
        self._by_inner: dict[object, GuardedProtocol] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def protocol_factory(
        self, inner_factory: Callable[[], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        def factory() -> asyncio.Protocol:
            return GuardedProtocol(self, inner_factory())

        return factory

    # -- connection lifecycle (called by GuardedProtocol)
    def admit(self, conn: GuardedProtocol) -> bool:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        full = self.pending >= self.max_pending or (
            self.fd_budget is not None and self.pending + self.upgraded >= self.fd_budget
        )
        if full:
            oldest = next(iter(self._waiting), None)
            if oldest is None:
                self.metrics.pending_refused += 1
                return False
            self.metrics.pending_evicted += 1
            self._drop(oldest)
            oldest.close(abort=True)
        conn.counted = _WAITING
        self.pending += 1
        self.metrics.pending_peak = max(self.metrics.pending_peak, self.pending)
        self._by_inner[conn.inner] = conn
        self._wait(conn, self.header_timeout_s)
        return True

    def first_bytes(self, conn: GuardedProtocol) -> None:
        """The first bytes of a request on an idle keep-alive connection: its deadline."""
        if conn.idle:
            conn.idle = False
            self._arm(conn, self.header_timeout_s)

    def headers_done(self, conn: GuardedProtocol) -> None:
        conn.state = _HANDLING
        conn.tail = b""
        conn.early = bytearray()
        self._waiting.pop(conn, None)

    def answered(self, conn: GuardedProtocol, status: int) -> None:
        if conn.state == _CLOSED or conn.state == _UPGRADED:
            return
        if status == 101:
            self._cancel(conn)
            self._waiting.pop(conn, None)
            conn.state = _UPGRADED
            conn.counted = _UPGRADED
            self.pending -= 1
            self.upgraded += 1
            conn.frames = FrameChecker()
            early, conn.early = bytes(conn.early), bytearray()
            if early and not conn.frames.feed(early):
                # sent before the 101 was: no close frame can be ordered after it
                self.metrics.reject("unmasked_frame")
                assert self._loop is not None
                self._loop.call_soon(lambda: conn.close(abort=True))
            return
        self._wait(conn, max(KEEPALIVE_S, self.header_timeout_s))
        conn.idle = True

    def unmasked(self, conn: GuardedProtocol) -> None:
        self.metrics.reject("unmasked_frame")
        HTTP_LOG.info("closing connection from %s: unmasked client frame (1002)", _peer(conn))
        if conn.transport is not None:
            conn.transport.write(_CLOSE_1002)
        conn.close(abort=False)

    def release(self, conn: GuardedProtocol) -> None:
        if conn.counted is None:
            return
        if conn.counted == _UPGRADED:
            self.upgraded -= 1
        else:
            self.pending -= 1
        conn.counted = None
        self._drop(conn)

    # -- internals
    def _wait(self, conn: GuardedProtocol, deadline_s: float) -> None:
        conn.state = _WAITING
        conn.got_bytes = False
        conn.idle = False
        conn.tail = b""
        conn.early = bytearray()
        self._waiting.pop(conn, None)
        self._waiting[conn] = None
        self._arm(conn, deadline_s)

    def _arm(self, conn: GuardedProtocol, deadline_s: float) -> None:
        self._cancel(conn)
        assert self._loop is not None
        conn.timer = self._loop.call_later(deadline_s, self._expired, conn)

    def _expired(self, conn: GuardedProtocol) -> None:
        conn.timer = None
        if conn.state == _WAITING and not conn.got_bytes:
            self.metrics.idle_closed += 1
            self._drop(conn)
            conn.close(abort=False)
            return
        if conn.state in (_WAITING, _HANDLING):
            what = "slow_headers" if conn.state == _WAITING else "slow_request"
            self.metrics.header_timeouts[what] += 1
            HTTP_LOG.info(
                "closing connection from %s: %s (no answer within %.1f s)",
                _peer(conn),
                what,
                self.header_timeout_s,
            )
            self._drop(conn)
            conn.close(abort=True)

    def _cancel(self, conn: GuardedProtocol) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _drop(self, conn: GuardedProtocol) -> None:
        self._cancel(conn)
        self._waiting.pop(conn, None)
        self._by_inner.pop(conn.inner, None)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """aiohttp signal: an answer starts (101: the connection is a WebSocket now)."""
        conn = self._by_inner.pop(request.protocol, None)
        if conn is not None:
            self.answered(conn, response.status)
            if conn.state == _WAITING:
                self._by_inner[conn.inner] = conn


def _peer(conn: GuardedProtocol) -> str:
    if conn.transport is None:
        return "?"
    peer = conn.transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


# --------------------------------------------------------------------------- logging


class RateLimitFilter(logging.Filter):
    """One line per record (tracebacks cut to their last line), at most ``burst``
    records per key (logger and message template) within ``window_s``; the next
    record let through says how many were suppressed."""

    def __init__(
        self, metrics: ServerMetrics | None = None, *, burst: int = 5, window_s: float = 10.0
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.burst = burst
        self.window_s = window_s
        self._windows: dict[tuple[str, str], list[float]] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:80])
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = " ".join(str(exc).split())[:200]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {text}"
            if isinstance(exc, HttpProcessingError) and record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"  # the client's
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        now = time.monotonic()
        if key not in self._windows and len(self._windows) >= 1024:
            self._windows.clear()  # keys are message templates; bound them anyway
        window = self._windows.setdefault(key, [now, 0.0])
        if now - window[0] >= self.window_s:
            window[0], window[1] = now, 0.0
        window[1] += 1
        if window[1] > self.burst:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            if self.metrics is not None:
                self.metrics.log_suppressed += 1
            return False
        dropped = self._suppressed.pop(key, 0)
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar lines suppressed)"
            record.args = None
        return True


def install_log_filter(metrics: ServerMetrics) -> RateLimitFilter:
    """Rate-limit :data:`HTTP_LOG` (one filter per process; the newest metrics count)."""
    for f in HTTP_LOG.filters:
        if isinstance(f, RateLimitFilter):
            f.metrics = metrics
            return f
    flt = RateLimitFilter(metrics)
    HTTP_LOG.addFilter(flt)
    return flt


ACCEPT_EXHAUSTED: Final = "socket.accept() out of system resource"


def install_loop_handler(
    loop: asyncio.AbstractEventLoop, metrics: ServerMetrics
) -> Callable[[], None]:
    """Count and rate-limit asyncio's accept-EMFILE reports; returns the undo function.

    asyncio (3.11) reports ``socket.accept() out of system resource`` once per
    attempt of its accept loop (up to the listen backlog per wake-up) and
    retries after a second: unfiltered, that is thousands of log lines a second.
    """
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == ACCEPT_EXHAUSTED:
            metrics.accept_errors += 1
            HTTP_LOG.warning("%s: %s (accepting again in 1 s)", ACCEPT_EXHAUSTED, exc)
            return
        if isinstance(exc, ValueError) and "_start_serving" in repr(context.get("handle")):
            # asyncio 3.11 re-arms accepting a second after EMFILE and does not cancel
            # that timer when the server closes: it then fires on the closed socket
            # (fd -1). Harmless: the socket is gone on purpose.
            log.debug("accept retry after the listening socket closed: %s", exc)
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)


def handler_args() -> dict[str, Any]:
    """Keyword arguments for aiohttp's request handlers (limits, the quiet logger)."""
    return {
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_FIELD_BYTES,
        "max_headers": MAX_HEADERS,
        "logger": HTTP_LOG,
    }
