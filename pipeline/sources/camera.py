"""``kind: camera``: a V4L2 camera by index or ``/dev/videoN`` path."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Literal

import cv2
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.settings import SOURCES, FrameSourceSettings
from pipeline.sources import DEFAULT_FPS
from pipeline.sources._cv import CvSource


class CameraSettings(FrameSourceSettings):
    """A camera at a requested size and frame rate (``fps``)."""

    kind: Literal["camera"] = "camera"
    device: int | str = Field(0, description="Camera index or /dev/videoN path.")
    width: int | None = Field(None, ge=16, le=7680, description="Requested camera width (px).")
    height: int | None = Field(None, ge=16, le=4320, description="Requested camera height (px).")


def camera_path(device: int | str) -> tuple[int | str, str]:
    """``(what to open, display name)`` for a camera index or ``/dev/videoN`` path."""
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        index = int(device)
        return index, f"camera {index} (/dev/video{index})"
    return device, f"camera {device}"


def camera_exists(device: int | str) -> tuple[bool, str]:
    """Whether the camera can exist on this machine, and why not (Linux checks /dev)."""
    target, name = camera_path(device)
    path = f"/dev/video{target}" if isinstance(target, int) else target
    if not os.path.exists("/dev") or os.name != "posix":  # pragma: no cover - not Linux
        return True, ""
    if not os.path.exists(path):
        return False, f"no such camera: {name}: {path} does not exist"
    if not stat.S_ISCHR(os.stat(path).st_mode):
        return False, f"no such camera: {path} is not a video device"
    return True, ""


class CameraSource(CvSource):
    """A V4L2 camera by index or ``/dev/videoN`` path, at a requested size and fps."""

    kind = "camera"
    live = True

    def __init__(
        self,
        device: int | str = 0,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
    ) -> None:
        super().__init__()
        self.device, self.name = camera_path(device)
        ok, why = camera_exists(device)
        if not ok:
            raise SourceError(why)
        self.width, self.height, self.requested_fps = width, height, fps

    def open(self) -> None:
        cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2 if os.name == "posix" else cv2.CAP_ANY)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.name} exists but cannot be opened (busy, or no permission?)")
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.requested_fps:
            cap.set(cv2.CAP_PROP_FPS, self.requested_fps)
        self._cap = cap
        self._set_fps_from(cap, self.requested_fps or DEFAULT_FPS)
        self.up = True

    def describe(self) -> str:
        w = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)) if self._cap else self.width
        h = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) if self._cap else self.height
        return f"{self.name}, {w}x{h} at {self.fps:g} fps"


def make(settings: CameraSettings, base_dir: Path, log: logging.Logger) -> CameraSource:
    return CameraSource(settings.device, settings.width, settings.height, settings.fps)


SOURCES.add("camera", CameraSettings, make)
