"""WebSocket transport: a room member over the server's ``/ws`` endpoint.

Used by the transmit stage (publish) and by every receiver (subscribe). It
joins with its token, keeps the member id the server gives it, measures its
clock offset to the server (NTP-style ping exchange, minimum-RTT sample) and,
when the connection drops for a reason worth retrying (network, server
restart, rate limit...), reconnects with capped exponential backoff (plus
jitter) and resumes its membership (``resume`` = the old member id). A
refusal that retrying cannot fix (token refused, kicked, room closed, bad
packets) ends it: the next :meth:`send`/:meth:`recv` raises
:class:`~pipeline.errors.TokenError` or
:class:`~pipeline.errors.BrokenResourceError` (with the close code and reason).

What a publisher does with the acks, keyframe requests and reconnects that
:meth:`recv` yields, and what a subscriber does with the ``backfill`` notice
(:class:`~pipeline.wire.messages.Backfill`) before a stream's stored packets,
is specified in ``docs/room-protocol.md``; :mod:`pipeline.transports.sender`
does it for the transmit stage.

Read them promptly (or with :meth:`recv_nowait` between sends): the receive
queue is bounded and drops the oldest pose packet (then the oldest item) when full.

The wire messages and close codes are those of :mod:`pipeline.wire`
(``docs/room-protocol.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import statistics as pystats
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import aiohttp

from pipeline.config import TransmitConfig
from pipeline.errors import (
    BrokenResourceError,
    ClosedResourceError,
    JsonInputError,
    TokenError,
    TransportError,
)
from pipeline.model import jsonsafe
from pipeline.model.net import unsent_bytes
from pipeline.transports import TRANSPORTS, TransportFactory
from pipeline.transports.base import (
    Control,
    Packet,
    Received,
    StateChange,
    Transport,
    TransportContext,
    TransportStatistics,
)
from pipeline.transports.clock import ClockSync
from pipeline.transports.endpoints import Endpoints
from pipeline.wire import messages
from pipeline.wire.close import final_error

log = logging.getLogger("posewire.transport.websocket")

_WINDOW = 128

#: What ends a transport for good: a token refusal or a final close.
Fatal = TokenError | BrokenResourceError

_W = aiohttp.WSMsgType
#: message types that end a connection
_ENDED = frozenset({_W.CLOSE, _W.CLOSING, _W.CLOSED, _W.ERROR})


class WebSocketTransport(Transport):
    """A member of one room over a WebSocket (see the module docstring)."""

    kind = "websocket"

    def __init__(
        self,
        url: str | Sequence[str],
        room: str,
        token: str,
        *,
        publish: bool = False,
        subscribe: bool = True,
        name: str | None = None,
        pair: bool = False,
        reconnect_initial_s: float = 0.05,
        reconnect_max_s: float = 0.25,
        connect_timeout_s: float = 5.0,
        recv_queue: int = 4096,
        clock_samples: int = 8,
        clock_interval_s: float = 5.0,
        heartbeat_s: float = 10.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        session: aiohttp.ClientSession | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.endpoints = Endpoints(url, ca_file)  # the URLs tried in turn, and TLS
        self.room = room
        self._token = token
        self.publish = publish
        self.subscribe = subscribe
        self.name = name
        self.pair = pair
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self.clock_samples = clock_samples
        self.clock_interval_s = clock_interval_s
        self.heartbeat_s = heartbeat_s
        self.max_message_bytes = max_message_bytes
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._clock_task: asyncio.Task[None] | None = None
        self._queue: deque[Received] = deque()
        self._queue_max = recv_queue
        self._wake = asyncio.Event()
        self._closed = False
        self._fatal: Fatal | None = None
        self._last_error: dict[str, Any] | None = None
        self._sync = ClockSync()
        self._sent_at: deque[int] = deque()
        self._ack_rtts: deque[float] = deque(maxlen=_WINDOW)
        self._send_times: deque[float] = deque(maxlen=_WINDOW)
        self._stats = TransportStatistics(kind=self.kind)
        self.member_id: str | None = None
        self.members: dict[str, dict[str, Any]] = {}
        self.welcome: dict[str, Any] = {}

    @classmethod
    def from_config(
        cls,
        cfg: TransmitConfig,
        token: str,
        *,
        publish: bool = True,
        subscribe: bool = False,
        name: str | None = None,
    ) -> Self:
        """A transport for the transmit stage from the ``transmit`` config section."""
        return cls(
            cfg.urls,
            cfg.room,
            token,
            publish=publish,
            subscribe=subscribe,
            name=name,
            **cls.options(cfg),
        )

    @classmethod
    def options(cls, cfg: TransmitConfig) -> dict[str, Any]:
        """The constructor options the ``transmit`` section sets."""
        return {
            "reconnect_initial_s": cfg.reconnect_initial_s,
            "reconnect_max_s": cfg.reconnect_max_s,
            "connect_timeout_s": cfg.connect_timeout_s,
            "ca_file": cfg.ca_file,
        }

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """The member WebSocket URL in use (or tried next)."""
        return self.endpoints.current

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    @property
    def clock_offset_ns(self) -> int | None:
        """Server clock minus local clock from the minimum-RTT sample, or None."""
        return self._sync.estimate.offset_ns

    @property
    def clock_rtt_ns(self) -> int | None:
        return self._sync.estimate.rtt_ns

    def stream_owner(self, stream_id: int) -> dict[str, Any] | None:
        """The member record publishing ``stream_id``, if known."""
        for m in self.members.values():
            if stream_id in m.get("streams", ()):
                return m
        return None

    async def connect(self) -> None:
        if self._closed:
            raise ClosedResourceError("transport was closed")
        if self._run_task is not None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        deadline = time.monotonic() + self.connect_timeout_s
        delay = self.reconnect_initial_s
        last: BaseException | None = None
        while True:
            tried = self.url
            try:
                ws = await self._open(max(deadline - time.monotonic(), 0.05))
                break
            except (TokenError, TransportError) as exc:
                last = exc
                try:
                    round_failed = self.endpoints.failed(exc)
                except (TokenError, BrokenResourceError):
                    await self._close_session()
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._close_session()
                raise TransportError(f"cannot connect to {tried}: {last}") from None
            if round_failed:
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, self.reconnect_max_s)
        self._stats.connects += 1
        self._attach(ws)
        self._run_task = asyncio.get_running_loop().create_task(
            self._run(ws), name="posewire-ws-transport"
        )
        await self._sync.measure(self._via(ws), self.clock_samples)
        await self._report_clock()

    async def send(self, packet: bytes) -> None:
        self._check()
        ws = self._ws
        if ws is None or ws.closed:
            self._stats.send_failures += 1
            return
        t0 = time.perf_counter()
        try:
            await ws.send_bytes(packet)
        except ConnectionError:
            self._stats.send_failures += 1
            return
        self._sent(packet, (time.perf_counter() - t0) * 1000.0)

    def _sent(self, packet: bytes, ms: float) -> None:
        """Account a packet sent (``ms`` spent in the send call)."""
        self._send_times.append(ms)
        if self.publish:
            self._sent_at.append(time.monotonic_ns())
            if len(self._sent_at) > 4096:
                self._sent_at.popleft()
        self._stats.packets_sent += 1
        self._stats.bytes_sent += len(packet)

    async def send_control(self, message: Mapping[str, Any]) -> None:
        self._check()
        ws = self._ws
        if ws is None or ws.closed:
            self._stats.send_failures += 1
            return
        try:
            await self._send_text(ws, messages.dumps(dict(message)))
        except ConnectionError:
            self._stats.send_failures += 1

    async def request_keyframe(self, stream_id: int, ref_seq: int | None = None) -> None:
        """Ask the server (and through it the publisher) for a keyframe of ``stream_id``;
        ``ref_seq``: the missing reference, which the server sends again when it has it."""
        await self.send_control(messages.keyframe_request(stream_id, ref_seq))

    async def recv(self) -> Received:
        while not self._queue:
            if self._closed:
                raise ClosedResourceError("transport was closed")
            if self._fatal is not None:
                raise self._fatal
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()

    def recv_nowait(self) -> Received | None:
        """The next received item, or None when nothing is waiting."""
        if self._queue:
            return self._queue.popleft()
        if self._fatal is not None:
            raise self._fatal
        return None

    @property
    def error(self) -> Fatal | None:
        """The fatal error that ended this transport, if any."""
        return self._fatal

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(ConnectionError):
                await ws.send_str(messages.LEAVE)
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                async with asyncio.timeout(2.0):
                    await ws.close()
        for task in (self._clock_task, self._run_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._run_task = None
        self._clock_task = None
        self._sync.cancel()
        await self._close_session()

    def statistics(self) -> TransportStatistics:
        s = self._stats
        s.connected = self.connected
        s.ack_rtt_ms = pystats.median(self._ack_rtts) if self._ack_rtts else None
        s.send_ms = pystats.fmean(self._send_times) if self._send_times else None
        s.clock_offset_ns = self.clock_offset_ns
        rtt = self.clock_rtt_ns
        s.clock_rtt_ms = rtt / 1e6 if rtt is not None else None
        s.buffered_bytes = self._kernel_buffered()
        s.extra = {"member_id": self.member_id, "members": len(self.members)}
        return TransportStatistics(**s.as_dict())

    # ------------------------------------------------------------------ internals

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("transport was closed")
        if self._fatal is not None:
            raise self._fatal

    def _kernel_buffered(self) -> int:
        ws = self._ws
        return 0 if ws is None or ws.closed else unsent_bytes(ws.get_extra_info("socket"))

    async def _close_session(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _put(self, item: Received) -> None:
        q = self._queue
        if len(q) >= self._queue_max:
            for i, old in enumerate(q):
                if isinstance(old, Packet):
                    del q[i]
                    break
            else:
                q.popleft()
            self._stats.dropped_received += 1
        q.append(item)
        self._wake.set()

    def _join_message(self) -> str:
        j = (self._token, self.room, self.publish, self.subscribe, self.member_id, self.name)
        return messages.Join(*j, pair=self.pair).dumps()

    def _refusal(self, code: int | None, fallback: str) -> Fatal | None:
        """The error for a close code, or None when a retry may help."""
        detail = self._last_error or {}
        reason = str(detail["reason"]) if detail.get("reason") else None
        return final_error(code, str(detail.get("message") or fallback), reason)

    async def _open(self, timeout: float) -> aiohttp.ClientWebSocketResponse:
        """Connect to :attr:`url`, join and read the welcome (within ``timeout``).

        Raises :data:`Fatal` errors for a refusal that retrying cannot fix, and a
        plain :class:`TransportError` when a retry may help.
        """
        assert self._session is not None
        self._last_error = None
        try:
            async with asyncio.timeout(max(timeout, 1.0)):
                ws = await self.endpoints.open(
                    self._session, heartbeat=self.heartbeat_s, max_msg_size=self.max_message_bytes
                )
        except TimeoutError as exc:
            raise TransportError(f"no answer within {max(timeout, 1.0):g} s") from exc
        try:
            await ws.send_str(self._join_message())
            async with asyncio.timeout(max(timeout, 1.0)):
                while True:
                    msg = await ws.receive()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        obj = self._parse(msg.data) or {}
                        if obj.get("type") == "welcome":
                            self._on_welcome(obj)
                            self.endpoints.joined()
                            return ws
                        if obj.get("type") == "error":
                            self._last_error = obj
                        continue
                    if msg.type in _ENDED:
                        code = ws.close_code
                        err = self._refusal(code, f"closed with code {code}")
                        if err is not None:
                            raise err
                        raise TransportError(f"closed during join (code {code})")
        except (TimeoutError, ConnectionError, ValueError) as exc:
            await ws.close()
            raise TransportError(f"join failed: {exc or type(exc).__name__}") from exc
        except BaseException:
            await ws.close()
            raise

    def _on_welcome(self, obj: dict[str, Any]) -> None:
        self.welcome = obj
        self.member_id = str(obj.get("member_id"))
        self.members = {
            str(m["id"]): m for m in obj.get("members", []) if isinstance(m, dict) and "id" in m
        }

    def _attach(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._sent_at.clear()
        self._clock_task = asyncio.get_running_loop().create_task(
            self._clock_loop(ws), name="posewire-ws-clock"
        )

    async def _run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read until the connection ends; reconnect while that may help."""
        while True:
            code = await self._read(ws)
            if self._clock_task is not None:
                self._clock_task.cancel()
            self._ws = None
            if self._closed:
                return
            err = self._refusal(code, f"connection closed (code {code})")
            self._on_lost(code)
            if err is not None:
                self._fatal = err
                self._wake.set()
                log.warning("%s", err)
                return
            log.info("connection to %s lost (code %s); reconnecting", self.url, code)
            new = await self._reconnect()
            if new is None:
                return
            ws = new

    async def _reconnect(self) -> aiohttp.ClientWebSocketResponse | None:
        """Join again, from the URL after the lost one (order and backoff:
        :mod:`pipeline.transports.endpoints`)."""
        delay = self.reconnect_initial_s
        self.endpoints.lost()
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        while not self._closed:
            try:
                ws = await self._open(max(self.connect_timeout_s, 1.0))
            except (TokenError, TransportError) as exc:
                try:
                    round_failed = self.endpoints.failed(exc)
                except (TokenError, BrokenResourceError) as fatal:
                    self._fatal = fatal
                    self._wake.set()
                    log.warning("%s", fatal)
                    return None
                if round_failed:
                    delay = min(delay * 2, self.reconnect_max_s)
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                continue
            self._stats.reconnects += 1
            self._stats.connects += 1
            self._attach(ws)
            self._on_reconnected()
            return ws
        return None

    # hooks of a transport that carries the traffic over another path once joined (webrtc)

    def _on_lost(self, code: int | None) -> None:
        """The WebSocket dropped (a reconnect follows unless the refusal is final)."""
        self._put(StateChange(False, code, (self._last_error or {}).get("reason", "")))

    def _on_reconnected(self) -> None:
        """Joined again after a drop (``welcome`` is the new one)."""
        self._put(StateChange(True, resumed=bool(self.welcome.get("resumed"))))

    async def _send_text(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        """Send a control message (``ConnectionError`` when the path is closed)."""
        await ws.send_str(text)

    def _packet(self, data: bytes, t: int) -> None:
        """A pose packet arrived (at wall-clock ``t``)."""
        self._stats.packets_received += 1
        self._stats.bytes_received += len(data)
        self._put(Packet(data, t))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> int | None:
        while True:
            try:
                msg = await ws.receive()
            except (TimeoutError, ConnectionError):
                return None
            t = time.time_ns()
            kind = msg.type
            if kind == aiohttp.WSMsgType.BINARY:
                self._packet(msg.data, t)
            elif kind == aiohttp.WSMsgType.TEXT:
                obj = self._parse(msg.data)
                if obj is not None:
                    self._on_control(obj, t)
            elif kind in _ENDED:
                return ws.close_code

    def _parse(self, text: str) -> dict[str, Any] | None:
        """A server message: a JSON object with a string ``type`` (bounded by
        :func:`pipeline.model.jsonsafe.loads`); anything else is counted and ignored."""
        try:
            obj = jsonsafe.loads(text)
        except JsonInputError as exc:
            obj = exc
        if isinstance(obj, dict) and isinstance(obj.get("type"), str):
            return obj
        self._stats.bad_messages += 1
        if self._stats.bad_messages == 1:  # once: a hostile peer must not flood the log
            log.warning("server sent a message that is not a typed JSON object (%s); ignored", obj)
        return None

    def _on_control(self, obj: dict[str, Any], t: int) -> None:
        kind = obj["type"]
        self._stats.controls_received += 1
        if kind == "pong":
            self._sync.on_pong(obj, t)
            return
        if kind == "ack":
            self._stats.acks += 1
            if self._sent_at:
                self._ack_rtts.append((time.monotonic_ns() - self._sent_at.popleft()) / 1e6)
        elif kind == "presence":
            member = obj.get("member")
            if isinstance(member, dict) and "id" in member:
                if obj.get("event") == "leave":
                    self.members.pop(str(member["id"]), None)
                else:
                    self.members[str(member["id"])] = member
        elif kind == "error":
            self._last_error = obj
        self._put(Control(kind, obj, t))

    def _via(self, ws: aiohttp.ClientWebSocketResponse) -> Callable[[str], Awaitable[None]]:
        async def send(text: str) -> None:
            if ws.closed:
                raise ConnectionError("closed")
            await self._send_text(ws, text)

        return send

    async def probe_rtt_ms(self) -> float | None:
        ws = self._ws  # one clock ping (on the WebRTC control channel once that is open)
        got = await self._sync.ping(self._via(ws)) if ws is not None and not ws.closed else None
        return got[0] / 1e6 if got is not None else None

    async def _report_clock(self) -> None:
        off, rtt = self.clock_offset_ns, self.clock_rtt_ns
        if self.publish and off is not None and rtt is not None:
            with contextlib.suppress(TransportError, TokenError):
                await self.send_control({"type": "clock", "offset_ns": off, "rtt_ns": rtt})

    async def _clock_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        first = True
        while not ws.closed:
            if first and self._stats.connects > 1:
                # after a reconnect: refresh the estimate against the (maybe new) server
                await self._sync.measure(self._via(ws), self.clock_samples, fresh=True)
                await self._report_clock()
            first = False
            await asyncio.sleep(self.clock_interval_s)
            before = self.clock_offset_ns
            await self._sync.ping(self._via(ws))
            if self.clock_offset_ns != before:
                await self._report_clock()


def member_factory(cls: type[WebSocketTransport]) -> TransportFactory:
    """The factory of a room-member transport class: a member of ``transmit.room`` built
    from the ``transmit`` section (``websocket`` and ``webrtc`` register one each)."""

    def factory(cfg: TransmitConfig, context: TransportContext) -> WebSocketTransport:
        if cfg.ca_file is not None:  # relative to the configuration file
            cfg = cfg.model_copy(update={"ca_file": context.resolve_path(cfg.ca_file)})
        member = cls.from_config(
            cfg, context.token(), publish=context.publish, subscribe=context.subscribe
        )
        member.name, member.pair = context.name, context.pair
        return member

    return factory


TRANSPORTS.add("websocket", TransmitConfig, member_factory(WebSocketTransport))
