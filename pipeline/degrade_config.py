"""The ``transmit.degrade`` section: the levels of the degradation ladder.

Its own module to keep :mod:`pipeline.config` within the size limit; the ladder that
uses it is :mod:`pipeline.runtime.ladder` (and docs/switching.md).
"""

from __future__ import annotations

import itertools

from pydantic import Field, field_validator

from pipeline.settings import ConfigModel


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
