"""``kind: images``: still images from a directory (name order) or a glob, at ``fps``."""

from __future__ import annotations

import glob
import logging
import time
from pathlib import Path
from typing import Final, Literal

import cv2
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.settings import SOURCES, FileProblem, FrameSourceSettings, missing_path
from pipeline.sources import DEFAULT_FPS, RGBFrame, Source, resolve
from pipeline.sources._cv import bgr_to_rgb

IMAGE_SUFFIXES: Final = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

_log = logging.getLogger("posewire.capture")


class ImagesSettings(FrameSourceSettings):
    """A folder or glob of images, shown at ``fps`` (default 30)."""

    kind: Literal["images"] = "images"
    path: Path = Field(description="A directory of images, or a glob.")
    loop: bool = Field(False, description="Replay the images forever.")

    def file_problems(self, base_dir: Path) -> list[FileProblem]:
        missing = missing_path(base_dir, self.path, "source")
        return [("path", missing)] if missing else []


class ImagesSource(Source):
    """Still images from a directory (sorted by name) or a glob, at ``fps``."""

    kind = "images"

    def __init__(self, pattern: Path, fps: float | None = None, loop: bool = False) -> None:
        super().__init__()
        self.pattern = pattern
        self.loop = loop
        self._fps = fps or DEFAULT_FPS
        text = str(pattern)
        if any(ch in text for ch in "*?["):
            files = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            files = [p for p in files if p.is_file()]
            if not files:
                raise SourceError(f"no images match {pattern}")
        else:
            if not pattern.exists():
                raise SourceError(f"no such directory: {pattern}")
            if not pattern.is_dir():
                raise SourceError(f"{pattern} is not a directory (kind: file?)")
            files = sorted(
                p for p in pattern.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not files:
                raise SourceError(
                    f"no images in {pattern} (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")"
                )
        self.files = files
        self._next = 0
        self._decoded_this_pass = 0

    @property
    def fps(self) -> float:
        return self._fps

    def open(self) -> None:
        self._next = 0
        self._decoded_this_pass = 0
        self.up = True

    def read(self) -> tuple[RGBFrame, int] | None:
        while True:
            if self._next >= len(self.files):
                if not self.loop:
                    self.up = False
                    return None
                if self._decoded_this_pass == 0:
                    raise SourceError(
                        f"none of the {len(self.files)} images in {self.pattern} can be decoded"
                    )
                self._next = 0
                self._decoded_this_pass = 0
            path = self.files[self._next]
            self._next += 1
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                _log.warning("skipping %s: not a decodable image", path)
                continue
            self._decoded_this_pass += 1
            return bgr_to_rgb(bgr), time.time_ns()

    def close(self) -> None:
        self.up = False

    def describe(self) -> str:
        loop = ", looping" if self.loop else ""
        return f"images {self.pattern} ({len(self.files)} files) at {self.fps:g} fps{loop}"


def make(settings: ImagesSettings, base_dir: Path, log: logging.Logger) -> ImagesSource:
    return ImagesSource(resolve(base_dir, settings.path), settings.fps, settings.loop)


SOURCES.add("images", ImagesSettings, make)
