"""``kind: auto`` (the default): a camera if one exists, else the demo; the choice is logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.settings import SOURCES, FrameSourceSettings
from pipeline.sources import Source
from pipeline.sources.camera import CameraSource, camera_exists, camera_path
from pipeline.sources.demo import DEMO_SIZE, DemoSource


class AutoSettings(FrameSourceSettings):
    """``device``, ``width`` and ``height`` apply to the camera or to the demo, as chosen."""

    kind: Literal["auto"] = "auto"
    device: int | str = Field(0, description="Camera index or /dev/videoN path to look for.")
    width: int | None = Field(None, ge=16, le=7680, description="Camera or demo width (px).")
    height: int | None = Field(None, ge=16, le=4320, description="Camera or demo height (px).")


def make(settings: AutoSettings, base_dir: Path, log: logging.Logger) -> Source:
    ok, why = camera_exists(settings.device)
    if ok:
        log.info("source auto: using %s", camera_path(settings.device)[1])
        return CameraSource(settings.device, settings.width, settings.height, settings.fps)
    log.info("source auto: using the demo (%s)", why)
    width, height = settings.width or DEMO_SIZE[0], settings.height or DEMO_SIZE[1]
    return DemoSource(width, height, settings.fps)


SOURCES.add("auto", AutoSettings, make)
