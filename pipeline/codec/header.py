"""Packet framing of the posewire wire protocol, version 1: header, varints, checksum.

``docs/protocol.md`` is the full specification (payload bit by bit, predictor
coefficients, loss handling); ``docs/codec.md`` holds the measurements. The packet:

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

Every packet is shorter than :data:`MAX_PACKET_BYTES`. This module reads and
writes everything but the payload and imports nothing else of the codec, so a
header-only user (the room server relays on :func:`peek_header`) never loads the
pose codec or its compiled kernels.
"""

import dataclasses
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
POSES_SHIFT = 2
POSES_MASK = 0x0F
EPOCH_SHIFT = 6
EPOCH_MASK = 0x03
MAX_WIRE_POSES = 8
"""At most this many poses in one packet (``pipeline.model.pose.MAX_POSES``)."""

MAX_STREAM_ID = 2**32 - 1
MAX_SEQ = 2**63 - 1
MAX_REF_DELTA = 2**32 - 1
CHECKSUM_BYTES = 4
ANCHOR_INTERVAL = 3
"""Anchor-reference mode (``CodecConfig.references == "anchor"``): a delta packet at
least this many sequence numbers after its reference is an *anchor*: later delta
packets predict from it, so it must arrive (it travels reliably, like a keyframe);
every other delta packet of the mode predicts from the latest anchor or keyframe and
may be lost without harm. Part of the protocol: a room server tells an anchor from
its header alone (:meth:`PacketHeader.anchor`); docs/codec.md, "Reference modes"."""
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

    @property
    def anchor(self) -> bool:
        """In an anchor-reference stream, whether this delta packet is an anchor (its
        reference is at least :data:`ANCHOR_INTERVAL` sequence numbers back), which
        later packets predict from. Meaningful only for streams of that mode: in the
        other modes it is merely a long reference gap."""
        return self.ref_seq is not None and self.seq - self.ref_seq >= ANCHOR_INTERVAL


# The decoder builds a PacketHeader per packet; a frozen dataclass's __init__ goes
# through object.__setattr__ per field; the slots' own setters are faster (docs/codec.md).
(_SET_SID, _SET_SEQ, _SET_TS, _SET_REF, _SET_KEY, _SET_WORLD, _SET_N, _SET_PLEN, _SET_VERSION,
 _SET_TSRES, _SET_HLEN, _SET_EPOCH) = (
    getattr(PacketHeader, f.name).__set__ for f in dataclasses.fields(PacketHeader)
)  # fmt: skip


def make_header(
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


def put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def zigzag(value: int) -> int:
    return (value << 1) if value >= 0 else ((-value << 1) - 1)


def unzigzag(value: int) -> int:
    return (value >> 1) if not value & 1 else -((value + 1) >> 1)


def get_varint(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
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

TS_RESIDUAL_LIMIT = 2**62
"""Bound of the microsecond timestamp residual of a delta packet."""


def write_header(
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
        (num_poses << POSES_SHIFT)
        | (FLAG_WORLD if has_world else 0)
        | ((epoch & EPOCH_MASK) << EPOCH_SHIFT)
    )
    if keyframe:
        flags |= FLAG_KEYFRAME
    out.append(flags)
    put_varint(out, stream_id)
    put_varint(out, seq)
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
        put_varint(out, delta)
        if not -TS_RESIDUAL_LIMIT < ts_field < TS_RESIDUAL_LIMIT:
            raise ProtocolError("capture timestamp too far from the reference's")
        put_varint(out, zigzag(ts_field))
    put_varint(out, payload_len)


def delta_prefix(stream_id: int, num_poses: int, has_world: bool, epoch: int) -> bytes:
    """The first bytes of a delta packet (magic and version, flags, stream id): what
    :func:`write_header` writes before the sequence number, for an encoder to cache.
    The caller has checked ``stream_id`` and ``num_poses``."""
    flags = (
        (num_poses << POSES_SHIFT)
        | (FLAG_WORLD if has_world else 0)
        | ((epoch & EPOCH_MASK) << EPOCH_SHIFT)
    )
    out = bytearray(((MAGIC_NIBBLE << 4) | PROTOCOL_VERSION, flags))
    put_varint(out, stream_id)
    return bytes(out)


def finish_packet(out: bytearray) -> bytes:
    """Append the checksum; check the size bound."""
    body = bytes(out)
    size = len(body) + CHECKSUM_BYTES
    if size >= MAX_PACKET_BYTES:
        raise ProtocolError(
            f"packet of {size} bytes would not be under MAX_PACKET_BYTES={MAX_PACKET_BYTES}"
        )
    return body + _U32.pack(google_crc32c.value(body))


def as_bytes(packet: object) -> bytes:
    if isinstance(packet, bytes):
        return packet
    if isinstance(packet, bytearray | memoryview):
        try:
            return bytes(packet)
        except (TypeError, ValueError, BufferError) as exc:
            raise ProtocolError(f"packet is not a byte buffer: {exc}") from exc
    raise ProtocolError(f"packet must be bytes, not {type(packet).__name__}")


def parse_header(
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
    num_poses = (flags >> POSES_SHIFT) & POSES_MASK
    if num_poses > MAX_WIRE_POSES:
        raise ProtocolError(f"{num_poses} poses in the flags, at most {MAX_WIRE_POSES}")
    stream_id, pos = get_varint(buf, pos, end, "stream id")
    if stream_id > MAX_STREAM_ID:
        raise ProtocolError(f"stream id {stream_id} out of range")
    seq, pos = get_varint(buf, pos, end, "sequence")
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
        ref_delta, pos = get_varint(buf, pos, end, "reference")
        if not 1 <= ref_delta <= min(seq, MAX_REF_DELTA):
            raise ProtocolError(f"reference delta {ref_delta} invalid for sequence {seq}")
        ref_seq = seq - ref_delta
        zz, pos = get_varint(buf, pos, end, "timestamp")
        ts_field = unzigzag(zz)
        if not -TS_RESIDUAL_LIMIT < ts_field < TS_RESIDUAL_LIMIT:
            raise ProtocolError("timestamp residual out of range")
    payload_len, pos = get_varint(buf, pos, end, "payload length")
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
        (flags >> EPOCH_SHIFT) & EPOCH_MASK,
    )


def peek_header(packet: bytes | bytearray | memoryview) -> PacketHeader:
    """Parse and validate a packet's header without decoding its payload.

    Checks the magic, the version, the flags, every field's range, that the
    payload length matches the packet length exactly, the size bound and the
    CRC32C checksum. Raises :class:`UnsupportedVersionError` for a version
    this build does not speak and :class:`ProtocolError` for anything else
    wrong; never anything else, whatever ``packet`` holds.
    """
    buf = as_bytes(packet)
    version, flags, sid, seq, ref_seq, ts_field, start, end, n, epoch = parse_header(buf)
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
