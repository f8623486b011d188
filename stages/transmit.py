"""The transmit stage: packets ring -> the active transport.

Moves packets from the ring into the priority queue of :mod:`pipeline.transports.sendqueue`
and sends from it as the throttle allows, with a :class:`~pipeline.transports.sender.Sender`
on the active transport, found by kind in :data:`pipeline.transports.TRANSPORTS`: ``file``
(a local sink), ``websocket`` or ``webrtc`` (a room on the room server; WebRTC
puts deltas on the lossy pose channel). What comes back from the far side
(acks, keyframe requests) goes to the encode stage through the ``feedback`` ring, and so
does a keyframe request whenever the transport comes up again (a reconnect, a reopened
WebRTC link). Where WebRTC cannot work at all (a server on loopback: aioice offers no
loopback candidates) the stage says why once and uses the WebSocket
(``transport_active_websocket`` 1, ``transport_unavailable_webrtc`` 1).

Connecting is retried with capped backoff while the ring absorbs (full: drops and
counts) what arrives. A refusal by the server is a visible state (``transport_refused``
1, ``transport_refused_<reason>`` 1, packets meanwhile counted in ``packets_dropped_total``
and ``packets_refused_total``, one log line, an alert): a closed or missing room is
retried until (re)opened; one no retry can fix (a bad or revoked token, a kick, a stream
id of another publisher, a protocol violation) stops the stage with ``ctx.refuse`` and
the run with exit 2 and the message.

Commands: ``switch_transport`` (``{"to": KIND}``, make-before-break; with a
``transmit.fallback`` onto the connected hot standby; the policy adds ``reason`` and
``auto``), ``pin`` (``{"to": KIND}``: move there, no automatic switch), ``unpin``, ``set``
(``{"max_bandwidth_kbps": 8}``; ``0`` or ``null`` lifts the cap); a bad argument is
refused with a :class:`~pipeline.errors.CommandError`.

Audio (``audio.enabled``): the ``audio`` ring's packets go through the same ``Sender``
(with the stream on every switch): at once while the pose queue is empty and the throttle
lets them, else queued at ``Priority.AUDIO`` (after keyframes and anchors, before pose
deltas): ``audio_latency_ms_p50/p95/p99``.

Metrics: ``packets_sent_total``, ``bytes_sent_total``, ``packets_dropped_total`` (send
failures, refused), ``packets_refused_total``, ``transport_refusals_total``,
``transport_refused``, ``acks_total``, ``fps``, capture-to-send ``latency_ms_p50/p95/p99``
(wall clock), ``ack_rtt_ms``, ``bandwidth_limit_kbps`` (0: none), ``throttled_ms_total``,
``transport_*`` (active, switches, connected, unavailable), ``sendqueue_*``, ``rtc_*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from pipeline.codec import feedback
from pipeline.config import TransportKind, resolve_path
from pipeline.errors import (
    BrokenResourceError,
    CertificateError,
    CommandError,
    ConfigError,
    RegistryError,
    RingError,
    TokenError,
    WouldBlock,
)
from pipeline.model.stats import Rate, Window
from pipeline.runtime.stage import StageContext
from pipeline.transports.base import TransportContext
from pipeline.transports.sender import Sender, parse_kind
from pipeline.transports.sendqueue import Priority, SendQueue, fill, send_next
from pipeline.wire.tokens import MAX_TTL_S, mint_token, resolve_secret

TOKEN_ENV = "POSEWIRE_TOKEN"


def publisher_token(ctx: StageContext) -> str:
    """``transmit.token``, else ``$POSEWIRE_TOKEN``, else one minted with the server secret."""
    cfg = ctx.config.transmit
    token = cfg.token or os.environ.get(TOKEN_ENV)
    if token:
        return token
    secret = resolve_secret(ctx.config.server)  # ConfigError when there is none
    return mint_token(
        secret,
        room=cfg.room,
        role="publisher",
        subject=f"sender-{ctx.spec.run_id}",
        ttl_s=min(MAX_TTL_S, 7 * 24 * 3600.0),
    )


#: the capture-to-send percentiles cover the last this many seconds, whatever the rate
LATENCY_WINDOW_S = 5.0
#: metrics that go away when they have no value (no stale figure for the policy or ladder)
_VANISHING = ("transport_refused_", "path_", "latency_ms_", "audio_latency_ms_", "ack_rtt_ms")
#: seconds between two metric updates of the stage (the heartbeat carries them)
METRICS_INTERVAL_S = 0.1


def run(ctx: StageContext) -> int:
    try:
        return asyncio.run(Transmitter(ctx).main())
    except TokenError as exc:  # a refused token: retrying cannot fix it
        _linger(ctx)
        return ctx.refuse(f"transmit.token: refused by the server ({exc.reason}): {exc}")
    except CertificateError as exc:  # the server's certificate is not trusted here
        return ctx.refuse(f"{exc} (transmit.ca_file: the CA to verify it with)")
    except BrokenResourceError as exc:  # kicked, stream id taken, ...: retrying cannot fix it
        _linger(ctx)
        return ctx.refuse(f"the room server refused this publisher for good ({exc.reason}): {exc}")
    except (ConfigError, RegistryError) as exc:  # no secret, no such transport
        return ctx.refuse(str(exc))


def _linger(ctx: StageContext) -> None:
    """Stay two heartbeats longer, so that the supervisor (metrics, alert, report) sees the
    refused state before the stage exits."""
    ctx.sleep(2 * ctx.config.supervisor.heartbeat_interval_ms / 1000)


class Transmitter:
    """The stage's state: the sender, the pending switch, the latency window."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.feedback = ctx.ring("feedback")
        context = TransportContext(token=lambda: publisher_token(ctx), name=ctx.spec.run_id,
                                   publish=True, subscribe=False,
                                   resolve_path=lambda p: resolve_path(ctx.config, p))  # fmt: skip
        self.sender = Sender(ctx.config.transmit, context, on_feedback=self._feedback, log=ctx.log,
                             stopping=lambda: ctx.stopping, tick=self._tick)  # fmt: skip
        self.queue = SendQueue(ctx.config.transmit.send_queue,
                               on_broken=lambda: self._feedback(feedback.pack_keyframe_request()),
                               live=ctx.config.transmit.primary != TransportKind.FILE)  # fmt: skip
        self.rate = Rate()
        self.latency = Window(max_age_s=LATENCY_WINDOW_S)
        self.audio_latency = Window(max_age_s=LATENCY_WINDOW_S)
        self._published = 0.0
        self.pending_switch: tuple[TransportKind, str, bool] | None = None
        ctx.on("set", self.sender.throttle.on_set)
        ctx.on("switch_transport", self._on_switch)
        ctx.on("pin", self._on_pin)
        ctx.on("unpin", self._on_unpin)

    def _on_switch(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{"to": KIND}``; the supervisor's policy adds ``reason`` and ``auto``."""
        kind = parse_kind(args.get("to"))
        auto = bool(args.get("auto"))
        if auto and self.sender.pinned is not None:
            raise CommandError(f"pinned to {self.sender.pinned.value}: no automatic switch")
        self.pending_switch = (kind, str(args.get("reason") or "manual"), auto)
        return {"from": self.sender.kind.value, "to": kind.value}

    def _on_pin(self, args: dict[str, Any]) -> dict[str, Any]:
        """Manual override: move the stream to ``to`` (default: where it is) and keep it
        there; no automatic switch (policy or dead-path failover) until ``unpin``."""
        kind = parse_kind(args.get("to", self.sender.kind.value))
        self.sender.pinned = kind
        self.pending_switch = (kind, "pin", False)
        self.ctx.log.info("transport pinned to %s", kind.value)
        return {"pinned": kind.value}

    def _on_unpin(self, args: dict[str, Any]) -> dict[str, Any]:
        was, self.sender.pinned = self.sender.pinned, None
        self.ctx.log.info("transport unpinned (was %s)", was.value if was else "none")
        return {"unpinned": was.value if was else None}

    def _tick(self) -> None:
        """Stay alive and keep the metrics current (also while connecting or refused)."""
        self.ctx.tick()
        self._publish()

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._published < METRICS_INTERVAL_S:
            return
        self._published = now
        fresh = self.sender.metrics()
        fresh.update(self.queue.metrics())  # its drops are frames dropped too
        fresh["packets_dropped_total"] += self.queue.dropped_total()
        fresh.update({"fps": self.rate.per_second(), **self.latency.summary("latency_ms"),
                      **self.audio_latency.summary("audio_latency_ms")})  # fmt: skip
        for key in [k for k in self.ctx.metrics if k.startswith(_VANISHING)]:
            if key not in fresh:  # a refusal that is over, a figure with no sample left
                del self.ctx.metrics[key]
        self.ctx.metrics.update(fresh)

    def _feedback(self, message: bytes) -> None:
        with contextlib.suppress(RingError):
            self.feedback.send(message)

    async def _next(self, ring: Any) -> Any:
        """The ring's next item (waited for in a thread, at most 0.1 s); None while paused
        or when nothing came."""
        if self.ctx.paused:
            await asyncio.sleep(0.05)
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(None, ring.recv, 0.1)
        except WouldBlock:
            return None

    async def _audio(self) -> None:
        """The audio ring's reader: a packet goes at once when nothing waits and the
        throttle lets it, else into the priority queue (module docstring)."""
        ring = self.ctx.ring("audio")
        while not self.ctx.stopping:
            item = await self._next(ring)
            if item is None:
                continue
            if self.queue or self.sender.throttle.delay() > 0:
                self.queue.put(bytes(item.data), capture_ts_ns=item.ts_ns)
                continue
            self.queue.offered_beside(len(item.data))  # the ladder's offered rate
            if await self.sender.send(bytes(item.data), throttled="send"):
                self.audio_latency.add((time.time_ns() - item.ts_ns) / 1e6)

    async def main(self) -> int:
        ctx, sender = self.ctx, self.sender
        loop = asyncio.get_running_loop()
        audio: asyncio.Task[None] | None = None
        try:
            if not await sender.activate(sender.kind):
                return 0
            if ctx.config.audio.enabled:
                audio = loop.create_task(self._audio())
            packets = ctx.ring("packets")
            while not ctx.stopping:
                self._tick()
                sender.check()  # a final refusal stops the stage even while no packet comes
                if self.pending_switch is not None:
                    (target, reason, auto), self.pending_switch = self.pending_switch, None
                    with contextlib.suppress(CommandError):  # pinned or capped meanwhile
                        await sender.switch(target, reason, auto=auto)
                if not await fill(self.queue, packets):
                    continue
                done = await send_next(self.queue, sender.throttle, sender.send)
                if done is None:  # the throttle says wait: the queue drops what goes stale
                    await asyncio.sleep(min(max(sender.throttle.delay(), 0.001), 0.01))
                elif done[1] and done[0].capture_ts_ns is not None:
                    age_ms = (time.time_ns() - done[0].capture_ts_ns) / 1e6
                    if done[0].priority == Priority.AUDIO:
                        self.audio_latency.add(age_ms)
                    else:
                        self.rate.tick()
                        self.latency.add(age_ms)
            while (left := self.queue.pop(stale=False)) is not None:  # an orderly stop
                await sender.send(left.packet)  # sends what the queue holds (the ring is empty)
        finally:
            if audio is not None:
                audio.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await audio
            self._publish(force=True)  # the last heartbeat carries the final state
            await sender.close()
        return 0
