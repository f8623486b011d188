"""Toy stage modules for topology tests: two heads (video, mic) feeding one sink.

Each head writes ``TOY_ITEMS`` numbered items (8-byte little-endian, 1-based)
into its ring, one every ``TOY_PERIOD_MS``, numbering on from what its ring
already holds after a restart, then returns ``ExitStatus.DONE``. The sink reads
both rings and appends ``<ring> <number>`` to ``TOY_OUT``, one flushed line per
item, until the supervisor stops it. The settings come from the environment,
which spawned stage processes inherit.
"""

from __future__ import annotations

import os
import time

from pipeline.runtime.stage import ExitStatus, StageContext

ITEM = 8


def settings() -> tuple[int, float]:
    return int(os.environ.get("TOY_ITEMS", "50")), float(os.environ.get("TOY_PERIOD_MS", "10"))


def produce(ctx: StageContext, ring_name: str) -> int:
    """A head: number items into ``ring_name`` until ``TOY_ITEMS`` were written."""
    items, period_ms = settings()
    ring = ctx.ring(ring_name)
    written = ring.statistics().written  # a restarted head numbers on
    while not ctx.stopping and written < items:
        ctx.tick()
        written = ring.send((written + 1).to_bytes(ITEM, "little"))
        ctx.metrics["items_total"] = float(written)
        ctx.metrics["fps"] = 1000.0 / period_ms
        time.sleep(period_ms / 1000)
    return ExitStatus.DONE
