"""Skeleton solver: MediaPipe's 33 world landmarks -> Unity humanoid local bone rotations.

Input: world landmarks in MediaPipe's frame (metres, origin between the hips,
x to the image right, y down, z away from the camera). They are first turned
into Unity's left-handed frame seen from the performer (x the performer's
right, y up, z the performer's forward when they face the camera):
``unity = -mediapipe`` (all three axes flip; the map has determinant -1, which
is exactly the change from MediaPipe's right-handed to Unity's left-handed
frame, so nothing is mirrored). In that frame a person facing the camera in a
T-pose has every bone at its rest orientation, and every local rotation is the
identity.

Method (docs/vmc.md): the hips get a full rotation from the hip line and the
torso's up vector; the chest likewise from the shoulder line, and the hips-to-
chest rotation is split evenly over Spine and Chest; Head gets a full rotation
from the ears and the nose. Every other bone (neck, arms, hands, legs, feet) is
a swing: the shortest rotation from its rest direction to the observed
direction, expressed in the parent bone's frame. Twist about a bone's own axis
is not observable from two points and is left at zero.

Quaternions are ``(x, y, z, w)`` as Unity (and VMC) order them. Everything
works on arrays ``[N, ...]`` (N poses at once); :class:`SkeletonSolver` adds
the per-stream state (hold the previous rotation of a bone whose landmarks are
not visible).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

# MediaPipe landmark indices
NOSE, L_EAR, R_EAR = 0, 7, 8
L_SH, R_SH, L_EL, R_EL, L_WR, R_WR = 11, 12, 13, 14, 15, 16
L_PINKY, R_PINKY, L_INDEX, R_INDEX = 17, 18, 19, 20
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANK, R_ANK = 23, 24, 25, 26, 27, 28
L_HEEL, R_HEEL, L_TOE, R_TOE = 29, 30, 31, 32

#: Bones solved, parents before children (Unity ``HumanBodyBones`` names).
BONES: tuple[str, ...] = (
    "Hips",
    "Spine",
    "Chest",
    "Neck",
    "Head",
    "LeftUpperArm",
    "LeftLowerArm",
    "LeftHand",
    "RightUpperArm",
    "RightLowerArm",
    "RightHand",
    "LeftUpperLeg",
    "LeftLowerLeg",
    "LeftFoot",
    "RightUpperLeg",
    "RightLowerLeg",
    "RightFoot",
)
BONE_INDEX = {name: i for i, name in enumerate(BONES)}

#: Parent of each solved bone (the shoulder bones are not solved: identity, so an
#: upper arm's parent frame is the chest's).
PARENT: dict[str, str | None] = {
    "Hips": None,
    "Spine": "Hips",
    "Chest": "Spine",
    "Neck": "Chest",
    "Head": "Neck",
    "LeftUpperArm": "Chest",
    "LeftLowerArm": "LeftUpperArm",
    "LeftHand": "LeftLowerArm",
    "RightUpperArm": "Chest",
    "RightLowerArm": "RightUpperArm",
    "RightHand": "RightLowerArm",
    "LeftUpperLeg": "Hips",
    "LeftLowerLeg": "LeftUpperLeg",
    "LeftFoot": "LeftLowerLeg",
    "RightUpperLeg": "Hips",
    "RightLowerLeg": "RightUpperLeg",
    "RightFoot": "RightLowerLeg",
}

_LEFT, _RIGHT = np.array([-1.0, 0, 0]), np.array([1.0, 0, 0])
_UP, _DOWN, _FWD = np.array([0, 1.0, 0]), np.array([0, -1.0, 0]), np.array([0, 0, 1.0])

#: Swing bones: (rest direction in the T-pose, from-landmarks, to-landmarks); a
#: tuple of indices means their midpoint.
SWING: dict[str, tuple[F64, tuple[int, ...], tuple[int, ...]]] = {
    "Neck": (_UP, (L_SH, R_SH), (L_EAR, R_EAR)),
    "LeftUpperArm": (_LEFT, (L_SH,), (L_EL,)),
    "LeftLowerArm": (_LEFT, (L_EL,), (L_WR,)),
    "LeftHand": (_LEFT, (L_WR,), (L_INDEX, L_PINKY)),
    "RightUpperArm": (_RIGHT, (R_SH,), (R_EL,)),
    "RightLowerArm": (_RIGHT, (R_EL,), (R_WR,)),
    "RightHand": (_RIGHT, (R_WR,), (R_INDEX, R_PINKY)),
    "LeftUpperLeg": (_DOWN, (L_HIP,), (L_KNEE,)),
    "LeftLowerLeg": (_DOWN, (L_KNEE,), (L_ANK,)),
    "LeftFoot": (_FWD, (L_HEEL,), (L_TOE,)),
    "RightUpperLeg": (_DOWN, (R_HIP,), (R_KNEE,)),
    "RightLowerLeg": (_DOWN, (R_KNEE,), (R_ANK,)),
    "RightFoot": (_FWD, (R_HEEL,), (R_TOE,)),
}

_TORSO = (L_SH, R_SH, L_HIP, R_HIP)
_OWN: dict[str, tuple[int, ...]] = {
    "Hips": _TORSO,
    "Spine": _TORSO,
    "Chest": _TORSO,
    "Head": (NOSE, L_EAR, R_EAR),
    **{b: s[1] + s[2] for b, s in SWING.items()},
}


def _required(bone: str) -> tuple[int, ...]:
    parent = PARENT[bone]
    return tuple(sorted(set(_OWN[bone]) | (set(_required(parent)) if parent else set())))


#: Landmarks a bone's local rotation depends on (its own and its ancestors'): when
#: any is not visible the bone keeps its previous rotation.
REQUIRED: dict[str, tuple[int, ...]] = {b: _required(b) for b in BONES}

VISIBILITY_THRESHOLD = 0.5
_EPS = 1e-9


# --------------------------------------------------------------------------- quaternion math


def identity(n: int) -> F64:
    q = np.zeros((n, 4))
    q[:, 3] = 1.0
    return q


def qmul(a: F64, b: F64) -> F64:
    """Hamilton product ``a * b`` of ``[..., 4]`` (x, y, z, w) arrays."""
    ax, ay, az, aw = np.moveaxis(a, -1, 0)
    bx, by, bz, bw = np.moveaxis(b, -1, 0)
    return np.stack(
        (
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ),
        axis=-1,
    )


def qconj(q: F64) -> F64:
    return np.asarray(q * np.array([-1.0, -1.0, -1.0, 1.0]), np.float64)


def qrotate(q: F64, v: F64) -> F64:
    """Rotate vectors ``v [..., 3]`` by unit quaternions ``q [..., 4]``."""
    u, w = q[..., :3], q[..., 3:4]
    t = 2.0 * np.cross(u, v)
    return np.asarray(v + w * t + np.cross(u, t), np.float64)


def qangle_deg(q: F64) -> F64:
    """Rotation angle of unit quaternions, degrees in [0, 180]."""
    return np.asarray(np.degrees(2.0 * np.arccos(np.clip(np.abs(q[..., 3]), 0.0, 1.0))))


def _normalize(v: F64) -> F64:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.asarray(v / np.maximum(n, _EPS), np.float64)


def qnormalize(q: F64) -> F64:
    q = _normalize(q)
    return np.asarray(
        np.where(q[..., 3:4] < 0, -q, q), np.float64
    )  # w >= 0: one of the two equal quaternions


def from_to(a: F64, b: F64) -> F64:
    """Shortest rotations taking unit vectors ``a [N, 3]`` onto ``b [N, 3]``."""
    a, b = _normalize(np.broadcast_to(a, b.shape)), _normalize(b)
    d = np.sum(a * b, axis=-1)
    axis = np.cross(a, b)
    q = np.concatenate((axis, (1.0 + d)[..., None]), axis=-1)
    opposite = d < -1.0 + 1e-9  # 180 degrees: any axis perpendicular to a
    if np.any(opposite):
        ao = a[opposite]
        perp = np.cross(ao, np.array([1.0, 0, 0]))
        small = np.linalg.norm(perp, axis=-1) < 1e-6
        perp[small] = np.cross(ao[small], np.array([0, 1.0, 0]))
        q[opposite] = np.concatenate((_normalize(perp), np.zeros((len(ao), 1))), axis=-1)
    return qnormalize(q)


def from_matrix(m: F64) -> F64:
    """Quaternions of rotation matrices ``[N, 3, 3]`` (columns: the rotated x, y, z axes)."""
    m00, m11, m22 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    q = np.empty((len(m), 4))
    q[:, 3] = np.sqrt(np.maximum(0.0, 1.0 + m00 + m11 + m22)) / 2
    q[:, 0] = np.sqrt(np.maximum(0.0, 1.0 + m00 - m11 - m22)) / 2
    q[:, 1] = np.sqrt(np.maximum(0.0, 1.0 - m00 + m11 - m22)) / 2
    q[:, 2] = np.sqrt(np.maximum(0.0, 1.0 - m00 - m11 + m22)) / 2
    q[:, 0] = np.copysign(q[:, 0], m[:, 2, 1] - m[:, 1, 2])
    q[:, 1] = np.copysign(q[:, 1], m[:, 0, 2] - m[:, 2, 0])
    q[:, 2] = np.copysign(q[:, 2], m[:, 1, 0] - m[:, 0, 1])
    return qnormalize(q)


def frame_from(x_hint: F64, y_hint: F64) -> F64:
    """Rotation whose x axis is ``x_hint`` and whose y axis is ``y_hint`` made orthogonal
    to it (z = x cross y, numerically, which is forward in Unity's frame)."""
    x = _normalize(x_hint)
    y = _normalize(y_hint - np.sum(y_hint * x, axis=-1, keepdims=True) * x)
    z = np.cross(x, y)
    return from_matrix(np.stack((x, y, z), axis=-1))


def qhalf(q: F64) -> F64:
    """Square roots ``s`` with ``s * s == q`` (half the angle about the same axis)."""
    q = qnormalize(q)
    return qnormalize(q + np.array([0, 0, 0, 1.0]))


# --------------------------------------------------------------------------- the solver


def to_unity(world: npt.ArrayLike) -> F64:
    """MediaPipe world landmarks (x right in the image, y down, z away from the camera)
    -> Unity's left-handed frame (x the performer's right, y up, z their forward)."""
    return -np.asarray(world, np.float64)


def _point(p: F64, idx: tuple[int, ...]) -> F64:
    return np.asarray(p[:, list(idx)].mean(axis=1), np.float64)


def solve_local(world: npt.ArrayLike) -> F64:
    """Local rotations ``[N, len(BONES), 4]`` (x, y, z, w) for world landmarks ``[N, 33, 3]``
    (MediaPipe's frame, or ``[33, 3]`` for one pose), no visibility handling."""
    w = np.asarray(world, np.float64)
    if w.ndim == 2:
        w = w[None]
    p = to_unity(w)
    n = len(p)
    local = np.empty((n, len(BONES), 4))
    glob: dict[str, F64] = {}
    mid_hip, mid_sh = _point(p, (L_HIP, R_HIP)), _point(p, (L_SH, R_SH))
    up = mid_sh - mid_hip
    hips = frame_from(p[:, R_HIP] - p[:, L_HIP], up)
    chest_g = frame_from(p[:, R_SH] - p[:, L_SH], up)
    bend = qhalf(qmul(qconj(hips), chest_g))
    glob["Hips"], local[:, BONE_INDEX["Hips"]] = hips, hips
    glob["Spine"], local[:, BONE_INDEX["Spine"]] = qmul(hips, bend), bend
    glob["Chest"], local[:, BONE_INDEX["Chest"]] = qmul(glob["Spine"], bend), bend
    for bone in BONES:
        if bone in glob:
            continue
        parent = PARENT[bone]
        assert parent is not None
        pg = glob[parent]
        if bone == "Head":
            mid_ear = _point(p, (L_EAR, R_EAR))
            fwd = p[:, NOSE] - mid_ear
            right = p[:, R_EAR] - p[:, L_EAR]
            # x from the ears, z toward the nose: y = z cross x
            g = frame_from(right, np.cross(fwd, right))
            loc = qnormalize(qmul(qconj(pg), g))
        else:
            rest, a, b = SWING[bone]
            d = _point(p, b) - _point(p, a)
            loc = from_to(rest, qrotate(qconj(pg), d))
            g = qmul(pg, loc)
        glob[bone] = qnormalize(g)
        local[:, BONE_INDEX[bone]] = loc
    return qnormalize(local)


def visible_bones(
    visibility: npt.ArrayLike, threshold: float = VISIBILITY_THRESHOLD
) -> npt.NDArray[np.bool_]:
    """``[N, len(BONES)]``: whether every landmark a bone depends on is visible enough."""
    v = np.asarray(visibility, np.float64)
    if v.ndim == 1:
        v = v[None]
    ok = v >= threshold
    return np.stack([ok[:, list(REQUIRED[b])].all(axis=1) for b in BONES], axis=1)


class SkeletonSolver:
    """Per-stream solver: bones whose landmarks are not visible (or not finite) keep
    their previous local rotation (the identity before the first good one)."""

    def __init__(self, threshold: float = VISIBILITY_THRESHOLD) -> None:
        self.threshold = threshold
        self.previous = identity(len(BONES))

    def solve(self, world: npt.ArrayLike, visibility: npt.ArrayLike | None = None) -> F64:
        """Local rotations ``[len(BONES), 4]`` for one pose's world landmarks ``[33, 3]``."""
        w = np.asarray(world, np.float64).reshape(1, -1, 3)
        with np.errstate(invalid="ignore", divide="ignore"):
            q = solve_local(w)[0]
        ok = np.isfinite(q).all(axis=1)
        if visibility is not None:
            ok &= visible_bones(visibility, self.threshold)[0]
        q = np.where(ok[:, None], q, self.previous)
        self.previous = q
        return q
