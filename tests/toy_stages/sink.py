"""Toy sink: reads the ``video`` and ``audio`` rings, appends what it got to ``TOY_OUT``."""

from __future__ import annotations

import os

from pipeline.errors import WouldBlock
from pipeline.runtime.stage import ExitStatus, StageContext


def run(ctx: StageContext) -> int:
    rings = {name: ctx.ring(name) for name in ("video", "audio")}
    got = 0
    with open(os.environ["TOY_OUT"], "a", encoding="utf-8") as out:
        while not ctx.stopping:
            ctx.tick()
            idle = True
            for name, ring in rings.items():
                try:
                    item = ring.recv(timeout=0)
                except WouldBlock:
                    continue
                idle = False
                out.write(f"{name} {int.from_bytes(item.data, 'little')}\n")
                out.flush()
                got += 1
                ctx.metrics["items_total"] = float(got)
            if idle:
                ctx.sleep(0.005)
    return ExitStatus.DONE
