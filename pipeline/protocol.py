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
                                   number of poses (0..8), bits 6-7 reserved,
                                   must be 0.
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

import struct
from dataclasses import dataclass

import google_crc32c

from pipeline.errors import ProtocolError, UnsupportedVersionError

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
_RESERVED_FLAGS = 0xC0
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
    flags = (num_poses << _POSES_SHIFT) | (FLAG_WORLD if has_world else 0)
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
    if flags & _RESERVED_FLAGS:
        raise ProtocolError(f"reserved flag bits set (flags 0x{flags:02x})")
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
    )
