"""WebRTC transport: a room member whose traffic rides two data channels (``docs/webrtc.md``).

:class:`WebRtcTransport` is a :class:`~pipeline.transports.websocket.WebSocketTransport`
(the member WebSocket: join, welcome, reconnect and resume, presence, the one
message parser, the clock exchange) that, once joined, offers a
:class:`~pipeline.rtc.link.PeerLink` (``rtc_offer`` on the WebSocket, the
server answers) and carries the traffic on its channels when they are open:
the packets that must arrive on ``control`` (reliable: keyframes, the anchors of an
anchor-reference stream, the deltas of a chained one, as
:class:`~pipeline.codec.anchors.AnchorTracker` learns them from the headers), the
other delta packets on ``pose`` (unordered, no retransmission, bounded by the
``bufferedAmount`` watermark), control messages
and clock pings on ``control``. It receives from both channels and from the
WebSocket (the server uses the WebSocket until the link is open, and again
after it dies). :attr:`connected` is true while the link is open.

Dead path: a task ticks the link every :data:`TICK_S` (heartbeat when idle;
nothing received for ``transmit.webrtc.dead_after_ms``: dead). A dead link is
reported as ``StateChange(False, reason="rtc_dead: ...")``, closed
(``rtc_close``), and replaced by a fresh one (a new offer, capped backoff) on
the same membership; ``StateChange(True, resumed=True)`` when open again. When
the WebSocket drops too, its reconnect and resume run first, then the offer.

Where WebRTC cannot work at all, :meth:`connect` raises
:class:`~pipeline.errors.TransportUnavailable` saying why (:func:`unavailable_reason`):
aioice never offers loopback candidates, so a server on a loopback address,
or a host with no other interface, cannot be reached; a server that does not
take offers (``webrtc_disabled``) neither. With ``optional=True`` (the
receiver's ``--transport auto``) the transport stays a plain WebSocket member
instead and :attr:`unavailable` says why. Failing to open the channels within
``transmit.webrtc.connect_timeout_s`` (no working candidate pair) is a plain
:class:`~pipeline.errors.TransportError`: retrying may help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import fields
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from aioice.ice import get_host_addresses

from pipeline.codec import peek_header
from pipeline.codec.anchors import AnchorTracker, tracker_for
from pipeline.codec.audio import is_audio
from pipeline.config import IceServer, RtcConfig, TransmitConfig
from pipeline.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ProtocolError,
    TokenError,
    TransportError,
    TransportUnavailable,
)
from pipeline.model.net import is_loopback
from pipeline.rtc.link import LinkStats, PeerLink
from pipeline.transports import TRANSPORTS
from pipeline.transports.base import StateChange, TransportStatistics
from pipeline.transports.endpoints import ws_url
from pipeline.transports.websocket import WebSocketTransport, member_factory
from pipeline.wire import messages

log = logging.getLogger("posewire.transport.webrtc")

#: how often the link is ticked: heartbeat and dead-path check (dead_after_ms + TICK_S
#: bounds the detection time after the last packet received)
TICK_S: Final = 0.02
#: before declaring a path dead, the loop runs this long to read what already arrived
CONFIRM_S: Final = 0.005
#: at most this long waiting on close for the channels' buffers to drain
FLUSH_S: Final = 0.5
#: clock pings over the control channel right after it opens
CHANNEL_CLOCK_SAMPLES: Final = 4
#: reliable packets kept for the server's NACKs (anchors come every third packet)
KEPT_FOR_NACKS: Final = 32
#: server ``error`` reasons that answer an offer: no retry can help / a retry may
_NEVER: Final = frozenset({"webrtc_disabled"})
_LATER: Final = frozenset({"too_many_peers"})


def local_addresses() -> list[str]:
    """This host's interface addresses that ICE can offer (aioice's list, loopback removed)."""
    return [a for a in get_host_addresses(use_ipv4=True, use_ipv6=True) if not is_loopback(a)]


def unavailable_reason(url: str) -> str | None:
    """Why WebRTC cannot reach the server at ``url`` from here, or None when it may."""
    host = urlsplit(ws_url(url)).hostname or ""
    if is_loopback(host):
        return f"WebRTC cannot reach a server on {host}: aioice offers no loopback candidates"
    if not local_addresses():
        return (
            "WebRTC needs a network interface address other than loopback "
            "(aioice offers no loopback candidates) and this host has none"
        )
    return None


def _add(total: LinkStats, more: LinkStats) -> None:
    for f in fields(LinkStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(more, f.name))


def _must_arrive(packet: bytes, trackers: dict[int, AnchorTracker]) -> bool:
    """Whether ``packet`` goes on the reliable channel: a keyframe, an anchor or a chained
    delta (something unreadable too: the server judges it); an audio packet does not: it
    goes on the lossy channel like a free delta (docs/audio.md)."""
    if is_audio(packet):
        return False
    try:
        h = peek_header(packet)
    except ProtocolError:
        return True
    tracker = tracker_for(trackers, h.stream_id)
    return tracker.classify(h.seq, h.ref_seq, h.keyframe, h.epoch) != "free"


class WebRtcTransport(WebSocketTransport):
    """A member of one room over WebRTC data channels (see the module docstring)."""

    kind = "webrtc"

    def __init__(
        self,
        url: str | Sequence[str],
        room: str,
        token: str,
        *,
        ice_servers: Sequence[IceServer] = (),
        rtc: RtcConfig | None = None,
        optional: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(url, room, token, **options)
        self.ice_servers = list(ice_servers)
        self.rtc = rtc if rtc is not None else TransmitConfig.model_validate({}).webrtc
        self.optional = optional
        self.unavailable: str | None = None
        """Why this member runs over the WebSocket only (``optional``), else None."""
        self._link: PeerLink | None = None
        self._trackers: dict[int, AnchorTracker] = {}
        self._recent: dict[tuple[int, int], bytes] = {}
        """The last packets sent on the reliable channel, for the server's NACKs."""
        self._rtc_session = 0
        self._up = False
        """What the last StateChange said (the link open and in use)."""
        self._answer: asyncio.Future[str] | None = None
        self._failure: asyncio.Future[None] | None = None
        self._ws_back = asyncio.Event()
        self._resumed = True
        self._rtc_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._retired = LinkStats()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "offers", "opens", "failures", "dead_detections", "violations", "via_webrtc",
                "nack_resent",
            ),
            0,
        )  # fmt: skip
        self._open_ms: float | None = None
        self._last_dead_ns: int | None = None
        self._last_dead_silence_ms: float | None = None
        self._last_dead_reason: str | None = None

    @classmethod
    def options(cls, cfg: TransmitConfig) -> dict[str, Any]:
        return {**super().options(cfg), "ice_servers": cfg.ice_servers, "rtc": cfg.webrtc}

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        if self.unavailable is not None:
            return super().connected
        link = self._link
        return self._up and link is not None and link.is_open and super().connected

    @property
    def link(self) -> PeerLink | None:
        """The current peer connection (None between two)."""
        return self._link

    async def connect(self) -> None:
        if self._closed:
            raise ClosedResourceError("transport was closed")
        if self._run_task is not None:
            return
        why = unavailable_reason(self.url)
        if why is not None and not self.optional:
            raise TransportUnavailable(why)
        await super().connect()
        offers = self.welcome.get("webrtc")
        enabled = offers.get("enabled") if isinstance(offers, dict) else None
        if why is None and enabled is False:
            why = f"the server at {self.url} does not take WebRTC offers (webrtc disabled)"
        elif why is None and enabled is None and self.optional:
            why = f"the server at {self.url} does not announce WebRTC in its welcome"
        try:
            if why is not None:
                raise TransportUnavailable(why)
            await self._negotiate(self.rtc.connect_timeout_s)
        except TransportUnavailable as exc:
            if not self.optional:
                await self.close()
                raise
            self._fall_back(str(exc))
            return
        except BaseException:
            await self.close()
            raise
        self._up = True
        self._rtc_task = asyncio.get_running_loop().create_task(
            self._rtc_loop(), name="posewire-rtc-link"
        )

    async def send(self, packet: bytes) -> None:
        link = self._link
        if self.unavailable is not None:
            await super().send(packet)
            return
        self._check()
        if link is None or not self.connected:
            self._stats.send_failures += 1
            return
        t0 = time.perf_counter()
        reliable = _must_arrive(packet, self._trackers)
        sent = link.send_control(packet) if reliable else link.send_pose(packet)
        if reliable:
            self._keep(packet)
        if not sent:  # over the watermark: counted by the link as pose_dropped_stale
            return
        self._sent(packet, (time.perf_counter() - t0) * 1000.0)

    async def close(self) -> None:
        if self._closed:
            return
        if self._rtc_task is not None:  # no dead-path verdict on a link we are ending
            self._rtc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rtc_task
            self._rtc_task = None
        link = self._link
        if link is not None and link.is_open:  # let what was sent leave before the leave
            deadline = time.monotonic() + FLUSH_S
            while link.pose.bufferedAmount + link.control.bufferedAmount > 0:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)
        await super().close()
        self._fail(TransportError("transport closed"))
        if self._link is not None:
            self._retire(self._link)
        if self._background:
            await asyncio.wait(self._background, timeout=3.0)

    def statistics(self) -> TransportStatistics:
        s = super().statistics()
        link = self._link
        if self.unavailable is not None:
            s.kind = "websocket"
            s.extra["webrtc_unavailable"] = self.unavailable
            return s
        s.kind = self.kind
        s.connected = self.connected
        totals = self._link_totals()
        c = self._counts
        if link is not None and link.is_open:
            s.buffered_bytes = int(link.pose.bufferedAmount) + int(link.control.bufferedAmount)
        s.extra.update(
            {
                "webrtc_unavailable": None,
                "rtc_session": self._rtc_session,
                "rtc_open": bool(link is not None and link.is_open),
                "rtc_offers": c["offers"],
                "rtc_opens": c["opens"],
                "rtc_connect_failures": c["failures"],
                "rtc_open_ms": self._open_ms,
                "rtc_dead_detections": c["dead_detections"],
                "rtc_last_dead_ns": self._last_dead_ns,
                "rtc_last_dead_silence_ms": self._last_dead_silence_ms,
                "rtc_last_dead_reason": self._last_dead_reason,
                "rtc_violations": c["violations"],
                "packets_via_webrtc": c["via_webrtc"],
                "nack_resent": c["nack_resent"],
                "packets_via_websocket": s.packets_received - c["via_webrtc"],
                **{f"rtc_{k}": v for k, v in totals.as_dict().items()},
            }
        )
        return s

    # ------------------------------------------------------------------ the link

    def _link_totals(self) -> LinkStats:
        total = LinkStats(**self._retired.as_dict())
        if self._link is not None:
            _add(total, self._link.stats)
        return total

    def _fall_back(self, why: str) -> None:
        self.unavailable = why
        log.warning("%s; using the WebSocket", why)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _retire(self, link: PeerLink, *, session: int | None = None) -> None:
        """Forget ``link`` (its counters stay in the totals), tell the server when
        ``session`` is given and the WebSocket is up, and close it in the background."""
        if self._link is link:
            self._link = None
            _add(self._retired, link.stats)
        ws = self._ws
        if session is not None and ws is not None and not ws.closed:
            self._spawn(self._send_ws(ws, {"type": "rtc_close", "session": session}))
        self._spawn(link.close())

    @staticmethod
    async def _send_ws(ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError):
            await ws.send_str(messages.dumps(message))

    def _fail(self, error: TransportError) -> None:
        """End the negotiation in progress (if any) with ``error``."""
        fut = self._failure
        if fut is not None and not fut.done():
            fut.set_exception(error)
            fut.exception()  # retrieved: nobody may be waiting any more

    async def _negotiate(self, timeout: float) -> None:
        """Offer a fresh link and wait until its channels are open (or raise)."""
        ws = self._ws
        if ws is None or ws.closed:
            raise TransportError("the member WebSocket is down")
        self._rtc_session += 1
        session = self._rtc_session
        self._counts["offers"] += 1
        link = self._link = PeerLink(
            self.ice_servers,
            self.rtc,
            on_pose=lambda data: self._on_pose(link, data),
            on_control=lambda msg: self._on_link_control(link, msg),
            on_violation=lambda why: self._on_violation(link, why),
        )
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        self._failure = failure = loop.create_future()
        t0 = time.monotonic()

        async def steps() -> None:
            await ws.send_str(
                messages.dumps(
                    {"type": "rtc_offer", "session": session, "sdp": await link.create_offer()}
                )
            )
            assert self._answer is not None
            await link.accept_answer(await self._answer)
            await link.opened.wait()

        task = loop.create_task(steps())
        try:
            done, _ = await asyncio.wait(
                {task, failure}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                task.result()
            elif failure in done:
                failure.result()
            else:
                raise TransportError(
                    f"WebRTC: the data channels did not open within {timeout:g} s "
                    "(no working ICE candidate pair?)"
                )
        except (ProtocolError, ConnectionError, TransportError) as exc:
            self._counts["failures"] += 1
            self._retire(link, session=session)
            if self._fatal is not None:  # the server closed the member for good (e.g. 4018)
                raise self._fatal from exc
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"WebRTC: {exc}") from exc
        except BaseException:
            self._counts["failures"] += 1
            self._retire(link, session=session)
            raise
        finally:
            task.cancel()
            self._answer = self._failure = None
        self._open_ms = (time.monotonic() - t0) * 1000.0
        self._counts["opens"] += 1
        log.info("WebRTC session %d open in %.0f ms", session, self._open_ms)
        self._spawn(self._channel_clock())

    async def _channel_clock(self) -> None:
        """A few clock samples over the new control channel (the min-RTT one wins)."""
        ws = self._ws
        if ws is not None:
            await self._sync.measure(self._via(ws), CHANNEL_CLOCK_SAMPLES)
            await self._report_clock()

    async def _rtc_loop(self) -> None:
        """Tick the open link; on a dead path report it and open a fresh one."""
        while not self._closed and self.unavailable is None:
            link = self._link
            while link is not None and link is self._link and self._up:
                if time.monotonic() - link.last_rx > self.rtc.dead_after_ms / 1000:
                    # about to be declared dead: first let what already arrived be read
                    # (a stalled loop must not be mistaken for a dead path)
                    await asyncio.sleep(CONFIRM_S)
                reason = link.tick()
                if reason is not None:
                    self._dead(link, reason)
                    break
                await asyncio.sleep(TICK_S)
            await self._reopen()

    def _dead(self, link: PeerLink, reason: str) -> None:
        silence = (time.monotonic() - link.last_rx) * 1000.0
        self._counts["dead_detections"] += 1
        self._last_dead_ns = time.time_ns()
        self._last_dead_silence_ms = silence
        self._last_dead_reason = reason
        self._up = False
        self._resumed = True
        log.warning("WebRTC path dead (%s); reopening", reason)
        self._put(StateChange(False, reason=f"rtc_dead: {reason}"))
        self._retire(link, session=self._rtc_session)

    async def _reopen(self) -> None:
        """A fresh link on the same membership, with capped backoff."""
        delay = self.reconnect_initial_s
        while not self._closed and not self._up:
            if self._ws is None or self._ws.closed:
                self._ws_back.clear()
                await self._ws_back.wait()  # the WebSocket's reconnect + resume runs first
                continue
            try:
                await self._negotiate(self.rtc.connect_timeout_s)
            except TransportUnavailable as exc:  # the server stopped taking offers
                self._fall_back(str(exc))
                self._put(StateChange(self.connected, reason="webrtc_unavailable"))
                return
            except (TokenError, BrokenResourceError):
                return  # the WebSocket's final refusal: recv() raises it
            except TransportError as exc:
                log.debug("WebRTC reopen failed: %s", exc)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.reconnect_max_s)
                continue
            self._up = True
            self._put(StateChange(True, resumed=self._resumed))

    # ------------------------------------------------------------------ receiving

    def _on_pose(self, link: PeerLink, data: bytes) -> None:
        if link is self._link:
            self._counts["via_webrtc"] += 1
            self._packet(data, time.time_ns())

    def _on_link_control(self, link: PeerLink, message: str | bytes) -> None:
        if link is not self._link:
            return
        t = time.time_ns()
        if isinstance(message, bytes):
            self._counts["via_webrtc"] += 1
            self._packet(message, t)
            return
        obj = self._parse(message)
        if obj is not None:
            self._on_control(obj, t)

    def _on_violation(self, link: PeerLink, why: str) -> None:
        self._counts["violations"] += 1
        self._stats.bad_messages += 1
        if self._counts["violations"] == 1:
            log.warning("the server broke the data-channel rules (%s); ignored", why)

    def _on_control(self, obj: dict[str, Any], t: int) -> None:
        kind = obj["type"]
        if kind in ("rtc_answer", "rtc_state"):
            self._on_signal(obj)
            return
        if kind == "nack":
            self._resend(obj["stream_id"], obj["seq"])
            return
        if kind == "error" and self._failure is not None:
            reason = str(obj.get("reason") or "")
            if reason in _NEVER | _LATER:
                error = TransportUnavailable if reason in _NEVER else TransportError
                self._fail(error(f"the server refused the WebRTC offer: {reason}"))
        super()._on_control(obj, t)

    def _keep(self, packet: bytes) -> None:
        """Remember a packet that must arrive, for a NACK of the server."""
        with contextlib.suppress(ProtocolError):
            h = peek_header(packet)
            self._recent[(h.stream_id, h.seq)] = packet
            while len(self._recent) > KEPT_FOR_NACKS:
                del self._recent[next(iter(self._recent))]

    def _resend(self, stream_id: int, seq: int) -> None:
        """The server lacks packet ``seq`` (a ``nack``): send it again on the lossy channel,
        where it does not wait behind the reliable channel's retransmission of it."""
        packet = self._recent.get((stream_id, seq))
        link = self._link
        if packet is None or link is None or not self.connected:
            return
        self._counts["nack_resent"] += 1
        link.send_pose(packet)

    def _on_signal(self, obj: Mapping[str, Any]) -> None:
        if obj.get("session") != self._rtc_session:
            return  # about an older session
        if obj["type"] == "rtc_answer":
            fut = self._answer
            if fut is not None and not fut.done():
                fut.set_result(str(obj.get("sdp")))
            return
        if obj.get("state") == "closed":
            reason = str(obj.get("reason") or "closed")
            link = self._link
            if self._failure is not None:
                self._fail(TransportError(f"the server closed the WebRTC session: {reason}"))
            elif link is not None and link.dead_reason is None:
                link.dead_reason = f"the server closed it ({reason})"

    # ------------------------------------------------------------------ WebSocket hooks

    def _on_lost(self, code: int | None) -> None:
        if self.unavailable is not None:
            super()._on_lost(code)
            return
        self._fail(TransportError("the member WebSocket dropped"))
        if self._link is not None:
            self._retire(self._link)  # the server drops it with the WebSocket
        if self._up:
            self._up = False
            super()._on_lost(code)

    def _on_reconnected(self) -> None:
        if self.unavailable is not None:
            super()._on_reconnected()
            return
        self._resumed = bool(self.welcome.get("resumed"))
        self._ws_back.set()

    async def _send_text(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        link = self._link
        if self._up and link is not None and link.send_control(text):
            return
        await ws.send_str(text)


TRANSPORTS.add("webrtc", TransmitConfig, member_factory(WebRtcTransport))
