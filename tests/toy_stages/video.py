"""Toy head: numbered items into the ``video`` ring."""

from __future__ import annotations

from pipeline.runtime.stage import StageContext
from tests.toy_stages import produce


def run(ctx: StageContext) -> int:
    return produce(ctx, "video")
