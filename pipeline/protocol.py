"""The posewire wire protocol, version 1: packet header (this part) and pose codec.

Packet format v1
================

All multi-byte fixed-width integers are little-endian. ``varint`` is unsigned
LEB128 (7 bits per byte, low group first, high bit = "more bytes follow"),
canonical (no trailing ``0x80 0x00`` padding) and at most 10 bytes.
``zigzag`` maps a signed integer to an unsigned one (0, -1, 1, -2, ... ->
0, 1, 2, 3, ...) before it is written as a varint.

=========  ======================  ============================================
bytes      field                   meaning
=========  ======================  ============================================
1          magic | version         high nibble ``0xB`` (magic), low nibble the
                                   protocol version (1 here). ``0xBF`` is
                                   reserved for "version >= 15 in the next
                                   byte" so the version can grow.
1          flags                   bit 0 ``K`` keyframe (no reference), bit 1
                                   ``W`` world landmarks present, bits 2-5
                                   number of poses (0..8), bits 6-7 the
                                   encoder's epoch (see below).
1-5        stream id               varint, publisher stream id, < 2**32.
1-9        sequence                varint, the frame's sequence number
                                   (``PoseFrame.seq``), < 2**63.
(K=1) 8    capture timestamp       int64, ``time.time_ns()`` of the capture.
(K=0) 1-5  reference delta         varint ``seq - ref_seq``, >= 1, < 2**32.
(K=0) 1-10 timestamp delta         zigzag varint, ``capture_ts_ns`` minus the
                                   reference frame's ``capture_ts_ns``, exact
                                   in nanoseconds.
1-2        payload length          varint, number of payload bytes.
n          payload                 the coded poses (see the codec section).
4          checksum                CRC32C (Castagnoli) of every byte before
                                   it, uint32.
=========  ======================  ============================================

A typical delta packet's header is 1 + 1 + 1 + 3 + 1 + 4 + 1 + 4 = 16 bytes
(stream id < 128, sequence < 2**21, i.e. 19 h at 30 fps; a 33 ms timestamp
delta takes 4 bytes); a keyframe's is 20 bytes.

The whole packet is strictly shorter than :data:`MAX_PACKET_BYTES` (1,100
bytes, one SCTP packet on a 1,200-byte path MTU).

Why the timestamp of a delta packet is a delta: an absolute ``time_ns()``
needs 8 bytes, an eighth of the 64-byte budget of a whole frame. The delta
to the reference frame's timestamp is exact (no rounding) and takes 4 bytes
for up to 134 ms. :func:`peek_header` therefore reports the absolute
timestamp only for keyframes; for delta packets it reports
``capture_ts_delta_ns`` and the :class:`Decoder` (which has the reference)
fills in ``capture_ts_ns``.

Checksum: CRC32C was measured against xxHash on a 60-byte packet on the
development machine: ``google_crc32c.value`` 142 ns, ``xxhash.xxh32_intdigest``
75 ns, ``xxh3_64`` 70 ns (``python -m bench codec`` re-measures it). The
67 ns difference is irrelevant next to the codec's microseconds; CRC32C wins on
the rest: it is already a runtime dependency (xxhash is a test extra), it is
the SCTP/iSCSI checksum with hardware support and a guaranteed Hamming
distance for short messages (every burst of up to 32 flipped bits is
detected), and a JavaScript viewer implements it in a dozen lines.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass, replace

import google_crc32c
import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError, ProtocolError, UnsupportedVersionError
from pipeline.pose import LANDMARK_NAMES, MAX_POSES, NUM_LANDMARKS, PoseFrame

PROTOCOL_VERSION: int = 1
"""The packet format version this build writes and reads."""

MAX_PACKET_BYTES: int = 1100
"""Every packet is strictly shorter than this (one SCTP packet)."""

MAGIC_NIBBLE = 0xB
"""High nibble of a packet's first byte."""

FLAG_KEYFRAME = 0x01
FLAG_WORLD = 0x02
_POSES_SHIFT = 2
_POSES_MASK = 0x0F
_EPOCH_SHIFT = 6
_EPOCH_MASK = 0x03
MAX_WIRE_POSES = 8
"""At most this many poses in one packet (``pipeline.pose.MAX_POSES``)."""

MAX_STREAM_ID = 2**32 - 1
MAX_SEQ = 2**63 - 1
MAX_REF_DELTA = 2**32 - 1
CHECKSUM_BYTES = 4
MIN_PACKET_BYTES = 1 + 1 + 1 + 1 + 1 + 1 + 1 + CHECKSUM_BYTES
"""Smallest possible packet: a delta header with one-byte fields, no payload."""

_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """The fixed part of a packet, readable without decoding the payload.

    :func:`peek_header` returns it (the room server relays on it);
    :meth:`Decoder.decode` returns it with ``capture_ts_ns`` filled in.
    """

    stream_id: int
    """Publisher stream id (chosen by the publisher / room server), < 2**32."""
    seq: int
    """Sequence number of the frame (``PoseFrame.seq``)."""
    capture_ts_ns: int | None
    """Wall-clock capture time in ns. Always set for keyframes; for a delta
    packet ``peek_header`` cannot know it (it is coded relative to the
    reference, see ``capture_ts_delta_ns``) and returns ``None``, while the
    decoder fills it in."""
    ref_seq: int | None
    """Sequence number of the reference frame, ``None`` for a keyframe."""
    keyframe: bool
    """The packet decodes without any reference."""
    has_world: bool
    """World landmarks are present."""
    num_poses: int
    """Number of poses (people) in the frame, 0..8."""
    payload_len: int
    """Number of payload bytes."""
    version: int
    """Protocol version of the packet."""
    capture_ts_delta_ns: int | None = None
    """For a delta packet: ``capture_ts_ns`` minus the reference's; ``None`` for keyframes."""
    header_len: int = 0
    """Bytes before the payload (the payload starts here)."""
    epoch: int = 0
    """Two-bit id of the encoder instance (flags bits 6-7); a decoder never predicts
    a packet from a frame of another epoch."""

    @property
    def packet_len(self) -> int:
        """Total packet length in bytes (header, payload and checksum)."""
        return self.header_len + self.payload_len + CHECKSUM_BYTES


# --------------------------------------------------------------------------- varints


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zigzag(value: int) -> int:
    return (value << 1) if value >= 0 else ((-value << 1) - 1)


def _unzigzag(value: int) -> int:
    return (value >> 1) if not value & 1 else -((value + 1) >> 1)


def _get_varint(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """Read a canonical varint of at most 10 bytes at ``pos``; return (value, new pos)."""
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise ProtocolError(f"packet truncated inside the {what} field")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and pos - start > 1:
                raise ProtocolError(f"non-canonical varint in the {what} field")
            return value, pos
        shift += 7
        if shift >= 70:
            raise ProtocolError(f"varint longer than 10 bytes in the {what} field")


# --------------------------------------------------------------------------- header


def _write_header(
    out: bytearray,
    *,
    stream_id: int,
    seq: int,
    keyframe: bool,
    has_world: bool,
    num_poses: int,
    capture_ts_ns: int,
    ref_seq: int | None,
    ref_ts_ns: int | None,
    payload_len: int,
    epoch: int = 0,
) -> None:
    """Append a v1 header (everything up to the payload) to ``out``."""
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ProtocolError(f"stream id {stream_id} out of range 0..{MAX_STREAM_ID}")
    if not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(f"sequence number {seq} out of range 0..{MAX_SEQ}")
    if not 0 <= num_poses <= MAX_WIRE_POSES:
        raise ProtocolError(f"{num_poses} poses in one frame, at most {MAX_WIRE_POSES}")
    if not -(2**63) <= capture_ts_ns < 2**63:
        raise ProtocolError(f"capture timestamp {capture_ts_ns} does not fit int64")
    out.append((MAGIC_NIBBLE << 4) | PROTOCOL_VERSION)
    flags = (
        (num_poses << _POSES_SHIFT)
        | (FLAG_WORLD if has_world else 0)
        | ((epoch & _EPOCH_MASK) << _EPOCH_SHIFT)
    )
    if keyframe:
        flags |= FLAG_KEYFRAME
    out.append(flags)
    _put_varint(out, stream_id)
    _put_varint(out, seq)
    if keyframe:
        out += _I64.pack(capture_ts_ns)
    else:
        if ref_seq is None or ref_ts_ns is None:
            raise ProtocolError("a delta packet needs a reference")
        delta = seq - ref_seq
        if not 1 <= delta <= MAX_REF_DELTA:
            raise ProtocolError(f"reference {ref_seq} is not 1..{MAX_REF_DELTA} before {seq}")
        _put_varint(out, delta)
        ts_delta = capture_ts_ns - ref_ts_ns
        if not -(2**63) <= ts_delta < 2**63:
            raise ProtocolError("timestamp delta to the reference does not fit int64")
        _put_varint(out, _zigzag(ts_delta))
    _put_varint(out, payload_len)


def _finish_packet(out: bytearray) -> bytes:
    """Append the checksum; check the size bound."""
    out += _U32.pack(google_crc32c.value(bytes(out)))
    if len(out) >= MAX_PACKET_BYTES:
        raise ProtocolError(
            f"packet of {len(out)} bytes would not be under MAX_PACKET_BYTES={MAX_PACKET_BYTES}"
        )
    return bytes(out)


def peek_header(packet: bytes | bytearray | memoryview) -> PacketHeader:
    """Parse and validate a packet's header without decoding its payload.

    Checks the magic, the version, the flags, every field's range, that the
    payload length matches the packet length exactly, the size bound and the
    CRC32C checksum. Raises :class:`UnsupportedVersionError` for a version
    this build does not speak and :class:`ProtocolError` for anything else
    wrong; never anything else, whatever ``packet`` holds.
    """
    if isinstance(packet, bytes):
        buf = packet
    elif isinstance(packet, bytearray | memoryview):
        try:
            buf = bytes(packet)
        except (TypeError, ValueError, BufferError) as exc:
            raise ProtocolError(f"packet is not a byte buffer: {exc}") from exc
    else:
        raise ProtocolError(f"packet must be bytes, not {type(packet).__name__}")
    n = len(buf)
    if n < MIN_PACKET_BYTES:
        raise ProtocolError(
            f"packet too short: {n} bytes, a packet has at least {MIN_PACKET_BYTES}"
        )
    if n >= MAX_PACKET_BYTES:
        raise ProtocolError(f"packet too long: {n} bytes, must be under {MAX_PACKET_BYTES}")
    b0 = buf[0]
    if b0 >> 4 != MAGIC_NIBBLE:
        raise ProtocolError(f"not a posewire packet (first byte 0x{b0:02x}, magic nibble 0xB)")
    version = b0 & 0x0F
    pos = 1
    if version == 0x0F:
        version = buf[1]
        pos = 2
        if version < 0x0F:
            raise ProtocolError(f"non-canonical version byte {version} after 0xBF")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"packet has protocol version {version}, this build supports only version "
            f"{PROTOCOL_VERSION}"
        )
    end = n - CHECKSUM_BYTES
    (crc,) = _U32.unpack_from(buf, end)
    if crc != google_crc32c.value(buf[:end]):
        raise ProtocolError("checksum mismatch: the packet is corrupt")
    flags = buf[pos]
    pos += 1
    num_poses = (flags >> _POSES_SHIFT) & _POSES_MASK
    if num_poses > MAX_WIRE_POSES:
        raise ProtocolError(f"{num_poses} poses in the flags, at most {MAX_WIRE_POSES}")
    keyframe = bool(flags & FLAG_KEYFRAME)
    has_world = bool(flags & FLAG_WORLD)
    stream_id, pos = _get_varint(buf, pos, end, "stream id")
    if stream_id > MAX_STREAM_ID:
        raise ProtocolError(f"stream id {stream_id} out of range")
    seq, pos = _get_varint(buf, pos, end, "sequence")
    if seq > MAX_SEQ:
        raise ProtocolError(f"sequence number {seq} out of range")
    ts: int | None
    ts_delta: int | None
    ref_seq: int | None
    if keyframe:
        if pos + 8 > end:
            raise ProtocolError("packet truncated inside the timestamp field")
        (ts,) = _I64.unpack_from(buf, pos)
        pos += 8
        ref_seq = None
        ts_delta = None
    else:
        ref_delta, pos = _get_varint(buf, pos, end, "reference")
        if not 1 <= ref_delta <= min(seq, MAX_REF_DELTA):
            raise ProtocolError(f"reference delta {ref_delta} invalid for sequence {seq}")
        ref_seq = seq - ref_delta
        zz, pos = _get_varint(buf, pos, end, "timestamp delta")
        ts_delta = _unzigzag(zz)
        if not -(2**63) <= ts_delta < 2**63:
            raise ProtocolError("timestamp delta out of range")
        ts = None
    payload_len, pos = _get_varint(buf, pos, end, "payload length")
    if payload_len != end - pos:
        raise ProtocolError(
            f"payload length field says {payload_len} bytes, the packet holds {end - pos}"
        )
    return PacketHeader(
        stream_id=stream_id,
        seq=seq,
        capture_ts_ns=ts,
        ref_seq=ref_seq,
        keyframe=keyframe,
        has_world=has_world,
        num_poses=num_poses,
        payload_len=payload_len,
        version=version,
        capture_ts_delta_ns=ts_delta,
        header_len=pos,
        epoch=(flags >> _EPOCH_SHIFT) & _EPOCH_MASK,
    )


# =========================================================================== codec
#
# Everything below is the pose codec: quantization, prediction, entropy coding,
# and the stateful Encoder/Decoder pair. The payload format is described in
# docs/protocol.md; the constants here are part of protocol version 1.

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

XY_RANGE = (-1.0, 2.0)
"""Accepted normalised x and y (MediaPipe reports points slightly outside the image)."""
Z_RANGE = (-4.0, 4.0)
"""Accepted z (depth relative to the hips, in the scale of x)."""
VISIBILITY_RANGE = (0.0, 1.0)
"""Accepted visibility."""
WORLD_RANGE_M = (-8.0, 8.0)
"""Accepted world coordinates in metres (origin at the hips)."""

HISTORY = 32
"""Decoded frames a decoder keeps per stream (an encoder references nothing older)."""
PREDICTOR_DEPTH = 3
"""Reference frames (the reference and its own references) a prediction uses."""
_GUARD = 1.001
"""Quantization steps are this much finer than the precision asks, so that float32
rounding of the decoded value never pushes the error over the bound."""
_MAX_STEPS = 1 << 16
_SHIFT = 16
_ONE = 1 << _SHIFT
_HALF = 1 << (_SHIFT - 1)
_MAX_K = 14
_ZERO_GROUP = 15
_MAX_Q_BITS = 6
"""The encoder never emits a unary part longer than 2**6 - 1 zeros."""
_GROUP = NUM_LANDMARKS

# Parent of each landmark in the keyframe (intra) prediction tree; -1 = root.
_PARENT: tuple[int, ...] = (
    -1, 0, 1, 2, 0, 4, 5, 3, 6, 0, 9,  # face: nose is the root
    0, 11, 11, 12, 13, 14, 15, 16, 15, 16, 15, 16,  # shoulders, arms, hands
    11, 23, 23, 24, 25, 26, 27, 28, 27, 28,  # hips, legs, feet
)  # fmt: skip

# Rigid groups for the inter predictor: points that move together.
_RIGID_GROUPS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),  # head
    (15, 17, 19, 21),  # left hand
    (16, 18, 20, 22),  # right hand
    (27, 29, 31),  # left foot
    (28, 30, 32),  # right foot
    (11, 12),  # shoulders
    (23, 24),  # hips
)

# Inter prediction coefficients, in 1/256, per component class and depth d (number of
# reference frames h1 = the reference, h2 = its reference, h3 = that one's):
#   grouped landmark j: pred = h1_j + sum_{i>=2} a_i (h_i,j - h1_j) + sum_{i>=1} b_i (G(h_i) - h1_j)
#   single landmark j:  pred = h1_j + sum_{i>=2} c_i (h_i,j - h1_j)
# with G(h) the mean of j's rigid group. Fitted by least squares on the six CMU
# traces with detector-like noise, validated leave-one-clip-out (bench/codec.py --fit).
_COEFS: dict[str, dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = {
    #        d: ((a_2..a_d), (b_1..b_d), (c_2..c_d))
    "xy": {1: ((), (0,), ()), 2: ((88,), (321, -317), (-144,)),
           3: ((74, 23), (282, -204, -75), (33, -113))},
    "z": {1: ((), (115,), ()), 2: ((89,), (94, -19), (113,)),
          3: ((65, 67), (121, 16, -81), (85, 51))},
    "world": {1: ((), (0,), ()), 2: ((76,), (295, -293), (-118,)),
              3: ((71, 7), (250, -185, -63), (30, -101))},
}  # fmt: skip


def _ancestor_matrix() -> FloatArray:
    a = np.zeros((NUM_LANDMARKS, NUM_LANDMARKS), np.float64)
    for j in range(NUM_LANDMARKS):
        k = j
        while k >= 0:
            a[j, k] = 1.0
            k = _PARENT[k]
    return a


def _predictor_matrix(cls: str, depth: int) -> FloatArray:
    """Integer matrix K (33 x 33*depth, in 1/65536): pred = floor((K @ H + 2**15) / 2**16)."""
    a_taps, b_taps, c_taps = _COEFS[cls][depth]
    k = np.zeros((NUM_LANDMARKS, NUM_LANDMARKS * depth), np.int64)
    group_of: dict[int, tuple[int, ...]] = {}
    for rigid in _RIGID_GROUPS:
        for j in rigid:
            group_of[j] = rigid
    for j in range(NUM_LANDMARKS):
        grp = group_of.get(j)
        if grp is None:
            own = [256 - sum(c_taps), *c_taps]
            for i in range(depth):
                k[j, i * NUM_LANDMARKS + j] += own[i] * 256
            continue
        own = [256 - sum(a_taps) - sum(b_taps), *a_taps]
        m = len(grp)
        for i in range(depth):
            k[j, i * NUM_LANDMARKS + j] += own[i] * 256
            share = (2 * b_taps[i] * 256 + m) // (2 * m)  # floor(b*256/m + 1/2), exact
            for member in grp:
                k[j, i * NUM_LANDMARKS + member] += share
    return k.astype(np.float64)


_ANCESTORS = _ancestor_matrix()
_PARENT_IDX = np.array([max(p, 0) for p in _PARENT], np.intp)
_IS_ROOT = np.array([p < 0 for p in _PARENT], bool)
_PREDICTORS: dict[tuple[str, int], FloatArray] = {
    (cls, d): _predictor_matrix(cls, d) for cls in _COEFS for d in range(1, PREDICTOR_DEPTH + 1)
}
_KRANGE = np.arange(_MAX_K + 1, dtype=np.int64)
_BITPOS = np.arange(_MAX_K, dtype=np.int64)
# _REM_WEIGHTS[k, j] = weight of the j-th remainder bit of a k-bit remainder (MSB first)
_REM_WEIGHTS = np.array(
    [[(1 << (k - 1 - j)) if j < k else 0 for j in range(_MAX_K)] for k in range(_MAX_K + 1)],
    np.int64,
)
_NIBBLE_WEIGHTS = np.array([8, 4, 2, 1], np.int64)
_NIBBLE_SHIFTS = np.array([3, 2, 1, 0], np.int64)


class PacketTooLargeError(ProtocolError):
    """The frame cannot be coded under :data:`MAX_PACKET_BYTES` (the encoder state is unchanged)."""


# --------------------------------------------------------------------------- config


@dataclass
class CodecConfig:
    """Parameters of the pose codec.

    The quantization parameters travel in every keyframe, so a decoder needs
    no configuration to decode any stream; a decoder only uses ``max_poses``.
    """

    precision_px: float = 0.5
    """Maximum absolute error of x and y, in pixels of an image ``reference_width_px``
    wide (normalised error ``precision_px / reference_width_px``; y uses the same
    normalised step). Default 0.5 px at 1920 px: error <= 2.6e-4."""
    reference_width_px: int = 1920
    """Image width at which ``precision_px`` is measured."""
    keyframe_interval: int = 30
    """A keyframe at least every this many frames (1: every frame; 0: only the first
    frame and on request). Keyframes let late joiners start and bound the damage of a
    loss when no acknowledgements come back."""
    z_precision: float = 0.01
    """Maximum absolute error of z (normalised, the scale of x). MediaPipe's z is far
    noisier than x and y (detector noise of about 0.01), and 0.01 adds less than 20 %
    to that noise (uniform quantization noise has std step/sqrt(12) = 0.0058)."""
    visibility_levels: int = 16
    """Number of visibility levels over [0, 1] (2..256); 16 levels: error <= 1/30. Viewers
    threshold visibility (typically at 0.5) or fade with it; MediaPipe's own score
    jitters by more than 0.03 from frame to frame."""
    world: bool = False
    """Send world landmarks (metres) when the frame has them."""
    world_precision_m: float = 0.005
    """Maximum absolute error of world landmarks in metres (MediaPipe's world landmarks
    are accurate to a few centimetres at best)."""
    max_poses: int = MAX_POSES
    """Most poses accepted in one frame (1..8)."""

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.precision_px) and self.precision_px > 0):
            problems.append(f"precision_px must be > 0, got {self.precision_px}")
        if not 1 <= self.reference_width_px <= 100_000:
            problems.append(f"reference_width_px must be 1..100000, got {self.reference_width_px}")
        if self.keyframe_interval < 0:
            problems.append(f"keyframe_interval must be >= 0, got {self.keyframe_interval}")
        if not (math.isfinite(self.z_precision) and self.z_precision > 0):
            problems.append(f"z_precision must be > 0, got {self.z_precision}")
        if not 2 <= self.visibility_levels <= 256:
            problems.append(f"visibility_levels must be 2..256, got {self.visibility_levels}")
        if not (math.isfinite(self.world_precision_m) and self.world_precision_m > 0):
            problems.append(f"world_precision_m must be > 0, got {self.world_precision_m}")
        if not 1 <= self.max_poses <= MAX_POSES:
            problems.append(f"max_poses must be 1..{MAX_POSES}, got {self.max_poses}")
        if not problems:
            try:
                _Quant.from_config(self)
            except ProtocolError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True, slots=True)
class _Quant:
    """Quantization steps as carried in keyframes: ``steps per unit``."""

    n_xy: int
    n_z: int
    n_world: int
    vis_levels: int

    @classmethod
    def from_config(cls, c: CodecConfig) -> _Quant:
        q = cls(
            n_xy=math.ceil(c.reference_width_px / (2.0 * c.precision_px) * _GUARD),
            n_z=math.ceil(1.0 / (2.0 * c.z_precision) * _GUARD),
            n_world=math.ceil(1.0 / (2.0 * c.world_precision_m) * _GUARD),
            vis_levels=c.visibility_levels,
        )
        q.check()
        return q

    def check(self) -> None:
        for name, v in (("x/y", self.n_xy), ("z", self.n_z), ("world", self.n_world)):
            if not 1 <= v <= _MAX_STEPS:
                raise ProtocolError(f"{name} quantization of {v} steps per unit not in 1..65536")
        if not 2 <= self.vis_levels <= 256:
            raise ProtocolError(f"{self.vis_levels} visibility levels, must be 2..256")

    def image_scale(self) -> FloatArray:
        return np.array([self.n_xy, self.n_xy, self.n_z, self.vis_levels - 1], np.float64)

    def image_bounds(self) -> tuple[FloatArray, FloatArray]:
        lo = np.array([XY_RANGE[0], XY_RANGE[0], Z_RANGE[0], 0.0]) * self.image_scale()
        hi = np.array([XY_RANGE[1], XY_RANGE[1], Z_RANGE[1], 1.0]) * self.image_scale()
        return np.floor(lo), np.ceil(hi)

    def world_bounds(self) -> tuple[float, float]:
        return math.floor(WORLD_RANGE_M[0] * self.n_world), math.ceil(
            WORLD_RANGE_M[1] * self.n_world
        )

    def to_bytes(self) -> bytes:
        out = bytearray()
        _put_varint(out, self.n_xy)
        _put_varint(out, self.n_z)
        _put_varint(out, self.n_world)
        out.append(self.vis_levels - 1)
        return bytes(out)

    @classmethod
    def parse(cls, buf: bytes, pos: int, end: int) -> tuple[_Quant, int]:
        n_xy, pos = _get_varint(buf, pos, end, "x/y step")
        n_z, pos = _get_varint(buf, pos, end, "z step")
        n_w, pos = _get_varint(buf, pos, end, "world step")
        if pos >= end:
            raise ProtocolError("packet truncated inside the visibility levels field")
        q = cls(n_xy, n_z, n_w, buf[pos] + 1)
        q.check()
        return q, pos + 1


# --------------------------------------------------------------------------- entropy coding


def _zigzag_np(r: IntArray) -> IntArray:
    return (r << 1) ^ (r >> 63)


def _unzigzag_np(u: IntArray) -> IntArray:
    return (u >> 1) ^ -(u & 1)


def _rice_encode(u: IntArray) -> bytes:
    """Code the rows (groups of 33 unsigned values) of ``u``; see docs/protocol.md.

    Layout: one 4-bit code per group (Rice parameter k 0..14, or 15 = every value
    is zero), then the unary parts (q zeros and a one, q = value >> k) of every
    value of the non-zero groups, then their k-bit remainders, MSB first, then zero
    padding to a byte boundary.
    """
    n_groups = u.shape[0]
    if n_groups == 0:
        return b""
    maxes = u.max(axis=1)
    # cost of each k for each group: sum(value >> k) + 33 * (k + 1)
    shifted = u[:, :, None] >> _KRANGE
    cost = shifted.sum(axis=1) + _GROUP * (_KRANGE + 1)
    # forbid parameters that would leave a unary part of more than 2**6 - 1 zeros
    cost[(maxes[:, None] >> _KRANGE) >= (1 << _MAX_Q_BITS)] = 1 << 40
    ks = cost.argmin(axis=1)
    codes = np.where(maxes == 0, _ZERO_GROUP, ks)
    nibble_bits = ((codes[:, None] >> _NIBBLE_SHIFTS) & 1).ravel()
    nz = codes != _ZERO_GROUP
    if not nz.any():
        return np.packbits(nibble_bits.astype(np.uint8)).tobytes()
    vals = u[nz].ravel()
    kv = np.repeat(ks[nz], _GROUP)
    q = vals >> kv
    ends = np.cumsum(q + 1)
    unary = np.zeros(int(ends[-1]), np.uint8)
    unary[ends - 1] = 1
    rem = vals & ((1 << kv) - 1)
    shifts = kv[:, None] - 1 - _BITPOS
    rbits = ((rem[:, None] >> np.maximum(shifts, 0)) & 1)[shifts >= 0]
    bits = np.concatenate((nibble_bits, unary, rbits)).astype(np.uint8)
    return np.packbits(bits).tobytes()


def _rice_decode(data: bytes, n_groups: int) -> IntArray:
    """Inverse of :func:`_rice_encode`: ``n_groups`` rows of 33 values from exactly ``data``."""
    if n_groups == 0:
        if data:
            raise ProtocolError(f"{len(data)} payload bytes where none are expected")
        return np.zeros((0, _GROUP), np.int64)
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    n_bits = bits.size
    head = 4 * n_groups
    if n_bits < head:
        raise ProtocolError("payload too short for its group codes")
    codes = bits[:head].reshape(n_groups, 4).astype(np.int64) @ _NIBBLE_WEIGHTS
    nz = codes != _ZERO_GROUP
    out = np.zeros((n_groups, _GROUP), np.int64)
    n_nz = int(nz.sum())
    if n_nz == 0:
        end = head
    else:
        ks = codes[nz]
        rest = bits[head:]
        n_vals = n_nz * _GROUP
        ones = np.flatnonzero(rest)
        if ones.size < n_vals:
            raise ProtocolError("payload truncated inside the unary codes")
        ends = ones[:n_vals]
        q = np.diff(ends, prepend=-1) - 1
        if int(q.max()) >= (1 << _MAX_Q_BITS):
            raise ProtocolError("unary code longer than the protocol allows")
        kv = np.repeat(ks, _GROUP)
        rstart = int(ends[-1]) + 1
        rlen = int(kv.sum())
        if rstart + rlen > rest.size:
            raise ProtocolError("payload truncated inside the remainders")
        offs = rstart + np.cumsum(kv) - kv
        idx = np.minimum(offs[:, None] + _BITPOS, rest.size - 1)
        rem = (rest[idx].astype(np.int64) * _REM_WEIGHTS[kv]).sum(axis=1)
        out[nz] = ((q << kv) | rem).reshape(n_nz, _GROUP)
        end = head + rstart + rlen
    pad = n_bits - end
    if pad >= 8 or (pad and bits[end:].any()):
        raise ProtocolError("payload has trailing bytes or non-zero padding")
    return out


# --------------------------------------------------------------------------- prediction


def _predict(cls: str, hist: list[FloatArray]) -> FloatArray:
    """Prediction of one pose's component block (33 x C) from 1..3 reference blocks."""
    k = _PREDICTORS[cls, len(hist)]
    h = hist[0] if len(hist) == 1 else np.concatenate(hist, axis=0)
    pred: FloatArray = np.floor((k @ h + _HALF) / _ONE)
    return pred


def _intra_residual(q: FloatArray, root: FloatArray) -> FloatArray:
    """Residual of a keyframe block: each landmark minus its parent (the root minus ``root``)."""
    r = q - q[_PARENT_IDX]
    r[0] = q[0] - root
    return r


def _intra_reconstruct(r: FloatArray, root: FloatArray) -> FloatArray:
    return _ANCESTORS @ r + root


@dataclass(slots=True)
class _Entry:
    """A decoded (or, in the encoder, reconstructed) frame kept as a possible reference."""

    seq: int
    ts: int
    epoch: int
    quant: _Quant
    img: tuple[FloatArray, ...]
    """Quantized image landmarks of this frame and its references, newest first,
    each [n, 33, 4] (float64 holding integers)."""
    world: tuple[FloatArray | None, ...]
    """Quantized world landmarks likewise (``None`` where a frame had none)."""
    key_seq: int
    """Sequence number of the keyframe this frame descends from."""


def _depth(hist: tuple[FloatArray | None, ...], pose: int) -> int:
    d = 0
    for h in hist:
        if h is None or h.shape[0] <= pose:
            break
        d += 1
    return d


def _residual_rows(
    q_img: FloatArray,
    q_world: FloatArray | None,
    quant: _Quant,
    ref: _Entry | None,
) -> IntArray:
    """Zigzagged residual rows (x, y, z, v[, wx, wy, wz] per pose) for the entropy coder."""
    n = q_img.shape[0]
    per_pose = 4 if q_world is None else 7
    rows = np.empty((n * per_pose, _GROUP), np.float64)
    root_img = np.array([quant.n_xy // 2, quant.n_xy // 2, 0, quant.vis_levels - 1], np.float64)
    for p in range(n):
        blk = q_img[p]
        d = _depth(ref.img, p) if ref is not None else 0
        if d:
            assert ref is not None
            hist = [h[p] for h in ref.img[:d]]
            pred_xy = _predict("xy", [h[:, 0:2] for h in hist])
            pred_z = _predict("z", [h[:, 2:3] for h in hist])
            res = np.empty_like(blk)
            res[:, 0:2] = blk[:, 0:2] - pred_xy
            res[:, 2:3] = blk[:, 2:3] - pred_z
            res[:, 3] = blk[:, 3] - hist[0][:, 3]
        else:
            res = _intra_residual(blk, root_img)
        base = p * per_pose
        rows[base : base + 4] = res.T
        if q_world is not None:
            wblk = q_world[p]
            dw = _depth(ref.world, p) if ref is not None else 0
            if dw:
                assert ref is not None
                wres = wblk - _predict("world", [h[p] for h in ref.world[:dw] if h is not None])
            else:
                wres = _intra_residual(wblk, np.zeros(3))
            rows[base + 4 : base + 7] = wres.T
    return _zigzag_np(rows.astype(np.int64))


def _reconstruct(
    rows: IntArray,
    n: int,
    has_world: bool,
    quant: _Quant,
    ref: _Entry | None,
) -> tuple[FloatArray, FloatArray | None]:
    """Inverse of :func:`_residual_rows`."""
    per_pose = 7 if has_world else 4
    res_all = _unzigzag_np(rows).astype(np.float64)
    q_img = np.empty((n, NUM_LANDMARKS, 4), np.float64)
    q_world = np.empty((n, NUM_LANDMARKS, 3), np.float64) if has_world else None
    root_img = np.array([quant.n_xy // 2, quant.n_xy // 2, 0, quant.vis_levels - 1], np.float64)
    for p in range(n):
        base = p * per_pose
        res = res_all[base : base + 4].T
        d = _depth(ref.img, p) if ref is not None else 0
        if d:
            assert ref is not None
            hist = [h[p] for h in ref.img[:d]]
            q_img[p, :, 0:2] = _predict("xy", [h[:, 0:2] for h in hist]) + res[:, 0:2]
            q_img[p, :, 2:3] = _predict("z", [h[:, 2:3] for h in hist]) + res[:, 2:3]
            q_img[p, :, 3] = hist[0][:, 3] + res[:, 3]
        else:
            q_img[p] = _intra_reconstruct(res, root_img)
        if q_world is not None:
            wres = res_all[base + 4 : base + 7].T
            dw = _depth(ref.world, p) if ref is not None else 0
            if dw:
                assert ref is not None
                hist_w = [h[p] for h in ref.world[:dw] if h is not None]
                q_world[p] = _predict("world", hist_w) + wres
            else:
                q_world[p] = _intra_reconstruct(wres, np.zeros(3))
    return q_img, q_world


# --------------------------------------------------------------------------- validation

_COMPONENT_NAMES = ("x", "y", "z", "visibility")


def _check_block(
    arr: object, n_cols: int, what: str, max_poses: int, n_expected: int | None
) -> FloatArray:
    if not isinstance(arr, np.ndarray):
        raise ProtocolError(f"{what} landmarks must be a numpy array, not {type(arr).__name__}")
    if arr.ndim != 3 or arr.shape[1:] != (NUM_LANDMARKS, n_cols):
        raise ProtocolError(
            f"{what} landmarks must have shape [n, {NUM_LANDMARKS}, {n_cols}], got {arr.shape}"
        )
    if n_expected is not None and arr.shape[0] != n_expected:
        raise ProtocolError(f"{arr.shape[0]} {what} poses for {n_expected} image poses")
    if arr.shape[0] > max_poses:
        raise ProtocolError(f"{arr.shape[0]} poses in one frame, at most {max_poses}")
    if arr.dtype.kind not in "fiu":
        raise ProtocolError(f"{what} landmarks must be numbers, not {arr.dtype}")
    return arr.astype(np.float64)


def _check_values(
    a: FloatArray, lo: FloatArray, hi: FloatArray, names: tuple[str, ...], what: str
) -> None:
    bad = ~((a >= lo) & (a <= hi))  # also catches NaN
    if bad.any():
        p, j, c = (int(i) for i in np.argwhere(bad)[0])
        v = float(a[p, j, c])
        why = "not finite" if not math.isfinite(v) else f"outside [{lo[c]:g}, {hi[c]:g}]"
        raise ProtocolError(
            f"pose {p} landmark {j} ({LANDMARK_NAMES[j]}) {what} {names[c]} = {v!r} is {why}"
        )


_IMG_LO = np.array([XY_RANGE[0], XY_RANGE[0], Z_RANGE[0], VISIBILITY_RANGE[0]])
_IMG_HI = np.array([XY_RANGE[1], XY_RANGE[1], Z_RANGE[1], VISIBILITY_RANGE[1]])
_W_LO = np.full(3, WORLD_RANGE_M[0])
_W_HI = np.full(3, WORLD_RANGE_M[1])


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Decoded:
    """A successfully decoded packet."""

    frame: PoseFrame
    """The decoded poses (every value within the stream's precision of the original)."""
    header: PacketHeader
    """The packet header, with ``capture_ts_ns`` filled in."""


@dataclass(frozen=True, slots=True)
class NeedKeyframe:
    """The packet predicts from a frame this decoder does not have: nothing was decoded.

    The receiver should ask the publisher for a keyframe (see :meth:`Decoder.ack_for`).
    """

    stream_id: int
    """Publisher stream of the packet."""
    seq: int
    """Sequence number of the packet that could not be decoded."""
    missing_ref: int
    """The reference frame the decoder lacks."""


@dataclass(frozen=True, slots=True)
class Feedback:
    """What a receiver sends back on the reliable channel after a decode.

    :meth:`Decoder.ack_for` makes it; :meth:`Encoder.on_feedback` consumes it.
    """

    stream_id: int
    """The publisher stream this is about."""
    ack_seq: int | None = None
    """A frame the receiver decoded (the publisher may predict from it), or ``None``."""
    keyframe_request: bool = False
    """The receiver cannot decode the stream and needs a keyframe (or a refresh)."""


# --------------------------------------------------------------------------- encoder


@dataclass
class EncoderStats:
    """Counters of an :class:`Encoder`."""

    packets: int = 0
    """Packets produced."""
    keyframes: int = 0
    """Keyframes among them."""
    refreshes: int = 0
    """Delta packets that predict from an acknowledged frame after a loss."""
    bytes: int = 0
    """Total bytes produced."""
    world_dropped: int = 0
    """Frames whose world landmarks were left out so the packet fits."""


class Encoder:
    """Encodes the :class:`PoseFrame` s of one publisher stream into packets.

    Each packet predicts from the previous packet (or is a keyframe). A keyframe is
    sent for the first frame, every ``keyframe_interval`` frames, after
    :meth:`request_keyframe`, and when the sequence number does not increase.
    :meth:`on_ack` records frames the receiver decoded; after :meth:`request_refresh`
    the next packet predicts from the newest of them instead (cheaper than a keyframe).
    Packets never reference a frame older than the newest keyframe, so the newest
    keyframe and the packets after it always suffice to decode (late joiners).
    """

    def __init__(self, config: CodecConfig, stream_id: int, *, epoch: int | None = None) -> None:
        if not 0 <= stream_id <= MAX_STREAM_ID:
            raise ProtocolError(f"stream id {stream_id} out of range 0..{MAX_STREAM_ID}")
        self.config = config
        self.stream_id = stream_id
        self.epoch = (secrets.randbelow(4) if epoch is None else epoch) & _EPOCH_MASK
        self.stats = EncoderStats()
        self._quant = _Quant.from_config(config)
        self._scale = self._quant.image_scale()
        self._history: dict[int, _Entry] = {}
        self._order: list[int] = []
        self._prev: _Entry | None = None
        self._since_key = 0
        self._force_key = False
        self._refresh = False
        self._acked: int | None = None

    # -- feedback

    def on_ack(self, seq: int) -> None:
        """The receiver decoded ``seq``: it may serve as a reference after a loss."""
        if seq in self._history and (self._acked is None or seq > self._acked):
            self._acked = seq

    def request_keyframe(self) -> None:
        """Make the next packet a keyframe."""
        self._force_key = True

    def request_refresh(self) -> None:
        """The receiver lost the chain: the next packet predicts from the newest
        acknowledged frame it still holds, or is a keyframe when there is none."""
        self._refresh = True

    def on_feedback(self, fb: Feedback) -> None:
        """Apply a receiver's :class:`Feedback` (ack and/or refresh request)."""
        if fb.stream_id != self.stream_id:
            return
        if fb.ack_seq is not None:
            self.on_ack(fb.ack_seq)
        if fb.keyframe_request:
            self.request_refresh()

    # -- encoding

    def _quantize(self, frame: PoseFrame) -> tuple[FloatArray, FloatArray | None]:
        cfg = self.config
        img = _check_block(frame.image, 4, "image", cfg.max_poses, None)
        _check_values(img, _IMG_LO, _IMG_HI, _COMPONENT_NAMES, "")
        q_img = np.rint(img * self._scale)
        q_world = None
        if cfg.world and frame.world is not None:
            w = _check_block(frame.world, 3, "world", cfg.max_poses, img.shape[0])
            _check_values(w, _W_LO, _W_HI, ("x", "y", "z"), "world")
            q_world = np.rint(w * self._quant.n_world)
        return q_img, q_world

    def _choose_ref(self, seq: int, keyframe: bool) -> _Entry | None:
        prev = self._prev
        interval = self.config.keyframe_interval
        if (
            keyframe
            or self._force_key
            or prev is None
            or seq <= prev.seq
            or seq - prev.key_seq > MAX_REF_DELTA
            or (interval > 0 and self._since_key + 1 >= interval)
        ):
            return None
        if not self._refresh:
            return prev
        acked = self._acked
        if acked is None or acked not in self._history:
            return None
        ref = self._history[acked]
        if ref.key_seq != prev.key_seq or ref.epoch != self.epoch:
            return None
        return ref

    def encode(self, frame: PoseFrame, *, keyframe: bool = False) -> bytes:
        """Encode one frame; raises :class:`ProtocolError` (state unchanged) for a frame
        that cannot be encoded (NaN, infinities, wrong shapes, out-of-range values,
        too many poses, a packet that would not fit, bad seq or timestamp)."""
        seq = frame.seq
        ts = frame.capture_ts_ns
        if not isinstance(seq, int | np.integer) or not 0 <= seq <= MAX_SEQ:
            raise ProtocolError(f"sequence number {seq!r} not an integer in 0..{MAX_SEQ}")
        if not isinstance(ts, int | np.integer) or not -(2**63) <= ts < 2**63:
            raise ProtocolError(f"capture timestamp {ts!r} not an int64")
        seq = int(seq)
        ts = int(ts)
        q_img, q_world = self._quantize(frame)
        ref = self._choose_ref(seq, keyframe)
        try:
            packet = self._build(seq, ts, q_img, q_world, ref)
        except PacketTooLargeError:
            if q_world is None:
                raise
            q_world = None
            packet = self._build(seq, ts, q_img, q_world, ref)
            self.stats.world_dropped += 1
        # commit the new state
        if ref is None:
            entry = _Entry(seq, ts, self.epoch, self._quant, (q_img,), (q_world,), seq)
            self._since_key = 0
            self._force_key = False
            self.stats.keyframes += 1
            # a keyframe starts a new chain: older frames are never referenced again
            self._history.clear()
            self._order.clear()
            self._acked = None
        else:
            entry = _Entry(
                seq,
                ts,
                self.epoch,
                self._quant,
                (q_img, *ref.img[: PREDICTOR_DEPTH - 1]),
                (q_world, *ref.world[: PREDICTOR_DEPTH - 1]),
                ref.key_seq,
            )
            self._since_key += 1
            if ref is not self._prev:
                self.stats.refreshes += 1
        self._refresh = False
        self._history[seq] = entry
        self._order.append(seq)
        # keep only frames the decoder is sure to still hold (it keeps HISTORY frames)
        while len(self._order) > HISTORY // 2:
            old = self._order.pop(0)
            self._history.pop(old, None)
            if self._acked == old:
                self._acked = None
        self._prev = entry
        self.stats.packets += 1
        self.stats.bytes += len(packet)
        return packet

    def _build(
        self,
        seq: int,
        ts: int,
        q_img: FloatArray,
        q_world: FloatArray | None,
        ref: _Entry | None,
    ) -> bytes:
        rows = _residual_rows(q_img, q_world, self._quant, ref)
        payload = _rice_encode(rows)
        if ref is None:
            payload = self._quant.to_bytes() + payload
        out = bytearray()
        _write_header(
            out,
            stream_id=self.stream_id,
            seq=seq,
            keyframe=ref is None,
            has_world=q_world is not None,
            num_poses=q_img.shape[0],
            capture_ts_ns=ts,
            ref_seq=None if ref is None else ref.seq,
            ref_ts_ns=None if ref is None else ref.ts,
            payload_len=len(payload),
            epoch=self.epoch,
        )
        out += payload
        if len(out) + CHECKSUM_BYTES >= MAX_PACKET_BYTES:
            raise PacketTooLargeError(
                f"frame {seq} with {q_img.shape[0]} poses"
                f"{' and world landmarks' if q_world is not None else ''} needs "
                f"{len(out) + CHECKSUM_BYTES} bytes, packets must stay under {MAX_PACKET_BYTES}"
            )
        return _finish_packet(out)


# --------------------------------------------------------------------------- decoder


class _Stream:
    __slots__ = ("entries", "epoch", "failures", "max_seq", "requested_at")

    def __init__(self, epoch: int) -> None:
        self.entries: dict[int, _Entry] = {}
        self.epoch = epoch
        self.max_seq = -1
        self.requested_at: int | None = None
        self.failures = 0


@dataclass
class DecoderStats:
    """Counters of a :class:`Decoder`."""

    decoded: int = 0
    """Packets decoded."""
    need_keyframe: int = 0
    """Packets that could not be decoded for lack of their reference."""
    errors: int = 0
    """Packets refused with :class:`ProtocolError`."""


class Decoder:
    """Decodes packets of any number of publisher streams.

    Keeps per stream the last :data:`HISTORY` decoded frames (the possible
    references) and at most ``max_streams`` streams (least recently used go), so
    its memory is bounded whatever it is fed. :meth:`decode` raises nothing but
    :class:`ProtocolError`.
    """

    REREQUEST_AFTER = 8
    """Undecodable packets after which a keyframe request is repeated."""

    def __init__(self, config: CodecConfig | None = None, *, max_streams: int = 256) -> None:
        self.config = config if config is not None else CodecConfig()
        self.max_streams = max_streams
        self.stats = DecoderStats()
        self._streams: OrderedDict[int, _Stream] = OrderedDict()

    def decode(self, packet: bytes | bytearray | memoryview) -> Decoded | NeedKeyframe:
        """Decode one packet: :class:`Decoded`, or :class:`NeedKeyframe` when its
        reference is missing. Raises :class:`ProtocolError` (only) for bad bytes."""
        try:
            return self._decode(packet)
        except ProtocolError:
            self.stats.errors += 1
            raise
        except (ValueError, IndexError, OverflowError, TypeError, MemoryError) as exc:
            # Defence in depth: every malformed input is meant to be caught above.
            self.stats.errors += 1
            raise ProtocolError(f"malformed packet: {exc}") from exc

    def _decode(self, packet: bytes | bytearray | memoryview) -> Decoded | NeedKeyframe:
        h = peek_header(packet)
        buf = packet if isinstance(packet, bytes) else bytes(packet)
        n = h.num_poses
        if n > self.config.max_poses:
            raise ProtocolError(
                f"{n} poses in a packet, this decoder accepts {self.config.max_poses}"
            )
        st = self._streams.get(h.stream_id)
        pos = h.header_len
        end = pos + h.payload_len
        ref: _Entry | None
        if h.keyframe:
            quant, pos = _Quant.parse(buf, pos, end)
            ref = None
            ts = h.capture_ts_ns
            assert ts is not None
            key_seq = h.seq
        else:
            assert h.ref_seq is not None and h.capture_ts_delta_ns is not None
            ref = st.entries.get(h.ref_seq) if st is not None else None
            if ref is None or ref.epoch != h.epoch:
                self.stats.need_keyframe += 1
                if st is not None:
                    st.failures += 1
                return NeedKeyframe(h.stream_id, h.seq, h.ref_seq)
            quant = ref.quant
            ts = ref.ts + h.capture_ts_delta_ns
            if not -(2**63) <= ts < 2**63:
                raise ProtocolError("capture timestamp out of range")
            key_seq = ref.key_seq
        per_pose = 7 if h.has_world else 4
        rows = _rice_decode(buf[pos:end], n * per_pose)
        q_img, q_world = _reconstruct(rows, n, h.has_world, quant, ref)
        lo, hi = quant.image_bounds()
        if n and not ((q_img >= lo) & (q_img <= hi)).all():
            raise ProtocolError("decoded image landmarks out of range: corrupt payload")
        if q_world is not None and n:
            wlo, whi = quant.world_bounds()
            if not ((q_world >= wlo) & (q_world <= whi)).all():
                raise ProtocolError("decoded world landmarks out of range: corrupt payload")
        # the packet is good: update the stream state
        if st is None:
            st = _Stream(h.epoch)
            self._streams[h.stream_id] = st
            while len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
        else:
            self._streams.move_to_end(h.stream_id)
        if h.keyframe:
            if h.epoch != st.epoch:
                st.entries.clear()  # another encoder instance: forget the old frames
                st.epoch = h.epoch
            elif h.seq <= st.max_seq:
                # a restarted publisher (or a late keyframe): frames after it may be stale
                for s in [s for s in st.entries if s >= h.seq]:
                    del st.entries[s]
                st.max_seq = h.seq
            entry = _Entry(h.seq, ts, h.epoch, quant, (q_img,), (q_world,), key_seq)
        else:
            assert ref is not None
            entry = _Entry(
                h.seq,
                ts,
                h.epoch,
                quant,
                (q_img, *ref.img[: PREDICTOR_DEPTH - 1]),
                (q_world, *ref.world[: PREDICTOR_DEPTH - 1]),
                key_seq,
            )
        st.entries.pop(h.seq, None)
        st.entries[h.seq] = entry
        while len(st.entries) > HISTORY:
            del st.entries[next(iter(st.entries))]
        st.max_seq = max(st.max_seq, h.seq)
        st.failures = 0
        st.requested_at = None
        image = (q_img / quant.image_scale()).astype(np.float32)
        world = None if q_world is None else (q_world / quant.n_world).astype(np.float32)
        frame = PoseFrame(h.seq, ts, image, world)
        self.stats.decoded += 1
        return Decoded(frame, replace(h, capture_ts_ns=ts))

    def ack_for(self, result: Decoded | NeedKeyframe) -> Feedback:
        """The :class:`Feedback` to send back for a decode result.

        A decoded frame is acknowledged (the publisher may predict from it after a
        loss). An undecodable packet asks for a keyframe/refresh, once per loss, and
        again after :attr:`REREQUEST_AFTER` further undecodable packets (in case the
        answer was lost too).
        """
        if isinstance(result, Decoded):
            return Feedback(result.header.stream_id, ack_seq=result.header.seq)
        st = self._streams.get(result.stream_id)
        if st is None:
            return Feedback(result.stream_id, keyframe_request=True)
        if st.requested_at is None or st.failures - st.requested_at >= self.REREQUEST_AFTER:
            st.requested_at = st.failures
            return Feedback(result.stream_id, keyframe_request=True)
        return Feedback(result.stream_id)

    def forget(self, stream_id: int) -> None:
        """Drop a stream's state (its publisher left)."""
        self._streams.pop(stream_id, None)

    @property
    def streams(self) -> list[int]:
        """Stream ids with state in this decoder."""
        return list(self._streams)
