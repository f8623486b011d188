"""Constructed poses shared by the skeleton tests (VMC, BVH export): a T-pose and a
raised arm in Unity's frame, the map to MediaPipe's world frame, quaternion helpers
(docs/vmc.md describes the poses). No tests here."""

from __future__ import annotations

import numpy as np

from pipeline.client import skeleton as sk
from pipeline.client.skeleton import F64
from pipeline.model.pose import NUM_LANDMARKS


def tpose_unity() -> F64:
    """A T-pose facing the camera, in Unity's frame (x performer's right, y up, z forward)."""
    p = np.zeros((NUM_LANDMARKS, 3))
    for side, s in ((-1.0, "L"), (1.0, "R")):
        p[sk.L_HIP if s == "L" else sk.R_HIP] = (0.1 * side, 0.0, 0.0)
        p[sk.L_SH if s == "L" else sk.R_SH] = (0.2 * side, 0.5, 0.0)
        p[sk.L_EL if s == "L" else sk.R_EL] = (0.48 * side, 0.5, 0.0)
        p[sk.L_WR if s == "L" else sk.R_WR] = (0.74 * side, 0.5, 0.0)
        p[sk.L_INDEX if s == "L" else sk.R_INDEX] = (0.84 * side, 0.5, 0.02)
        p[sk.L_PINKY if s == "L" else sk.R_PINKY] = (0.84 * side, 0.5, -0.02)
        p[sk.L_KNEE if s == "L" else sk.R_KNEE] = (0.1 * side, -0.45, 0.0)
        p[sk.L_ANK if s == "L" else sk.R_ANK] = (0.1 * side, -0.9, 0.0)
        p[sk.L_HEEL if s == "L" else sk.R_HEEL] = (0.1 * side, -0.96, -0.05)
        p[sk.L_TOE if s == "L" else sk.R_TOE] = (0.1 * side, -0.96, 0.16)
        p[sk.L_EAR if s == "L" else sk.R_EAR] = (0.075 * side, 0.68, 0.0)
    p[sk.NOSE] = (0.0, 0.68, 0.11)
    return p


def to_mediapipe(unity: F64) -> F64:
    """Unity frame -> MediaPipe world frame (x image right, y down, z away from camera)."""
    return -unity


def angle_between(q: F64, expected: F64) -> float:
    return float(sk.qangle_deg(sk.qmul(sk.qconj(expected[None]), q[None]))[0])


def axis_angle(axis: tuple[float, float, float], deg: float) -> F64:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    h = np.radians(deg) / 2
    return np.array([*(a * np.sin(h)), np.cos(h)])


def right_arm_raised() -> F64:
    """The T-pose with the right arm raised to vertical (90 degrees about +z, Unity frame)."""
    p = tpose_unity()
    p[sk.R_EL] = (0.2, 0.78, 0.0)
    p[sk.R_WR] = (0.2, 1.04, 0.0)
    p[sk.R_INDEX] = (0.22, 1.14, 0.0)
    p[sk.R_PINKY] = (0.18, 1.14, 0.0)
    return p
