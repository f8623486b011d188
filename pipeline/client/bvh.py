"""BVH export: MediaPipe world landmarks -> a Biovision Hierarchy (Blender, MotionBuilder).

The skeleton is the solver's (:mod:`pipeline.client.skeleton`, the one VMC
uses): one JOINT per solved bone, parents before children, an End Site after
the head, hands and feet. The rest pose is the solver's T-pose; the OFFSETs
are the rest directions times the bone lengths measured on the first frame
with every landmark finite (``docs/recordings.md`` lists which landmarks give
which length; the spine, which MediaPipe does not see, is the hips-to-shoulders
distance split in three). The rotations of a frame are the solver's local
rotations (a bone whose landmarks are not visible keeps its last rotation).

Frame: the solver works in Unity's left-handed frame (x the performer's right,
y up, z forward); BVH is right-handed with y up, so x is mirrored (x = the
performer's left) in offsets and rotations alike: a quaternion (x, y, z, w)
becomes (x, -y, -z, w). Units: metres. Every joint has the channels
``Zrotation Xrotation Yrotation`` (the rotation is Rz * Rx * Ry, the common BVH
order), the root also ``Xposition Yposition Zposition``: a constant hip height
(world landmarks are centred on the hips, so there is no root motion).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from pipeline.client import skeleton as sk
from pipeline.client.skeleton import BONE_INDEX, BONES, F64, PARENT, SkeletonSolver

#: The leaf bones and the landmarks their End Site reaches (from, to).
END_SITES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "Head": ((sk.L_EAR,), (sk.R_EAR,)),
    "LeftHand": ((sk.L_WR,), (sk.L_INDEX, sk.L_PINKY)),
    "RightHand": ((sk.R_WR,), (sk.R_INDEX, sk.R_PINKY)),
    "LeftFoot": ((sk.L_HEEL,), (sk.L_TOE,)),
    "RightFoot": ((sk.R_HEEL,), (sk.R_TOE,)),
}

_MIRROR = np.array([-1.0, 1.0, 1.0])
CHANNELS = ("Zrotation", "Xrotation", "Yrotation")
ROOT_CHANNELS = ("Xposition", "Yposition", "Zposition", *CHANNELS)


def _len(p: F64, a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return float(np.linalg.norm(p[list(b)].mean(axis=0) - p[list(a)].mean(axis=0)))


def rest_offsets(world: npt.ArrayLike) -> tuple[dict[str, F64], dict[str, F64], float]:
    """(joint offsets from the parent joint, End Site offsets, hip height), in BVH's
    frame, from one pose's world landmarks ``[33, 3]``."""
    p = sk.to_unity(world)
    mid_hip = p[[sk.L_HIP, sk.R_HIP]].mean(axis=0)
    mid_sh = p[[sk.L_SH, sk.R_SH]].mean(axis=0)
    torso = float(np.linalg.norm(mid_sh - mid_hip))
    third = np.array([0.0, torso / 3, 0.0])
    shoulder = _len(p, (sk.L_SH,), (sk.R_SH,)) / 2
    hip = _len(p, (sk.L_HIP,), (sk.R_HIP,)) / 2
    off: dict[str, F64] = {
        "Hips": np.zeros(3),
        "Spine": third,
        "Chest": third,
        "Neck": third,
        "Head": np.array([0.0, _len(p, (sk.L_SH, sk.R_SH), (sk.L_EAR, sk.R_EAR)), 0.0]),
        "LeftUpperArm": np.array([-shoulder, torso / 3, 0.0]),
        "RightUpperArm": np.array([shoulder, torso / 3, 0.0]),
        "LeftUpperLeg": np.array([-hip, 0.0, 0.0]),
        "RightUpperLeg": np.array([hip, 0.0, 0.0]),
    }
    for bone in BONES:  # a swing bone's child sits at rest direction * the bone's length
        parent = PARENT[bone]
        if bone not in off and parent is not None and parent in sk.SWING:
            rest, a, b = sk.SWING[parent]
            off[bone] = rest * _len(p, a, b)
    ends: dict[str, F64] = {}
    for bone, (a, b) in END_SITES.items():
        rest = sk.SWING[bone][0] if bone in sk.SWING else np.array([0.0, 1.0, 0.0])
        ends[bone] = rest * _len(p, a, b)
    height = (
        _len(p, (sk.L_HIP,), (sk.L_KNEE,))
        + _len(p, (sk.L_KNEE,), (sk.L_ANK,))
        + _len(p, (sk.R_HIP,), (sk.R_KNEE,))
        + _len(p, (sk.R_KNEE,), (sk.R_ANK,))
    ) / 2
    return (
        {k: v * _MIRROR for k, v in off.items()},
        {k: v * _MIRROR for k, v in ends.items()},
        height,
    )


def to_bvh_quat(q: F64) -> F64:
    """Solver quaternions (Unity frame) -> BVH's frame (x mirrored)."""
    return np.asarray(q * np.array([1.0, -1.0, -1.0, 1.0]), np.float64)


def quat_matrix(q: F64) -> F64:
    """Rotation matrices ``[..., 3, 3]`` of unit quaternions ``[..., 4]`` (x, y, z, w)."""
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.asarray(
        np.stack(
            (
                np.stack((1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)), -1),
                np.stack((2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)), -1),
                np.stack((2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)), -1),
            ),
            -2,
        ),
        np.float64,
    )


def euler_zxy(q: F64) -> F64:
    """Degrees ``[..., 3]`` (z, x, y) with R = Rz(z) * Rx(x) * Ry(y)."""
    m = quat_matrix(q)
    x = np.arcsin(np.clip(m[..., 2, 1], -1.0, 1.0))
    z = np.arctan2(-m[..., 0, 1], m[..., 1, 1])
    y = np.arctan2(-m[..., 2, 0], m[..., 2, 2])
    # gimbal lock (x = +-90 degrees): z and y turn about the same axis; put it all in z
    lock = np.abs(m[..., 2, 1]) > 1.0 - 1e-9
    z = np.where(lock, np.arctan2(m[..., 1, 0], m[..., 0, 0]), z)
    y = np.where(lock, 0.0, y)
    return np.asarray(np.degrees(np.stack((z, x, y), axis=-1)), np.float64)


def solve_frames(world: npt.ArrayLike, visibility: npt.ArrayLike | None = None) -> F64:
    """Local rotations ``[N, len(BONES), 4]`` (solver frame) of ``N`` poses; a pose with
    non-finite landmarks (no person) keeps every rotation of the previous one."""
    w = np.asarray(world, np.float64)
    solver = SkeletonSolver()
    out = np.empty((len(w), len(BONES), 4))
    for i in range(len(w)):
        out[i] = solver.solve(w[i], None if visibility is None else np.asarray(visibility)[i])
    return out


def _fmt(v: float) -> str:
    return f"{v:.6f}"


def bvh_text(
    world: npt.ArrayLike, frame_time_s: float, visibility: npt.ArrayLike | None = None
) -> str:
    """The BVH file of the poses ``world [N, 33, 3]`` (MediaPipe world landmarks, NaN for
    a frame without a person). Raises ValueError when no frame is complete."""
    w = np.asarray(world, np.float64)
    finite = np.isfinite(w).all(axis=(1, 2))
    if not finite.any():
        raise ValueError("no frame with every world landmark")
    offsets, ends, height = rest_offsets(w[int(np.argmax(finite))])
    children: dict[str, list[str]] = {b: [c for c in BONES if PARENT[c] == b] for b in BONES}
    lines = ["HIERARCHY"]

    def joint(bone: str, depth: int) -> None:
        pad = "\t" * depth
        chans = ROOT_CHANNELS if depth == 0 else CHANNELS
        lines.append(f"{pad}{'ROOT' if depth == 0 else 'JOINT'} {bone}")
        lines.append(pad + "{")
        lines.append(f"{pad}\tOFFSET {' '.join(_fmt(v) for v in offsets[bone])}")
        lines.append(f"{pad}\tCHANNELS {len(chans)} {' '.join(chans)}")
        for child in children[bone]:
            joint(child, depth + 1)
        if bone in ends:
            lines.append(f"{pad}\tEnd Site")
            lines.append(pad + "\t{")
            lines.append(f"{pad}\t\tOFFSET {' '.join(_fmt(v) for v in ends[bone])}")
            lines.append(pad + "\t}")
        lines.append(pad + "}")

    joint("Hips", 0)
    order = [b for b in _depth_first(children, "Hips")]
    eul = euler_zxy(to_bvh_quat(solve_frames(w, visibility)))  # [N, bones, 3]
    idx = [BONE_INDEX[b] for b in order]
    lines += ["MOTION", f"Frames: {len(w)}", f"Frame Time: {frame_time_s:.6f}"]
    root = f"0.000000 {_fmt(height)} 0.000000 "
    for f in eul[:, idx]:
        lines.append(root + " ".join(_fmt(v) for v in f.reshape(-1)))
    return "\n".join(lines) + "\n"


def _depth_first(children: dict[str, list[str]], bone: str) -> list[str]:
    out = [bone]
    for c in children[bone]:
        out += _depth_first(children, c)
    return out


def frame_time(capture_ts_ns: npt.ArrayLike, default_s: float = 1 / 30) -> float:
    """The median interval of capture times, seconds (BVH has one frame rate)."""
    t = np.asarray(capture_ts_ns, np.int64)
    if len(t) < 2:
        return default_s
    d = float(np.median(np.diff(t))) / 1e9
    return d if math.isfinite(d) and d > 0 else default_s
