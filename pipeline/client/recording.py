"""Recordings: the packets a receiver got, as they came, in one append-only file.

``receive --record FILE`` stores every pose packet (the wire bytes, unchanged)
with its arrival time, and the control events a replay or an export needs
(presence: which member publishes which stream under which name, with its
clock offset; backfill announcements; connection changes). ``replay`` and
``export`` read it back. The format is specified in ``docs/recordings.md``::

    file    = magic "PWREC\\r\\n\\x1a" | u16 version (1) | u32 header length n
              | n bytes header (UTF-8 JSON object) | u32 CRC32C of the header
              | record*
    record  = u32 body length m | i64 arrival ns | u8 kind | u32 stream id
              | m bytes body | u32 CRC32C of the 17 fixed bytes and the body

All integers little-endian. ``kind`` 1 is a pose packet (the stream id is the
packet header's, ``0xFFFFFFFF`` when the header does not parse), 2 an event
(a JSON object with a ``type``; stream id ``0xFFFFFFFF``).

The writer appends one whole record per ``write`` (flushed to the OS at once),
so after a crash the file holds every record but perhaps a partial last one;
the reader ignores a truncated last record, stops at a record whose checksum
does not match (corruption), and says so in :attr:`Recording.problem`, keeping
everything before. A size limit makes the writer refuse (and count) records
that would grow the file past it.

:func:`decode` decodes a recording as the receiver that made it did (one
:class:`~pipeline.codec.Decoder` per stream, all forgotten at a reconnect).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import google_crc32c

from pipeline.codec import Decoded, Decoder, peek_header
from pipeline.codec.quant import Quant
from pipeline.errors import ProtocolError, RecordingError
from pipeline.model.pose import PoseFrame
from pipeline.transports.base import Control, Packet, Received

log = logging.getLogger("posewire.recording")

MAGIC = b"PWREC\r\n\x1a"
VERSION = 1
FORMAT = "posewire-recording"
KIND_PACKET = 1
KIND_EVENT = 2
NO_STREAM = 0xFFFFFFFF
MAX_HEADER_BYTES = 1 << 20
MAX_BODY_BYTES = 1 << 20
"""Longest record body (pose packets are < 1,100 bytes, events a few kB)."""

_PREFIX = struct.Struct("<8sHI")
_RECORD = struct.Struct("<IqBI")
_CRC = struct.Struct("<I")


def _crc(*parts: bytes) -> int:
    c = 0
    for p in parts:
        c = google_crc32c.extend(c, p)
    return int(c)


@dataclass(frozen=True, slots=True)
class Record:
    """One record: a pose packet or an event."""

    kind: int
    arrival_ns: int
    """The receiver's wall clock (``time.time_ns()``) when it arrived."""
    stream_id: int
    data: bytes

    def event(self) -> dict[str, Any]:
        """The event object of a :data:`KIND_EVENT` record."""
        obj = json.loads(self.data)
        return obj if isinstance(obj, dict) else {"type": "?"}


@dataclass
class Recording:
    """A recording read back: its header, its records, and what was wrong at its end."""

    path: Path
    header: dict[str, Any]
    records: list[Record]
    problem: str | None = None
    """Why reading stopped before the end of the file (truncated or corrupt), or None."""

    @property
    def packets(self) -> list[Record]:
        return [r for r in self.records if r.kind == KIND_PACKET]

    @property
    def start_ns(self) -> int:
        """Arrival time of the first record (or the header's creation time)."""
        if self.records:
            return self.records[0].arrival_ns
        return int(self.header.get("created_ns", 0))


# --------------------------------------------------------------------------- writing


class RecordingWriter:
    """Appends records to a new recording file (see the module docstring).

    ``max_bytes``: a record that would make the file larger is refused
    (:attr:`refused` counts them, :attr:`full` says it happened): a recording
    never grows past the limit.
    """

    def __init__(
        self, path: Path, header: Mapping[str, Any], *, max_bytes: int | None = None
    ) -> None:
        body = json.dumps(
            {"format": FORMAT, "version": VERSION, "created_ns": time.time_ns(), **header},
            separators=(",", ":"),
        ).encode()
        if len(body) > MAX_HEADER_BYTES:
            raise RecordingError(f"recording header of {len(body)} bytes is too large")
        prefix = _PREFIX.pack(MAGIC, VERSION, len(body)) + body + _CRC.pack(_crc(body))
        if max_bytes is not None and len(prefix) > max_bytes:
            raise RecordingError(f"the size limit of {max_bytes} bytes is below the header's")
        try:
            self._file: IO[bytes] = path.open("wb")
            self._file.write(prefix)
            self._file.flush()
        except OSError as exc:
            raise RecordingError(f"cannot write the recording {path}: {exc.strerror}") from None
        self.path = path
        self.max_bytes = max_bytes
        self.size = len(prefix)
        self.records = 0
        self.refused = 0

    @property
    def full(self) -> bool:
        return self.refused > 0

    def _write(self, kind: int, arrival_ns: int, stream_id: int, body: bytes) -> bool:
        if len(body) > MAX_BODY_BYTES:
            self.refused += 1
            return False
        fixed = _RECORD.pack(len(body), arrival_ns, kind, stream_id)
        n = len(fixed) + len(body) + _CRC.size
        if self._file.closed or (self.max_bytes is not None and self.size + n > self.max_bytes):
            if not self.refused and not self._file.closed:
                log.warning(
                    "%s reached its size limit of %d bytes: no more records are written",
                    self.path,
                    self.max_bytes,
                )
            self.refused += 1
            return False
        # one write per record, flushed: a crash leaves at most one partial record
        self._file.write(fixed + body + _CRC.pack(_crc(fixed, body)))
        self._file.flush()
        self.size += n
        self.records += 1
        return True

    def packet(self, data: bytes, arrival_ns: int) -> bool:
        """Append a pose packet (its bytes as they came); False when refused."""
        try:
            sid = peek_header(data).stream_id
        except ProtocolError:
            sid = NO_STREAM
        return self._write(KIND_PACKET, arrival_ns, sid, bytes(data))

    def event(self, obj: Mapping[str, Any], arrival_ns: int) -> bool:
        """Append an event (a JSON object with a ``type``); False when refused."""
        body = json.dumps(dict(obj), separators=(",", ":"), default=str).encode()
        return self._write(KIND_EVENT, arrival_ns, NO_STREAM, body)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Recorder:
    """Feeds what a :class:`~pipeline.client.receiver.Receiver` handles into a writer
    (its ``on_item`` hook): packets as they came, control messages and connection
    changes as events, the member list after every (re)connect, the receiver's clock
    offset whenever it changes."""

    def __init__(
        self,
        writer: RecordingWriter,
        *,
        members: Callable[[], list[dict[str, Any]]] = list,
        clock_offset: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.writer = writer
        self.members = members
        self.clock_offset = clock_offset
        self._offset: int | None = None

    def __call__(self, item: Received) -> None:
        w = self.writer
        off = self.clock_offset()
        if off is not None and off != self._offset:
            self._offset = off
            w.event({"type": "clock", "offset_ns": off}, time.time_ns())
        if isinstance(item, Packet):
            w.packet(item.data, item.received_ns)
        elif isinstance(item, Control):
            if item.type not in ("ack", "pong"):
                w.event(dict(item.body), item.received_ns)
        else:
            now = time.time_ns()
            w.event(
                {
                    "type": "state",
                    "connected": item.connected,
                    "code": item.code,
                    "reason": item.reason,
                    "resumed": item.resumed,
                },
                now,
            )
            if item.connected:
                w.event({"type": "members", "members": self.members()}, now)


# --------------------------------------------------------------------------- reading


def read(path: Path) -> Recording:
    """Read a recording; :class:`RecordingError` when it is not one (missing, another
    format, a damaged header). A truncated or corrupt tail keeps what came before it
    (:attr:`Recording.problem` says what was ignored)."""
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        raise RecordingError(f"no such recording: {path}") from None
    except IsADirectoryError:
        raise RecordingError(f"{path} is a directory, not a recording") from None
    except OSError as exc:
        raise RecordingError(f"cannot read {path}: {exc.strerror}") from None
    if len(buf) < _PREFIX.size or buf[:8] != MAGIC:
        raise RecordingError(f"{path} is not a posewire recording (no PWREC signature)")
    _, version, hlen = _PREFIX.unpack_from(buf)
    if version != VERSION:
        raise RecordingError(
            f"{path} is a recording of format version {version}; this build reads {VERSION}"
        )
    pos = _PREFIX.size
    if hlen > MAX_HEADER_BYTES or pos + hlen + _CRC.size > len(buf):
        raise RecordingError(f"{path}: the recording header is truncated")
    body = buf[pos : pos + hlen]
    (crc,) = _CRC.unpack_from(buf, pos + hlen)
    if crc != _crc(body):
        raise RecordingError(f"{path}: the recording header is corrupt (checksum mismatch)")
    try:
        header = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RecordingError(f"{path}: the recording header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RecordingError(f"{path}: the recording header does not name {FORMAT!r}")
    pos += hlen + _CRC.size
    records: list[Record] = []
    problem: str | None = None
    while pos < len(buf):
        start = pos
        if pos + _RECORD.size > len(buf):
            problem = f"truncated last record at byte {start} ignored"
            break
        length, arrival, kind, sid = _RECORD.unpack_from(buf, pos)
        end = pos + _RECORD.size + length
        if length > MAX_BODY_BYTES or kind not in (KIND_PACKET, KIND_EVENT):
            problem = f"corrupt record at byte {start}: it and the {len(buf) - start} bytes after"
            problem += " it ignored"
            break
        if end + _CRC.size > len(buf):
            problem = f"truncated last record at byte {start} ignored"
            break
        fixed = buf[pos : pos + _RECORD.size]
        data = buf[pos + _RECORD.size : end]
        (crc,) = _CRC.unpack_from(buf, end)
        if crc != _crc(fixed, data):
            problem = (
                f"corrupt record at byte {start} (checksum mismatch): it and the "
                f"{len(buf) - start} bytes after it ignored"
            )
            break
        records.append(Record(kind, arrival, sid, data))
        pos = end + _CRC.size
    return Recording(path, header, records, problem)


# --------------------------------------------------------------------------- decoding


@dataclass(slots=True)
class RecordedPose:
    """One decoded frame of a recording."""

    stream_id: int
    arrival_ns: int
    frame: PoseFrame
    keyframe: bool
    quant: Quant | None
    """The quantization of a keyframe (None for delta packets)."""


@dataclass
class StreamInfo:
    """What the recording says about one publisher stream."""

    stream_id: int
    member: dict[str, Any] = field(default_factory=dict)
    """The newest member record that listed the stream (``id``, ``name``, ``subject``,
    ``clock_offset_ns``...)."""
    received: int = 0
    decoded: int = 0
    undecodable: int = 0
    """Packets whose reference was missing or whose bytes were bad."""

    @property
    def name(self) -> str:
        m = self.member
        for key in ("name", "subject", "id"):
            if isinstance(m.get(key), str) and m[key]:
                return str(m[key])
        return f"stream {self.stream_id}"

    @property
    def clock_offset_ns(self) -> int | None:
        v = self.member.get("clock_offset_ns")
        return v if type(v) is int and abs(v) < 86_400 * 10**9 else None


@dataclass
class Decoding:
    """:func:`decode`'s result: the frames in arrival order and per-stream facts."""

    poses: list[RecordedPose]
    streams: dict[int, StreamInfo]
    clock_offset_ns: int | None
    """The receiver's clock offset to the server (server minus receiver), if known."""


def _members(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    ms = obj.get("members")
    return [m for m in ms if isinstance(m, dict)] if isinstance(ms, list) else []


def decode(rec: Recording) -> Decoding:
    """Decode every packet as the recording receiver did (see the module docstring)."""
    streams: dict[int, StreamInfo] = {}
    owners: dict[int, dict[str, Any]] = {}
    offset = rec.header.get("clock_offset_ns")
    my_off = offset if type(offset) is int else None

    def learn(members: list[dict[str, Any]]) -> None:
        for m in members:
            for sid in m.get("streams", ()) if isinstance(m.get("streams"), list) else ():
                if type(sid) is int:
                    owners[sid] = m
                    if sid in streams:
                        streams[sid].member = m

    learn(_members(rec.header))
    decoders: dict[int, Decoder] = {}
    poses: list[RecordedPose] = []
    for r in rec.records:
        if r.kind == KIND_EVENT:
            ev = r.event()
            kind = ev.get("type")
            if kind == "members":
                learn(_members(ev))
            elif kind == "presence" and isinstance(ev.get("member"), dict):
                learn([ev["member"]])
            elif kind == "clock" and type(ev.get("offset_ns")) is int:
                my_off = ev["offset_ns"]
            elif kind == "state" and ev.get("connected"):
                decoders.clear()  # as the receiver: a new membership starts every stream
            continue
        try:
            h = peek_header(r.data)
        except ProtocolError:
            continue
        st = streams.get(h.stream_id)
        if st is None:
            st = streams[h.stream_id] = StreamInfo(h.stream_id, owners.get(h.stream_id, {}))
        st.received += 1
        dec = decoders.get(h.stream_id)
        if dec is None:
            dec = decoders[h.stream_id] = Decoder()
        try:
            res = dec.decode(r.data)
        except ProtocolError:
            st.undecodable += 1
            continue
        if not isinstance(res, Decoded):
            st.undecodable += 1
            continue
        st.decoded += 1
        quant = None
        if h.keyframe:
            quant, _ = Quant.parse(r.data, h.header_len, h.header_len + h.payload_len)
        poses.append(RecordedPose(h.stream_id, r.arrival_ns, res.frame, h.keyframe, quant))
    return Decoding(poses, streams, my_off)
