"""``kind: url``: a network stream through FFmpeg (rtsp, rtsps, http, https)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

import cv2
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.settings import SOURCES, FrameSourceSettings
from pipeline.sources import DEFAULT_FPS
from pipeline.sources._cv import CvSource

URL_SCHEMES: Final = ("rtsp", "rtsps", "http", "https")


class UrlSettings(FrameSourceSettings):
    """A stream that may not be up yet: a failing first open is retried with backoff."""

    kind: Literal["url"] = "url"
    url: str = Field(min_length=1, description="rtsp://, rtsps://, http:// or https:// stream.")


class UrlSource(CvSource):
    """A network stream through FFmpeg: rtsp(s):// or http(s)://, with I/O timeouts."""

    kind = "url"
    live = True
    retry_open = True

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        super().__init__()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in URL_SCHEMES:
            shown = f"{scheme}://" if scheme else "no scheme"
            raise SourceError(
                f"unsupported URL scheme in {url!r}: {shown} (supported: "
                + ", ".join(f"{s}://" for s in URL_SCHEMES)
                + ")"
            )
        if not parts.hostname:
            raise SourceError(f"no host in URL {url!r}")
        self.url = url
        self.timeout_ms = max(500, int(timeout_s * 1000))

    def _safe_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.password:
            return self.url.replace(f":{parts.password}@", ":***@")
        return self.url

    def open(self) -> None:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            self.timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            self.timeout_ms,
        ]
        cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open stream {self._safe_url()}")
        self._cap = cap
        self._set_fps_from(cap, DEFAULT_FPS)
        self.up = True

    def describe(self) -> str:
        return f"stream {self._safe_url()} at {self.fps:g} fps"


def make(settings: UrlSettings, base_dir: Path, log: logging.Logger) -> UrlSource:
    return UrlSource(settings.url, timeout_s=min(settings.stall_timeout_s, 10.0))


SOURCES.add("url", UrlSettings, make)
