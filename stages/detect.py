"""The detect stage: newest frame in, :class:`~pipeline.model.pose.PoseFrame` out.

Backends (``detect.backend``), all behind the small :class:`Detector` base:

``mediapipe``
    ``mp.solutions.pose.Pose`` from mediapipe 0.10.21. Only the *full* model
    (``model_complexity: 1``) ships in the wheel; 0 (lite) and 2 (heavy) would
    be downloaded by MediaPipe at start, which posewire never does, so they
    are refused with a clear message unless their ``.tflite`` file is already
    in place. Smoothing is on for video (config), image and world landmarks.
``tasks``
    MediaPipe Tasks ``PoseLandmarker`` from a user-supplied ``.task`` bundle
    (``detect.task_model``), ``num_poses`` people per frame.
``trace``
    Replays a pose trace ``.npz`` (``image`` ``[T,33,4]``, ``world``
    ``[T,33,3]``, ``fps``; see ``data/pose-traces``) at the trace's
    own fps, timed by the frames' capture timestamps: everything downstream
    runs without a model.

The stage consumes the ``frames`` ring *latest-wins* (the ring counts the
frames detection could not keep up with as skipped) and sends every result,
"no person" (0 poses) included, to the ``poses`` ring with
``ts_ns=capture_ts_ns, meta=frame seq``. An end-of-stream frame ends the
stage with 0.

This module also holds what ``python -m pipeline detect`` needs (reading
images and videos, drawing the skeleton), so that OpenCV stays in the stages.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import sys
import tempfile
import threading
import time
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Final

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.config import Config, DetectBackend, DetectConfig, resolve_path
from pipeline.errors import ConfigError, SourceError, WouldBlock
from pipeline.model.frame import frame_from_slot, frame_slot_size
from pipeline.model.pose import (
    LANDMARK_NAMES,
    MAX_POSES,
    NUM_LANDMARKS,
    POSE_CONNECTIONS,
    PoseFrame,
)
from pipeline.model.stats import Rate, Window
from stages.capture import IMAGE_SUFFIXES, FileSource

if TYPE_CHECKING:
    from pipeline.runtime.stage import StageContext

RGBFrame = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]

_log = logging.getLogger("posewire.detect")

#: model_complexity -> the landmark model file MediaPipe loads (relative to the package)
_LANDMARK_MODELS: Final = {
    0: "modules/pose_landmark/pose_landmark_lite.tflite",
    1: "modules/pose_landmark/pose_landmark_full.tflite",
    2: "modules/pose_landmark/pose_landmark_heavy.tflite",
}
_COMPLEXITY_NAMES: Final = {0: "lite", 1: "full", 2: "heavy"}
#: members a PoseLandmarker .task bundle must have
_TASK_MEMBERS: Final = ("pose_detector.tflite", "pose_landmarks_detector.tflite")


def _import_mediapipe() -> Any:
    """Import mediapipe quietly (absl/glog noise off unless the user set it)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mediapipe

    return mediapipe


_NATIVE_NOISE = re.compile(
    rb"^(INFO: Created TensorFlow Lite|WARNING: All log messages before absl::InitializeLog"
    rb"|[IW]\d{4} [\d:.]+ +\d+ )"
)


#: inferences during which MediaPipe's start-up chatter is filtered (at most)
QUIET_CALLS = 60


class NativeLogFilter:
    """Hide MediaPipe's start-up chatter on fd 2 while keeping everything else.

    MediaPipe's C++ side logs through absl straight to file descriptor 2 (the
    GLOG/TF environment variables do not silence it): XNNPACK and
    feedback-manager notes when the graph starts, a projection warning at the
    first person, written asynchronously by the graph's threads. While any
    detector holds the filter (:meth:`hold`), fd 2 points at a temporary file;
    when the last one releases it (:meth:`release`), fd 2 is restored and every
    line that is not absl INFO/WARNING noise (errors, our own log lines) is
    written to it, in order. fd 2 is process-wide, so the filter is one
    reference-counted object per process.
    """

    _lock = threading.Lock()
    _holders = 0
    _saved = -1
    _tmp: IO[bytes] | None = None

    @classmethod
    def hold(cls) -> None:
        with cls._lock:
            cls._holders += 1
            if cls._holders > 1:
                return
            sys.stderr.flush()
            cls._saved = os.dup(2)
            cls._tmp = tempfile.TemporaryFile()  # noqa: SIM115 - held until release()
            os.dup2(cls._tmp.fileno(), 2)

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            if cls._holders == 0:
                return
            cls._holders -= 1
            if cls._holders > 0 or cls._tmp is None:
                return
            sys.stderr.flush()
            os.dup2(cls._saved, 2)
            os.close(cls._saved)
            tmp, cls._tmp = cls._tmp, None
            tmp.seek(0)
            kept = [ln for ln in tmp.read().splitlines(True) if not _NATIVE_NOISE.match(ln)]
            tmp.close()
            if kept:
                os.write(2, b"".join(kept))


def _mediapipe_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mediapipe")
    if spec is None or spec.origin is None:
        raise ConfigError(["detect.backend: mediapipe is not installed"])
    return Path(spec.origin).parent


def check_model_complexity(complexity: int) -> Path:
    """The landmark model file for ``complexity``; :class:`ConfigError` if not bundled.

    MediaPipe would download a missing model at start; posewire never downloads.
    """
    if complexity not in _LANDMARK_MODELS:
        raise ConfigError([f"detect.model_complexity: must be 0, 1 or 2, got {complexity}"])
    path = _mediapipe_root() / _LANDMARK_MODELS[complexity]
    if not path.is_file():
        name = _COMPLEXITY_NAMES[complexity]
        raise ConfigError(
            [
                f"detect.model_complexity: {complexity} ({name}) is not bundled with this "
                f"mediapipe wheel ({path} is missing) and posewire downloads nothing; "
                "use model_complexity: 1 (full, bundled), or put the file there yourself"
            ]
        )
    return path


# --------------------------------------------------------------------------- detectors


class Detector(ABC):
    """Finds poses in one RGB frame."""

    name: ClassVar[str] = "?"

    @abstractmethod
    def detect(self, frame_rgb: RGBFrame, seq: int, capture_ts_ns: int) -> PoseFrame:
        """Poses in ``frame_rgb`` (RGB ``uint8 [h, w, 3]``); 0 poses when nobody is there.

        Sets ``detect_start_ns``/``detect_end_ns`` (wall clock).
        """

    @property
    def finished(self) -> bool:
        """True when the detector has nothing more to give (a non-looping trace)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""

    def describe(self) -> str:
        """One line for the log."""
        return self.name


def _landmarks_to_array(landmarks: Sequence[Any], with_visibility: bool) -> FloatArray:
    rows: list[tuple[float, ...]]
    if with_visibility:
        rows = [(lm.x, lm.y, lm.z, lm.visibility) for lm in landmarks]
    else:
        rows = [(lm.x, lm.y, lm.z) for lm in landmarks]
    arr = np.asarray(rows, np.float32)
    if arr.shape[0] != NUM_LANDMARKS:
        raise RuntimeError(f"MediaPipe returned {arr.shape[0]} landmarks, not {NUM_LANDMARKS}")
    return arr


class MediaPipeDetector(Detector):
    """``mp.solutions.pose.Pose`` (one person per frame)."""

    name = "mediapipe"

    def __init__(self, cfg: DetectConfig, *, static_image_mode: bool = False) -> None:
        check_model_complexity(cfg.model_complexity)
        mp = _import_mediapipe()
        self.cfg = cfg
        self.static_image_mode = static_image_mode
        # MediaPipe's graph threads log asynchronously during the first inferences:
        # keep fd 2 filtered from construction through the first frames with a person.
        NativeLogFilter.hold()
        self._quiet = True
        self._quiet_calls = 0
        try:
            self._pose = mp.solutions.pose.Pose(
                static_image_mode=static_image_mode,
                model_complexity=cfg.model_complexity,
                smooth_landmarks=cfg.smooth_landmarks,
                enable_segmentation=False,
                min_detection_confidence=cfg.min_detection_confidence,
                min_tracking_confidence=cfg.min_tracking_confidence,
            )
        except BaseException:
            self._end_quiet()
            raise

    def detect(self, frame_rgb: RGBFrame, seq: int, capture_ts_ns: int) -> PoseFrame:
        frame = np.ascontiguousarray(frame_rgb)
        start = time.time_ns()
        result = self._pose.process(frame)
        end = time.time_ns()
        if self._quiet:
            self._quiet_calls += 1
            if self._quiet_calls >= QUIET_CALLS or (
                result.pose_landmarks is not None and self._quiet_calls >= 5
            ):
                self._end_quiet()
        if result.pose_landmarks is None:
            return PoseFrame(seq, capture_ts_ns, detect_start_ns=start, detect_end_ns=end)
        image = _landmarks_to_array(result.pose_landmarks.landmark, True)[None]
        world: FloatArray | None = None
        if self.cfg.world_landmarks and result.pose_world_landmarks is not None:
            world = _landmarks_to_array(result.pose_world_landmarks.landmark, False)[None]
        return PoseFrame(seq, capture_ts_ns, image, world, start, end)

    def _end_quiet(self) -> None:
        if self._quiet:
            self._quiet = False
            NativeLogFilter.release()

    def close(self) -> None:
        self._end_quiet()
        self._pose.close()

    def describe(self) -> str:
        mode = "images" if self.static_image_mode else "video"
        smooth = ", smoothed" if self.cfg.smooth_landmarks and not self.static_image_mode else ""
        name = _COMPLEXITY_NAMES[self.cfg.model_complexity]
        return f"mediapipe pose ({name} model, {mode}{smooth})"


def check_task_model(path: Path) -> None:
    """:class:`ConfigError` unless ``path`` looks like a PoseLandmarker ``.task`` bundle."""
    where = "detect.task_model"
    if not path.exists():
        raise ConfigError([f"{where}: task model not found: {path}"])
    if not path.is_file():
        raise ConfigError([f"{where}: {path} is not a file"])
    if not zipfile.is_zipfile(path):
        raise ConfigError([f"{where}: {path} is not a MediaPipe .task bundle (not a zip archive)"])
    try:
        with zipfile.ZipFile(path) as bundle:
            names = set(bundle.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError([f"{where}: cannot read {path}: {exc}"]) from exc
    missing = [m for m in _TASK_MEMBERS if m not in names]
    if missing:
        raise ConfigError(
            [
                f"{where}: {path} is not a pose landmarker bundle: it lacks "
                + ", ".join(missing)
                + f" (it has: {', '.join(sorted(names)) or 'nothing'})"
            ]
        )


class TasksDetector(Detector):
    """MediaPipe Tasks ``PoseLandmarker`` from a ``.task`` bundle; several people."""

    name = "tasks"

    def __init__(self, model: Path, cfg: DetectConfig, *, video: bool = True) -> None:
        check_task_model(model)
        mp = _import_mediapipe()
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.core.base_options import BaseOptions

        self.cfg = cfg
        self.model = model
        self.video = video
        self._mp = mp
        options = vision.PoseLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(model)),
            running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
            num_poses=min(cfg.num_poses, MAX_POSES),
            min_pose_detection_confidence=cfg.min_detection_confidence,
            min_pose_presence_confidence=cfg.min_detection_confidence,
            min_tracking_confidence=cfg.min_tracking_confidence,
            output_segmentation_masks=False,
        )
        try:
            self._landmarker = vision.PoseLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError([f"detect.task_model: MediaPipe cannot load {model}: {exc}"]) from exc
        self._last_ms = -1

    def detect(self, frame_rgb: RGBFrame, seq: int, capture_ts_ns: int) -> PoseFrame:
        mp = self._mp
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame_rgb))
        start = time.time_ns()
        if self.video:
            # VIDEO mode needs strictly increasing millisecond timestamps
            ts_ms = max(self._last_ms + 1, capture_ts_ns // 1_000_000)
            self._last_ms = ts_ms
            result = self._landmarker.detect_for_video(image, ts_ms)
        else:
            result = self._landmarker.detect(image)
        end = time.time_ns()
        people = list(result.pose_landmarks or [])[:MAX_POSES]
        if not people:
            return PoseFrame(seq, capture_ts_ns, detect_start_ns=start, detect_end_ns=end)
        img = np.stack([_landmarks_to_array(p, True) for p in people])
        world: FloatArray | None = None
        worlds = list(result.pose_world_landmarks or [])[: len(people)]
        if self.cfg.world_landmarks and len(worlds) == len(people):
            world = np.stack([_landmarks_to_array(w, False) for w in worlds])
        return PoseFrame(seq, capture_ts_ns, img, world, start, end)

    def close(self) -> None:
        self._landmarker.close()

    def describe(self) -> str:
        return f"mediapipe tasks PoseLandmarker {self.model} (up to {self.cfg.num_poses} people)"


@dataclass
class PoseTrace:
    """A pose trace loaded from an ``.npz`` file."""

    image: FloatArray
    """``[T, 33, 4]`` normalised x, y, z, visibility."""
    world: FloatArray | None
    """``[T, 33, 3]`` metres, or ``None`` when the file has none."""
    fps: float
    """Frames per second of the trace."""
    path: Path = field(default_factory=Path)

    @property
    def frames(self) -> int:
        return int(self.image.shape[0])

    @classmethod
    def load(cls, path: Path) -> PoseTrace:
        """Load and check a trace; :class:`ConfigError` naming what is wrong."""
        where = "detect.trace"
        if not path.is_file():
            raise ConfigError([f"{where}: trace file not found: {path}"])
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = set(data.files)
                missing = [k for k in ("image", "fps") if k not in keys]
                if missing:
                    raise ConfigError(
                        [f"{where}: {path} is not a pose trace: no {' or '.join(missing)} array"]
                    )
                image = np.asarray(data["image"], np.float32)
                world = np.asarray(data["world"], np.float32) if "world" in keys else None
                fps = float(data["fps"])
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ConfigError([f"{where}: cannot read {path} as an .npz trace: {exc}"]) from exc
        if image.ndim != 3 or image.shape[1:] != (NUM_LANDMARKS, 4) or image.shape[0] == 0:
            raise ConfigError(
                [f"{where}: {path}: image must be [T, 33, 4] with T > 0, got {list(image.shape)}"]
            )
        if world is not None and world.shape != (image.shape[0], NUM_LANDMARKS, 3):
            raise ConfigError(
                [f"{where}: {path}: world must be [T, 33, 3] like image, got {list(world.shape)}"]
            )
        if not (math.isfinite(fps) and 0 < fps <= 1000):
            raise ConfigError([f"{where}: {path}: fps must be in (0, 1000], got {fps}"])
        return cls(image, world, fps, path)


class TraceDetector(Detector):
    """Replays a :class:`PoseTrace` at its own fps, ignoring the pixels.

    The trace frame for a camera frame is chosen by the frame's capture time
    since the first frame seen: ``index = floor(elapsed_s * trace_fps)``, so
    the motion plays at the trace's speed whatever the source's frame rate.
    """

    name = "trace"

    def __init__(self, trace: PoseTrace, *, loop: bool = True, world: bool = True) -> None:
        self.trace = trace
        self.loop = loop
        self.world = world
        self._t0_ns: int | None = None
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def index_at(self, elapsed_s: float) -> int | None:
        """The trace frame shown ``elapsed_s`` after the start (None: past a non-looping end)."""
        i = math.floor(max(0.0, elapsed_s) * self.trace.fps + 1e-6)
        if i >= self.trace.frames:
            if not self.loop:
                return None
            i %= self.trace.frames
        return i

    def pose_at(self, index: int, seq: int, capture_ts_ns: int) -> PoseFrame:
        """The trace's frame ``index`` as a one-person :class:`PoseFrame`."""
        image = self.trace.image[index][None].copy()
        world = None
        if self.world and self.trace.world is not None:
            world = self.trace.world[index][None].copy()
        now = time.time_ns()
        return PoseFrame(seq, capture_ts_ns, image, world, now, now)

    def detect(self, frame_rgb: RGBFrame, seq: int, capture_ts_ns: int) -> PoseFrame:
        if self._t0_ns is None:
            self._t0_ns = capture_ts_ns
        index = self.index_at((capture_ts_ns - self._t0_ns) / 1e9)
        if index is None:
            self._finished = True
            now = time.time_ns()
            return PoseFrame(seq, capture_ts_ns, detect_start_ns=now, detect_end_ns=now)
        return self.pose_at(index, seq, capture_ts_ns)

    def describe(self) -> str:
        loop = ", looping" if self.loop else ""
        return (
            f"trace {self.trace.path} ({self.trace.frames} frames at {self.trace.fps:g} fps{loop})"
        )


def create_detector(cfg: Config, *, video: bool = True) -> Detector:
    """The detector ``cfg.detect`` describes; :class:`ConfigError` if it cannot be made.

    ``video=False`` treats inputs as unrelated still images (no tracking).
    """
    det = cfg.detect
    if det.backend == DetectBackend.MEDIAPIPE:
        return MediaPipeDetector(det, static_image_mode=not video)
    if det.backend == DetectBackend.TASKS:
        assert det.task_model is not None  # enforced by the config
        return TasksDetector(resolve_path(cfg, det.task_model), det, video=video)
    assert det.trace is not None
    trace = PoseTrace.load(resolve_path(cfg, det.trace))
    return TraceDetector(trace, loop=det.trace_loop, world=det.world_landmarks)


# --------------------------------------------------------------------------- the stage


def run(ctx: StageContext) -> int:
    """Detect stage (see :func:`_detect`); a detector that cannot be made is refused."""
    try:
        return _detect(ctx)
    except (ConfigError, SourceError) as exc:
        return ctx.refuse(str(exc))


def _detect(ctx: StageContext) -> int:
    """Detect stage: ``frames`` ring (latest-wins) -> detector(s) -> ``poses`` ring.

    With the ``trace`` backend there is no capture stage and no frames ring
    (the supervisor plans it so): the trace is replayed on its own clock, see
    :func:`replay_trace`. Otherwise ``detect.workers`` detector instances run
    in threads (MediaPipe releases the GIL while it works), each on the
    newest frame when it becomes free; results leave in frame order.

    Metrics: ``frames_detected_total``, ``frames_no_person_total``, and the
    gauges ``detect_ms_p50``, ``detect_ms_p95`` (last 300 frames), ``fps``,
    ``frames_skipped`` (the frames ring's own counter: frames superseded
    before detection could take them, across restarts), ``last_seq``,
    ``capture_to_detect_ms`` (capture timestamp to end of detection) and
    ``detect_workers``.
    """
    log = ctx.log
    detectors = [create_detector(ctx.config, video=True)]  # ConfigError: fails fast
    try:
        log.info("detector: %s", detectors[0].describe())
        if isinstance(detectors[0], TraceDetector):
            return replay_trace(ctx, detectors[0])
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


def replay_trace(ctx: StageContext, detector: TraceDetector) -> int:
    """Send the trace's poses to the ``poses`` ring at the trace's fps (no frames ring).

    Sequence numbers continue the poses ring's own counter, so they keep
    increasing across restarts; the capture timestamp is the send time.
    ``source.as_fast_as_possible`` replays without pacing (benchmarks). A
    non-looping trace ends the stage with 0. Metrics: ``frames_replayed_total``,
    ``frames_detected_total``, ``fps``, ``last_seq``.
    """
    poses = ctx.ring("poses")
    trace = detector.trace
    paced = not ctx.config.source.as_fast_as_possible
    interval = 1.0 / trace.fps
    m = ctx.metrics
    rate = Rate()
    seq = poses.statistics().written
    sent = 0
    start = time.monotonic()
    m.update(frames_replayed_total=0.0, frames_detected_total=0.0, fps=0.0)
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
        if sent >= trace.frames and not detector.loop:
            ctx.log.info("trace ended after %d frames: detect stage done", sent)
            return 0
        seq += 1
        pose = detector.pose_at(sent % trace.frames, seq, time.time_ns())
        got = poses.send(pose.to_bytes(), ts_ns=pose.capture_ts_ns, meta=seq)
        if got != seq:  # another writer on the ring: follow its counter
            seq = got
        sent += 1
        rate.tick()
        m["frames_replayed_total"] = float(sent)
        m["frames_detected_total"] = float(sent)
        m["last_seq"] = float(seq)
    return 0


# --------------------------------------------------------------------------- detect command


VIDEO_OVERLAY_SUFFIXES: Final = {".mp4": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
IMAGE_OVERLAY_SUFFIXES: Final = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


@dataclass
class MediaFrame:
    """One frame of an input of ``python -m pipeline detect``."""

    index: int
    t_s: float
    rgb: RGBFrame


@dataclass
class MediaInput:
    """An image or a video given on the command line."""

    path: Path
    kind: str  # "image" | "video"
    fps: float | None = None


def classify_inputs(paths: Sequence[Path]) -> list[MediaInput]:
    """Check every path exists and say whether it is an image or a video.

    A directory stands for the images in it. :class:`SourceError` for a
    missing file or an empty directory, before any work is done.
    """
    out: list[MediaInput] = []
    for p in paths:
        if not p.exists():
            raise SourceError(f"no such file: {p}")
        if p.is_dir():
            images = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise SourceError(f"no images in {p}")
            out.extend(MediaInput(q, "image") for q in images)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(MediaInput(p, "image"))
        else:
            out.append(MediaInput(p, "video"))
    return out


def read_image(path: Path) -> RGBFrame:
    """An image file as RGB; :class:`SourceError` if OpenCV cannot decode it."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SourceError(f"cannot decode {path}: not an image OpenCV can read")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8)


def iter_video(path: Path) -> tuple[float, Iterator[MediaFrame]]:
    """``(fps, frames)`` of a video file, as fast as it decodes."""
    src = FileSource(path)
    src.open()  # SourceError if undecodable
    fps = src.fps

    def frames() -> Iterator[MediaFrame]:
        try:
            i = 0
            while True:
                got = src.read()
                if got is None:
                    return
                yield MediaFrame(i, i / fps, got[0])
                i += 1
        finally:
            src.close()

    return fps, frames()


_POSE_COLORS: Final = ((0, 255, 0), (255, 128, 0), (0, 160, 255), (255, 0, 255))


def draw_pose(frame_rgb: RGBFrame, pose: PoseFrame, min_visibility: float = 0.5) -> RGBFrame:
    """A copy of ``frame_rgb`` with every skeleton of ``pose`` drawn over it."""
    out = np.ascontiguousarray(frame_rgb).copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 240))
    for p in range(pose.num_poses):
        color = _POSE_COLORS[p % len(_POSE_COLORS)]
        lm = pose.image[p]
        pts = [(round(float(x) * w), round(float(y) * h)) for x, y in lm[:, :2]]
        seen = [float(v) >= min_visibility for v in lm[:, 3]]
        for a, b in POSE_CONNECTIONS:
            if seen[a] and seen[b]:
                cv2.line(out, pts[a], pts[b], color, thick, cv2.LINE_AA)
        for i, pt in enumerate(pts):
            if seen[i]:
                cv2.circle(out, pt, thick + 2, (255, 255, 255), -1, cv2.LINE_AA)
                cv2.circle(out, pt, thick + 1, color, -1, cv2.LINE_AA)
    return out


def pose_json(pose: PoseFrame) -> list[dict[str, Any]]:
    """The people of ``pose`` as JSON-ready dicts (named landmarks, world in metres)."""
    people: list[dict[str, Any]] = []
    for p in range(pose.num_poses):
        landmarks = [
            {
                "name": LANDMARK_NAMES[i],
                "x": round(float(x), 5),
                "y": round(float(y), 5),
                "z": round(float(z), 5),
                "visibility": round(float(v), 4),
            }
            for i, (x, y, z, v) in enumerate(pose.image[p])
        ]
        person: dict[str, Any] = {"landmarks": landmarks}
        if pose.world is not None:
            person["world"] = [[round(float(c), 5) for c in row] for row in pose.world[p]]
        people.append(person)
    return people


class OverlayWriter:
    """Writes skeleton overlays to one image (``.png`` ...) or one video (``.mp4`` ...)."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = fps
        suffix = path.suffix.lower()
        if suffix not in IMAGE_OVERLAY_SUFFIXES and suffix not in VIDEO_OVERLAY_SUFFIXES:
            raise SourceError(
                f"--overlay {path}: unknown format {suffix or '(none)'}; use one of "
                + ", ".join(sorted(IMAGE_OVERLAY_SUFFIXES | set(VIDEO_OVERLAY_SUFFIXES)))
            )
        self.is_video = suffix in VIDEO_OVERLAY_SUFFIXES
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def add(self, frame_rgb: RGBFrame) -> None:
        bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
        if not self.is_video:
            if self.frames:
                raise SourceError(
                    f"--overlay {self.path}: an image holds one frame; "
                    "use a video overlay (e.g. OUT.mp4) for videos or several images"
                )
            if not cv2.imwrite(str(self.path), bgr):
                raise SourceError(f"--overlay {self.path}: cannot write the image")
            self.frames += 1
            return
        h, w = bgr.shape[:2]
        if self._writer is None:
            fourcc = cv2.VideoWriter.fourcc(*VIDEO_OVERLAY_SUFFIXES[self.path.suffix.lower()])
            self._size = (w - w % 2, h - h % 2)  # codecs want even sizes
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, self._size)
            if not self._writer.isOpened():
                raise SourceError(f"--overlay {self.path}: cannot open a video writer")
        assert self._size is not None
        if (w, h) != self._size:
            bgr = cv2.resize(bgr, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


@dataclass
class MediaResult:
    """Detection results for one input."""

    path: Path
    kind: str
    width: int = 0
    height: int = 0
    fps: float | None = None
    frames: list[FrameResult] = field(default_factory=list)


@dataclass
class FrameResult:
    """The poses of one frame of an input."""

    index: int
    t_s: float
    pose: PoseFrame


def detect_media(
    cfg: Config,
    paths: Sequence[Path],
    *,
    overlay: Path | None = None,
    on_result: Callable[[MediaResult], None] | None = None,
) -> list[MediaResult]:
    """Run the configured detector over images and videos (the ``detect`` command).

    Images are detected as unrelated stills; each video with tracking (a fresh
    detector per video). ``on_result(MediaResult)`` is called as each input
    completes. Raises :class:`SourceError` (missing or undecodable input,
    unusable overlay) or :class:`ConfigError` (detector).
    """
    if cfg.detect.backend == DetectBackend.TRACE:
        raise ConfigError(
            ["detect.backend: trace replays a recorded trace; it cannot find poses in images"]
        )
    inputs = classify_inputs(paths)
    single_image = len(inputs) == 1 and inputs[0].kind == "image"
    if (
        overlay is not None
        and overlay.suffix.lower() in IMAGE_OVERLAY_SUFFIXES
        and not single_image
    ):
        raise SourceError(
            f"--overlay {overlay}: an image overlay needs exactly one input image; "
            "use a video overlay (e.g. OUT.mp4)"
        )
    writer: OverlayWriter | None = None
    still: Detector | None = None
    results: list[MediaResult] = []
    try:
        for inp in inputs:
            if inp.kind == "image":
                rgb = read_image(inp.path)
                if still is None:
                    still = create_detector(cfg, video=False)
                res = MediaResult(inp.path, "image", rgb.shape[1], rgb.shape[0])
                frames: Iterator[MediaFrame] = iter([MediaFrame(0, 0.0, rgb)])
                detector = still
                fps = 10.0
            else:
                fps, frames = iter_video(inp.path)
                res = MediaResult(inp.path, "video", fps=fps)
                detector = create_detector(cfg, video=True)
            try:
                t0 = time.time_ns()
                for mf in frames:
                    ts = t0 + round(mf.t_s * 1e9)
                    pose = detector.detect(mf.rgb, mf.index, ts)
                    res.height, res.width = mf.rgb.shape[:2]
                    res.frames.append(FrameResult(mf.index, mf.t_s, pose))
                    if overlay is not None:
                        if writer is None:
                            writer = OverlayWriter(overlay, fps)
                        writer.add(draw_pose(mf.rgb, pose))
            finally:
                if detector is not still:
                    detector.close()
            results.append(res)
            if on_result is not None:
                on_result(res)
    finally:
        if still is not None:
            still.close()
        if writer is not None:
            writer.close()
    return results
