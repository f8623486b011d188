"""The transmit stage: packets ring -> the active transport.

Reads packets in order (a bounded queue that drops the oldest when full) and
sends them on the active transport. Acknowledgements and keyframe requests
coming back from the far side are passed to the encode stage through the
``feedback`` ring. Metrics: ``packets_sent_total``, ``bytes_sent_total``,
``packets_dropped_total`` (send failures), capture-to-send latency
``latency_ms_p50/p95/p99`` (wall clock, the capture timestamp travels with
each packet).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pipeline.config import TransportKind, resolve_path
from pipeline.errors import TransportError, WouldBlock
from pipeline.stage import StageContext
from pipeline.stats import Rate, Window
from pipeline.transports.file import FileTransport


def make_transport(ctx: StageContext, kind: TransportKind) -> Any:
    cfg = ctx.config.transmit
    if kind == TransportKind.FILE:
        return FileTransport(resolve_path(ctx.config, cfg.file))
    raise TransportError(f"transport {kind.value} is not available in this build")


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
                    **latency.summary("latency_ms"),
                }
            )
    finally:
        await transport.close()
    return 0
