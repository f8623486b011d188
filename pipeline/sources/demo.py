"""``kind: demo``: ``skimage.data.astronaut()`` animated on a canvas: no camera, no download."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Final, Literal, cast

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.settings import SOURCES, FrameSourceSettings
from pipeline.sources import DEFAULT_FPS, RGBFrame, Source

DEMO_SIZE: Final = (1280, 720)


class DemoSettings(FrameSourceSettings):
    """The animated demo at ``fps`` (default 30)."""

    kind: Literal["demo"] = "demo"
    width: int | None = Field(None, ge=16, le=7680, description="Canvas width (px), default 1280.")
    height: int | None = Field(None, ge=16, le=4320, description="Canvas height (px), default 720.")


class DemoSource(Source):
    """``skimage.data.astronaut()`` moving smoothly on a canvas: no camera, no download.

    Frame ``n`` is a pure function of ``n`` (see :meth:`render`): the photo
    translates, scales and rotates a little, so MediaPipe tracks a moving body.
    """

    kind = "demo"
    BACKGROUND: ClassVar[tuple[int, int, int]] = (58, 64, 74)

    def __init__(
        self, width: int = DEMO_SIZE[0], height: int = DEMO_SIZE[1], fps: float | None = None
    ) -> None:
        super().__init__()
        self.width, self.height = width, height
        self._fps = fps or DEFAULT_FPS
        self._photo: RGBFrame | None = None
        self._n = 0

    @property
    def fps(self) -> float:
        return self._fps

    def open(self) -> None:
        if self._photo is None:
            import skimage.data

            astronaut = cast(Callable[[], RGBFrame], skimage.data.astronaut)
            self._photo = np.ascontiguousarray(astronaut(), np.uint8)
        self._n = 0
        self.up = True

    def transform(self, n: int) -> npt.NDArray[np.float64]:
        """The 2x3 affine matrix (photo -> canvas) of frame ``n``."""
        t = n / self._fps
        side = 512.0
        base = 0.9 * self.height / side
        scale = base * (1.0 + 0.08 * math.sin(2 * math.pi * t / 5.0))
        angle = 6.0 * math.sin(2 * math.pi * t / 7.0)
        cx = self.width / 2 + 0.18 * self.width * math.sin(2 * math.pi * t / 6.0)
        cy = self.height / 2 + 0.04 * self.height * math.sin(2 * math.pi * t / 4.0)
        m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, scale)
        m[0, 2] += cx - side / 2
        m[1, 2] += cy - side / 2
        return np.asarray(m, np.float64)

    def render(self, n: int) -> RGBFrame:
        """Frame ``n`` of the animation (RGB)."""
        if self._photo is None:
            self.open()
        assert self._photo is not None
        out = cv2.warpAffine(
            self._photo,
            self.transform(n),
            (self.width, self.height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=self.BACKGROUND,
        )
        return np.asarray(out, np.uint8)

    def read(self) -> tuple[RGBFrame, int] | None:
        frame = self.render(self._n)
        self._n += 1
        return frame, time.time_ns()

    def close(self) -> None:
        self.up = False

    def describe(self) -> str:
        return f"demo (astronaut, animated) {self.width}x{self.height} at {self.fps:g} fps"


def write_demo_video(
    path: Path, width: int = 1280, height: int = 720, frames: int = 150, fps: float = 30.0
) -> Path:
    """Write ``frames`` frames of the demo animation to ``path`` (MJPG ``.avi``; benchmarks)."""
    demo = DemoSource(width, height, fps)
    demo.open()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise SourceError(f"cannot write a video to {path}")
    try:
        for n in range(frames):
            writer.write(cv2.cvtColor(demo.render(n), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def make(settings: DemoSettings, base_dir: Path, log: logging.Logger) -> DemoSource:
    return DemoSource(settings.width or DEMO_SIZE[0], settings.height or DEMO_SIZE[1], settings.fps)


SOURCES.add("demo", DemoSettings, make)
