"""The transmit stage: packets ring -> the active transport.

Reads packets in order (a bounded queue that drops the oldest when full) and
sends them on the active transport. Acknowledgements and keyframe requests
coming back from the far side are passed to the encode stage through the
``feedback`` ring. Metrics: ``packets_sent_total``, ``bytes_sent_total``,
``packets_dropped_total`` (send failures), capture-to-send latency
``latency_ms_p50/p95/p99`` (wall clock, the capture timestamp travels with
each packet).

``transmit.max_bandwidth_kbps`` caps the send rate with a token bucket
(:class:`Throttle`): a packet waits until the bucket has room, so a low cap
backs packets up into the ring (latency grows, the ring drops the oldest).
The supervisor's ``set`` command changes it at run time
(``{"max_bandwidth_kbps": 8}``; ``0`` or ``null`` lifts it). Metrics
``bandwidth_limit_kbps`` (0: none) and ``throttled_ms_total``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pipeline.config import TransportKind, resolve_path
from pipeline.errors import ConfigError, TransportError, WouldBlock
from pipeline.stage import StageContext
from pipeline.stats import Rate, Window
from pipeline.transports.file import FileTransport


def make_transport(ctx: StageContext, kind: TransportKind) -> Any:
    cfg = ctx.config.transmit
    if kind == TransportKind.FILE:
        return FileTransport(resolve_path(ctx.config, cfg.file))
    raise TransportError(f"transport {kind.value} is not available in this build")


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
    return asyncio.run(_main(ctx))


async def _main(ctx: StageContext) -> int:
    loop = asyncio.get_running_loop()
    transport = make_transport(ctx, ctx.config.transmit.primary)
    await transport.connect()
    ctx.log.info("transport %s connected", transport.name)
    packets = ctx.ring("packets")
    latency = Window()
    rate = Rate()
    sent = failed = nbytes = 0
    throttle = Throttle(ctx.config.transmit.max_bandwidth_kbps)
    ctx.on("set", throttle.on_set)
    throttled_ms = 0.0
    try:
        while not ctx.stopping:
            ctx.tick()
            if ctx.paused:
                await asyncio.sleep(0.05)
                continue
            try:
                item = await loop.run_in_executor(None, packets.recv, 0.1)
            except WouldBlock:
                continue
            packet = bytes(item.data)
            t_wait = time.monotonic()
            while (wait := throttle.delay()) > 0 and not ctx.stopping:
                ctx.tick()  # stay alive, and a set command may lift the cap
                await asyncio.sleep(min(wait, 0.05))
            throttled_ms += (time.monotonic() - t_wait) * 1000
            throttle.consume(len(packet))
            try:
                await transport.send(packet)
            except TransportError as exc:
                failed += 1
                ctx.log.warning("send failed: %s", exc)
                continue
            sent += 1
            nbytes += len(packet)
            rate.tick()
            latency.add((time.time_ns() - item.ts_ns) / 1e6)
            ctx.metrics.update(
                {
                    "packets_sent_total": sent,
                    "bytes_sent_total": nbytes,
                    "packets_dropped_total": failed,
                    "fps": rate.per_second(),
                    "bandwidth_limit_kbps": throttle.kbps or 0.0,
                    "throttled_ms_total": throttled_ms,
                    **latency.summary("latency_ms"),
                }
            )
    finally:
        await transport.close()
    return 0
