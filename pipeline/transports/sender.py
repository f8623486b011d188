"""The publishing side of a member: the active transport, switching, throttle, feedback.

:class:`Sender` owns the transport the transmit stage sends on. It connects
with capped exponential backoff (the room server may still be starting or
restarting); a refused token is not retried (:class:`~pipeline.errors.TokenError`).
:meth:`Sender.activate` switches make-before-break: the new transport is
connected before the old one is closed. What the far side says goes to the
encoder as feedback records (:mod:`pipeline.codec.feedback`): the server's
acks (the encoder may predict from an acknowledged frame) and keyframe
requests; a (re)connect or a switch asks for a keyframe too, so that nobody
waits a whole keyframe interval.

:class:`Throttle` caps the send rate with a token bucket: a packet waits until
the bucket has room, so a low cap backs packets up into the ring (latency
grows, the ring drops the oldest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.codec import feedback
from pipeline.config import TransmitConfig, TransportKind
from pipeline.errors import ClosedResourceError, CommandError, TokenError, TransportError
from pipeline.transports import TRANSPORTS, make_transport
from pipeline.transports.base import Control, StateChange, Transport, TransportContext

CONNECT_BACKOFF_MAX_S = 2.0


class Throttle:
    """Token bucket in bytes; the bucket may go into debt by one packet, never more.

    A packet may go when the bucket is not in debt; sending takes its size from
    the bucket, which refills at the rate up to ``burst_s`` seconds' worth.
    """

    def __init__(self, kbps: float | None, burst_s: float = 0.1) -> None:
        self.burst_s = burst_s
        self.kbps: float | None = None
        self._tokens = 0.0
        self._at = time.monotonic()
        self.set_rate(kbps)

    def set_rate(self, kbps: float | None) -> None:
        """New cap in kbit/s; ``None`` or 0 lifts it."""
        self._refill()
        self.kbps = kbps if kbps else None
        self._tokens = min(self._tokens, self._capacity())

    def _capacity(self) -> float:
        return 0.0 if self.kbps is None else self.kbps * 125.0 * self.burst_s

    def _refill(self) -> None:
        now = time.monotonic()
        if self.kbps is not None:
            self._tokens = min(self._capacity(), self._tokens + (now - self._at) * self.kbps * 125)
        self._at = now

    def delay(self) -> float:
        """Seconds until the next packet may go (0: now)."""
        if self.kbps is None:
            return 0.0
        self._refill()
        return 0.0 if self._tokens >= 0 else -self._tokens / (self.kbps * 125)

    def consume(self, nbytes: int) -> None:
        if self.kbps is not None:
            self._refill()
            self._tokens -= nbytes

    def on_set(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """``set`` handler: applies ``max_bandwidth_kbps``, ignores other keys."""
        if "max_bandwidth_kbps" not in args:
            return None
        value = args["max_bandwidth_kbps"]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
        ):
            raise CommandError(f"max_bandwidth_kbps must be a number >= 0 or null, got {value!r}")
        self.set_rate(float(value) if value else None)
        return {"max_bandwidth_kbps": self.kbps}


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
    ) -> None:
        self.cfg = cfg
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
        self.sent = 0
        self.failed = 0
        self.bytes_sent = 0
        self.throttled_ms = 0.0

    async def connect(self, kind: TransportKind) -> Transport | None:
        """Connect ``kind``, retrying with capped backoff; ``None`` if stopping first.

        A refused token raises :class:`TokenError` (no retry).
        """
        delay = 0.05
        warned = False
        while not self.stopping():
            transport = make_transport(kind.value, self.cfg, self.context)
            try:
                await transport.connect()
                self.log.info("transport %s connected", kind.value)
                return transport
            except TokenError:
                raise
            except TransportError as exc:
                if not warned:
                    self.log.warning("cannot connect %s yet (%s): retrying", kind.value, exc)
                    warned = True
                with contextlib.suppress(TransportError):
                    await transport.close()
            end = time.monotonic() + delay
            while time.monotonic() < end and not self.stopping():
                self.tick()
                await asyncio.sleep(0.05)
            delay = min(delay * 2, CONNECT_BACKOFF_MAX_S)
        return None

    async def activate(self, kind: TransportKind) -> bool:
        """Make-before-break: connect ``kind``, then retire the old transport."""
        new = await self.connect(kind)
        if new is None:
            return False
        old, old_pump = self.transport, self.pump
        self.transport, self.kind = new, kind
        self.pump = asyncio.get_running_loop().create_task(self._pump(new))
        if old is not None:
            self.switches += 1
            self.log.info("switched transport %s -> %s", old.kind, kind.value)
            await self._retire(old, old_pump)
        # the far side may not have our reference frames: start from a keyframe
        self.on_feedback(feedback.pack_keyframe_request())
        return True

    async def _pump(self, transport: Transport) -> None:
        """What the far side says: acks and keyframe requests go to the encoder."""
        while True:
            try:
                item = await transport.recv()
            except (ClosedResourceError, asyncio.CancelledError):
                return
            except (TransportError, TokenError) as exc:  # the far side ended it
                self.log.warning("transport %s broke: %s", transport.kind, exc)
                return
            if isinstance(item, Control):
                if item.type == "ack" and isinstance(item.body.get("seq"), int):
                    self.acks += 1
                    self.on_feedback(feedback.pack_ack(int(item.body["seq"])))
                elif item.type == "keyframe_request":
                    self.on_feedback(feedback.pack_keyframe_request())
            elif isinstance(item, StateChange) and item.connected:
                self.on_feedback(feedback.pack_keyframe_request())

    async def send(self, packet: bytes) -> bool:
        """Wait for the throttle, then send on the active transport; False if it failed.

        A refused token raises :class:`TokenError`.
        """
        t_wait = time.monotonic()
        while (wait := self.throttle.delay()) > 0 and not self.stopping():
            self.tick()  # stay alive, and a set command may lift the cap
            await asyncio.sleep(min(wait, 0.05))
        self.throttled_ms += (time.monotonic() - t_wait) * 1000
        self.throttle.consume(len(packet))
        assert self.transport is not None
        try:
            await self.transport.send(packet)
        except TransportError as exc:
            self.failed += 1
            if self.failed == 1 or self.failed % 100 == 0:
                self.log.warning("send failed (%d so far): %s", self.failed, exc)
            return False
        self.sent += 1
        self.bytes_sent += len(packet)
        return True

    def metrics(self) -> dict[str, float]:
        """Counters and the active transport's figures, as stage metrics."""
        out: dict[str, float] = {
            "packets_sent_total": self.sent,
            "bytes_sent_total": self.bytes_sent,
            "packets_dropped_total": self.failed,
            "acks_total": self.acks,
            "bandwidth_limit_kbps": self.throttle.kbps or 0.0,
            "throttled_ms_total": self.throttled_ms,
            "transport_switches_total": self.switches,
        }
        if self.transport is not None:
            out["transport_connected"] = float(self.transport.connected)
            rtt = self.transport.statistics().ack_rtt_ms
            if rtt is not None:
                out["ack_rtt_ms"] = rtt
        for k in TransportKind:
            out[f"transport_active_{k.value}"] = float(k == self.kind)
        return out

    async def close(self) -> None:
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
