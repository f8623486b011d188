"""The detect stage: newest frame in, :class:`~pipeline.model.pose.PoseFrame` out.

The detector comes from the registry (:data:`pipeline.config.DETECTORS`, key
``detect.backend``: ``mediapipe``, ``tasks`` or a plugin). The stage consumes
the ``frames`` ring *latest-wins* (the ring counts the frames detection could
not keep up with as skipped) and sends every result, "no person" (0 poses)
included, to the ``poses`` ring with ``ts_ns=capture_ts_ns, meta=frame seq``.
An end-of-stream frame ends the stage with 0. A detector that cannot be made
(:class:`~pipeline.errors.ConfigError`) is refused: no restart, the run stops.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

from pipeline.detectors import Detector, RGBFrame, create_detector
from pipeline.errors import ConfigError, SourceError, WouldBlock
from pipeline.model.frame import frame_from_slot, frame_slot_size
from pipeline.model.pose import PoseFrame
from pipeline.model.stats import Rate, Window

if TYPE_CHECKING:
    from pipeline.runtime.stage import StageContext


def run(ctx: StageContext) -> int:
    """Detect stage (see :func:`detect_frames`); a detector that cannot be made is refused."""
    try:
        return detect_frames(ctx)
    except (ConfigError, SourceError) as exc:
        return ctx.refuse(str(exc))


def detect_frames(ctx: StageContext) -> int:
    """``frames`` ring (latest-wins) -> detector(s) -> ``poses`` ring.

    ``detect.workers`` detector instances run in threads (MediaPipe releases
    the GIL while it works), each on the newest frame when it becomes free;
    results leave in frame order.

    Metrics: ``frames_detected_total``, ``frames_no_person_total``, and the
    gauges ``detect_ms_p50``, ``detect_ms_p95`` (last 300 frames), ``fps``,
    ``frames_skipped`` (the frames ring's own counter: frames superseded
    before detection could take them, across restarts), ``last_seq``,
    ``capture_to_detect_ms`` (capture timestamp to end of detection) and
    ``detect_workers``.
    """
    detectors = [create_detector(ctx.config, video=True)]  # ConfigError: fails fast
    try:
        ctx.log.info("detector: %s", detectors[0].describe())
        for _ in range(ctx.config.detect.workers - 1):
            detectors.append(create_detector(ctx.config, video=True))
        return DetectLoop(ctx, detectors).run()
    finally:
        for detector in detectors:
            detector.close()


class DetectLoop:
    """Dispatch the newest frame to a free detector; emit results in frame order.

    The main thread takes frames (it is the ring's only reader) and ticks the
    supervisor; each detector has its own thread and frame buffer. A result is
    sent as soon as no earlier frame is still being detected, so ``seq`` stays
    strictly increasing on the poses ring whatever the workers' timing.
    """

    def __init__(self, ctx: StageContext, detectors: list[Detector]) -> None:
        self.ctx = ctx
        self.detectors = detectors
        self.frames = ctx.ring("frames")
        self.poses = ctx.ring("poses")
        rings = ctx.config.rings
        slot = frame_slot_size(rings.max_frame_width, rings.max_frame_height)
        self.buffers = [bytearray(slot) for _ in detectors]
        self.inboxes: list[queue.SimpleQueue[tuple[RGBFrame, int, int] | None]] = [
            queue.SimpleQueue() for _ in detectors
        ]
        self.lock = threading.Lock()
        self.idle = list(range(len(detectors)))
        self.free = threading.Semaphore(len(detectors))
        self.in_flight: set[int] = set()
        self.done: dict[int, PoseFrame] = {}
        self.failure: BaseException | None = None
        self.window = Window(300)
        self.rate = Rate()
        self.detected = 0
        self.no_person = 0

    def run(self) -> int:
        ctx = self.ctx
        m = ctx.metrics
        m.update(frames_detected_total=0.0, frames_no_person_total=0.0, fps=0.0, last_seq=-1.0)
        m["detect_workers"] = float(len(self.detectors))
        threads = [
            threading.Thread(target=self._work, args=(i,), name=f"detect-{i}", daemon=True)
            for i in range(len(self.detectors))
        ]
        for t in threads:
            t.start()
        try:
            return self._dispatch()
        finally:
            for inbox in self.inboxes:
                inbox.put(None)
            for t in threads:
                t.join(timeout=5)

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _dispatch(self) -> int:
        ctx = self.ctx
        m = ctx.metrics
        while not ctx.stopping:
            ctx.tick()
            self._check()
            m["frames_skipped"] = float(self.frames.statistics().skipped)
            m["fps"] = self.rate.per_second()
            if ctx.paused:
                ctx.sleep(0.1)
                continue
            if not self.free.acquire(timeout=0.2):
                continue
            with self.lock:
                worker = self.idle.pop()
            try:
                item = self.frames.recv_into(self.buffers[worker], timeout=0.2)  # the newest
            except WouldBlock:
                self._release(worker)
                continue
            header, pixels = frame_from_slot(item.data)
            if header.end_of_stream:
                self._release(worker)
                self._drain()
                ctx.log.info("source ended: detect stage done after %d frames", self.detected)
                return 0
            with self.lock:
                self.in_flight.add(item.seq)
            self.inboxes[worker].put((pixels, item.seq, item.ts_ns))
        return 0

    def _drain(self) -> None:
        """Wait until every frame in flight has been detected and sent."""
        while True:
            self.ctx.tick()
            self._check()
            with self.lock:
                if not self.in_flight:
                    return
            time.sleep(0.005)

    def _release(self, worker: int) -> None:
        with self.lock:
            self.idle.append(worker)
        self.free.release()

    def _work(self, worker: int) -> None:
        detector = self.detectors[worker]
        inbox = self.inboxes[worker]
        while (job := inbox.get()) is not None:
            pixels, seq, ts_ns = job
            try:
                pose = detector.detect(pixels, seq, ts_ns)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, re-raised
                self.failure = exc
                return
            with self.lock:
                self.in_flight.discard(seq)
                self.done[seq] = pose
                self._emit_ready()
                self.idle.append(worker)
            self.free.release()

    def _emit_ready(self) -> None:
        """Send every finished pose that no earlier in-flight frame precedes (lock held)."""
        first_busy = min(self.in_flight, default=None)
        for seq in sorted(self.done):
            if first_busy is not None and seq > first_busy:
                break
            pose = self.done.pop(seq)
            self.poses.send(pose.to_bytes(), ts_ns=pose.capture_ts_ns, meta=seq)
            self.detected += 1
            self.no_person += not pose.present
            self.window.add((pose.detect_end_ns - pose.detect_start_ns) / 1e6)
            self.rate.tick()
            m = self.ctx.metrics
            m["frames_detected_total"] = float(self.detected)
            m["frames_no_person_total"] = float(self.no_person)
            m["detect_ms_p50"] = self.window.percentile(50)
            m["detect_ms_p95"] = self.window.percentile(95)
            m["last_seq"] = float(seq)
            m["capture_to_detect_ms"] = (pose.detect_end_ns - pose.capture_ts_ns) / 1e6
