"""``backend: mediapipe``: ``mp.solutions.pose.Pose`` (mediapipe 0.10.21), one person.

Only the *full* model (``model_complexity: 1``) ships in the wheel; 0 (lite)
and 2 (heavy) would be downloaded by MediaPipe at start, which posewire never
does, so they are refused with a clear message unless their ``.tflite`` file
is already in place. Smoothing is on for video (config), image and world
landmarks. This module also holds what every MediaPipe backend shares: the
quiet import and the filter of MediaPipe's native start-up chatter on fd 2.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Final, Literal

import numpy as np
from pydantic import Field

from pipeline.detectors import Detector, RGBFrame
from pipeline.errors import ConfigError
from pipeline.model.landmarks import frame_from_result
from pipeline.model.pose import PoseFrame
from pipeline.settings import DETECTORS, DetectorSettings

#: model_complexity -> the landmark model file MediaPipe loads (relative to the package)
_LANDMARK_MODELS: Final = {
    0: "modules/pose_landmark/pose_landmark_lite.tflite",
    1: "modules/pose_landmark/pose_landmark_full.tflite",
    2: "modules/pose_landmark/pose_landmark_heavy.tflite",
}
_COMPLEXITY_NAMES: Final = {0: "lite", 1: "full", 2: "heavy"}


class ConfidenceSettings(DetectorSettings):
    """The thresholds every MediaPipe backend takes."""

    min_detection_confidence: float = Field(0.5, ge=0, le=1, description="Person detection.")
    min_tracking_confidence: float = Field(0.5, ge=0, le=1, description="Landmark tracking.")


class MediaPipeSettings(ConfidenceSettings):
    """MediaPipe Pose (``mp.solutions.pose``)."""

    backend: Literal["mediapipe"] = "mediapipe"
    model_complexity: Literal[0, 1, 2] = Field(
        1, description="MediaPipe Pose model: 0 lite, 1 full (bundled), 2 heavy."
    )
    smooth_landmarks: bool = Field(True, description="Temporal smoothing (video sources).")


def import_mediapipe() -> Any:
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


class MediaPipeDetector(Detector):
    """``mp.solutions.pose.Pose`` (one person per frame)."""

    name = "mediapipe"

    def __init__(self, cfg: MediaPipeSettings, *, static_image_mode: bool = False) -> None:
        check_model_complexity(cfg.model_complexity)
        mp = import_mediapipe()
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
        pose = frame_from_result(result, seq, capture_ts_ns, world=self.cfg.world_landmarks)
        pose.detect_start_ns, pose.detect_end_ns = start, end
        return pose

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


def make(settings: MediaPipeSettings, base_dir: Path, *, video: bool = True) -> MediaPipeDetector:
    return MediaPipeDetector(settings, static_image_mode=not video)


DETECTORS.add("mediapipe", MediaPipeSettings, make)
