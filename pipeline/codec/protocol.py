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
from pipeline.model.pose import LANDMARK_NAMES, MAX_POSES, NUM_LANDMARKS, PoseFrame

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
"""At most this many poses in one packet (``pipeline.model.pose.MAX_POSES``)."""

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
_L = NUM_LANDMARKS

# The predictor (its coefficients, rigid groups and the intra tree), the Rice coder
# and the reference history are in pipeline/codec/kernels.py, compiled; loaded
# on the first Encoder or Decoder (see _load_kernels).


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


_kernels: Any = None
"""``pipeline.codec.kernels``, once :func:`_load_kernels` ran (importing numba costs
about 0.2 s, which header-only users such as the room server never pay)."""


def _load_kernels() -> Any:
    global _kernels
    if _kernels is None:
        from pipeline.codec import kernels as codec_kernels

        _kernels = codec_kernels
    return _kernels


def warm_kernels() -> None:
    """Compile the codec kernels for every argument type the codec uses (float32 and
    float64 landmarks, with and without world landmarks) and cache the machine code,
    so that no later process pays the compilation (about 3 s; loading the cache takes
    about 0.2 s). ``make install`` runs it."""
    for dtype in (np.float32, np.float64):
        enc = Encoder(CodecConfig(world=True), 0, epoch=0)
        dec = Decoder()
        image: Any = np.full((1, _L, 4), 0.5, dtype)  # float64 too: the encoder takes it
        world: Any = np.zeros((1, _L, 3), dtype)
        for seq in range(3):
            dec.decode(enc.encode(PoseFrame(seq, seq * 33_000_000, image, world)))
            dec.decode(enc.encode(PoseFrame(seq + 10, seq * 33_000_000, image)))


_KPARAMS: dict[_Quant, FloatArray] = {}


def _kernel_params(q: _Quant) -> FloatArray:
    """The kernels' parameter vector for a quantization (``codec_kernels.KP_*``)."""
    kp = _KPARAMS.get(q)
    if kp is None:
        k = _load_kernels()
        per = np.array([q.n_xy, q.n_xy, q.n_z, q.vis_levels - 1], np.float64)
        kp = np.zeros(k.KP_SIZE, np.float64)
        kp[k.KP_SCALE : k.KP_SCALE + 4] = per
        kp[k.KP_INV : k.KP_INV + 4] = 1.0 / per
        kp[k.KP_LO : k.KP_LO + 4] = np.floor(_IMG_LO4 * per)
        kp[k.KP_HI : k.KP_HI + 4] = np.ceil(_IMG_HI4 * per)
        kp[k.KP_ROOT : k.KP_ROOT + 4] = (q.n_xy // 2, q.n_xy // 2, 0, q.vis_levels - 1)
        kp[k.KP_NW] = q.n_world
        kp[k.KP_INVW] = 1.0 / q.n_world
        kp[k.KP_WLO] = math.floor(WORLD_RANGE_M[0] * q.n_world)
        kp[k.KP_WHI] = math.ceil(WORLD_RANGE_M[1] * q.n_world)
        kp.flags.writeable = False
        if len(_KPARAMS) > 64:
            _KPARAMS.clear()
        _KPARAMS[q] = kp
    return kp


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
    hist: npt.NDArray[np.int32]
    """[n, 7, 101]: this frame's quantized values, its references' and its group codes
    (layout in pipeline/codec/kernels.py); encoder and decoder compute the same."""
    world: bool
    """The frame had world landmarks."""
    key_seq: int
    """Sequence number of the keyframe this frame descends from."""
    kp: FloatArray
    """``_kernel_params(quant)``."""


_NO_REF = np.zeros((0, 7, 101), np.int32)
_NO_WORLD = np.zeros((0, _L, 3), np.float64)
_NO_WORLD_SCALE = np.ones(1, np.float64)


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


def _check_values(
    arr: npt.NDArray[Any], lo: FloatArray, hi: FloatArray, names: tuple[str, ...], what: str
) -> None:
    """Raise the error naming the first value of ``arr`` ([n, 33, c]) outside [lo, hi]
    per component (or NaN). The kernels check the same; this finds which value."""
    a = arr.astype(np.float64)
    bad = np.argwhere(~((a >= lo) & (a <= hi)))
    if not bad.size:
        return
    p, j, c = (int(i) for i in bad[0])
    v = float(a[p, j, c])
    why = "not finite" if not math.isfinite(v) else f"outside [{lo[c]:g}, {hi[c]:g}]"
    raise ProtocolError(
        f"pose {p} landmark {j} ({LANDMARK_NAMES[j]}) {what}{names[c]} = {v!r} is {why}"
    )


_IMG_LO4 = np.array([XY_RANGE[0], XY_RANGE[0], Z_RANGE[0], VISIBILITY_RANGE[0]])
_IMG_HI4 = np.array([XY_RANGE[1], XY_RANGE[1], Z_RANGE[1], VISIBILITY_RANGE[1]])
_WORLD_LO3 = np.full(3, WORLD_RANGE_M[0])
_WORLD_HI3 = np.full(3, WORLD_RANGE_M[1])


def _check_image_values(img: npt.NDArray[Any]) -> None:
    _check_values(img, _IMG_LO4, _IMG_HI4, _COMPONENTS, "")


def _check_world_values(w: npt.NDArray[Any]) -> None:
    _check_values(w, _WORLD_LO3, _WORLD_HI3, ("x", "y", "z"), "world ")


_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _kernel_input(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``arr`` as the kernels take it: C-contiguous float32 or float64 (other number
    types become float64, exactly)."""
    if arr.dtype not in _KERNEL_DTYPES:
        return np.ascontiguousarray(arr, np.float64)
    if not arr.flags.c_contiguous:
        return np.ascontiguousarray(arr)
    return arr


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
        _load_kernels()
        self._kp = _kernel_params(self._quant)
        self._w_scale32 = np.array([self._quant.n_world], np.float32)
        self._w_scale64 = np.array([self._quant.n_world], np.float64)
        """World steps per metre in the dtype of the world landmarks: the product is
        rounded in that dtype (as numpy rounds ``float32 array * float``)."""
        self._out = np.zeros(_kernels.max_payload_bytes(config.max_poses), np.uint8)
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

    def _inputs(self, frame: PoseFrame) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
        """The frame's image (and world) landmarks, checked for shape and type."""
        cfg = self.config
        img = _kernel_input(_check_block(frame.image, 4, "image", cfg.max_poses, None))
        if not cfg.world or frame.world is None:
            return img, None
        try:
            w = _check_block(frame.world, 3, "world", cfg.max_poses, img.shape[0])
        except ProtocolError:
            _check_image_values(img)  # a bad image value is reported first
            raise
        return img, _kernel_input(w)

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
        img, world = self._inputs(frame)
        ref = self._choose_ref(seq, keyframe)
        try:
            packet, entry = self._build(seq, ts, img, world, ref)
        except PacketTooLargeError:
            if world is None:
                raise
            packet, entry = self._build(seq, ts, img, None, ref)
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
        img: npt.NDArray[Any],
        world: npt.NDArray[Any] | None,
        ref: _Entry | None,
    ) -> tuple[bytes, _Entry]:
        n = img.shape[0]
        has_world = world is not None
        w: npt.NDArray[Any]
        w_scale: npt.NDArray[Any]
        if world is None:
            w, w_scale = _NO_WORLD, _NO_WORLD_SCALE
        else:
            w = world
            w_scale = self._w_scale32 if world.dtype == np.float32 else self._w_scale64
        status, nbytes, hist = _kernels.encode_payload(
            img,
            w,
            w_scale,
            has_world,
            self._kp,
            _NO_REF if ref is None else ref.hist,
            -1 if ref is None else ref.n,
            ref is not None and ref.world,
            self._out,
        )
        if status:
            if status == _kernels.ST_BAD_IMAGE:
                _check_image_values(img)
            elif status == _kernels.ST_BAD_WORLD and world is not None:
                _check_world_values(world)
            elif status == _kernels.ST_RESIDUAL_TOO_LARGE:
                raise ProtocolError("residual too large to code")
            raise ProtocolError(f"encoder kernel status {status}")  # not reached
        payload = self._out[:nbytes].tobytes()
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
                has_world=has_world,
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
            key = (n, has_world, self.epoch, self.stream_id)
            head = self._heads.get(key)
            if head is None:
                flags = (
                    (n << _POSES_SHIFT)
                    | (FLAG_WORLD if has_world else 0)
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
                f"frame {seq} with {n} poses{' and world landmarks' if has_world else ''}"
                f" needs {len(out) + CHECKSUM_BYTES} bytes; packets must stay under "
                f"{MAX_PACKET_BYTES} (send fewer poses, or no world landmarks)"
            )
        packet = _finish_packet(out)
        key_seq = seq if ref is None else ref.key_seq
        entry = _Entry(
            seq, entry_ts, step_us, self.epoch, self._quant, n, hist, has_world, key_seq, self._kp
        )
        return packet, entry


# --------------------------------------------------------------------------- decoder


def _decode_error(status: int, aux: int) -> str:
    k = _kernels
    messages = {
        k.ST_PAYLOAD_NOT_EMPTY: f"{aux} payload bytes where none are expected",
        k.ST_CODES_TRUNCATED: "payload truncated inside the group codes",
        k.ST_CODE_RANGE: f"group code {aux} out of range",
        k.ST_UNARY_TRUNCATED: "payload truncated inside the unary codes",
        k.ST_REMAINDER_TRUNCATED: "payload truncated inside the remainders",
        k.ST_PADDING: "payload has trailing bytes or non-zero padding",
        k.ST_IMAGE_RANGE: "decoded image landmarks out of range: corrupt payload",
        k.ST_WORLD_RANGE: "decoded world landmarks out of range: corrupt payload",
    }
    return messages.get(status, f"decoder kernel status {status}")


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
        _load_kernels()
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
            kp = _kernel_params(quant)
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
            kp = ref.kp
            gap = seq - ref_seq
            d_us = ts_field + ref.step_us * gap
            ts = ref.ts + d_us * 1000
            if not -(2**63) <= ts < 2**63:
                raise ProtocolError("capture timestamp out of range")
            step_us = d_us // gap
        status, aux, hist, image, world = _kernels.decode_payload(
            buf,
            pos,
            end,
            n,
            has_world,
            kp,
            _NO_REF if ref is None else ref.hist,
            -1 if ref is None else ref.n,
            ref is not None and ref.world,
        )
        if status:
            raise ProtocolError(_decode_error(status, aux))
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
        st.entries.pop(seq, None)
        st.entries[seq] = _Entry(
            seq, ts, step_us, epoch, quant, n, hist, has_world,
            seq if ref is None else ref.key_seq, kp,
        )  # fmt: skip
        while len(st.entries) > HISTORY:
            del st.entries[next(iter(st.entries))]
        if seq > st.max_seq:
            st.max_seq = seq
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
        return Decoded(PoseFrame(seq, ts, image, world if has_world else None), header)

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
