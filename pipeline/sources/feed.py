"""The frame feed: a video source read in a thread, paced, watched, reopened.

A :class:`FrameFeed` runs a :class:`~pipeline.sources.Source` in a reader
thread so that the capture stage's main loop keeps ticking even when
``VideoCapture.read`` hangs on a dead stream: no frame for ``stall_timeout_s``
and the source is abandoned and reopened after a capped exponential backoff.
Files, image folders and the demo are paced to real time (their own fps, or
``source.fps``) unless ``as_fast_as_possible``; live sources (camera, url) are
never paced, and the newest two of their frames are kept.

A source that cannot exist raises :class:`~pipeline.errors.SourceError` at
once and is not retried; a source with ``retry_open`` (a url stream that may
not be up yet) is retried with backoff like a stream that went down.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pipeline.errors import SourceError
from pipeline.settings import FrameSourceSettings
from pipeline.sources import DEFAULT_FPS, RGBFrame, Source, create_source

if TYPE_CHECKING:
    from pipeline.config import Config

_log = logging.getLogger("posewire.capture")


@dataclass
class Captured:
    """One frame out of the feed."""

    frame: RGBFrame
    """RGB ``uint8 [h, w, 3]``."""
    ts_ns: int
    """``time.time_ns()`` when it was read."""


class EndOfSource:
    """The type of :data:`END`."""

    def __repr__(self) -> str:
        return "END"


END: Final = EndOfSource()
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
        if not isinstance(src, FrameSourceSettings):
            raise TypeError(f"source kind {src.kind!r} produces poses, not frames")
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

    def poll(self, timeout: float, *, take_frames: bool = True) -> Captured | EndOfSource | None:
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

    def _event(self, ev: _Event) -> EndOfSource | None:
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
