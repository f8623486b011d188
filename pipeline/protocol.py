"""The posewire wire protocol, version 1: packet format and the pose codec.

``docs/protocol.md`` is the full specification (payload bit by bit, predictor
coefficients, loss handling, measurements). The packet:

===========  =================  ==============================================
bytes        field              content
===========  =================  ==============================================
1            magic, version     ``0xB1``: magic nibble ``0xB``, version 1
                                (``0xBF`` + one byte for versions >= 15)
1            flags              bit 0 keyframe, bit 1 world landmarks, bits
                                2-5 number of poses (0..8), bits 6-7 epoch
1-5          stream id          varint (unsigned LEB128), < 2**32
1-9          sequence           varint, ``PoseFrame.seq``, < 2**63
8            capture time       keyframes only: int64 ``time.time_ns()``
1-5          reference          delta packets only: varint ``seq - ref_seq``
1-10         time residual      delta packets only: zigzag varint, us since
                                the reference's capture minus the expected
                                interval (decoded within 0.5 us)
1-2          payload length     varint
n            payload            quantization (keyframes), Rice-coded residuals
4            checksum           CRC32C of all the bytes before it
===========  =================  ==============================================

Every packet is shorter than :data:`MAX_PACKET_BYTES`. A delta packet's header
is 9 to 11 bytes, plus the 4-byte checksum.

Checksum: CRC32C over xxHash. On a 64-byte packet ``google_crc32c.value`` takes
about 100-140 ns, ``xxhash.xxh32_intdigest`` 50-75 ns (``python -m bench codec``
re-measures it): irrelevant next to the codec's microseconds. CRC32C is already a
runtime dependency (xxhash only a test extra), is the SCTP/iSCSI checksum with
hardware support and guaranteed detection of error bursts up to 32 bits, and is
a dozen lines of JavaScript for the viewer.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

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
    """Wall-clock capture time in ns. Always set for keyframes (exact). A delta packet
    codes it relative to its reference (see ``ts_residual_us``), so ``peek_header``
    returns ``None`` there and the decoder fills it in (within 0.5 us)."""
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
    ts_residual_us: int | None = None
    """Delta packets: the coded timestamp field (microseconds since the reference's
    capture minus the expected interval); ``None`` for keyframes."""
    header_len: int = 0
    """Bytes before the payload (the payload starts here)."""
    epoch: int = 0
    """Two-bit id of the encoder instance (flags bits 6-7); a decoder never predicts
    a packet from a frame of another epoch."""

    @property
    def packet_len(self) -> int:
        """Total packet length in bytes (header, payload and checksum)."""
        return self.header_len + self.payload_len + CHECKSUM_BYTES


# The decoder builds a PacketHeader per packet; a frozen dataclass's __init__ goes
# through object.__setattr__ per field, the slots' own setters take half the time.
(_SET_SID, _SET_SEQ, _SET_TS, _SET_REF, _SET_KEY, _SET_WORLD, _SET_N, _SET_PLEN, _SET_VERSION,
 _SET_TSRES, _SET_HLEN, _SET_EPOCH) = (
    getattr(PacketHeader, f.name).__set__ for f in dataclasses.fields(PacketHeader)
)  # fmt: skip


def _packet_header(
    stream_id: int,
    seq: int,
    capture_ts_ns: int | None,
    ref_seq: int | None,
    keyframe: bool,
    has_world: bool,
    num_poses: int,
    payload_len: int,
    version: int,
    ts_residual_us: int | None,
    header_len: int,
    epoch: int,
) -> PacketHeader:
    """``PacketHeader(...)`` with every field given, faster."""
    h: PacketHeader = object.__new__(PacketHeader)
    _SET_SID(h, stream_id)
    _SET_SEQ(h, seq)
    _SET_TS(h, capture_ts_ns)
    _SET_REF(h, ref_seq)
    _SET_KEY(h, keyframe)
    _SET_WORLD(h, has_world)
    _SET_N(h, num_poses)
    _SET_PLEN(h, payload_len)
    _SET_VERSION(h, version)
    _SET_TSRES(h, ts_residual_us)
    _SET_HLEN(h, header_len)
    _SET_EPOCH(h, epoch)
    return h


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
    if pos + 1 < end:  # fast paths: one or two bytes
        byte = buf[pos]
        if byte < 0x80:
            return byte, pos + 1
        b2 = buf[pos + 1]
        if 0 < b2 < 0x80:
            return (byte & 0x7F) | (b2 << 7), pos + 2
    elif pos < end and buf[pos] < 0x80:
        return buf[pos], pos + 1
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

_TS_RESIDUAL_LIMIT = 2**62
"""Bound of the microsecond timestamp residual of a delta packet."""


def _write_header(
    out: bytearray,
    *,
    stream_id: int,
    seq: int,
    keyframe: bool,
    has_world: bool,
    num_poses: int,
    ts_field: int,
    ref_seq: int | None,
    payload_len: int,
    epoch: int = 0,
) -> None:
    """Append a v1 header (everything up to the payload) to ``out``.

    ``ts_field`` is the capture time in ns for a keyframe, the signed microsecond
    residual for a delta packet.
    """
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ProtocolError(f"stream id {stream_id} out of range 0..{MAX_STREAM_ID}")
    if not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(f"sequence number {seq} out of range 0..{MAX_SEQ}")
    if not 0 <= num_poses <= MAX_WIRE_POSES:
        raise ProtocolError(f"{num_poses} poses in one frame, at most {MAX_WIRE_POSES}")
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
        if not -(2**63) <= ts_field < 2**63:
            raise ProtocolError(f"capture timestamp {ts_field} does not fit int64")
        out += _I64.pack(ts_field)
    else:
        if ref_seq is None:
            raise ProtocolError("a delta packet needs a reference")
        delta = seq - ref_seq
        if not 1 <= delta <= MAX_REF_DELTA:
            raise ProtocolError(f"reference {ref_seq} is not 1..{MAX_REF_DELTA} before {seq}")
        _put_varint(out, delta)
        if not -_TS_RESIDUAL_LIMIT < ts_field < _TS_RESIDUAL_LIMIT:
            raise ProtocolError("capture timestamp too far from the reference's")
        _put_varint(out, _zigzag(ts_field))
    _put_varint(out, payload_len)


def _finish_packet(out: bytearray) -> bytes:
    """Append the checksum; check the size bound."""
    body = bytes(out)
    size = len(body) + CHECKSUM_BYTES
    if size >= MAX_PACKET_BYTES:
        raise ProtocolError(
            f"packet of {size} bytes would not be under MAX_PACKET_BYTES={MAX_PACKET_BYTES}"
        )
    return body + _U32.pack(google_crc32c.value(body))


def _as_bytes(packet: object) -> bytes:
    if isinstance(packet, bytes):
        return packet
    if isinstance(packet, bytearray | memoryview):
        try:
            return bytes(packet)
        except (TypeError, ValueError, BufferError) as exc:
            raise ProtocolError(f"packet is not a byte buffer: {exc}") from exc
    raise ProtocolError(f"packet must be bytes, not {type(packet).__name__}")


def _parse_header(
    buf: bytes,
) -> tuple[int, int, int, int, int | None, int, int, int, int, int]:
    """Validate a packet; return (version, flags, stream_id, seq, ref_seq, ts_field,
    payload_start, payload_end, num_poses, epoch)."""
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
    if _U32.unpack_from(buf, end)[0] != google_crc32c.value(buf[:end]):
        raise ProtocolError("checksum mismatch: the packet is corrupt")
    flags = buf[pos]
    pos += 1
    num_poses = (flags >> _POSES_SHIFT) & _POSES_MASK
    if num_poses > MAX_WIRE_POSES:
        raise ProtocolError(f"{num_poses} poses in the flags, at most {MAX_WIRE_POSES}")
    stream_id, pos = _get_varint(buf, pos, end, "stream id")
    if stream_id > MAX_STREAM_ID:
        raise ProtocolError(f"stream id {stream_id} out of range")
    seq, pos = _get_varint(buf, pos, end, "sequence")
    if seq > MAX_SEQ:
        raise ProtocolError(f"sequence number {seq} out of range")
    ref_seq: int | None
    if flags & FLAG_KEYFRAME:
        if pos + 8 > end:
            raise ProtocolError("packet truncated inside the timestamp field")
        ts_field = _I64.unpack_from(buf, pos)[0]
        pos += 8
        ref_seq = None
    else:
        ref_delta, pos = _get_varint(buf, pos, end, "reference")
        if not 1 <= ref_delta <= min(seq, MAX_REF_DELTA):
            raise ProtocolError(f"reference delta {ref_delta} invalid for sequence {seq}")
        ref_seq = seq - ref_delta
        zz, pos = _get_varint(buf, pos, end, "timestamp")
        ts_field = _unzigzag(zz)
        if not -_TS_RESIDUAL_LIMIT < ts_field < _TS_RESIDUAL_LIMIT:
            raise ProtocolError("timestamp residual out of range")
    payload_len, pos = _get_varint(buf, pos, end, "payload length")
    if payload_len != end - pos:
        raise ProtocolError(
            f"payload length field says {payload_len} bytes, the packet holds {end - pos}"
        )
    return (
        version,
        flags,
        stream_id,
        seq,
        ref_seq,
        ts_field,
        pos,
        end,
        num_poses,
        (flags >> _EPOCH_SHIFT) & _EPOCH_MASK,
    )


def peek_header(packet: bytes | bytearray | memoryview) -> PacketHeader:
    """Parse and validate a packet's header without decoding its payload.

    Checks the magic, the version, the flags, every field's range, that the
    payload length matches the packet length exactly, the size bound and the
    CRC32C checksum. Raises :class:`UnsupportedVersionError` for a version
    this build does not speak and :class:`ProtocolError` for anything else
    wrong; never anything else, whatever ``packet`` holds.
    """
    buf = _as_bytes(packet)
    version, flags, sid, seq, ref_seq, ts_field, start, end, n, epoch = _parse_header(buf)
    key = bool(flags & FLAG_KEYFRAME)
    return PacketHeader(
        stream_id=sid,
        seq=seq,
        capture_ts_ns=ts_field if key else None,
        ref_seq=ref_seq,
        keyframe=key,
        has_world=bool(flags & FLAG_WORLD),
        num_poses=n,
        payload_len=end - start,
        version=version,
        ts_residual_us=None if key else ts_field,
        header_len=start,
        epoch=epoch,
    )


# =========================================================================== codec
#
# Everything below is the pose codec: quantization, prediction, entropy coding and
# the stateful Encoder/Decoder pair. docs/protocol.md describes the payload bit by
# bit; the constants here are part of protocol version 1.

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

XY_RANGE = (-1.0, 2.0)
"""Accepted normalised x and y (MediaPipe reports points slightly outside the image)."""
Z_RANGE = (-4.0, 4.0)
"""Accepted z (depth relative to the hips, in the scale of x)."""
VISIBILITY_RANGE = (0.0, 1.0)
"""Accepted visibility."""
WORLD_RANGE_M = (-8.0, 8.0)
"""Accepted world coordinates in metres (origin at the hips)."""

HISTORY = 32
"""Decoded frames a decoder keeps per stream. An encoder predicts from nothing older
than its last ``HISTORY // 2`` packets, so a decoder always still has the reference
unless the packet that made it was lost."""
PREDICTOR_DEPTH = 3
"""Frames a prediction uses: the reference, its reference, and that one's."""
_GUARD = 1.001
"""Quantization steps are this much finer than the precision asks, so that the
float32 rounding of a decoded value never pushes the error over the bound."""
_MAX_STEPS_XY = 1 << 14
_MAX_STEPS_OTHER = 1 << 12
_FIX = 2.0**-16
"""Predictor coefficients are integers in units of 2**-16."""
_MAX_K = 14
_ZERO_GROUP = 15
_MAX_Q_BITS = 6
"""The encoder never writes a unary part of 64 zeros or more."""
_L = NUM_LANDMARKS

# Parent of each landmark in the keyframe (intra) prediction tree; -1 = root.
_PARENT: tuple[int, ...] = (
    -1, 0, 1, 2, 0, 4, 5, 3, 6, 0, 9,  # face: the nose is the root
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

# Inter prediction coefficients in 1/256, per component class and depth d (the number
# of frames: h1 = the reference, h2 = its reference, h3 = that one's):
#   grouped landmark j: pred = h1_j + sum_{i>=2} a_i (h_i,j - h1_j) + sum_{i>=1} b_i (G(h_i) - h1_j)
#   single landmark j:  pred = h1_j + sum_{i>=2} c_i (h_i,j - h1_j)
# with G(h) the mean of j's rigid group. Visibility is predicted as h1. Fitted by
# least squares on the six CMU traces with detector-like noise and validated
# leave-one-clip-out (python -m bench.codec --fit prints the fit).
_COEFS: dict[str, dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = {
    #        d: ((a_2..a_d), (b_1..b_d), (c_2..c_d))
    "xy": {1: ((), (0,), ()), 2: ((88,), (321, -317), (-144,)),
           3: ((74, 23), (282, -204, -75), (33, -113))},
    "z": {1: ((), (115,), ()), 2: ((89,), (94, -19), (113,)),
          3: ((65, 67), (121, 16, -81), (85, 51))},
    "world": {1: ((), (0,), ()), 2: ((76,), (295, -293), (-118,)),
              3: ((71, 7), (250, -185, -63), (30, -101))},
}  # fmt: skip


def _component_predictor(cls: str, depth: int) -> IntArray:
    """Integer matrix P (33 x 33*depth, units 2**-16): pred = floor(P @ [h1; h2; ..] + 1/2)."""
    a_taps, b_taps, c_taps = _COEFS[cls][depth]
    mat = np.zeros((_L, _L * depth), np.int64)
    group_of: dict[int, tuple[int, ...]] = {}
    for rigid in _RIGID_GROUPS:
        for j in rigid:
            group_of[j] = rigid
    for j in range(_L):
        grp = group_of.get(j)
        if grp is None:
            own = [256 - sum(c_taps), *c_taps]
            for i in range(depth):
                mat[j, i * _L + j] += own[i] * 256
            continue
        own = [256 - sum(a_taps) - sum(b_taps), *a_taps]
        m = len(grp)
        for i in range(depth):
            mat[j, i * _L + j] += own[i] * 256
            share = (2 * b_taps[i] * 256 + m) // (2 * m)  # floor(b * 256 / m + 1/2), exact
            for member in grp:
                mat[j, i * _L + member] += share
    return mat


def _block_predictor(classes: tuple[str, ...], depth: int) -> FloatArray:
    """Per-component predictor matrices [C, 33, 33 * depth], times 2**-16, so that
    ``pred[c] = floor(M[c] @ H[c] + 1/2)`` with ``H[c]`` the component's reference
    values (newest frame first, 33 per frame) as a column.

    A batched matrix times a column is faster than a row times the transposed
    matrices, and the order of the sums does not matter: every product and partial
    sum is a multiple of 2**-16 far below 2**53, hence exact."""
    mats = np.zeros((len(classes), _L, _L * depth), np.float64)
    for c, cls in enumerate(classes):
        if cls == "vis":
            mats[c, :, :_L] = np.eye(_L)
        else:
            mats[c] = _component_predictor(cls, depth) * _FIX
    return mats


def _intra_matrices() -> tuple[FloatArray, FloatArray]:
    """(E, A) transposed, per component: residual = q @ E - root, q = residual @ A + root."""
    diff = np.eye(_L)
    anc = np.zeros((_L, _L))
    for j in range(_L):
        if _PARENT[j] >= 0:
            diff[j, _PARENT[j]] = -1.0
        k = j
        while k >= 0:
            anc[j, k] = 1.0
            k = _PARENT[k]
    return np.ascontiguousarray(diff.T), np.ascontiguousarray(anc.T)


_IMG_CLASSES = ("xy", "xy", "z", "vis")
_WLD_CLASSES = ("world", "world", "world")
_PRED_IMG = {d: _block_predictor(_IMG_CLASSES, d) for d in range(1, PREDICTOR_DEPTH + 1)}
_PRED_WLD = {d: _block_predictor(_WLD_CLASSES, d) for d in range(1, PREDICTOR_DEPTH + 1)}


_INTRA = _intra_matrices()


class PacketTooLargeError(ProtocolError):
    """The frame cannot be coded under :data:`MAX_PACKET_BYTES` (the encoder state is unchanged)."""


# --------------------------------------------------------------------------- config


@dataclass
class CodecConfig:
    """Parameters of the pose codec.

    The quantization parameters travel in every keyframe, so a decoder needs no
    configuration to decode any stream; a :class:`Decoder` only uses ``max_poses``.
    """

    precision_px: float = 0.5
    """Maximum absolute error of x and y, in pixels of an image ``reference_width_px``
    wide (normalised error ``precision_px / reference_width_px``; y uses the same
    normalised step). Default 0.5 px at 1920 px, i.e. normalised error <= 2.6e-4."""
    reference_width_px: int = 1920
    """Image width at which ``precision_px`` is measured."""
    keyframe_interval: int = 30
    """A keyframe at least every this many frames (1: every frame; 0: only the first
    frame and on request). Keyframes let late joiners start and bound the damage of a
    loss when no feedback comes back."""
    z_precision: float = 0.01
    """Maximum absolute error of z (normalised, in the scale of x). MediaPipe's z is far
    noisier than x and y (about 0.01 frame to frame, the noise the traces' README
    suggests); quantization with this bound adds std 0.0057 (step/sqrt(12)), i.e. about
    15 % to that noise, and halves z's share of the packet compared with 0.005."""
    visibility_levels: int = 16
    """Number of visibility levels over [0, 1] (2..256). 16 levels: error <= 1/30.
    Viewers threshold visibility (typically at 0.5) or fade with it, and MediaPipe's
    own score jitters by more than that from frame to frame."""
    world: bool = False
    """Send world landmarks (metres) when the frame has them."""
    world_precision_m: float = 0.005
    """Maximum absolute error of world landmarks in metres (MediaPipe's world
    landmarks are accurate to a few centimetres at best)."""
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
    """Quantization as carried in keyframes: steps per unit, visibility levels."""

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
        if not 1 <= self.n_xy <= _MAX_STEPS_XY:
            raise ProtocolError(
                f"x/y quantization of {self.n_xy} steps per unit not in 1..{_MAX_STEPS_XY} "
                "(precision_px too fine or too coarse for reference_width_px)"
            )
        for name, v in (("z", self.n_z), ("world", self.n_world)):
            if not 1 <= v <= _MAX_STEPS_OTHER:
                raise ProtocolError(
                    f"{name} quantization of {v} steps per unit not in 1..{_MAX_STEPS_OTHER}"
                )
        if not 2 <= self.vis_levels <= 256:
            raise ProtocolError(f"{self.vis_levels} visibility levels, must be 2..256")

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


@dataclass(frozen=True, slots=True)
class _QTables:
    """Per-quantization vectors over a flat image block (component-major, 132 values)."""

    scale: FloatArray
    inv_scale4: FloatArray
    root: FloatArray
    """Intra root prediction added to every landmark when reconstructing."""
    root_res: FloatArray
    """The same, at the root landmark only: subtracted when computing intra residuals."""
    lo: FloatArray
    hi: FloatArray
    w_lo: float
    w_hi: float
    scale_n: dict[tuple[int, ...], npt.NDArray[Any]]
    """Caches of full-shape copies of ``scale``, ``lo``, ``hi``, ``inv_scale4`` (see _full)."""
    lo_n: dict[tuple[int, ...], npt.NDArray[Any]]
    hi_n: dict[tuple[int, ...], npt.NDArray[Any]]
    inv_n: dict[tuple[int, ...], npt.NDArray[Any]]
    dec_n: dict[tuple[int, ...], tuple[FloatArray, FloatArray, FloatArray]]
    """Per shape: the full-shape ``lo``, ``hi`` and ``inv_scale4`` the decoder uses."""


def _dec_limits(t: _QTables, shape: tuple[int, ...]) -> tuple[FloatArray, FloatArray, FloatArray]:
    lim = (
        _full(t.lo_n, shape, t.lo, np.float64),
        _full(t.hi_n, shape, t.hi, np.float64),
        _full(t.inv_n, shape, t.inv_scale4[:, None], np.float64),
    )
    if len(t.dec_n) > 256:
        t.dec_n.clear()
    t.dec_n[shape] = lim
    return lim


_QTABLES: dict[_Quant, _QTables] = {}


def _full(
    cache: dict[tuple[int, ...], npt.NDArray[Any]],
    shape: tuple[int, ...],
    fill: npt.ArrayLike,
    dtype: type,
) -> npt.NDArray[Any]:
    """A read-only array of ``shape`` filled by broadcasting ``fill``, cached in ``cache``
    (one cache per fill and dtype): ufuncs on these tiny arrays are about twice as fast
    with operands of equal shapes as with broadcast or scalar operands."""
    a = cache.get(shape)
    if a is None:
        a = np.ascontiguousarray(np.broadcast_to(np.asarray(fill, dtype), shape))
        a.flags.writeable = False
        if len(cache) > 256:
            cache.clear()
        cache[shape] = a
    return a


_HALF: dict[tuple[int, ...], npt.NDArray[Any]] = {}
_I1: dict[tuple[int, ...], npt.NDArray[Any]] = {}
_I63: dict[tuple[int, ...], npt.NDArray[Any]] = {}


def _qtables(q: _Quant) -> _QTables:
    t = _QTABLES.get(q)
    if t is None:
        per = np.array([q.n_xy, q.n_xy, q.n_z, q.vis_levels - 1], np.float64)
        lo4 = np.floor(np.array([XY_RANGE[0], XY_RANGE[0], Z_RANGE[0], 0.0]) * per)
        hi4 = np.ceil(np.array([XY_RANGE[1], XY_RANGE[1], Z_RANGE[1], 1.0]) * per)
        root4 = np.array([q.n_xy // 2, q.n_xy // 2, 0, q.vis_levels - 1], np.float64)
        t = _QTables(
            scale=per[:, None],
            inv_scale4=1.0 / per,
            root=root4[:, None],
            root_res=root4[:, None] * np.eye(_L)[0],
            lo=lo4[:, None],
            hi=hi4[:, None],
            w_lo=math.floor(WORLD_RANGE_M[0] * q.n_world),
            w_hi=math.ceil(WORLD_RANGE_M[1] * q.n_world),
            scale_n={},
            lo_n={},
            hi_n={},
            inv_n={},
            dec_n={},
        )
        if len(_QTABLES) > 64:
            _QTABLES.clear()
        _QTABLES[q] = t
    return t


# --------------------------------------------------------------------------- entropy coding


@dataclass(frozen=True, slots=True)
class _Layout:
    """Everything about a payload's bit section that depends only on its group codes."""

    n_groups: int
    n_vals: int
    """Values in the non-zero groups."""
    nz_idx: IntArray | None
    """Flat indices of those values among all groups (``None``: every group is non-zero)."""
    kv: IntArray
    """Rice parameter of each value."""
    iota: IntArray
    """``0 .. n_vals - 1``."""
    rpos: IntArray
    """For each bit of the remainder section, in order: its position in the unpacked
    bits (``np.unpackbits``, most significant bit of each byte first) of the values as
    little-endian 16-bit words; the k remainder bits of a value are the low k bits of
    its word. (Little-endian words cast without a byte swap on the usual machines.)"""
    rlen: int
    """Bits in the remainder section."""


_LAYOUTS: dict[tuple[int, ...], _Layout] = {}
_U16LE = np.dtype("<u2")


def _layout(codes: tuple[int, ...]) -> _Layout:
    lay = _LAYOUTS.get(codes)
    if lay is not None:
        return lay
    codes_a = np.array(codes, np.int64)
    nz = codes_a != _ZERO_GROUP
    ks = codes_a[nz]
    kv = np.repeat(ks, _L)
    nz_idx = None if nz.all() else np.flatnonzero(np.repeat(nz, _L)).astype(np.int64)
    rlen = int(kv.sum())
    pos_in = np.arange(rlen, dtype=np.int64) - np.repeat(np.cumsum(kv) - kv, kv)
    weight = np.repeat(kv, kv) - 1 - pos_in  # the bit's weight (log2) in its value
    # bit b of a little-endian 16-bit word: byte b // 8, then MSB first inside the byte
    rpos = (
        np.repeat(np.arange(kv.size, dtype=np.int64) * 16, kv)
        + (weight // 8) * 8
        + (7 - weight % 8)
    )
    lay = _Layout(
        n_groups=len(codes),
        n_vals=int(kv.size),
        nz_idx=nz_idx,
        kv=kv,
        iota=np.arange(kv.size, dtype=np.int64),
        rpos=rpos,
        rlen=rlen,
    )
    if len(_LAYOUTS) > 512:
        _LAYOUTS.clear()
    _LAYOUTS[codes] = lay
    return lay


# Prefix code of a group's Rice code c given the same group's code r in the
# reference frame (15 when there is none): "0" c = r, "10" c = r + 1, "110"
# c = r - 1, "111" and 4 bits: c.
_SAME = [0]
_UP = [1, 0]
_DOWN = [1, 1, 0]
_EXPLICIT = [[1, 1, 1, (c >> 3) & 1, (c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(16)]


def _code_bits(codes: tuple[int, ...], ref_codes: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for c, r in zip(codes, ref_codes, strict=True):
        if c == r:
            out += _SAME
        elif c == r + 1:
            out += _UP
        elif c == r - 1:
            out += _DOWN
        else:
            out += _EXPLICIT[c]
    return out


_PREFIXES: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[npt.NDArray[np.uint8], _Layout]] = {}


def _prefix_bits(
    codes: tuple[int, ...], ref_codes: tuple[int, ...]
) -> tuple[npt.NDArray[np.uint8], _Layout]:
    """The group-code section as an array of bits, and the layout (cached together)."""
    key = (codes, ref_codes)
    hit = _PREFIXES.get(key)
    if hit is None:
        hit = (np.array(_code_bits(codes, ref_codes), np.uint8), _layout(codes))
        if len(_PREFIXES) > 1024:
            _PREFIXES.clear()
        _PREFIXES[key] = hit
    return hit


def _read_codes(
    data: bytes, pos: int, end: int, ref_codes: tuple[int, ...]
) -> tuple[tuple[int, ...], int]:
    """Parse the group codes at ``data[pos:]``; return them and their length in bits."""
    n_groups = len(ref_codes)
    chunk = data[pos : min(end, pos + (7 * n_groups + 7) // 8)]
    total = 8 * len(chunk)
    v = int.from_bytes(chunk, "big")
    if total >= n_groups and not v >> (total - n_groups):
        return ref_codes, n_groups  # every group keeps its reference's code ("0" each)
    bit = total
    codes = []
    for r in ref_codes:
        if bit < 1:
            raise ProtocolError("payload truncated inside the group codes")
        bit -= 1
        if not (v >> bit) & 1:
            codes.append(r)
            continue
        if bit < 1:
            raise ProtocolError("payload truncated inside the group codes")
        bit -= 1
        if not (v >> bit) & 1:
            c = r + 1
        else:
            if bit < 1:
                raise ProtocolError("payload truncated inside the group codes")
            bit -= 1
            if not (v >> bit) & 1:
                c = r - 1
            else:
                if bit < 4:
                    raise ProtocolError("payload truncated inside the group codes")
                bit -= 4
                c = (v >> bit) & 15
        if not 0 <= c <= _ZERO_GROUP:
            raise ProtocolError(f"group code {c} out of range")
        codes.append(c)
    return tuple(codes), total - bit


_GROUP_STARTS = [np.arange(0, g * _L, _L, dtype=np.int64) for g in range(7 * MAX_POSES + 1)]
"""Index of the first value of each group, for 0 .. 56 groups."""


_K_OF_MEAN = [max(0, m.bit_length() - 1) for m in range(1024)]
"""``max(0, floor(log2(m)))`` for small m."""


def _est(total: int, k: int) -> float:
    """Estimated Rice bits of a group of 33 values summing to ``total`` with parameter k."""
    return total / (1 << k) + _L * (k + 0.5 + 0.5 / (1 << k))


def _rice_encode(u: IntArray, ref_codes: tuple[int, ...]) -> tuple[bytes, tuple[int, ...]]:
    """Code the groups (rows of 33 unsigned values) of ``u``: see docs/protocol.md.

    Layout, as one bit string, MSB first: the group codes (Rice parameter k = 0..14,
    or 15 = every value of the group is zero), each as a prefix code relative to
    ``ref_codes``; then the unary parts (q zeros and a one, q = value >> k) of every
    value of the non-zero groups; then their k-bit remainders; then zero bits to a
    byte boundary. Returns the bytes and the codes.
    """
    if u.shape[0] == 0:
        return b"", ()
    # Rice parameter per group: floor(log2(mean)) (within 0.2 bit per group of the
    # best k on the traces), raised where needed to keep unary parts under 2**6.
    # Keep the reference's k when it is a neighbour costing (by the estimate
    # sum / 2**k + 33 * (k + 1/2 + 2**-k / 2)) at most 1.5 bits more: its code is 1 bit
    # instead of 2 or 3.
    codes_l = []
    flat = u.ravel()
    starts = _GROUP_STARTS[u.shape[0]]  # (reduceat on the flat values: faster than axis=1)
    sums = np.add.reduceat(flat, starts).tolist()
    tops = np.maximum.reduceat(flat, starts).tolist()
    k_of_mean = _K_OF_MEAN
    for total, top, r in zip(sums, tops, ref_codes, strict=True):
        if top == 0:
            codes_l.append(_ZERO_GROUP)
            continue
        kmin = (top >> _MAX_Q_BITS).bit_length()
        mean = total // _L
        k = k_of_mean[mean] if mean < 1024 else mean.bit_length() - 1
        if kmin > k:
            k = kmin
        if k > _MAX_K:
            raise ProtocolError("residual too large to code")
        if (
            (r == k + 1 or r == k - 1)
            and r >= kmin
            and total / (1 << r) + _L * (r + 0.5 + 0.5 / (1 << r))
            <= total / (1 << k) + _L * (k + 0.5 + 0.5 / (1 << k)) + 1.5
        ):  # _est(total, r) <= _est(total, k) + 1.5
            k = r
        codes_l.append(k)
    codes = tuple(codes_l)
    hit = _PREFIXES.get((codes, ref_codes))
    prefix, lay = hit if hit is not None else _prefix_bits(codes, ref_codes)
    n_prefix = prefix.size
    if lay.n_vals == 0:
        return np.packbits(prefix).tobytes(), codes
    vals = u.ravel() if lay.nz_idx is None else u.ravel()[lay.nz_idx]
    # unary section: value i ends with a one at (sum of q_j for j <= i) + i
    ends = np.add.accumulate(vals >> lay.kv)
    ends += lay.iota
    rstart = n_prefix + int(ends[-1]) + 1
    bits = np.zeros(rstart + lay.rlen, np.uint8)
    bits[:n_prefix] = prefix
    bits[n_prefix:][ends] = 1
    if lay.rlen:
        # remainders: the low k bits of each value's 16-bit word
        bits[rstart:] = np.unpackbits(vals.astype(_U16LE).view(np.uint8))[lay.rpos]
    return np.packbits(bits).tobytes(), codes


def _rice_decode(
    data: bytes, pos: int, end: int, ref_codes: tuple[int, ...]
) -> tuple[IntArray, tuple[int, ...]]:
    """Inverse of :func:`_rice_encode` over ``data[pos:end]`` (which it must fill exactly)."""
    n_groups = len(ref_codes)
    if n_groups == 0:
        if end != pos:
            raise ProtocolError(f"{end - pos} payload bytes where none are expected")
        return np.zeros((0, _L), np.int64), ()
    codes, n_prefix = _read_codes(data, pos, end, ref_codes)
    lay = _layout(codes)
    n_bits = 8 * (end - pos)
    n_vals = lay.n_vals
    if n_vals == 0:
        pad = n_bits - n_prefix
        if pad >= 8 or data[end - 1] & ((1 << pad) - 1):
            raise ProtocolError("payload has trailing bytes or non-zero padding")
        return np.zeros((n_groups, _L), np.int64), codes
    bits = np.unpackbits(np.frombuffer(data, np.uint8, end - pos, pos))
    # n_prefix >= 1 (every group code has a bit): mark the bit before the unary
    # section so that the differences of the one positions are the q + 1
    bits[n_prefix - 1] = 1
    ones = bits[n_prefix - 1 :].view(np.bool_).nonzero()[0]  # (bool: a faster nonzero)
    if ones.size <= n_vals:
        raise ProtocolError("payload truncated inside the unary codes")
    last = int(ones[n_vals])
    rstart = n_prefix + last
    used = rstart + lay.rlen
    pad = n_bits - used
    if pad < 0:
        raise ProtocolError("payload truncated inside the remainders")
    if pad >= 8 or data[end - 1] & ((1 << pad) - 1):
        raise ProtocolError("payload has trailing bytes or non-zero padding")
    vals = ones[1 : n_vals + 1] - ones[:n_vals]  # q + 1
    vals -= 1
    vals <<= lay.kv
    if lay.rlen:
        words = np.zeros(16 * n_vals, np.uint8)
        words[lay.rpos] = bits[rstart:used]
        vals += np.packbits(words).view(_U16LE)
    if lay.nz_idx is None:
        out: IntArray = vals.reshape(n_groups, _L)
        return out, codes
    out = np.zeros(n_groups * _L, np.int64)
    out[lay.nz_idx] = vals
    return out.reshape(n_groups, _L), codes


def _ref_codes(ref: _Entry | None, n: int, has_world: bool) -> tuple[int, ...]:
    """The reference frame's group codes aligned with this frame's groups (15 where the
    reference has no such group)."""
    per_pose = 7 if has_world else 4
    if ref is None:
        return (_ZERO_GROUP,) * (n * per_pose)
    rpp = 7 if ref.wstack is not None else 4
    if ref.n == n and rpp == per_pose:
        return ref.codes
    rc = ref.codes
    out: list[int] = []
    for p in range(n):
        if p < ref.n:
            out += rc[p * rpp : p * rpp + 4]
            if has_world:
                out += rc[p * rpp + 4 : p * rpp + 7] if rpp == 7 else [_ZERO_GROUP] * 3
        else:
            out += [_ZERO_GROUP] * per_pose
    return tuple(out)


# --------------------------------------------------------------------------- reference frames


@dataclass(slots=True)
class _Entry:
    """A decoded (or, in the encoder, reconstructed) frame kept as a possible reference."""

    seq: int
    ts: int
    """Capture time in ns as the decoder knows it."""
    step_us: int
    """Expected capture interval per sequence step, in us (0 when unknown)."""
    epoch: int
    quant: _Quant
    n: int
    stack: FloatArray
    """[n, 132 * w]: this frame's quantized image block followed by its references'
    (newest first), each component-major; float64 holding integers."""
    depth: tuple[int, ...]
    """Valid blocks in ``stack`` per pose (1..PREDICTOR_DEPTH)."""
    wstack: FloatArray | None
    """Likewise for world blocks ([n, 99 * w]), ``None`` when this frame had none."""
    wdepth: tuple[int, ...]
    key_seq: int
    """Sequence number of the keyframe this frame descends from."""
    codes: tuple[int, ...]
    """The group codes of this frame's packet (the next packet's code reference)."""
    tables: _QTables
    """``_qtables(quant)``."""


_FULL_DEPTH = [(PREDICTOR_DEPTH,) * n for n in range(MAX_POSES + 1)]
_KEEP = (PREDICTOR_DEPTH - 1) * _L


def _history(
    q: FloatArray, qw: FloatArray | None, n: int, seq: int, ref: _Entry | None
) -> tuple[FloatArray, tuple[int, ...], FloatArray | None, tuple[int, ...], int]:
    """The reference stacks a new frame keeps (image and world) and its keyframe's seq.

    Encoder and decoder run exactly this after each packet, so that both hold
    the same history: a keyframe starts one, a delta frame stacks on its reference.
    """
    if ref is None:
        return q, (1,) * n, qw, ((1,) * n if qw is not None else ()), seq
    depth = ref.depth
    if qw is None and n and depth == _FULL_DEPTH[n]:  # the usual case, as in _stack_on
        return np.concatenate((q, ref.stack[:, :, :_KEEP]), axis=2), depth, None, (), ref.key_seq
    stack, depth = _stack_on(q, ref.stack, depth)
    if qw is None:
        return stack, depth, None, (), ref.key_seq
    wstack, wdepth = _stack_on(qw, ref.wstack, ref.wdepth)
    return stack, depth, wstack, wdepth, ref.key_seq


def _stack_on(
    q: FloatArray, ref_stack: FloatArray | None, ref_depth: tuple[int, ...]
) -> tuple[FloatArray, tuple[int, ...]]:
    """A new frame's reference stack [n, C, 33 * w]: its own block, then its reference's."""
    n = q.shape[0]
    if ref_stack is None or not ref_depth or n == 0:
        return q, (1,) * n
    keep = min(PREDICTOR_DEPTH - 1, max(ref_depth)) * _L
    m = ref_stack.shape[0]
    if m == n:
        stack = np.concatenate((q, ref_stack[:, :, :keep]), axis=2)
        if ref_depth == _FULL_DEPTH[n]:
            return stack, ref_depth
        return stack, tuple(min(PREDICTOR_DEPTH, d + 1) for d in ref_depth)
    stack = np.zeros((n, q.shape[1], _L + keep), np.float64)
    stack[:, :, :_L] = q
    common = min(m, n)
    stack[:common, :, _L:] = ref_stack[:common, :, :keep]
    depth = tuple(min(PREDICTOR_DEPTH, ref_depth[p] + 1) if p < m else 1 for p in range(n))
    return stack, depth


def _predict(
    stack: FloatArray, depth: tuple[int, ...], n: int, mats: dict[int, FloatArray]
) -> tuple[FloatArray, BoolArray | None]:
    """Prediction [n, C, 33] of the first ``n`` poses from a reference stack.

    Also returns a mask of the poses without a reference pose (intra coded), or
    ``None`` when every pose has one.
    """
    m = len(depth)
    d0 = depth[0] if m else 0
    if (m == n and depth == _FULL_DEPTH[n]) or (m >= n and all(d == d0 for d in depth[:n])):
        pred = (mats[d0] @ stack[:n, :, : d0 * _L, None])[:, :, :, 0]
        pred += _full(_HALF, pred.shape, 0.5, np.float64)
        np.floor(pred, out=pred)
        return pred, None
    pred = np.zeros((n, stack.shape[1], _L), np.float64)
    intra = np.ones(n, bool)
    for p in range(min(n, m)):
        d = depth[p]
        pred[p] = np.floor(mats[d] @ stack[p, :, : d * _L, None] + 0.5)[:, :, 0]
        intra[p] = False
    return pred, intra


def _residuals(
    q: FloatArray,
    ref_stack: FloatArray | None,
    ref_depth: tuple[int, ...],
    mats: dict[int, FloatArray],
    root_res: FloatArray | float,
) -> FloatArray:
    """Residuals [n, C, 33] of quantized blocks against their prediction."""
    if ref_stack is None or not ref_depth:
        return q @ _INTRA[0] - root_res
    pred, intra_mask = _predict(ref_stack, ref_depth, q.shape[0], mats)
    r = q - pred
    if intra_mask is not None and intra_mask.any():
        r[intra_mask] = q[intra_mask] @ _INTRA[0] - root_res
    return r


def _reconstruct(
    r: FloatArray,
    ref_stack: FloatArray | None,
    ref_depth: tuple[int, ...],
    mats: dict[int, FloatArray],
    root: FloatArray | float,
) -> FloatArray:
    """Inverse of :func:`_residuals`."""
    if ref_stack is None or not ref_depth:
        return r @ _INTRA[1] + root
    pred, intra_mask = _predict(ref_stack, ref_depth, r.shape[0], mats)
    q = pred + r
    if intra_mask is not None and intra_mask.any():
        q[intra_mask] = r[intra_mask] @ _INTRA[1] + root
    return q


def _zigzag_np(r: FloatArray) -> IntArray:
    ri = r.astype(np.int64)
    zz = ri + ri
    zz ^= ri >> _full(_I63, ri.shape, 63, np.int64)
    return zz


_UNZIGZAG_TABLE_SIZE = 1 << 16
_UNZIGZAG_HALF_TABLE: FloatArray = np.array(
    [_unzigzag(v) + 0.5 for v in range(_UNZIGZAG_TABLE_SIZE)], np.float64
)
"""``_unzigzag(v) + 1/2`` for v = 0 .. 2**16 - 1: one gather instead of five ufuncs."""


def _unzigzag_half_np(u: IntArray) -> FloatArray:
    """Zigzag-decode ``u`` (non-negative) to float64 and add 1/2 (exact): the residual
    plus the rounding term of the prediction, ``q = floor(P + (r + 1/2))``."""
    try:
        out: FloatArray = _UNZIGZAG_HALF_TABLE[u]
        return out
    except IndexError:  # a value of 2**16 or more (no valid stream of the traces has one)
        pass
    one = _full(_I1, u.shape, 1, np.int64)
    r: IntArray = u >> one
    r ^= -(u & one)
    half: FloatArray = r + 0.5
    return half


def _unzigzag_np(u: IntArray) -> FloatArray:
    """Zigzag-decode ``u`` (non-negative) to float64."""
    r: FloatArray = _unzigzag_half_np(u) - 0.5
    return r


# --------------------------------------------------------------------------- validation

_COMPONENTS = ("x", "y", "z", "visibility")
_INT_TYPES = (int, np.integer)


def _check_block(
    arr: object, n_cols: int, what: str, max_poses: int, n_expected: int | None
) -> npt.NDArray[np.floating[npt.NBitBase] | np.integer[npt.NBitBase]]:
    if not isinstance(arr, np.ndarray):
        raise ProtocolError(f"{what} landmarks must be a numpy array, not {type(arr).__name__}")
    if arr.ndim != 3 or arr.shape[1:] != (_L, n_cols):
        raise ProtocolError(
            f"{what} landmarks must have shape [n, {_L}, {n_cols}], got {list(arr.shape)}"
        )
    if n_expected is not None and arr.shape[0] != n_expected:
        raise ProtocolError(f"{arr.shape[0]} {what} poses for {n_expected} image poses")
    if arr.shape[0] > max_poses:
        raise ProtocolError(f"{arr.shape[0]} poses in one frame, at most {max_poses}")
    if arr.dtype.kind not in "fiu":
        raise ProtocolError(f"{what} landmarks must be numbers, not {arr.dtype}")
    return arr


def _value_error(
    a: FloatArray, lo: FloatArray, hi: FloatArray, names: tuple[str, ...], what: str
) -> ProtocolError:
    """The error for the first value of ``a`` ([n, 33, c]) outside [lo, hi] (or NaN)."""
    bad = ~((a >= lo) & (a <= hi))
    p, j, c = (int(i) for i in np.argwhere(bad)[0])
    v = float(a[p, j, c])
    why = "not finite" if not math.isfinite(v) else f"outside [{lo[c]:g}, {hi[c]:g}]"
    return ProtocolError(
        f"pose {p} landmark {j} ({LANDMARK_NAMES[j]}) {what}{names[c]} = {v!r} is {why}"
    )


_IMG_LO4 = np.array([XY_RANGE[0], XY_RANGE[0], Z_RANGE[0], VISIBILITY_RANGE[0]])
_IMG_HI4 = np.array([XY_RANGE[1], XY_RANGE[1], Z_RANGE[1], VISIBILITY_RANGE[1]])
_IMG_LO4_32 = _IMG_LO4.astype(np.float32)  # the bounds are exact in float32
_IMG_HI4_32 = _IMG_HI4.astype(np.float32)
_IMG_LO_32: dict[tuple[int, ...], npt.NDArray[Any]] = {}
_IMG_HI_32: dict[tuple[int, ...], npt.NDArray[Any]] = {}
_IMG_LO_64: dict[tuple[int, ...], npt.NDArray[Any]] = {}
_IMG_HI_64: dict[tuple[int, ...], npt.NDArray[Any]] = {}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Decoded:
    """A successfully decoded packet."""

    frame: PoseFrame
    """The decoded poses (every value within the stream's precision of the original;
    the capture timestamp of a delta packet within 0.5 us)."""
    header: PacketHeader
    """The packet header, with ``capture_ts_ns`` filled in."""


@dataclass(frozen=True, slots=True)
class NeedKeyframe:
    """The packet predicts from a frame this decoder does not have: nothing was decoded.

    The receiver should ask the publisher for a keyframe (:meth:`Decoder.ack_for`
    says when); later packets decode again from the next keyframe or refresh.
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

    :meth:`Decoder.ack_for` makes it; :meth:`Encoder.on_feedback` applies it.
    """

    stream_id: int
    """The publisher stream this is about."""
    ack_seq: int | None = None
    """A frame the receiver decoded (the publisher may predict from it), or ``None``."""
    keyframe_request: bool = False
    """The receiver cannot decode the stream: it needs a keyframe or a refresh."""
    failed_seq: int | None = None
    """With ``keyframe_request``: the packet that could not be decoded (lets the
    encoder ignore a request it already answered)."""


# --------------------------------------------------------------------------- encoder


@dataclass
class EncoderStats:
    """Counters of an :class:`Encoder`."""

    packets: int = 0
    """Packets produced."""
    keyframes: int = 0
    """Keyframes among them."""
    refreshes: int = 0
    """Delta packets predicted from an acknowledged frame after a refresh request."""
    bytes: int = 0
    """Total bytes produced."""
    world_dropped: int = 0
    """Frames whose world landmarks were left out so that the packet fits."""


class Encoder:
    """Encodes the :class:`PoseFrame` s of one publisher stream into packets.

    Each packet predicts from the previous packet, or is a keyframe: for the first
    frame, every ``keyframe_interval`` frames, after :meth:`request_keyframe`, and
    when the sequence number does not increase. :meth:`on_ack` records frames the
    receiver decoded; after :meth:`request_refresh` the next packet predicts from
    the newest of them instead of the previous packet (cheaper than a keyframe).
    No packet references a frame older than the newest keyframe, so the newest
    keyframe and the packets after it always suffice to decode (late joiners).

    A frame whose packet would not fit under :data:`MAX_PACKET_BYTES` is sent
    without its world landmarks (counted in ``stats.world_dropped``); when even
    that does not fit, :meth:`encode` raises :class:`PacketTooLargeError` and
    the encoder state is unchanged.
    """

    def __init__(self, config: CodecConfig, stream_id: int, *, epoch: int | None = None) -> None:
        if not 0 <= stream_id <= MAX_STREAM_ID:
            raise ProtocolError(f"stream id {stream_id} out of range 0..{MAX_STREAM_ID}")
        self.config = config
        self.stream_id = stream_id
        self.epoch = (secrets.randbelow(4) if epoch is None else epoch) & _EPOCH_MASK
        """Two-bit id of this encoder instance, in every packet (random by default)."""
        self.stats = EncoderStats()
        self._quant = _Quant.from_config(config)
        self._t = _qtables(self._quant)
        self._heads: dict[tuple[int, bool, int, int], bytes] = {}
        """Delta packet header starts (magic, flags, stream id) per (pose count, world,
        epoch, stream id)."""
        self._history: dict[int, _Entry] = {}
        self._prev: _Entry | None = None
        self._since_key = 0
        self._force_key = False
        self._refresh = False
        self._acked: int | None = None
        self._recovered_at = -1
        """Sequence number of the last keyframe or refresh packet."""

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
        acknowledged frame the receiver still holds, or is a keyframe when there is
        none."""
        self._refresh = True

    def on_feedback(self, fb: Feedback) -> None:
        """Apply a receiver's :class:`Feedback` (an ack and/or a refresh request)."""
        if fb.stream_id != self.stream_id:
            return
        if fb.ack_seq is not None:
            self.on_ack(fb.ack_seq)
        if fb.keyframe_request and (fb.failed_seq is None or fb.failed_seq > self._recovered_at):
            self.request_refresh()

    # -- encoding

    def _quantize(self, frame: PoseFrame) -> tuple[FloatArray, FloatArray | None]:
        cfg = self.config
        img = _check_block(frame.image, 4, "image", cfg.max_poses, None)
        n = img.shape[0]
        shape = img.shape
        if img.dtype == np.float32:
            lo4 = _full(_IMG_LO_32, shape, _IMG_LO4_32, np.float32)
            hi4 = _full(_IMG_HI_32, shape, _IMG_HI4_32, np.float32)
        else:
            lo4 = _full(_IMG_LO_64, shape, _IMG_LO4, np.float64)
            hi4 = _full(_IMG_HI_64, shape, _IMG_HI4, np.float64)
        if np.count_nonzero((img >= lo4) & (img <= hi4)) != img.size:  # NaN fails both
            raise _value_error(img.astype(np.float64), _IMG_LO4, _IMG_HI4, _COMPONENTS, "")
        q = np.rint(
            img.transpose(0, 2, 1) * _full(self._t.scale_n, (n, 4, _L), self._t.scale, np.float64)
        )
        qw = None
        if cfg.world and frame.world is not None:
            w = _check_block(frame.world, 3, "world", cfg.max_poses, n)
            if np.count_nonzero((w >= WORLD_RANGE_M[0]) & (w <= WORLD_RANGE_M[1])) != w.size:
                lo = np.full(3, WORLD_RANGE_M[0])
                hi = np.full(3, WORLD_RANGE_M[1])
                raise _value_error(w.astype(np.float64), lo, hi, ("x", "y", "z"), "world ")
            qw = np.rint(w.transpose(0, 2, 1) * float(self._quant.n_world))
        return q, qw

    def _choose_ref(self, seq: int, keyframe: bool) -> _Entry | None:
        prev = self._prev
        interval = self.config.keyframe_interval
        if (
            keyframe
            or self._force_key
            or prev is None
            or seq <= prev.seq
            or seq - prev.seq > MAX_REF_DELTA
            or (interval > 0 and self._since_key + 1 >= interval)
        ):
            return None
        if not self._refresh:
            return prev
        acked = self._acked
        ref = self._history.get(acked) if acked is not None else None
        if ref is None or ref.key_seq != prev.key_seq or seq - ref.seq > MAX_REF_DELTA:
            return None
        return ref

    def encode(self, frame: PoseFrame, *, keyframe: bool = False) -> bytes:
        """Encode one frame into one packet (``keyframe=True`` forces a keyframe).

        Raises :class:`ProtocolError`, leaving the encoder state unchanged, for a
        frame that cannot be encoded: NaN or infinite values, wrong shapes or
        dtypes, values outside the documented ranges, too many poses, a sequence
        number or timestamp out of range, or a packet that would not fit.
        """
        seq = frame.seq
        ts = frame.capture_ts_ns
        if not isinstance(seq, _INT_TYPES) or not 0 <= seq <= MAX_SEQ:
            raise ProtocolError(f"sequence number {seq!r} not an integer in 0..{MAX_SEQ}")
        if not isinstance(ts, _INT_TYPES) or not -(2**63) <= ts < 2**63:
            raise ProtocolError(f"capture timestamp {ts!r} not an int64")
        seq = int(seq)
        ts = int(ts)
        q, qw = self._quantize(frame)
        ref = self._choose_ref(seq, keyframe)
        try:
            packet, entry = self._build(seq, ts, q, qw, ref)
        except PacketTooLargeError:
            if qw is None:
                raise
            packet, entry = self._build(seq, ts, q, None, ref)
            self.stats.world_dropped += 1
        # commit the new state
        if ref is None:
            self._since_key = 0
            self._force_key = False
            self.stats.keyframes += 1
            self._history.clear()  # older frames are never referenced again
            self._acked = None
            self._recovered_at = seq
        else:
            self._since_key += 1
            if ref is not self._prev:
                self.stats.refreshes += 1
                self._recovered_at = seq
        self._refresh = False
        self._history[seq] = entry
        # keep only frames the decoder is sure to still hold (it keeps HISTORY frames)
        while len(self._history) > HISTORY // 2:
            old = next(iter(self._history))
            del self._history[old]
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
        q: FloatArray,
        qw: FloatArray | None,
        ref: _Entry | None,
    ) -> tuple[bytes, _Entry]:
        n = q.shape[0]
        t = self._t
        if ref is None:
            r = q @ _INTRA[0] - t.root_res
            rw = None if qw is None else qw @ _INTRA[0]
        else:
            r = _residuals(q, ref.stack, ref.depth, _PRED_IMG, t.root_res)
            rw = None if qw is None else _residuals(qw, ref.wstack, ref.wdepth, _PRED_WLD, 0.0)
        if rw is None:
            groups = r.reshape(n * 4, _L)
        else:
            groups = np.concatenate((r, rw), axis=1).reshape(n * 7, _L)
        payload, codes = _rice_encode(_zigzag_np(groups), _ref_codes(ref, n, qw is not None))
        out = bytearray()
        gap = 0
        if ref is None:
            payload = self._quant.to_bytes() + payload
            ts_field = ts
            entry_ts = ts
            step_us = 0
        else:
            gap = seq - ref.seq
            d_us = (ts - ref.ts + 500) // 1000
            ts_field = d_us - ref.step_us * gap
            entry_ts = ref.ts + d_us * 1000
            step_us = d_us // gap
            if not -(2**63) <= entry_ts < 2**63:
                raise ProtocolError("capture timestamp too far from the reference's")
        if ref is None or not (1 <= gap <= MAX_REF_DELTA and 0 <= n <= MAX_WIRE_POSES):
            _write_header(
                out,
                stream_id=self.stream_id,
                seq=seq,
                keyframe=ref is None,
                has_world=qw is not None,
                num_poses=n,
                ts_field=ts_field,
                ref_seq=None if ref is None else ref.seq,
                payload_len=len(payload),
                epoch=self.epoch,
            )
        else:
            # a delta packet (the common case): what _write_header writes, with the
            # magic, flags and stream id cached (seq was checked by encode(), the
            # reference by _choose_ref)
            if not -_TS_RESIDUAL_LIMIT < ts_field < _TS_RESIDUAL_LIMIT:
                raise ProtocolError("capture timestamp too far from the reference's")
            key = (n, qw is not None, self.epoch, self.stream_id)
            head = self._heads.get(key)
            if head is None:
                flags = (
                    (n << _POSES_SHIFT)
                    | (FLAG_WORLD if qw is not None else 0)
                    | ((self.epoch & _EPOCH_MASK) << _EPOCH_SHIFT)
                )
                h = bytearray(((MAGIC_NIBBLE << 4) | PROTOCOL_VERSION, flags))
                _put_varint(h, self.stream_id)
                head = self._heads[key] = bytes(h)
            out += head
            _put_varint(out, seq)
            _put_varint(out, gap)
            _put_varint(out, (ts_field << 1) if ts_field >= 0 else ((-ts_field << 1) - 1))
            _put_varint(out, len(payload))
        out += payload
        if len(out) + CHECKSUM_BYTES >= MAX_PACKET_BYTES:
            raise PacketTooLargeError(
                f"frame {seq} with {n} poses{' and world landmarks' if qw is not None else ''}"
                f" needs {len(out) + CHECKSUM_BYTES} bytes; packets must stay under "
                f"{MAX_PACKET_BYTES} (send fewer poses, or no world landmarks)"
            )
        packet = _finish_packet(out)
        stack, depth, wstack, wdepth, key_seq = _history(q, qw, n, seq, ref)
        entry = _Entry(
            seq, entry_ts, step_us, self.epoch, self._quant, n, stack, depth, wstack, wdepth,
            key_seq, codes, t,
        )  # fmt: skip
        return packet, entry


# --------------------------------------------------------------------------- decoder


class _Stream:
    __slots__ = ("entries", "epoch", "max_seq")

    def __init__(self, epoch: int) -> None:
        self.entries: dict[int, _Entry] = {}
        self.epoch = epoch
        self.max_seq = -1


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
    references), and at most ``max_streams`` streams (the least recently used
    go), so its memory is bounded whatever it is fed. :meth:`decode` raises
    nothing but :class:`ProtocolError`.
    """

    def __init__(self, config: CodecConfig | None = None, *, max_streams: int = 256) -> None:
        self.config = config if config is not None else CodecConfig()
        self.max_streams = max_streams
        self.stats = DecoderStats()
        self._streams: OrderedDict[int, _Stream] = OrderedDict()

    def decode(self, packet: bytes | bytearray | memoryview) -> Decoded | NeedKeyframe:
        """Decode one packet: :class:`Decoded`, or :class:`NeedKeyframe` when its
        reference is missing. Raises :class:`ProtocolError` (only) for bad bytes."""
        try:
            return self._decode(_as_bytes(packet))
        except ProtocolError:
            self.stats.errors += 1
            raise
        except (ValueError, IndexError, OverflowError, TypeError, MemoryError) as exc:
            # Defence in depth: every malformed input is meant to be refused above.
            self.stats.errors += 1
            raise ProtocolError(f"malformed packet: {exc}") from exc

    def _decode(self, buf: bytes) -> Decoded | NeedKeyframe:
        version, flags, sid, seq, ref_seq, ts_field, pos, end, n, epoch = _parse_header(buf)
        if n > self.config.max_poses:
            raise ProtocolError(
                f"{n} poses in a packet, this decoder accepts {self.config.max_poses}"
            )
        keyframe = bool(flags & FLAG_KEYFRAME)
        has_world = bool(flags & FLAG_WORLD)
        st = self._streams.get(sid)
        ref: _Entry | None
        if keyframe:
            quant, pos = _Quant.parse(buf, pos, end)
            t = _qtables(quant)
            ref = None
            ts = ts_field
            step_us = 0
        else:
            assert ref_seq is not None
            ref = st.entries.get(ref_seq) if st is not None else None
            if ref is None or ref.epoch != epoch:
                self.stats.need_keyframe += 1
                return NeedKeyframe(sid, seq, ref_seq)
            quant = ref.quant
            t = ref.tables
            gap = seq - ref_seq
            d_us = ts_field + ref.step_us * gap
            ts = ref.ts + d_us * 1000
            if not -(2**63) <= ts < 2**63:
                raise ProtocolError("capture timestamp out of range")
            step_us = d_us // gap
        per_pose = 7 if has_world else 4
        u, codes = _rice_decode(buf, pos, end, _ref_codes(ref, n, has_world))
        if (
            ref is not None
            and not has_world
            and n
            and (
                ref.depth == _FULL_DEPTH[n]
                or (len(ref.depth) >= n and all(d == ref.depth[0] for d in ref.depth[:n]))
            )
        ):
            # every pose predicted at one depth: q = floor(P + 1/2) + r = floor(P + (r + 1/2))
            # (exact: every term is a multiple of 2**-16 far below 2**53)
            d0 = ref.depth[0]
            q = (_PRED_IMG[d0] @ ref.stack[:n, :, : d0 * _L, None])[:, :, :, 0]
            q += _unzigzag_half_np(u.reshape(n, per_pose, _L))
            np.floor(q, out=q)
            qw = None
        else:
            r = _unzigzag_np(u.reshape(n, per_pose, _L))
            rw = None
            if has_world:
                rw = r[:, 4:]
                r = r[:, :4]
            if ref is None:
                q = r @ _INTRA[1] + t.root
                qw = None if rw is None else rw @ _INTRA[1]
            else:
                q = _reconstruct(r, ref.stack, ref.depth, _PRED_IMG, t.root)
                qw = (
                    None if rw is None else _reconstruct(rw, ref.wstack, ref.wdepth, _PRED_WLD, 0.0)
                )
        lim = t.dec_n.get(q.shape)
        if lim is None:
            lim = _dec_limits(t, q.shape)
        if n and np.count_nonzero((q >= lim[0]) & (q <= lim[1])) != q.size:
            raise ProtocolError("decoded image landmarks out of range: corrupt payload")
        if qw is not None and n and np.count_nonzero((qw >= t.w_lo) & (qw <= t.w_hi)) != qw.size:
            raise ProtocolError("decoded world landmarks out of range: corrupt payload")
        # the packet is good: update the stream state
        if st is None:
            st = _Stream(epoch)
            self._streams[sid] = st
            while len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
        else:
            self._streams.move_to_end(sid)
        if ref is None:
            if epoch != st.epoch:
                st.entries.clear()  # another encoder instance: forget the old frames
                st.epoch = epoch
            elif seq <= st.max_seq:
                # a restarted publisher (or a late keyframe): frames after it may be stale
                for s in [s for s in st.entries if s >= seq]:
                    del st.entries[s]
                st.max_seq = seq
        stack, depth, wstack, wdepth, key_seq = _history(q, qw, n, seq, ref)
        st.entries.pop(seq, None)
        st.entries[seq] = _Entry(
            seq, ts, step_us, epoch, quant, n, stack, depth, wstack, wdepth, key_seq, codes, t
        )
        while len(st.entries) > HISTORY:
            del st.entries[next(iter(st.entries))]
        if seq > st.max_seq:
            st.max_seq = seq
        # q / n in float64, rounded to float32 (a contiguous product, then one copy)
        image = (q * lim[2]).transpose(0, 2, 1)
        image = image.astype(np.float32, order="C")
        world = None
        if qw is not None:
            world = (qw * (1.0 / quant.n_world)).transpose(0, 2, 1).astype(np.float32, order="C")
        header = _packet_header(
            sid,
            seq,
            ts,
            ref_seq,
            keyframe,
            has_world,
            n,
            end - pos,
            version,
            None if keyframe else ts_field,
            pos,
            epoch,
        )
        self.stats.decoded += 1
        return Decoded(PoseFrame(seq, ts, image, world), header)

    def ack_for(self, result: Decoded | NeedKeyframe) -> Feedback:
        """The :class:`Feedback` to send back (reliably) for a decode result.

        A decoded frame is acknowledged: the publisher may predict from it after a
        loss. An undecodable packet asks for a refresh; the request names the packet,
        and :meth:`Encoder.on_feedback` ignores requests about packets sent before its
        last keyframe or refresh, so a receiver can send one for every undecodable
        packet (and must: the answer may be lost too).
        """
        if isinstance(result, Decoded):
            return Feedback(result.header.stream_id, ack_seq=result.header.seq)
        return Feedback(result.stream_id, keyframe_request=True, failed_seq=result.seq)

    def forget(self, stream_id: int) -> None:
        """Drop a stream's state (its publisher left)."""
        self._streams.pop(stream_id, None)

    @property
    def streams(self) -> list[int]:
        """Stream ids with state in this decoder."""
        return list(self._streams)
