"""``backend: tasks``: MediaPipe Tasks ``PoseLandmarker`` from a user's ``.task`` bundle.

``detect.task_model`` names the bundle; ``num_poses`` people per frame.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Final, Literal

import numpy as np
from pydantic import Field

from pipeline.detectors import Detector, RGBFrame
from pipeline.detectors.mediapipe import ConfidenceSettings, import_mediapipe
from pipeline.errors import ConfigError
from pipeline.model.landmarks import frame_from_result
from pipeline.model.pose import MAX_POSES, PoseFrame
from pipeline.settings import DETECTORS, FileProblem, missing_path

#: members a PoseLandmarker .task bundle must have
_TASK_MEMBERS: Final = ("pose_detector.tflite", "pose_landmarks_detector.tflite")


class TasksSettings(ConfidenceSettings):
    """MediaPipe Tasks PoseLandmarker."""

    backend: Literal["tasks"] = "tasks"
    task_model: Path = Field(description="PoseLandmarker .task file.")
    num_poses: int = Field(1, ge=1, le=8, description="People per frame.")

    def file_problems(self, base_dir: Path) -> list[FileProblem]:
        missing = missing_path(base_dir, self.task_model, "task model")
        return [("task_model", missing)] if missing else []


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

    def __init__(self, model: Path, cfg: TasksSettings, *, video: bool = True) -> None:
        check_task_model(model)
        mp = import_mediapipe()
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
        pose = frame_from_result(result, seq, capture_ts_ns, world=self.cfg.world_landmarks)
        pose.detect_start_ns, pose.detect_end_ns = start, end
        return pose

    def close(self) -> None:
        self._landmarker.close()

    def describe(self) -> str:
        return f"mediapipe tasks PoseLandmarker {self.model} (up to {self.cfg.num_poses} people)"


def make(settings: TasksSettings, base_dir: Path, *, video: bool = True) -> TasksDetector:
    model = settings.task_model
    return TasksDetector(
        model if model.is_absolute() else (base_dir / model).resolve(), settings, video=video
    )


DETECTORS.add("tasks", TasksSettings, make)
