"""MediaPipe's landmark objects -> posewire arrays and :class:`~pipeline.model.pose.PoseFrame`.

Both MediaPipe APIs of mediapipe 0.10.21 are read here (the detect stage's backends
and the client API's ``publish`` share it):

* the legacy solution, ``mp.solutions.pose.Pose().process(rgb)``: a result with
  ``pose_landmarks`` and ``pose_world_landmarks``, each ``None`` (nobody found) or a
  landmark-list protobuf whose ``.landmark`` holds 33 landmarks (``x y z visibility``);
* the Tasks API, ``PoseLandmarker.detect*()``: a ``PoseLandmarkerResult`` whose
  ``pose_landmarks`` and ``pose_world_landmarks`` are lists (one per person) of 33
  ``NormalizedLandmark`` / ``Landmark`` dataclasses (``visibility`` may be ``None``:
  read as 1.0, the codec needs a number).

Only attribute access is used: mediapipe is never imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import ProtocolError
from pipeline.model.pose import MAX_POSES, NUM_LANDMARKS, FloatArray, PoseFrame


def landmarks_to_array(landmarks: Sequence[Any], with_visibility: bool) -> FloatArray:
    """MediaPipe landmarks as ``[33, 4]`` (x, y, z, visibility) or ``[33, 3]``;
    :class:`ProtocolError` when there are not 33 of them."""
    rows: list[tuple[float, ...]]
    if with_visibility:
        rows = [
            (lm.x, lm.y, lm.z, 1.0 if lm.visibility is None else lm.visibility) for lm in landmarks
        ]
    else:
        rows = [(lm.x, lm.y, lm.z) for lm in landmarks]
    arr = np.asarray(rows, np.float32)
    if arr.shape[0] != NUM_LANDMARKS:
        raise ProtocolError(f"MediaPipe returned {arr.shape[0]} landmarks, not {NUM_LANDMARKS}")
    return arr


def _people(value: Any) -> list[Sequence[Any]]:
    """The per-person landmark sequences of a result field (legacy: one or none)."""
    if value is None:
        return []
    if hasattr(value, "landmark"):  # legacy: one NormalizedLandmarkList / LandmarkList
        return [value.landmark]
    return [list(p) for p in value]  # Tasks: a list of lists of landmarks


def is_mediapipe_result(obj: object) -> bool:
    """True for an object that looks like a MediaPipe pose result (either API)."""
    return hasattr(obj, "pose_landmarks") and hasattr(obj, "pose_world_landmarks")


def frame_from_result(
    result: Any,
    seq: int,
    capture_ts_ns: int,
    *,
    world: bool = True,
    max_poses: int = MAX_POSES,
) -> PoseFrame:
    """A :class:`PoseFrame` from a MediaPipe pose result of either API (see the module
    docstring): at most ``max_poses`` people; world landmarks when ``world`` and the
    result has them for every person. :class:`ProtocolError` when ``result`` is not one."""
    if not is_mediapipe_result(result):
        raise ProtocolError(
            "not a MediaPipe pose result (no pose_landmarks / pose_world_landmarks): "
            f"{type(result).__name__}"
        )
    try:
        people = _people(result.pose_landmarks)[:max_poses]
        worlds = _people(result.pose_world_landmarks)[: len(people)]
    except TypeError as exc:  # a field that is neither a landmark list nor a list of them
        raise ProtocolError(f"unreadable MediaPipe result: {exc}") from None
    if not people:
        return PoseFrame(seq, capture_ts_ns)
    image = np.stack([landmarks_to_array(p, True) for p in people])
    w: FloatArray | None = None
    if world and len(worlds) == len(people):
        w = np.stack([landmarks_to_array(p, False) for p in worlds])
    return PoseFrame(seq, capture_ts_ns, image, w)
