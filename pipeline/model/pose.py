"""The pose record that flows from the detect stage to the encoder and out of decoders.

A :class:`PoseFrame` is one detector output: zero or more people, each with
33 image landmarks ``(x, y, z, visibility)`` in MediaPipe's order and,
optionally, 33 world landmarks ``(x, y, z)`` in metres. It has a fixed-size
binary form (:meth:`PoseFrame.to_bytes`) so that it fits a shared-memory ring
slot: ``POSE_RECORD_HEADER`` followed by ``max_poses`` landmark blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.errors import ProtocolError

NUM_LANDMARKS = 33
MAX_POSES = 8

LANDMARK_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye_inner",
    "left_eye",
    "left_eye_outer",
    "right_eye_inner",
    "right_eye",
    "right_eye_outer",
    "left_ear",
    "right_ear",
    "mouth_left",
    "mouth_right",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_pinky",
    "right_pinky",
    "left_index",
    "right_index",
    "left_thumb",
    "right_thumb",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
    "left_heel",
    "right_heel",
    "left_foot_index",
    "right_foot_index",
)

#: Skeleton edges (pairs of landmark indices) as MediaPipe draws them.
POSE_CONNECTIONS: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 7), (0, 4), (4, 5), (5, 6), (6, 8), (9, 10),
    (11, 12), (11, 13), (13, 15), (15, 17), (15, 19), (15, 21), (17, 19),
    (12, 14), (14, 16), (16, 18), (16, 20), (16, 22), (18, 20),
    (11, 23), (12, 24), (23, 24), (23, 25), (24, 26), (25, 27), (26, 28),
    (27, 29), (28, 30), (29, 31), (30, 32), (27, 31), (28, 32),
)  # fmt: skip

# seq, capture_ts_ns, detect_start_ns, detect_end_ns, num_poses, has_world
_HEADER = struct.Struct("<QqqqBB6x")
POSE_RECORD_HEADER = _HEADER.size
_IMAGE_BYTES = NUM_LANDMARKS * 4 * 4
_WORLD_BYTES = NUM_LANDMARKS * 3 * 4

FloatArray = npt.NDArray[np.float32]


def pose_record_size(max_poses: int = MAX_POSES) -> int:
    """Bytes a :class:`PoseFrame` with up to ``max_poses`` people needs in a ring slot."""
    return POSE_RECORD_HEADER + max_poses * (_IMAGE_BYTES + _WORLD_BYTES)


def _empty_image() -> FloatArray:
    return np.zeros((0, NUM_LANDMARKS, 4), np.float32)


@dataclass
class PoseFrame:
    """One detector output for one captured frame.

    ``image`` has shape ``[num_poses, 33, 4]`` (normalised x, y, z, visibility);
    ``world`` is ``None`` or ``[num_poses, 33, 3]`` metres. ``num_poses == 0``
    means "no person in this frame" and is emitted, never silently dropped.
    """

    seq: int
    """Capture sequence number of the frame this pose was found in."""
    capture_ts_ns: int
    """Wall-clock time (``time.time_ns()``) when the frame was read."""
    image: FloatArray = field(default_factory=_empty_image)
    """Image landmarks, float32 ``[num_poses, 33, 4]``."""
    world: FloatArray | None = None
    """World landmarks in metres, float32 ``[num_poses, 33, 3]``, or ``None``."""
    detect_start_ns: int = 0
    """Wall-clock time when detection started (0 when unknown)."""
    detect_end_ns: int = 0
    """Wall-clock time when detection finished (0 when unknown)."""

    @property
    def num_poses(self) -> int:
        return int(self.image.shape[0])

    @property
    def present(self) -> bool:
        """True when at least one person was found."""
        return self.num_poses > 0

    def to_bytes(self) -> bytes:
        """Fixed-layout little-endian record (variable length: header + poses)."""
        n = self.num_poses
        if n > MAX_POSES:
            raise ProtocolError(f"{n} poses in one frame, at most {MAX_POSES} supported")
        has_world = self.world is not None
        parts = [
            _HEADER.pack(
                self.seq,
                self.capture_ts_ns,
                self.detect_start_ns,
                self.detect_end_ns,
                n,
                1 if has_world else 0,
            ),
            np.ascontiguousarray(self.image, dtype="<f4").tobytes(),
        ]
        if self.world is not None:
            parts.append(np.ascontiguousarray(self.world, dtype="<f4").tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> PoseFrame:
        """Inverse of :meth:`to_bytes`; raises :class:`ProtocolError` on bad bytes."""
        buf = memoryview(data)
        if len(buf) < POSE_RECORD_HEADER:
            raise ProtocolError(f"pose record too short: {len(buf)} bytes")
        seq, ts, d0, d1, n, has_world = _HEADER.unpack_from(buf, 0)
        if n > MAX_POSES or has_world > 1:
            raise ProtocolError(f"corrupt pose record header (poses={n}, world={has_world})")
        need = POSE_RECORD_HEADER + n * (_IMAGE_BYTES + (_WORLD_BYTES if has_world else 0))
        if len(buf) < need:
            raise ProtocolError(f"pose record truncated: {len(buf)} < {need} bytes")
        off = POSE_RECORD_HEADER
        image = np.frombuffer(buf, "<f4", n * NUM_LANDMARKS * 4, off).reshape(n, NUM_LANDMARKS, 4)
        off += image.nbytes
        world = None
        if has_world:
            world = np.frombuffer(buf, "<f4", n * NUM_LANDMARKS * 3, off).reshape(
                n, NUM_LANDMARKS, 3
            )
            world = world.astype(np.float32)
        return cls(seq, ts, image.astype(np.float32), world, d0, d1)
