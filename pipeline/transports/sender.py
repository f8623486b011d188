"""The publishing side of a member: the active transport, switching, throttle, feedback.

:class:`Sender` owns the transport the transmit stage sends on. It connects
with capped exponential backoff (the room server may still be starting or
restarting); a refused token is not retried (:class:`~pipeline.errors.TokenError`).
:meth:`Sender.activate` switches make-before-break: the new transport is
connected before the old one is closed. What the far side says goes to the
encoder as feedback records (:mod:`pipeline.codec.feedback`): the server's
acks (the encoder may predict from an acknowledged frame) and keyframe
requests; a (re)connect or a switch asks for a keyframe too, so that nobody
waits a whole keyframe interval. After a reconnect (``StateChange(True)``: the
WebSocket resumed, a dead WebRTC link reopened) the far side may lack the
references of the next deltas: they are skipped (``packets_skipped_for_keyframe_total``)
until the keyframe comes, at most :data:`KEYFRAME_WAIT_S`.

:class:`~pipeline.transports.throttle.Throttle` caps the send rate.

With ``transmit.fallback`` the sender keeps a **hot standby**: both transports connected
(as a ``pair`` on the server: one stream, docs/room-protocol.md), the stream on one, the
other carrying only its own heartbeat and a clock ping every
:data:`~pipeline.transports.health.PROBE_S` (its round trip: the standby has no acks).
Per transport it keeps the health figures of :mod:`pipeline.transports.health` (stage
metrics ``path_<kind>_*``). A switch
(:meth:`Sender.switch`, the ``switch_transport`` command) moves the stream onto the
connected standby and sends the packets of the last moment again there; a dead path of
the active transport fails over at once (:meth:`Sender._failover`); automatic switches
are refused while pinned and past ``transmit.max_switches_per_min``.

A refusal by the far side (a token refused, a kick, a closed room, a stream id
owned by another publisher: :func:`~pipeline.transports.base.refusal_of`) is a
visible state, never a silent one: :attr:`Sender.refused` holds it, the
metrics say ``transport_refused`` 1 (and ``transport_refused_<reason>`` 1,
``transport_connected`` 0), every packet offered meanwhile is dropped and
counted in ``packets_dropped_total``, and it is logged once. A refusal that a
retry can fix (the room was closed or does not exist yet) is retried in the
background with capped backoff (:data:`REFUSED_BACKOFF_MAX_S`) and cleared
when the server accepts us again; a final one (kicked, token refused, protocol
violation) makes :meth:`Sender.send` raise it, and the caller stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

from pipeline.codec import feedback, peek_header
from pipeline.codec.audio import is_audio
from pipeline.config import TransmitConfig, TransportKind
from pipeline.errors import (
    BrokenResourceError,
    ClosedResourceError,
    CommandError,
    ProtocolError,
    TokenError,
    TransportError,
    TransportUnavailable,
)
from pipeline.transports import TRANSPORTS, make_transport
from pipeline.transports.base import (
    Control,
    Received,
    Refusal,
    StateChange,
    Transport,
    TransportContext,
    refusal_of,
)
from pipeline.transports.health import PathHealth, Recent, SwitchCap, metric_name, probe_standby
from pipeline.transports.throttle import Throttle

CONNECT_BACKOFF_MAX_S = 2.0
#: cap of the backoff between retries after a refusal that a retry may fix
REFUSED_BACKOFF_MAX_S = 5.0
#: what replaces a transport that cannot work here at all (TransportUnavailable)
FALLBACK_OF: dict[TransportKind, TransportKind] = {TransportKind.WEBRTC: TransportKind.WEBSOCKET}
#: after a reconnect, deltas are skipped until a keyframe, at most this long
KEYFRAME_WAIT_S = 1.0
#: what :meth:`Sender.send` does when the throttle says wait: wait (the stage), send at
#: once (the bucket goes into debt: a high-priority pose), or drop (a low-priority one)
WhenThrottled = Literal["wait", "send", "drop"]


_NAMES = {TransportKind.WEBSOCKET: "WebSocket", TransportKind.WEBRTC: "WebRTC"}


def _peek(packet: bytes) -> tuple[bool, int | None]:
    """(keyframe, seq); unreadable: (True, None): not ours to judge, the far side refuses it."""
    try:
        h = peek_header(packet)
    except ProtocolError:
        return True, None
    return h.keyframe, h.seq


def parse_kind(value: object) -> TransportKind:
    """The ``to`` of a ``switch_transport`` command; :class:`CommandError` unless it names a
    transport of this build."""
    known = [k for k in TransportKind if k.value in TRANSPORTS]
    try:
        kind = TransportKind(str(value))
    except ValueError:
        kind = None
    if kind is None or kind not in known:
        names = ", ".join(k.value for k in known)
        raise CommandError(f"switch_transport: 'to' must be one of {names}")
    return kind


class Sender:
    """The active transport of a publisher and its feedback pump.

    ``on_feedback`` receives encoder feedback records; ``stopping`` and ``tick``
    let a supervised caller stop a connect loop and stay alive while waiting.
    ``on_received`` (the client API: a member that also subscribes) gets every item
    the active transport yields, after the feedback was taken from it; ``fallback``
    replaces :data:`FALLBACK_OF` (``{}``: a transport that cannot work here is an error).
    """

    def __init__(
        self,
        cfg: TransmitConfig,
        context: TransportContext,
        *,
        on_feedback: Callable[[bytes], None],
        stopping: Callable[[], bool] = lambda: False,
        tick: Callable[[], None] = lambda: None,
        log: logging.Logger | None = None,
        on_received: Callable[[Received], Awaitable[None]] | None = None,
        fallback: Mapping[TransportKind, TransportKind] = FALLBACK_OF,
    ) -> None:
        self.cfg = cfg
        self.on_received = on_received
        self.fallback = fallback
        self.context = context
        self.on_feedback = on_feedback
        self.stopping = stopping
        self.tick = tick
        self.log = log or logging.getLogger("posewire.sender")
        self.kind = cfg.primary
        self.transport: Transport | None = None
        self.pump: asyncio.Task[None] | None = None
        self.throttle = Throttle(cfg.max_bandwidth_kbps)
        self.switches = 0
        self.acks = 0
        self.sent = self.failed = self.bytes_sent = 0
        self.audio_sent = self.audio_bytes = 0  # audio packets: counted apart from pose
        self.throttled_ms = 0.0
        self.dropped_refused = 0
        """Packets dropped because the far side refused us (counted once each)."""
        self.refusals = 0
        self.refused: Refusal | None = None
        """The refusal in force (None while accepted)."""
        self._recovery: asyncio.Task[None] | None = None
        self._retiring: asyncio.Task[None] | None = None
        self._keyframe_wait: float | None = None
        """Since when deltas are held back until the keyframe asked for after a reconnect."""
        self.skipped_for_keyframe = 0
        self.throttle_dropped = 0
        """Packets dropped because the throttle said wait (``send(..., throttled="drop")``)."""
        self.unavailable: dict[TransportKind, str] = {}
        """Transports that cannot work here (why), replaced by :data:`FALLBACK_OF` theirs."""
        self.hot = cfg.fallback is not None
        """Hot standby: both transports connected, the stream on one (docs/room-protocol.md)."""
        if self.hot:  # the two connections form a pair on the server: one stream, no takeover
            self.context = dataclasses.replace(context, pair=True)
        self.standby: Transport | None = None
        self.standby_kind: TransportKind | None = None
        self._standby_pump: asyncio.Task[None] | None = None
        self._standby_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self.health = {k: PathHealth(k.value, cfg.window_s) for k in TransportKind}
        self.recent = Recent(cfg.webrtc.dead_after_ms / 1000 + 0.15)  # sent again on a switch
        self.cap = SwitchCap(cfg.max_switches_per_min)
        self.pinned: TransportKind | None = None  # manual override: no automatic switch
        self.switch_reasons: dict[str, int] = {}
        self.switched_at: dict[str, int] = {}  # reason -> wall-clock ns of the last switch
        self.replayed = 0

    def _note_refusal(self, exc: TokenError | BrokenResourceError) -> Refusal:
        """Enter (or stay in) the refused state; logged once per refusal."""
        ref = refusal_of(exc)
        if self.refused is None or self.refused.reason != ref.reason:
            self.refusals += 1
            if ref.final:
                self.log.error("transport %s refused for good: %s", self.kind.value, ref.message)
            else:
                self.log.warning(
                    "transport %s refused (%s): %s; retrying with backoff (at most %g s); "
                    "packets are dropped meanwhile",
                    self.kind.value,
                    ref.reason,
                    ref.message,
                    REFUSED_BACKOFF_MAX_S,
                )
        self.refused = ref
        return ref

    async def connect(
        self, kind: TransportKind, *, retry: bool = True
    ) -> tuple[Transport, TransportKind] | None:
        """Connect ``kind``, retrying with capped backoff; ``None`` if stopping first.

        With ``retry`` false (the client API's first connect) the first failure or
        refusal is raised instead of retried (the fallback of an unavailable transport
        is still tried).

        A final refusal (token refused, kicked...) raises it (no retry); a refusal a
        retry may fix is retried with a longer backoff and shown in :attr:`refused`.
        A transport that cannot work here at all
        (:class:`~pipeline.errors.TransportUnavailable`) is replaced by its
        :attr:`fallback` (said once in the log, and in :attr:`unavailable`).
        """
        delay = 0.05
        cap = CONNECT_BACKOFF_MAX_S
        warned = False
        while not self.stopping():
            if kind in self.unavailable and kind in self.fallback:
                kind = self.fallback[kind]
            transport = make_transport(kind.value, self.cfg, self.context)
            try:
                await transport.connect()
                if self.refused is not None:
                    self.log.info(
                        "transport %s accepted again (was refused: %s)",
                        kind.value,
                        self.refused.reason,
                    )
                    self.refused = None
                else:
                    self.log.info("transport %s connected", kind.value)
                return transport, kind
            except TransportUnavailable as exc:
                with contextlib.suppress(TransportError, TokenError):
                    await transport.close()
                if kind not in self.fallback:
                    raise
                self.unavailable[kind] = str(exc)
                self.log.warning("%s; using the %s", exc, _NAMES[self.fallback[kind]])
                continue
            except (TokenError, BrokenResourceError) as exc:
                with contextlib.suppress(TransportError, TokenError):
                    await transport.close()
                if self._note_refusal(exc).final or not retry:
                    raise
                cap = REFUSED_BACKOFF_MAX_S
            except TransportError as exc:
                if not retry:
                    with contextlib.suppress(TransportError, TokenError):
                        await transport.close()
                    raise
                if not warned:
                    self.log.warning("cannot connect %s yet (%s): retrying", kind.value, exc)
                    warned = True
                with contextlib.suppress(TransportError, TokenError):
                    await transport.close()
            end = time.monotonic() + delay
            while time.monotonic() < end and not self.stopping():
                self.tick()
                await asyncio.sleep(0.05)
            delay = min(delay * 2, cap)
        return None

    async def activate(self, kind: TransportKind, *, retry: bool = True) -> bool:
        """Make-before-break: connect ``kind``, then retire the old transport (``retry``:
        see :meth:`connect`)."""
        self._cancel_recovery()
        standby = self.standby
        if standby is not None and self.standby_kind == kind and standby.connected:
            await self._swap("manual")
            return True
        made = await self.connect(kind, retry=retry)
        if made is None:
            return False
        new, kind = made
        old, old_pump = self.transport, self.pump
        switched = old is not None and kind != self.kind
        self._install(new, kind)
        if old is not None:
            if switched:
                self.switches += 1
                self.log.info("switched transport %s -> %s", old.kind, kind.value)
            await self._retire(old, old_pump)
        self._ensure_standby()
        return True

    async def switch(self, kind: TransportKind, reason: str, *, auto: bool) -> bool:
        """Move the stream to ``kind`` (a command); ``auto``: a decision of the policy,
        refused (:class:`CommandError`) while pinned or past the cap per minute."""
        if auto and self.pinned is not None:
            raise CommandError(f"pinned to {self.pinned.value}: automatic switches are off")
        if auto and not self.cap.allowed():
            raise CommandError(
                f"at most {self.cap.per_min} automatic switches per minute: staying on "
                f"{self.kind.value}"
            )
        if kind == self.kind:
            return False
        standby = self.standby
        if standby is not None and self.standby_kind == kind and standby.connected:
            await self._swap(reason)
        elif not await self.activate(kind):
            return False
        else:
            self._count(reason)
        if auto:
            self.cap.note()
        return True

    def _count(self, reason: str) -> None:
        self.switch_reasons[reason] = self.switch_reasons.get(reason, 0) + 1
        self.switched_at[reason] = time.time_ns()

    async def _swap(self, reason: str) -> None:
        """Make-before-break onto the connected standby (the old one becomes the standby);
        the packets of the last moment go again on the new one (see :class:`Recent`)."""
        assert self.standby is not None and self.standby_kind is not None
        old, old_pump, old_kind = self.transport, self.pump, self.kind
        self.transport, self.pump, self.kind = self.standby, self._standby_pump, self.standby_kind
        self.standby, self._standby_pump, self.standby_kind = old, old_pump, old_kind
        self.switches += 1
        self._count(reason)
        self.log.info("switched transport %s -> %s (%s)", old_kind.value, self.kind.value, reason)
        self.on_feedback(feedback.pack_keyframe_request())
        for packet in self.recent.take():
            if not self.transport.connected:
                break
            with contextlib.suppress(TransportError):
                await self.transport.send(packet)
                self.replayed += 1

    def _ensure_standby(self) -> None:
        """With a fallback: connect the other transport as the standby (in the background)."""
        if self.hot and self._probe_task is None:  # the standby's RTT: it has no acks
            probe = probe_standby(lambda: (self.standby, self.standby_kind), self.health)
            self._probe_task = asyncio.get_running_loop().create_task(probe)
        if not self.hot or self.standby is not None or self._standby_task is not None:
            return
        assert self.cfg.fallback is not None
        kind = self.cfg.fallback if self.kind == self.cfg.primary else self.cfg.primary
        if kind in self.unavailable:
            return
        self._standby_task = asyncio.get_running_loop().create_task(self._connect_standby(kind))

    async def _connect_standby(self, kind: TransportKind) -> None:
        try:
            made = await self.connect(kind)
        except (TokenError, BrokenResourceError, TransportError) as exc:
            self.log.warning("no hot standby on %s: %s", kind.value, exc)
            return
        finally:
            self._standby_task = None
        if made is None:
            return
        transport, got = made
        if got == self.kind or self.standby is not None:  # the standby cannot work here
            await self._retire(transport, None)
            return
        self.standby, self.standby_kind = transport, got
        self._standby_pump = asyncio.get_running_loop().create_task(self._pump(transport))
        self.log.info("hot standby: %s connected beside %s", got.value, self.kind.value)

    def _install(self, new: Transport, kind: TransportKind) -> None:
        self.transport, self.kind = new, kind
        self.refused = None
        self.pump = asyncio.get_running_loop().create_task(self._pump(new))
        # the far side may not have our reference frames: start from a keyframe
        self.on_feedback(feedback.pack_keyframe_request())

    def _refused_by(self, transport: Transport, exc: TokenError | BrokenResourceError) -> None:
        """The active transport was refused: show it; retry in the background if that
        can help (a final refusal is raised by the next :meth:`send`)."""
        if transport is not self.transport:
            return
        if self._note_refusal(exc).final or self._recovery is not None:
            return
        self._recovery = asyncio.get_running_loop().create_task(self._recover(self.kind))

    async def _recover(self, kind: TransportKind) -> None:
        """Reconnect after a refusal a retry may fix; a final refusal is kept in
        :attr:`refused` for :meth:`send` to raise."""
        try:
            made = await self.connect(kind)
        except (TokenError, BrokenResourceError):
            return  # recorded by connect as a final refusal
        except TransportError as exc:  # no such transport any more: keep refusing visibly
            self.log.error("transport %s cannot be made: %s", kind.value, exc)
            return
        finally:
            self._recovery = None
        if made is None:
            return
        old, old_pump = self.transport, self.pump
        self._install(*made)
        if old is not None:
            await self._retire(old, old_pump)

    def _cancel_recovery(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None

    async def _pump(self, transport: Transport) -> None:
        """What the far side says: acks and keyframe requests go to the encoder."""
        while True:
            try:
                item = await transport.recv()
            except (ClosedResourceError, asyncio.CancelledError):
                return
            except (BrokenResourceError, TokenError) as exc:  # the far side refused us
                self._lost_standby(transport, exc)
                self._refused_by(transport, exc)
                return
            except TransportError as exc:  # the far side ended it
                self.log.warning("transport %s broke: %s", transport.kind, exc)
                self._lost_standby(transport, exc)
                return
            health = self.health[TransportKind(transport.kind)]
            if isinstance(item, Control):
                if item.type == "ack" and isinstance(item.body.get("seq"), int):
                    self.acks += 1
                    health.on_ack(int(item.body["seq"]))
                    self.on_feedback(feedback.pack_ack(int(item.body["seq"])))
                elif item.type == "keyframe_request":
                    self.on_feedback(feedback.pack_keyframe_request())
            elif isinstance(item, StateChange):
                health.dead = None if item.connected else (item.reason or "down")
                standby_back = transport is self.standby and self.health[self.kind].dead is not None
                if standby_back or (not item.connected and transport is self.transport):
                    await self._failover("dead" if standby_back else item.reason or "down")
            if transport is not self.transport:
                continue  # the standby: figures only
            if isinstance(item, StateChange) and item.connected:
                # back after a drop (a reconnect, a reopened WebRTC link): the far side
                # may lack our references; the next packet it gets is a keyframe
                self.on_feedback(feedback.pack_keyframe_request())
                self._keyframe_wait = time.monotonic()
            if self.on_received is not None:
                await self.on_received(item)

    def _lost_standby(self, transport: Transport, exc: Exception) -> None:
        if transport is self.standby:
            self.log.warning("hot standby %s lost: %s", transport.kind, exc)
            self.standby = self.standby_kind = self._standby_pump = None
            self._retiring = asyncio.get_running_loop().create_task(self._retire(transport, None))

    async def _failover(self, reason: str) -> None:
        """The active path is dead: onto the standby at once, unless pinned or capped (a
        round trip through the supervisor would cost heartbeats; it records it)."""
        standby = self.standby
        if self.pinned is not None or standby is None or not standby.connected:
            return
        if not self.cap.allowed():
            self.log.warning("path dead (%s) but the switch cap is reached: staying", reason)
            return
        self.cap.note()
        await self._swap("dead")

    def check(self) -> None:
        """Raise the final refusal in force, if any (the caller stops)."""
        if self.refused is not None and self.refused.final:
            raise self.refused.error

    async def send(self, packet: bytes, *, throttled: WhenThrottled = "wait") -> bool:
        """Wait for the throttle, then send on the active transport; False if it failed.

        While refused the packet is dropped and counted (False); a final refusal is
        raised (:class:`TokenError` or :class:`BrokenResourceError`). ``throttled``
        says what to do when the throttle says wait (:data:`WhenThrottled`).
        """
        if self.refused is not None:
            self.check()
            self.dropped_refused += 1
            return False
        if throttled != "wait" and self.throttle.delay() > 0:
            if throttled == "drop":
                self.throttle_dropped += 1
                return False
            self.throttle.consume(len(packet))  # "send": into debt, at once
            return await self._send_now(packet)
        t_wait = time.monotonic()
        while (wait := self.throttle.delay()) > 0 and not self.stopping():
            self.tick()  # stay alive, and a set command may lift the cap
            await asyncio.sleep(min(wait, 0.05))
        self.throttled_ms += (time.monotonic() - t_wait) * 1000
        self.throttle.consume(len(packet))
        return await self._send_now(packet)

    async def _send_now(self, packet: bytes) -> bool:
        assert self.transport is not None
        transport = self.transport
        if not transport.connected:  # reconnecting: the transport would drop it silently
            self.failed += 1
            self.health[self.kind].on_send(None, False)
            return False
        audio = is_audio(packet)  # audio never waits for a pose keyframe
        if self._keyframe_wait is not None and not audio:
            if _peek(packet)[0] or time.monotonic() - self._keyframe_wait > KEYFRAME_WAIT_S:
                self._keyframe_wait = None
            else:
                self.skipped_for_keyframe += 1
                return False
        health = self.health[self.kind]
        try:
            await transport.send(packet)
        except (TokenError, BrokenResourceError) as exc:
            health.on_send(None, False)
            self.dropped_refused += 1
            self._refused_by(transport, exc)
            if self.refused is not None and self.refused.final:
                raise
            return False
        except TransportError as exc:
            self.failed += 1
            health.on_send(None, False)
            if self.failed == 1 or self.failed % 100 == 0:
                self.log.warning("send failed (%d so far): %s", self.failed, exc)
            return False
        if audio:
            self.audio_sent, self.audio_bytes = self.audio_sent + 1, self.audio_bytes + len(packet)
        else:
            self.sent, self.bytes_sent = self.sent + 1, self.bytes_sent + len(packet)
        health.on_send(None if audio else _peek(packet)[1], True)
        if self.hot:
            self.recent.add(packet)
        return True

    def metrics(self) -> dict[str, float]:
        """Counters and the active transport's figures, as stage metrics."""
        out: dict[str, float] = {
            "packets_sent_total": self.sent,
            "bytes_sent_total": self.bytes_sent,
            "packets_dropped_total": self.failed + self.dropped_refused,
            "packets_refused_total": self.dropped_refused,
            "transport_refusals_total": self.refusals,
            "transport_refused": 0.0 if self.refused is None else 1.0,
            "acks_total": self.acks,
            "bandwidth_limit_kbps": self.throttle.kbps or 0.0,
            "throttled_ms_total": self.throttled_ms,
            "transport_switches_total": self.switches,
            "packets_skipped_for_keyframe_total": self.skipped_for_keyframe,
            "audio_packets_sent_total": self.audio_sent,
            "audio_bytes_sent_total": self.audio_bytes,
        }
        if self.refused is not None:
            out[f"transport_refused_{metric_name(self.refused.reason)}"] = 1.0
        if self.transport is not None:
            out["transport_connected"] = float(self.refused is None and self.transport.connected)
            stats = self.transport.statistics()
            if stats.ack_rtt_ms is not None:
                out["ack_rtt_ms"] = stats.ack_rtt_ms
            for key, value in stats.extra.items():  # the WebRTC link's counters
                if (
                    key.startswith("rtc_")
                    and not key.endswith("_ns")
                    and type(value) in (int, float)
                ):
                    out[key] = value
        for k in TransportKind:
            out[f"transport_active_{k.value}"] = float(k == self.kind)
            out[f"transport_unavailable_{k.value}"] = float(k in self.unavailable)
            out[f"transport_pinned_{k.value}"] = float(k == self.pinned)
        if self.hot:
            out["transport_hot_standby"] = 1.0
            out["packets_replayed_total"] = self.replayed
            for reason, n in self.switch_reasons.items():
                out[f"transport_switches_{metric_name(reason)}_total"] = n
                out[f"transport_last_switch_{metric_name(reason)}_ns"] = self.switched_at[reason]
            for kind, t in ((self.kind, self.transport), (self.standby_kind, self.standby)):
                if kind is not None:
                    out.update(self.health[kind].metrics(t, standby=t is self.standby))
        return out

    async def close(self) -> None:
        self._cancel_recovery()
        for task in (self._probe_task, self._standby_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.standby is not None:
            await self._retire(self.standby, self._standby_pump)
            self.standby = self._standby_pump = None
        if self.transport is not None:
            await self._retire(self.transport, self.pump)
            self.transport = None
            self.pump = None

    @staticmethod
    async def _retire(transport: Transport, pump: asyncio.Task[None] | None) -> None:
        with contextlib.suppress(TransportError, TokenError):
            await transport.close()
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
