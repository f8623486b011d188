"""What the OpenCV ``VideoCapture`` sources share: colour conversion and reading."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np

from pipeline.sources import DEFAULT_FPS, RGBFrame, Source

__all__ = ["DEFAULT_FPS", "CvSource", "bgr_to_rgb", "to_rgb"]


def _quiet_opencv() -> None:
    """OpenCV's own warnings duplicate our precise errors; keep only its errors."""
    set_level = getattr(cv2, "setLogLevel", None)
    if set_level is not None:
        set_level(2)  # LOG_LEVEL_ERROR


_quiet_opencv()


def bgr_to_rgb(frame: object) -> RGBFrame:
    """An OpenCV BGR image as RGB (the one conversion, at the source)."""
    out: RGBFrame = np.asarray(cv2.cvtColor(np.asarray(frame), cv2.COLOR_BGR2RGB), np.uint8)
    return out


def to_rgb(frame: RGBFrame) -> RGBFrame:
    """A gray, BGRA or BGR OpenCV image as RGB."""
    if frame.ndim == 2:
        return np.asarray(cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB), np.uint8)
    if frame.shape[2] == 4:
        return np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB), np.uint8)
    return bgr_to_rgb(frame)


class CvSource(Source):
    """Common part of the OpenCV ``VideoCapture`` sources."""

    def __init__(self) -> None:
        super().__init__()
        self._cap: cv2.VideoCapture | None = None
        self._fps = 0.0
        self._pending: RGBFrame | None = None

    @property
    def fps(self) -> float:
        return self._fps

    def _set_fps_from(self, cap: cv2.VideoCapture, fallback: float) -> None:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        self._fps = fps if math.isfinite(fps) and 0 < fps <= 1000 else fallback

    def _grab(self) -> RGBFrame | None:
        cap = self._cap
        if cap is None:
            return None
        ok, frame = cap.read()
        if not ok or frame is None:
            return None
        return to_rgb(np.asarray(frame, np.uint8))

    def read(self) -> tuple[RGBFrame, int] | None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            return pending, time.time_ns()
        frame = self._grab()
        if frame is None:
            self.up = False
            return None
        return frame, time.time_ns()

    def close(self) -> None:
        self.up = False
        self._pending = None
        if self._cap is not None:
            self._cap.release()
            self._cap = None
