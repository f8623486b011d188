"""Toy plugins registered from outside the library (see tests/test_plugins.py).

Importing this module registers them; a pipeline reaches them in every
process with ``POSEWIRE_PLUGINS=tests.toy_plugin`` (the registries import the
modules named there when they discover their plugins).

* ``source: {kind: toy_poses, count: N}``: N synthetic poses (a source of poses)
  whose nose moves right by 0.01 per pose.
* ``source: {kind: toy_frames, count: N}``: N gray frames, frame ``n`` at level
  ``20 + 10 n`` (a source of frames).
* ``detect: {backend: toy}``: one "pose" per frame, its nose x the frame's mean
  brightness / 255 (no model).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.detectors import Detector, FloatArray, RGBFrame
from pipeline.model.pose import NUM_LANDMARKS, PoseFrame
from pipeline.settings import (
    DETECTORS,
    SOURCES,
    DetectorSettings,
    FrameSourceSettings,
    SourceSettings,
)
from pipeline.sources import PoseSource, Source


def toy_landmarks(nose_x: float) -> FloatArray:
    """``[1, 33, 4]`` landmarks in the codec's range, landmark 0 at ``nose_x``."""
    image = np.full((1, NUM_LANDMARKS, 4), 0.5, np.float32)
    image[0, :, 0] = np.linspace(0.3, 0.7, NUM_LANDMARKS)
    image[0, :, 2] = 0.0
    image[0, :, 3] = 0.9
    image[0, 0, 0] = nose_x
    return image


class ToyPoseSettings(SourceSettings):
    produces: ClassVar[Literal["frames", "poses"]] = "poses"

    kind: Literal["toy_poses"] = "toy_poses"
    count: int = Field(30, ge=1, description="Poses before the source ends.")
    fps: float = Field(60.0, gt=0, description="Poses per second.")


class ToyPoseSource(PoseSource):
    kind = "toy_poses"

    def __init__(self, settings: ToyPoseSettings) -> None:
        self.settings = settings

    @property
    def fps(self) -> float:
        return self.settings.fps

    def pose(self, n: int, seq: int, capture_ts_ns: int) -> PoseFrame | None:
        if n >= self.settings.count:
            return None
        now = time.time_ns()
        return PoseFrame(seq, capture_ts_ns, toy_landmarks(0.1 + 0.01 * n), None, now, now)


class ToyFrameSettings(FrameSourceSettings):
    kind: Literal["toy_frames"] = "toy_frames"
    count: int = Field(8, ge=1, le=20, description="Frames before the source ends.")
    size: int = Field(32, ge=16, le=256, description="Frame width and height (px).")


class ToyFrameSource(Source):
    kind = "toy_frames"

    def __init__(self, settings: ToyFrameSettings) -> None:
        super().__init__()
        self.settings = settings
        self.n = 0

    @property
    def fps(self) -> float:
        return 30.0

    def open(self) -> None:
        self.n = 0
        self.up = True

    def read(self) -> tuple[RGBFrame, int] | None:
        if self.n >= self.settings.count:
            self.up = False
            return None
        size = self.settings.size
        frame = np.full((size, size, 3), 20 + 10 * self.n, np.uint8)
        self.n += 1
        return frame, time.time_ns()

    def close(self) -> None:
        self.up = False


class ToyDetectorSettings(DetectorSettings):
    backend: Literal["toy"] = "toy"
    scale: float = Field(1.0, gt=0, le=2, description="Multiplies the nose x.")


class ToyDetector(Detector):
    name = "toy"

    def __init__(self, settings: ToyDetectorSettings) -> None:
        self.scale = settings.scale

    def detect(self, frame_rgb: RGBFrame, seq: int, capture_ts_ns: int) -> PoseFrame:
        start = time.time_ns()
        nose_x = self.scale * float(frame_rgb.mean()) / 255.0
        return PoseFrame(seq, capture_ts_ns, toy_landmarks(nose_x), None, start, time.time_ns())


def make_poses(settings: ToyPoseSettings, base_dir: Path, log: logging.Logger) -> ToyPoseSource:
    return ToyPoseSource(settings)


def make_frames(settings: ToyFrameSettings, base_dir: Path, log: logging.Logger) -> ToyFrameSource:
    return ToyFrameSource(settings)


def make_detector(settings: ToyDetectorSettings, base_dir: Path, *, video: bool) -> ToyDetector:
    return ToyDetector(settings)


def register() -> None:
    """Register the toys (again: a registration by the same module is idempotent)."""
    SOURCES.add("toy_poses", ToyPoseSettings, make_poses)
    SOURCES.add("toy_frames", ToyFrameSettings, make_frames)
    DETECTORS.add("toy", ToyDetectorSettings, make_detector)


def unregister() -> None:
    SOURCES.remove("toy_poses")
    SOURCES.remove("toy_frames")
    DETECTORS.remove("toy")


register()
