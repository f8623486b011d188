"""The stream's shape: the ``encode`` section and ``transmit.degrade`` (the levels of the
degradation ladder, which change the encode stage's rate and precision at run time).

Their own module to keep :mod:`pipeline.config` (which re-exports ``EncodeConfig``)
within the size limit; the ladder is :mod:`pipeline.runtime.ladder` (docs/switching.md).
"""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import Field, field_validator

from pipeline.settings import ConfigModel


class EncodeConfig(ConfigModel):
    """The pose codec (the encode stage)."""

    precision_px: float = Field(
        0.5, gt=0, le=16, description="Maximum x/y error in pixels at reference_width_px."
    )
    reference_width_px: int = Field(1920, ge=64, le=16384, description="Width for precision_px.")
    keyframe_interval: int = Field(30, ge=1, le=3600, description="Frames between keyframes.")
    world_landmarks: bool = Field(False, description="Send world landmarks too.")
    references: Literal["auto", "previous", "keyframe", "anchor"] = Field(
        "auto",
        description="What a delta packet predicts from: 'previous' (the previous packet, "
        "smallest, for reliable transports), 'keyframe' (the stream's latest keyframe: every "
        "delta decodes on its own), 'anchor' (the latest anchor, every third delta, which "
        "must arrive: for lossy channels, 11 % more bytes than 'previous'); auto: anchor when "
        "transmit uses webrtc.",
    )
    stream_id: int | None = Field(
        None, ge=0, le=65535, description="Publisher stream id; default derived from the run id."
    )


class DegradeConfig(ConfigModel):
    """The degradation ladder (``pipeline/runtime/ladder.py``, docs/switching.md)."""

    enabled: bool = Field(
        True,
        description="Step the stream down (fewer frames, then coarser precision) while even "
        "the best transport is over max_latency_ms or the bandwidth cap is below its rate; "
        "step back up after hold_s of good health.",
    )
    fps: list[float] = Field(
        default_factory=lambda: [15.0, 10.0],
        max_length=8,
        description="Frame-rate levels, strictly decreasing, each in (0, 240].",
    )
    precision_px: list[float] = Field(
        default_factory=lambda: [2.0],
        max_length=8,
        description="Then, at the lowest rate, coarser x/y precision levels (pixels at "
        "encode.reference_width_px), strictly increasing, each above encode.precision_px "
        "and at most 16.",
    )

    @field_validator("fps")
    @classmethod
    def _fps(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 240 for f in v) or any(a <= b for a, b in itertools.pairwise(v)):
            raise ValueError(f"must be strictly decreasing rates in (0, 240], got {v}")
        return v

    @field_validator("precision_px")
    @classmethod
    def _px(cls, v: list[float]) -> list[float]:
        if any(not 0 < p <= 16 for p in v) or any(a >= b for a, b in itertools.pairwise(v)):
            raise ValueError(f"must be strictly increasing values in (0, 16], got {v}")
        return v
