"""The capture stage: the configured source, paced, into the ``frames`` or ``poses`` ring.

The source comes from the registry (:data:`pipeline.config.SOURCES`, key
``source.kind``). A source of frames is read through a
:class:`~pipeline.sources.feed.FrameFeed` and written, as RGB frame slots, to
the ``frames`` ring (latest-wins); the end of a non-looping file or folder
sends an end-of-stream marker (:data:`pipeline.model.frame.FLAG_END_OF_STREAM`)
and returns 0. A source of poses (``produces = "poses"``, the trace replay)
writes :class:`~pipeline.model.pose.PoseFrame` records straight to the
``poses`` ring on its own clock; the pipeline then has no detect stage.

A source that cannot exist (:class:`~pipeline.errors.SourceError`) is refused:
the stage exits with the configuration-error status and is not restarted.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import cv2

from pipeline.errors import SourceError
from pipeline.model.frame import FrameBuffer, end_of_stream_payload
from pipeline.model.stats import Rate
from pipeline.settings import FrameSourceSettings
from pipeline.sources import PoseSource, RGBFrame, make_source
from pipeline.sources.feed import EndOfSource, FrameFeed

if TYPE_CHECKING:
    from pipeline.runtime.stage import StageContext


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


def run(ctx: StageContext) -> int:
    """Capture stage: frames or poses, by what the source produces; refuses impossible sources."""
    try:
        if ctx.config.source.produces == "poses":
            source = make_source(ctx.config, ctx.log)  # SourceError: fails fast, before the ring
            if not isinstance(source, PoseSource):
                raise TypeError(f"source kind {ctx.config.source.kind!r} made no PoseSource")
            return replay_poses(ctx, source)
        return capture_frames(ctx)
    except SourceError as exc:
        return ctx.refuse(str(exc))


def capture_frames(ctx: StageContext) -> int:
    """Frame source -> ``frames`` ring (latest-wins). Returns 0 at end of file.

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
    settings = cfg.source
    assert isinstance(settings, FrameSourceSettings)
    feed = FrameFeed.from_config(cfg, log)  # SourceError: fails fast, before the ring
    frames = ctx.ring("frames")
    on_demand = settings.as_fast_as_possible and not feed.source.live

    def wait_until_taken() -> None:
        """On demand: until the reader has taken the last frame sent (or we stop)."""
        while on_demand and not ctx.stopping and frames.statistics().occupancy > 0:
            ctx.tick()
            time.sleep(0.0005)

    packer = FramePacker(
        cfg.rings.max_frame_width, cfg.rings.max_frame_height, settings.resize, log
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
            if isinstance(got, EndOfSource):
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


def replay_poses(ctx: StageContext, source: PoseSource) -> int:
    """Pose source -> ``poses`` ring at the source's fps (no frames ring, no detect stage).

    Sequence numbers continue the poses ring's own counter, so they keep
    increasing across restarts; the capture timestamp is the send time.
    ``source.as_fast_as_possible`` replays without pacing (benchmarks). The end
    of a non-looping source ends the stage with 0. Metrics:
    ``frames_captured_total``, ``fps``, ``last_seq``.
    """
    source.open()
    ctx.log.info("source: %s", source.describe())
    poses = ctx.ring("poses")
    paced = not ctx.config.source.as_fast_as_possible
    interval = 1.0 / source.fps
    m = ctx.metrics
    rate = Rate()
    seq = poses.statistics().written
    sent = 0
    start = time.monotonic()
    m.update(frames_captured_total=0.0, fps=0.0)
    try:
        while not ctx.stopping:
            ctx.tick()
            m["fps"] = rate.per_second()
            if ctx.paused:
                ctx.sleep(0.1)
                start = time.monotonic() - sent * interval  # resume where we were
                continue
            if paced:
                due = start + sent * interval
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(min(delay, 0.1))
                    continue
                if delay < -interval:  # fell behind (e.g. stopped): skip ahead, no burst
                    start = time.monotonic() - sent * interval
            pose = source.pose(sent, seq + 1, time.time_ns())
            if pose is None:
                ctx.log.info("source ended after %d poses", sent)
                return 0
            seq += 1
            got = poses.send(pose.to_bytes(), ts_ns=pose.capture_ts_ns, meta=seq)
            if got != seq:  # another writer on the ring: follow its counter
                seq = got
            sent += 1
            rate.tick()
            m["frames_captured_total"] = float(sent)
            m["last_seq"] = float(seq)
        return 0
    finally:
        source.close()
