"""The transmit stage: packets ring -> the active transport.

Reads packets in order (a bounded queue that drops the oldest when full) and
sends them on the active transport: ``file`` (a local sink) or ``websocket``
(a room on the room server; WebRTC is not in this build). What comes back
from the far side is passed to the encode stage through the ``feedback``
ring: the server acknowledges every packet it accepted (the encoder may then
predict from it) and asks for keyframes; after a reconnect a keyframe is
requested too, so that nobody waits a whole keyframe interval.

Connecting: the room server may still be starting (embedded) or restarting,
so connecting is retried with capped exponential backoff while the ring
absorbs (and, when full, drops and counts) what arrives meanwhile; a refused
token is a user error (no retry, the run stops with exit 2).

Switching: the supervisor's ``switch_transport`` command (``{"to": KIND}``)
switches make-before-break: the new transport is connected before the old
one is closed. Metrics ``transport_active_<kind>`` (1 for the one in use),
``transport_switches_total``.

Other metrics: ``packets_sent_total``, ``bytes_sent_total``,
``packets_dropped_total`` (send failures), ``acks_total``, capture-to-send
latency ``latency_ms_p50/p95/p99`` (wall clock; the capture timestamp travels
with each packet), ``ack_rtt_ms``.

``transmit.max_bandwidth_kbps`` caps the send rate with a token bucket
(:class:`Throttle`): a packet waits until the bucket has room, so a low cap
backs packets up into the ring (latency grows, the ring drops the oldest).
The supervisor's ``set`` command changes it at run time
(``{"max_bandwidth_kbps": 8}``; ``0`` or ``null`` lifts it). Metrics
``bandwidth_limit_kbps`` (0: none) and ``throttled_ms_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from pipeline.codec import feedback
from pipeline.config import TransportKind, resolve_path
from pipeline.errors import ConfigError, RingError, TokenError, TransportError, WouldBlock
from pipeline.model.stats import Rate, Window
from pipeline.runtime.stage import StageContext
from pipeline.transports.base import Control, StateChange, Transport, TransportClosed
from pipeline.transports.file import FileTransport

TOKEN_ENV = "POSEWIRE_TOKEN"
CONNECT_BACKOFF_MAX_S = 2.0


def publisher_token(ctx: StageContext) -> str:
    """``transmit.token``, else ``$POSEWIRE_TOKEN``, else one minted with the server secret."""
    cfg = ctx.config.transmit
    token = cfg.token or os.environ.get(TOKEN_ENV)
    if token:
        return token
    from pipeline.server.tokens import MAX_TTL_S, mint_token, resolve_secret

    secret = resolve_secret(ctx.config.server)  # ConfigError when there is none
    return mint_token(
        secret,
        room=cfg.room,
        role="publisher",
        subject=f"sender-{ctx.spec.run_id}",
        ttl_s=min(MAX_TTL_S, 7 * 24 * 3600.0),
    )


def make_transport(ctx: StageContext, kind: TransportKind) -> Transport:
    cfg = ctx.config.transmit
    if kind == TransportKind.FILE:
        return FileTransport(resolve_path(ctx.config, cfg.file))
    if kind == TransportKind.WEBSOCKET:
        from pipeline.transports.websocket import WebSocketTransport

        return WebSocketTransport.from_config(
            cfg, publisher_token(ctx), publish=True, subscribe=False, name=ctx.spec.run_id
        )
    raise ConfigError([f"transmit: transport {kind.value!r} is not available in this build"])


async def connect(ctx: StageContext, kind: TransportKind) -> Transport | None:
    """Connect, retrying with capped backoff; ``None`` if the stage is stopping first."""
    delay = 0.05
    warned = False
    while not ctx.stopping:
        transport = make_transport(ctx, kind)
        try:
            await transport.connect()
            ctx.log.info("transport %s connected", kind.value)
            return transport
        except TokenError as exc:
            raise ConfigError(
                [f"transmit.token: refused by the server ({exc.reason}): {exc}"]
            ) from exc
        except TransportError as exc:
            if not warned:
                ctx.log.warning("cannot connect %s yet (%s): retrying", kind.value, exc)
                warned = True
            with contextlib.suppress(TransportError):
                await transport.close()
        end = time.monotonic() + delay
        while time.monotonic() < end and not ctx.stopping:
            ctx.tick()
            await asyncio.sleep(0.05)
        delay = min(delay * 2, CONNECT_BACKOFF_MAX_S)
    return None


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
            raise ConfigError([f"max_bandwidth_kbps must be a number >= 0 or null, got {value!r}"])
        self.set_rate(float(value) if value else None)
        return {"max_bandwidth_kbps": self.kbps}


def run(ctx: StageContext) -> int:
    try:
        return asyncio.run(Transmitter(ctx).main())
    except (ConfigError, TokenError) as exc:  # no secret, no such transport, a refused token
        return ctx.refuse(str(exc))


class Transmitter:
    """The stage's state: the active transport, its feedback pump, the counters."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.kind = ctx.config.transmit.primary
        self.transport: Transport | None = None
        self.pump: asyncio.Task[None] | None = None
        self.pending_switch: TransportKind | None = None
        self.switches = 0
        self.acks = 0
        self.feedback = ctx.ring("feedback")
        self.throttle = Throttle(ctx.config.transmit.max_bandwidth_kbps)
        ctx.on("set", self.throttle.on_set)
        ctx.on("switch_transport", self._on_switch)

    def _on_switch(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            kind = TransportKind(str(args.get("to")))
        except ValueError:
            known = ", ".join(k.value for k in TransportKind)
            raise ConfigError([f"switch_transport: 'to' must be one of {known}"]) from None
        self.pending_switch = kind
        return {"from": self.kind.value, "to": kind.value}

    def _feedback(self, message: bytes) -> None:
        with contextlib.suppress(RingError):
            self.feedback.send(message)

    async def _pump(self, transport: Transport) -> None:
        """What the far side says: acks and keyframe requests go to the encoder."""
        while True:
            try:
                item = await transport.recv()
            except (TransportClosed, asyncio.CancelledError):
                return
            except (TransportError, TokenError) as exc:
                self.ctx.log.warning("transport %s broke: %s", transport.kind, exc)
                return
            if isinstance(item, Control):
                if item.type == "ack" and isinstance(item.body.get("seq"), int):
                    self.acks += 1
                    self._feedback(feedback.pack_ack(int(item.body["seq"])))
                elif item.type == "keyframe_request":
                    self._feedback(feedback.pack_keyframe_request())
            elif isinstance(item, StateChange) and item.connected:
                self._feedback(feedback.pack_keyframe_request())

    async def activate(self, kind: TransportKind) -> bool:
        """Make-before-break: connect ``kind``, then retire the old transport."""
        new = await connect(self.ctx, kind)
        if new is None:
            return False
        old, old_pump = self.transport, self.pump
        self.transport, self.kind = new, kind
        self.pump = asyncio.get_running_loop().create_task(self._pump(new))
        if old is not None:
            self.switches += 1
            self.ctx.log.info("switched transport %s -> %s", old.kind, kind.value)
            await self._retire(old, old_pump)
        # the far side may not have our reference frames: start from a keyframe
        self._feedback(feedback.pack_keyframe_request())
        return True

    @staticmethod
    async def _retire(transport: Transport, pump: asyncio.Task[None] | None) -> None:
        with contextlib.suppress(TransportError, TokenError):
            await transport.close()
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def main(self) -> int:
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        if not await self.activate(self.kind):
            return 0
        packets = ctx.ring("packets")
        latency = Window()
        rate = Rate()
        sent = failed = nbytes = 0
        throttled_ms = 0.0
        try:
            while not ctx.stopping:
                ctx.tick()
                if self.pending_switch is not None:
                    target, self.pending_switch = self.pending_switch, None
                    if target != self.kind:
                        await self.activate(target)
                if ctx.paused:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    item = await loop.run_in_executor(None, packets.recv, 0.1)
                except WouldBlock:
                    continue
                packet = bytes(item.data)
                t_wait = time.monotonic()
                while (wait := self.throttle.delay()) > 0 and not ctx.stopping:
                    ctx.tick()  # stay alive, and a set command may lift the cap
                    await asyncio.sleep(min(wait, 0.05))
                throttled_ms += (time.monotonic() - t_wait) * 1000
                self.throttle.consume(len(packet))
                assert self.transport is not None
                try:
                    await self.transport.send(packet)
                except TokenError as exc:
                    raise ConfigError([f"transmit.token: refused ({exc.reason}): {exc}"]) from exc
                except TransportError as exc:
                    failed += 1
                    if failed == 1 or failed % 100 == 0:
                        ctx.log.warning("send failed (%d so far): %s", failed, exc)
                    continue
                sent += 1
                nbytes += len(packet)
                rate.tick()
                latency.add((time.time_ns() - item.ts_ns) / 1e6)
                stats = self.transport.statistics()
                ctx.metrics.update(
                    {
                        "packets_sent_total": sent,
                        "bytes_sent_total": nbytes,
                        "packets_dropped_total": failed,
                        "acks_total": self.acks,
                        "fps": rate.per_second(),
                        "bandwidth_limit_kbps": self.throttle.kbps or 0.0,
                        "throttled_ms_total": throttled_ms,
                        "transport_switches_total": self.switches,
                        "transport_connected": float(self.transport.connected),
                        **{
                            f"transport_active_{k.value}": float(k == self.kind)
                            for k in TransportKind
                        },
                        **(
                            {"ack_rtt_ms": stats.ack_rtt_ms} if stats.ack_rtt_ms is not None else {}
                        ),
                        **latency.summary("latency_ms"),
                    }
                )
        finally:
            if self.transport is not None:
                await self._retire(self.transport, self.pump)
        return 0
