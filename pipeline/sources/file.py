"""``kind: file``: a video file (anything OpenCV/FFmpeg decodes), optionally looped."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import cv2
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.settings import SOURCES, FileProblem, FrameSourceSettings, missing_path
from pipeline.sources import DEFAULT_FPS, RGBFrame, resolve
from pipeline.sources._cv import CvSource


class FileSettings(FrameSourceSettings):
    """A video file, paced at its own fps (or ``fps``)."""

    kind: Literal["file"] = "file"
    path: Path = Field(description="Video file.")
    loop: bool = Field(False, description="Replay the file forever.")

    def file_problems(self, base_dir: Path) -> list[FileProblem]:
        missing = missing_path(base_dir, self.path, "source")
        return [("path", missing)] if missing else []


class FileSource(CvSource):
    """A video file (anything OpenCV/FFmpeg decodes); ``loop`` replays it forever."""

    kind = "file"

    def __init__(self, path: Path, loop: bool = False) -> None:
        super().__init__()
        self.path = path
        self.loop = loop
        if not path.exists():
            raise SourceError(f"no such file: {path}")
        if path.is_dir():
            raise SourceError(f"{path} is a directory, not a video file (kind: images?)")
        if not os.access(path, os.R_OK):
            raise SourceError(f"cannot read {path}: permission denied")
        self.frames_read = 0

    def _open_cap(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot decode {self.path}: OpenCV cannot open it as a video")
        return cap

    def open(self) -> None:
        self._cap = self._open_cap()
        first = self._grab()
        if first is None:
            self.close()
            raise SourceError(f"cannot decode {self.path}: no decodable frame in it")
        self._pending = first
        self._set_fps_from(self._cap, DEFAULT_FPS)
        self.up = True

    def read(self) -> tuple[RGBFrame, int] | None:
        got = super().read()
        if got is None and self.loop and self.frames_read > 0:
            # rewind by reopening: seeking is unreliable on some containers
            if self._cap is not None:
                self._cap.release()
            self._cap = self._open_cap()
            self.frames_read = 0
            got = super().read()
            if got is not None:
                self.up = True
        if got is not None:
            self.frames_read += 1
        return got

    def describe(self) -> str:
        w = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)) if self._cap else 0
        h = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) if self._cap else 0
        loop = ", looping" if self.loop else ""
        return f"file {self.path}, {w}x{h} at {self.fps:g} fps{loop}"


def make(settings: FileSettings, base_dir: Path, log: logging.Logger) -> FileSource:
    return FileSource(resolve(base_dir, settings.path), settings.loop)


SOURCES.add("file", FileSettings, make)
