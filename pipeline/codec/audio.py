"""Audio packets: one Opus frame of one publisher stream, beside its pose packets.

An audio packet travels on the same member connection as the pose packets
(WebSocket binary messages, the lossy ``pose`` data channel over WebRTC) and is
told apart from a pose packet by its first byte: high nibble ``0xA`` (a pose
packet's is ``0xB``). The layout (``docs/protocol.md``, "Audio packets"):

====== ================ ==========================================================
bytes  field            content
====== ================ ==========================================================
1      magic, version   ``0xA1``: audio packet, version 1
1      flags            0 (every bit reserved)
1-5    stream id        varint, the publisher's (pose) stream id, < 2^32
1-9    seq              varint, the audio frame counter, < 2^63
8      capture time     int64 little-endian, ``time.time_ns()`` of the frame's first sample
1-2    duration         varint, samples at 48 kHz, 120..5760 (2.5..120 ms)
1-2    payload length   varint, 1..1275 (Opus's largest packet), equal to what follows
n      payload          one Opus packet (RFC 6716), 48 kHz, mono
4      checksum         CRC32C of every byte before it
====== ================ ==========================================================

:func:`parse_audio` raises nothing but :class:`~pipeline.errors.ProtocolError`
on any input; every packet is shorter than ``MAX_PACKET_BYTES`` (1,100).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import google_crc32c

from pipeline.codec.header import (
    CHECKSUM_BYTES,
    MAX_PACKET_BYTES,
    MAX_SEQ,
    MAX_STREAM_ID,
    as_bytes,
    finish_packet,
    get_varint,
    put_varint,
)
from pipeline.errors import ProtocolError

AUDIO_MAGIC_NIBBLE: Final = 0xA
AUDIO_VERSION: Final = 1
AUDIO_FIRST_BYTE: Final = (AUDIO_MAGIC_NIBBLE << 4) | AUDIO_VERSION
SAMPLE_RATE: Final = 48_000
MIN_DURATION: Final = 120
"""2.5 ms, Opus's shortest frame."""
MAX_DURATION: Final = 5760
"""120 ms, Opus's longest packet."""
MAX_OPUS_BYTES: Final = 1275
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
MIN_AUDIO_BYTES: Final = 1 + 1 + 1 + 1 + 8 + 1 + 1 + 1 + CHECKSUM_BYTES


@dataclass(frozen=True, slots=True)
class AudioPacket:
    """One parsed audio packet."""

    stream_id: int
    seq: int
    capture_ts_ns: int
    """Wall-clock ns of the first sample, on the publisher's clock (as pose packets)."""
    duration: int
    """Samples at 48 kHz (960 for 20 ms)."""
    payload: bytes
    """The Opus packet."""

    @property
    def duration_ns(self) -> int:
        return self.duration * 1_000_000_000 // SAMPLE_RATE


def is_audio(packet: bytes | bytearray | memoryview) -> bool:
    """Whether ``packet`` claims to be an audio packet (its first byte's magic nibble)."""
    return len(packet) > 0 and packet[0] >> 4 == AUDIO_MAGIC_NIBBLE


def pack_audio(
    stream_id: int, seq: int, capture_ts_ns: int, duration: int, payload: bytes
) -> bytes:
    """One audio packet; :class:`ProtocolError` naming the field out of range."""
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ProtocolError(f"audio stream id {stream_id} outside 0..{MAX_STREAM_ID}")
    if not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(f"audio seq {seq} outside 0..{MAX_SEQ}")
    if not -(2**63) <= capture_ts_ns < 2**63:
        raise ProtocolError("audio capture timestamp outside int64")
    if not MIN_DURATION <= duration <= MAX_DURATION:
        raise ProtocolError(f"audio duration {duration} outside {MIN_DURATION}..{MAX_DURATION}")
    if not 1 <= len(payload) <= MAX_OPUS_BYTES:
        raise ProtocolError(f"opus payload of {len(payload)} bytes outside 1..{MAX_OPUS_BYTES}")
    out = bytearray((AUDIO_FIRST_BYTE, 0))
    put_varint(out, stream_id)
    put_varint(out, seq)
    out += _I64.pack(capture_ts_ns)
    put_varint(out, duration)
    put_varint(out, len(payload))
    out += payload
    return finish_packet(out)  # the checksum; ProtocolError past MAX_PACKET_BYTES


def parse_audio(packet: object) -> AudioPacket:
    """Parse and check an audio packet; :class:`ProtocolError` on anything wrong."""
    buf = as_bytes(packet)
    n = len(buf)
    if n < MIN_AUDIO_BYTES:
        raise ProtocolError(f"audio packet of {n} bytes is shorter than {MIN_AUDIO_BYTES}")
    if n >= MAX_PACKET_BYTES:
        raise ProtocolError(f"audio packet of {n} bytes is not under {MAX_PACKET_BYTES}")
    if buf[0] >> 4 != AUDIO_MAGIC_NIBBLE:
        raise ProtocolError(f"not an audio packet (first byte 0x{buf[0]:02X})")
    if buf[0] & 0x0F != AUDIO_VERSION:
        raise ProtocolError(
            f"audio packet has version {buf[0] & 0x0F}, this build supports only "
            f"version {AUDIO_VERSION}"
        )
    end = n - CHECKSUM_BYTES
    if _U32.unpack_from(buf, end)[0] != google_crc32c.value(buf[:end]):
        raise ProtocolError("audio packet checksum mismatch")
    if buf[1] != 0:
        raise ProtocolError(f"audio packet flags 0x{buf[1]:02X}: every bit is reserved")
    stream_id, pos = get_varint(buf, 2, end, "audio stream id")
    if stream_id > MAX_STREAM_ID:
        raise ProtocolError(f"audio stream id {stream_id} above {MAX_STREAM_ID}")
    seq, pos = get_varint(buf, pos, end, "audio seq")
    if seq > MAX_SEQ:
        raise ProtocolError(f"audio seq {seq} above {MAX_SEQ}")
    if pos + 8 > end:
        raise ProtocolError("audio packet truncated inside the capture time field")
    ts = _I64.unpack_from(buf, pos)[0]
    duration, pos = get_varint(buf, pos + 8, end, "audio duration")
    if not MIN_DURATION <= duration <= MAX_DURATION:
        raise ProtocolError(f"audio duration {duration} outside {MIN_DURATION}..{MAX_DURATION}")
    length, pos = get_varint(buf, pos, end, "audio payload length")
    if not 1 <= length <= MAX_OPUS_BYTES:
        raise ProtocolError(f"opus payload length {length} outside 1..{MAX_OPUS_BYTES}")
    if pos + length != end:
        raise ProtocolError(
            f"audio payload length {length} does not match the {end - pos} bytes present"
        )
    return AudioPacket(stream_id, seq, ts, duration, bytes(buf[pos:end]))
