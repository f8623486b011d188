"""The capture stage: every video source, paced, watched, into the ``frames`` ring.

Sources (``source.kind``)
    ``camera`` (index or ``/dev/videoN``), ``file`` (anything OpenCV reads,
    ``loop``), ``url`` (``rtsp://``, ``rtsps://``, ``http://``, ``https://``),
    ``images`` (a directory or a glob, at ``source.fps``, default 30),
    ``demo`` (``skimage.data.astronaut()`` animated on a 1280x720 canvas at
    30 fps: no camera, no download) and ``auto`` (a camera if one exists,
    else demo; the choice is logged).

Every :class:`Source` returns frames as **RGB** ``uint8 [h, w, 3]`` arrays
(MediaPipe's order; OpenCV's BGR is converted once, at the source) with the
capture timestamp ``time.time_ns()`` taken right after the frame was read.

A :class:`FrameFeed` runs the source in a reader thread so that the stage's
main loop keeps ticking even when ``VideoCapture.read`` hangs on a dead
stream: no frame for ``stall_timeout_s`` and the source is abandoned and
reopened after a capped exponential backoff (metrics ``source_up``,
``reopens``). Files, image folders and the demo are paced to real time
unless ``as_fast_as_possible``.

A source that cannot exist (no such file or camera, an unsupported scheme, a
file OpenCV cannot decode, an empty image folder) raises
:class:`~pipeline.errors.SourceError` at once with a precise message, and is
not retried: the stage exits with the configuration-error code. The one
exception is a ``url`` stream, which may simply not be up yet: it is retried
with backoff (and logged) like a stream that went down.

The end of a non-looping file or folder sends an end-of-stream marker
(:data:`pipeline.model.frame.FLAG_END_OF_STREAM`) on the ring and returns 0.
"""

from __future__ import annotations

import collections
import glob
import logging
import math
import os
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, cast
from urllib.parse import urlsplit

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.config import Config, SourceConfig, SourceKind, resolve_path
from pipeline.errors import SourceError
from pipeline.model.frame import FrameBuffer, end_of_stream_payload
from pipeline.model.stats import Rate

if TYPE_CHECKING:
    from pipeline.runtime.stage import StageContext

RGBFrame = npt.NDArray[np.uint8]
"""An RGB ``uint8 [h, w, 3]`` image."""

IMAGE_SUFFIXES: Final = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
URL_SCHEMES: Final = ("rtsp", "rtsps", "http", "https")
DEFAULT_FPS: Final = 30.0
DEMO_SIZE: Final = (1280, 720)

_log = logging.getLogger("posewire.capture")


def _quiet_opencv() -> None:
    """OpenCV's own warnings duplicate our precise errors; keep only its errors."""
    set_level = getattr(cv2, "setLogLevel", None)
    if set_level is not None:
        set_level(2)  # LOG_LEVEL_ERROR


_quiet_opencv()


def _bgr_to_rgb(frame: object) -> RGBFrame:
    out: RGBFrame = np.asarray(cv2.cvtColor(np.asarray(frame), cv2.COLOR_BGR2RGB), np.uint8)
    return out


def _gray_to_rgb(frame: RGBFrame) -> RGBFrame:
    if frame.ndim == 2:
        return np.asarray(cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB), np.uint8)
    if frame.shape[2] == 4:
        return np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB), np.uint8)
    return _bgr_to_rgb(frame)


# --------------------------------------------------------------------------- sources


class Source(ABC):
    """A video source: ``open()``, then ``read()`` until ``None``, then ``close()``.

    ``read()`` returns ``(frame, capture_ts_ns)``: an RGB ``uint8 [h, w, 3]``
    array and ``time.time_ns()`` taken when the frame was read. ``None`` means
    the source ended (a file) or broke (a live source: the feed reopens it).
    Construction checks what can be checked without opening (paths, schemes)
    and raises :class:`SourceError` for a source that cannot exist.
    """

    kind: ClassVar[str] = "?"
    live: ClassVar[bool] = False
    """Frames arrive at the device's own pace (camera, url); never paced by us."""
    retry_open: ClassVar[bool] = False
    """A failing first ``open()`` is retried with backoff instead of fatal (url)."""

    def __init__(self) -> None:
        self.up = False
        """True between a successful ``open()`` and ``close()``/a failed read."""

    @property
    @abstractmethod
    def fps(self) -> float:
        """The source's own frame rate (pacing for files, folders and demo)."""

    @abstractmethod
    def open(self) -> None:
        """Open the source; :class:`SourceError` if it cannot be opened."""

    @abstractmethod
    def read(self) -> tuple[RGBFrame, int] | None:
        """The next RGB frame and its capture timestamp, or ``None`` at the end."""

    @abstractmethod
    def close(self) -> None:
        """Release the source (idempotent)."""

    def describe(self) -> str:
        """One line for the log."""
        return self.kind


class _CvSource(Source):
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
        return _gray_to_rgb(np.asarray(frame, np.uint8))

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


def _camera_path(device: int | str) -> tuple[int | str, str]:
    """``(what to open, display name)`` for a camera index or ``/dev/videoN`` path."""
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        index = int(device)
        return index, f"camera {index} (/dev/video{index})"
    return device, f"camera {device}"


def camera_exists(device: int | str) -> tuple[bool, str]:
    """Whether the camera can exist on this machine, and why not (Linux checks /dev)."""
    target, name = _camera_path(device)
    path = f"/dev/video{target}" if isinstance(target, int) else target
    if not os.path.exists("/dev") or os.name != "posix":  # pragma: no cover - not Linux
        return True, ""
    if not os.path.exists(path):
        return False, f"no such camera: {name}: {path} does not exist"
    if not stat.S_ISCHR(os.stat(path).st_mode):
        return False, f"no such camera: {path} is not a video device"
    return True, ""


class CameraSource(_CvSource):
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
        self.device, self.name = _camera_path(device)
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


class FileSource(_CvSource):
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


class UrlSource(_CvSource):
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
            return _bgr_to_rgb(bgr), time.time_ns()

    def close(self) -> None:
        self.up = False

    def describe(self) -> str:
        loop = ", looping" if self.loop else ""
        return f"images {self.pattern} ({len(self.files)} files) at {self.fps:g} fps{loop}"


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


def create_source(cfg: Config, log: logging.Logger | None = None) -> Source:
    """The :class:`Source` ``cfg.source`` describes (not opened yet).

    Raises :class:`SourceError` at once for a source that cannot exist.
    ``auto`` picks a camera when one exists, else the demo, and logs which.
    """
    src: SourceConfig = cfg.source
    log = log or _log
    kind = src.kind
    if kind == SourceKind.AUTO:
        ok, why = camera_exists(src.device)
        if ok:
            log.info("source auto: using %s", _camera_path(src.device)[1])
            kind = SourceKind.CAMERA
        else:
            log.info("source auto: using the demo (%s)", why)
            kind = SourceKind.DEMO
    if kind == SourceKind.CAMERA:
        return CameraSource(src.device, src.width, src.height, src.fps)
    if kind == SourceKind.FILE:
        assert src.path is not None  # enforced by the config
        return FileSource(resolve_path(cfg, src.path), src.loop)
    if kind == SourceKind.URL:
        assert src.url is not None
        return UrlSource(src.url, timeout_s=min(src.stall_timeout_s, 10.0))
    if kind == SourceKind.IMAGES:
        assert src.path is not None
        return ImagesSource(resolve_path(cfg, src.path), src.fps, src.loop)
    width, height = src.width or DEMO_SIZE[0], src.height or DEMO_SIZE[1]
    return DemoSource(width, height, src.fps)


# --------------------------------------------------------------------------- the feed


@dataclass
class Captured:
    """One frame out of the feed."""

    frame: RGBFrame
    """RGB ``uint8 [h, w, 3]``."""
    ts_ns: int
    """``time.time_ns()`` when it was read."""


class _End:
    def __repr__(self) -> str:
        return "END"


END: Final = _End()
"""Returned by :meth:`FrameFeed.poll` when a non-live source has ended."""


@dataclass
class _Event:
    kind: str  # "opened" | "end" | "error"
    detail: str = ""
    error: Exception | None = None


class _Mailbox:
    """Frames (bounded) and events from the reader to the main thread, in order.

    An "end" or "error" event comes after the frames read before it, so no
    frame is lost at the end of a file.
    """

    def __init__(self, capacity: int, drop_oldest: bool) -> None:
        self.capacity = capacity
        self.drop_oldest = drop_oldest
        self.items: collections.deque[Captured | _Event] = collections.deque()
        self.nframes = 0
        self.dropped = 0
        self.cond = threading.Condition()

    def put_frame(self, item: Captured, stop: threading.Event) -> bool:
        """Deliver a frame; blocks while full unless ``drop_oldest``. False if stopped."""
        with self.cond:
            while self.nframes >= self.capacity:
                if self.drop_oldest:
                    for old in self.items:
                        if isinstance(old, Captured):
                            self.items.remove(old)
                            break
                    self.nframes -= 1
                    self.dropped += 1
                    break
                if stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.items.append(item)
            self.nframes += 1
            self.cond.notify_all()
            return True

    def put_event(self, event: _Event) -> None:
        with self.cond:
            self.items.append(event)
            self.cond.notify_all()

    def get(self, timeout: float, take_frames: bool) -> _Event | Captured | None:
        """The next item; with ``take_frames=False`` only an event at the head."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if self.items and (take_frames or isinstance(self.items[0], _Event)):
                    item = self.items.popleft()
                    if isinstance(item, Captured):
                        self.nframes -= 1
                        self.cond.notify_all()
                    return item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


class _Reader(threading.Thread):
    """Opens one source and reads it until the end, an error, or being abandoned."""

    def __init__(
        self, source: Source, realtime: bool, fps_override: float | None, mailbox: _Mailbox
    ) -> None:
        super().__init__(name=f"capture-{source.kind}", daemon=True)
        self.source = source
        self.realtime = realtime
        self.fps_override = fps_override
        self.mailbox = mailbox
        self.stop = threading.Event()
        self.waiting_since: float | None = time.monotonic()
        """Monotonic time since the source owes us a frame (None while pacing or blocked)."""
        self.frames = 0

    def run(self) -> None:
        src = self.source
        try:
            src.open()
        except SourceError as exc:
            self.waiting_since = None
            self.mailbox.put_event(_Event("error", str(exc), exc))
            return
        # paced after open: a file's own fps is known only now
        fps = 0.0
        if self.realtime and not src.live:
            fps = self.fps_override or src.fps or DEFAULT_FPS
        self.mailbox.put_event(_Event("opened", src.describe()))
        interval = 1.0 / fps if fps else 0.0
        next_t = time.monotonic()
        try:
            while not self.stop.is_set():
                if interval:
                    self.waiting_since = None
                    delay = next_t - time.monotonic()
                    if delay > 0 and self.stop.wait(delay):
                        break
                    now = time.monotonic()
                    next_t += interval
                    if next_t < now - interval:  # late by more than a frame: no burst
                        next_t = now
                self.waiting_since = time.monotonic()
                got = src.read()
                self.waiting_since = None
                if self.stop.is_set():
                    break
                if got is None:
                    self.mailbox.put_event(_Event("end"))
                    break
                self.frames += 1
                if not self.mailbox.put_frame(Captured(got[0], got[1]), self.stop):
                    break
        except SourceError as exc:
            self.waiting_since = None
            self.mailbox.put_event(_Event("error", str(exc), exc))
        finally:
            self.waiting_since = None
            src.close()


class FrameFeed:
    """A source read in a thread, paced, with a stall watchdog and reopen backoff.

    Call :meth:`poll` from the main loop (it never blocks longer than its
    timeout): it returns a :class:`Captured` frame, ``None`` (nothing yet),
    or :data:`END` (a non-live source ended). It raises :class:`SourceError`
    when the source cannot exist (the first open failed, for non-url kinds).
    """

    def __init__(
        self,
        make_source: Callable[[], Source],
        *,
        pace_fps: float | None = None,
        realtime: bool = True,
        stall_timeout_s: float = 5.0,
        reopen_backoff_max_s: float = 10.0,
        reopen_backoff_min_s: float = 0.25,
        log: logging.Logger | None = None,
    ) -> None:
        self._make_source = make_source
        self._pace_fps = pace_fps
        self._realtime = realtime
        self.stall_timeout_s = stall_timeout_s
        self.backoff_max_s = reopen_backoff_max_s
        self.backoff_min_s = min(reopen_backoff_min_s, reopen_backoff_max_s)
        self._backoff = self.backoff_min_s
        self.log = log or _log
        self.up = False
        """A frame came from the current source and it has not stalled or ended since."""
        self.reopens = 0
        """Times the source was reopened after a stall, an error or a broken stream."""
        self.ever_up = False
        self.frames = 0
        self._reader: _Reader | None = None
        self._mailbox: _Mailbox | None = None
        self._reopen_at: float | None = None
        self._dropped_before = 0
        self.source: Source = make_source()  # SourceError here: fails fast, in this thread

    @classmethod
    def from_config(cls, cfg: Config, log: logging.Logger | None = None) -> FrameFeed:
        """A feed for ``cfg.source`` (raises :class:`SourceError` for impossible sources)."""
        src = cfg.source
        first = [create_source(cfg, log)]

        def make() -> Source:
            return first.pop() if first else create_source(cfg, log)

        return cls(
            make,
            pace_fps=src.fps,
            realtime=not src.as_fast_as_possible,
            stall_timeout_s=src.stall_timeout_s,
            reopen_backoff_max_s=src.reopen_backoff_max_s,
            log=log,
        )

    @property
    def dropped(self) -> int:
        """Frames a live source delivered that the main loop did not take in time."""
        return self._dropped_before + (self._mailbox.dropped if self._mailbox else 0)

    def _start(self) -> None:
        src = self.source
        if self._mailbox is not None:
            self._dropped_before += self._mailbox.dropped
        # a non-live source decodes one frame ahead; a live one keeps the newest two
        self._mailbox = _Mailbox(capacity=2 if src.live else 1, drop_oldest=src.live)
        self._reader = _Reader(src, self._realtime, self._pace_fps, self._mailbox)
        self._reader.start()

    def _abandon(self, why: str) -> None:
        """Give up on the current reader (it may be stuck in read) and schedule a reopen."""
        if self._reader is not None:
            self._reader.stop.set()
            if self._mailbox is not None:
                with self._mailbox.cond:
                    self._mailbox.cond.notify_all()
        self._reader = None
        self.up = False
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max_s)
        self._reopen_at = time.monotonic() + delay
        self.log.warning("source %s: %s; reopening in %.2g s", self.source.kind, why, delay)

    def _reopen(self) -> None:
        self._reopen_at = None
        self.reopens += 1
        try:
            self.source = self._make_source()
        except SourceError as exc:
            self._abandon(f"cannot reopen: {exc}")
            return
        self._start()

    def poll(self, timeout: float, *, take_frames: bool = True) -> Captured | _End | None:
        """Wait up to ``timeout`` s for the next frame; service the watchdog meanwhile.

        With ``take_frames=False`` (paused) frames stay queued (a paced source
        then stops reading) and only events and the watchdog are handled.
        """
        if self._reader is None and self._reopen_at is None:
            self._start()
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self._reopen_at is not None:
                if now >= self._reopen_at:
                    self._reopen()
                else:
                    time.sleep(max(0.0, min(deadline - now, self._reopen_at - now)))
                    if time.monotonic() >= deadline:
                        return None
                    continue
            reader, mailbox = self._reader, self._mailbox
            assert reader is not None and mailbox is not None
            got = mailbox.get(max(0.0, min(deadline - now, 0.1)), take_frames)
            if isinstance(got, Captured):
                if not self.up:
                    self.log.info("source %s is up", self.source.kind)
                self.up = self.ever_up = True
                self._backoff = self.backoff_min_s
                self.frames += 1
                return got
            if got is not None:
                result = self._event(got)
                if result is not None:
                    return result
            waiting = reader.waiting_since
            if (
                self._reader is reader
                and waiting is not None
                and time.monotonic() - waiting > self.stall_timeout_s
            ):
                self._abandon(f"no frame for {self.stall_timeout_s:g} s (stalled)")
            if time.monotonic() >= deadline:
                return None

    def _event(self, ev: _Event) -> _End | None:
        src = self.source
        if ev.kind == "opened":
            self.log.info("source: %s", ev.detail)
            return None
        if ev.kind == "error":
            if not self.ever_up and not src.retry_open and isinstance(ev.error, SourceError):
                raise ev.error
            self._abandon(ev.detail)
            return None
        # end
        if src.live:
            self._abandon("stream ended")
            return None
        self.up = False
        return END

    def close(self) -> None:
        """Stop the reader (waits briefly; a reader stuck in ``read`` is left behind)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop.set()
            if self._mailbox is not None:
                with self._mailbox.cond:
                    self._mailbox.cond.notify_all()
            reader.join(timeout=1.0)
        self.up = False


# --------------------------------------------------------------------------- packing


class FramePacker:
    """Resizes (``source.resize``, or down to the slot size) into a :class:`FrameBuffer`."""

    def __init__(
        self, max_w: int, max_h: int, resize: tuple[int, int] | None, log: logging.Logger
    ) -> None:
        self.buffer = FrameBuffer(max_w, max_h)
        self.resize = resize
        self.log = log
        self._warned: tuple[int, int] | None = None

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The size a ``width`` x ``height`` frame is sent at."""
        w, h = self.resize or (width, height)
        if self.buffer.fits(h, w):
            return w, h
        s = min(self.buffer.max_w / w, self.buffer.max_h / h)
        fit = max(1, int(w * s)), max(1, int(h * s))
        if self._warned != (w, h):
            self._warned = (w, h)
            self.log.warning(
                "frames of %dx%d exceed the ring slot (%dx%d, rings.max_frame_width/height): "
                "sent at %dx%d",
                w,
                h,
                self.buffer.max_w,
                self.buffer.max_h,
                *fit,
            )
        return fit

    def pack(self, frame: RGBFrame) -> memoryview:
        """The slot payload for ``frame`` (RGB); resizing writes straight into the buffer."""
        h, w = frame.shape[:2]
        tw, th = self.target(w, h)
        if (tw, th) == (w, h):
            return self.buffer.pack(frame)
        dst = self.buffer.pixels(th, tw)
        interp = cv2.INTER_AREA if tw < w else cv2.INTER_LINEAR
        cv2.resize(frame, (tw, th), dst=dst, interpolation=interp)
        return self.buffer.payload()


# --------------------------------------------------------------------------- the stage


def run(ctx: StageContext) -> int:
    """Capture stage (see :func:`_capture`); a source that cannot exist is refused."""
    try:
        return _capture(ctx)
    except SourceError as exc:
        return ctx.refuse(str(exc))


def _capture(ctx: StageContext) -> int:
    """Capture stage: source -> ``frames`` ring (latest-wins). Returns 0 at end of file.

    With ``as_fast_as_possible`` a file, folder or demo is read *on demand*:
    the next frame is sent as soon as detection has taken the previous one
    (the reader thread decodes it meanwhile), so no frame is decoded only to
    be skipped and every frame of a file is detected, as fast as detection
    goes. Paced and live sources are latest-wins: detection takes the newest
    frame and the ring counts the others as skipped.

    Metrics: ``frames_captured_total``, ``reopens_total``,
    ``frames_dropped_source_total`` (a live source outran this loop), and the
    gauges ``fps`` and ``source_up`` (1 while frames arrive, 0 while the
    source is stalled, broken or being reopened).
    """
    cfg = ctx.config
    log = ctx.log
    feed = FrameFeed.from_config(cfg, log)  # SourceError: fails fast, before the ring
    frames = ctx.ring("frames")
    on_demand = cfg.source.as_fast_as_possible and not feed.source.live

    def wait_until_taken() -> None:
        """On demand: until the reader has taken the last frame sent (or we stop)."""
        while on_demand and not ctx.stopping and frames.statistics().occupancy > 0:
            ctx.tick()
            time.sleep(0.0005)

    packer = FramePacker(
        cfg.rings.max_frame_width, cfg.rings.max_frame_height, cfg.source.resize, log
    )
    m = ctx.metrics
    rate = Rate()
    captured = 0
    m.update(frames_captured_total=0.0, reopens_total=0.0, fps=0.0, source_up=0.0)
    try:
        while not ctx.stopping:
            ctx.tick()
            wait_until_taken()
            got = feed.poll(0.2, take_frames=not ctx.paused)
            if isinstance(got, _End):
                wait_until_taken()
                frames.send(end_of_stream_payload(), ts_ns=time.time_ns())
                log.info("source ended after %d frames", captured)
                return 0
            if got is not None:
                frames.send(packer.pack(got.frame), ts_ns=got.ts_ns)
                captured += 1
                rate.tick()
            m["frames_captured_total"] = float(captured)
            m["reopens_total"] = float(feed.reopens)
            m["frames_dropped_source_total"] = float(feed.dropped)
            m["source_up"] = 1.0 if feed.up else 0.0
            m["fps"] = rate.per_second()
        return 0
    finally:
        feed.close()
        m["source_up"] = 0.0
