"""The reusable receiving member: join a room, decode every publisher, measure.

:class:`Receiver` joins a room over
:class:`~pipeline.transports.websocket.WebSocketTransport`, decodes every
publisher stream with its own :class:`~pipeline.codec.Decoder`, asks
for a keyframe when a packet cannot be decoded, and keeps per stream the
frames received, decoded and lost and the latency from capture to decode.
The ``receive`` command, tests and benchmarks use it.

Live and backfill are told apart. A member that joins a room with history
first receives, per stream, a ``backfill`` announcement and the stored
packets it names (the latest keyframe and the packets after it, up to the
server's history: they may be close to a second old); only the packets after
them are live. The report keeps the two apart: ``latency_ms`` is the live
latency, ``backfill`` the count and the age (capture to decode) of the stored
packets. A gap in the sequence numbers between two live packets is ``lost``;
the gap between what came before a (re)join and the first live packet after
it (packets the server withheld because the receiver could not yet decode
them) is ``join_gap``, not a loss. The codec kernels are loaded before
joining, so the first decode does not pay for them either.

Latency across hosts: the transport estimates this host's clock offset to the
server (minimum-RTT ping sample) before the first packet is counted, and
every publisher reports its own offset to the server (``clock_offset_ns`` in
its member record); the latency is ``(decode time + our offset) - (capture
time + publisher offset)``, both sides on the server's clock.

What other members say is not trusted: a member record the shared validator
(:func:`pipeline.wire.messages.member_record`) refuses, e.g. a
``clock_offset_ns`` beyond a day (a publisher may send anything, 10**400) is counted in
``bad_member_records`` and its frames are reported uncorrected
(``clock_corrected`` false), never used in arithmetic; messages that are not
bounded JSON are dropped by the transport (``bad_messages``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.codec import Decoded, peek_header, warm_kernels
from pipeline.codec.audio import is_audio
from pipeline.codec.holding import HoldingDecoder
from pipeline.config import IceServer, RtcConfig
from pipeline.errors import ProtocolError, RefusedError, TransportError
from pipeline.model.pose import PoseFrame
from pipeline.model.stats import percentiles
from pipeline.transports.base import Control, MemberTransport, Packet, StateChange
from pipeline.transports.webrtc import WebRtcTransport
from pipeline.transports.websocket import WebSocketTransport
from pipeline.wire import messages
from pipeline.wire.messages import Backfill

if TYPE_CHECKING:
    from pipeline.audio.player import AudioPlayer

log = logging.getLogger("posewire.receiver")

#: a request naming a missing reference at most this often per stream (the repair on
#: the lossy channel may be lost too: the next packet that waits asks again)
NACK_INTERVAL_S = 0.05
#: what ``--transport`` may name: auto is WebRTC when the server takes offers and this
#: host can reach it (not on loopback), else the WebSocket (saying why)
TRANSPORT_CHOICES = ("auto", "webrtc", "websocket")
#: latency samples kept per stream for the report (8 bytes each: 8 MB at the cap, ~9 h at 30 fps)
MAX_LATENCY_SAMPLES = 1_000_000

_warmed = False


def warm() -> None:
    """Load the codec kernels once per process (the first decode must not pay for them)."""
    global _warmed
    if not _warmed:
        warm_kernels()
        _warmed = True


def clock_offset(record: dict[str, Any]) -> tuple[int | None, bool]:
    """A member record's ``clock_offset_ns``: (value or None, whether the record is bad).

    The record is checked with the shared validator (:func:`pipeline.wire.messages.
    member_record`, the one the server applies): a record it refuses (an offset
    beyond a day, a field of the wrong type) is bad, and its offset is not used.
    Missing or null is not bad (the publisher did not measure yet).
    """
    try:
        messages.member_record(record)
    except RefusedError:
        return None, True
    value = record.get("clock_offset_ns")
    return (value if isinstance(value, int) else None), False


def member_transport(
    kind: str,
    url: str | Sequence[str],
    room: str,
    token: str,
    name: str,
    connect_timeout_s: float,
    *,
    ice_servers: Sequence[IceServer] = (),
    rtc: RtcConfig | None = None,
    ca_file: Path | None = None,
) -> MemberTransport:
    """A subscribing member's transport: ``websocket``, ``webrtc`` (fails where WebRTC
    cannot work) or ``auto`` (WebRTC where it can, else the WebSocket, saying why);
    ``ice_servers`` and ``rtc`` configure the WebRTC side (STUN/TURN, heartbeat);
    ``url`` may be a list (tried in turn), ``ca_file`` verifies https/wss servers."""
    if kind not in TRANSPORT_CHOICES:
        choices = ", ".join(TRANSPORT_CHOICES)
        raise TransportError(f"transport must be one of {choices}, not {kind!r}")
    options: dict[str, Any] = {
        "publish": False,
        "subscribe": True,
        "name": name,
        "connect_timeout_s": connect_timeout_s,
        "ca_file": ca_file,
    }
    if kind == "websocket":
        return WebSocketTransport(url, room, token, **options)
    return WebRtcTransport(
        url, room, token, optional=kind == "auto", ice_servers=ice_servers, rtc=rtc, **options
    )


def latency_summary(values: Sequence[float]) -> dict[str, float | None]:
    """``p50``, ``p95``, ``p99``, ``mean``, ``max`` of ``values`` (None when empty)."""
    if not len(values):
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    p50, p95, p99 = percentiles(values, (50, 95, 99))
    return {
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "mean": sum(values) / len(values),
        "max": max(values),
    }


@dataclass(slots=True)
class ReceivedPose:
    """One decoded frame of one publisher stream."""

    stream_id: int
    member_id: str | None
    frame: PoseFrame
    received_ns: int
    decoded_ns: int
    latency_ms: float
    backfill: bool = False
    """A stored packet the server sent on joining, not a live one."""


@dataclass
class StreamStats:
    """What one publisher stream delivered to this receiver."""

    stream_id: int
    member_id: str | None = None
    subject: str | None = None
    received: int = 0
    """Packets received, backfill included."""
    decoded: int = 0
    """Packets decoded, backfill included."""
    lost: int = 0
    """Sequence numbers never received between two live packets, counted per packet."""
    join_gap: int = 0
    """Sequence numbers skipped at (re)join boundaries (not losses: see the module docstring)."""
    need_keyframe: int = 0
    """Packets that could not be decoded for lack of their reference."""
    bad_packets: int = 0
    keyframe_requests: int = 0
    held: int = 0
    """Packets that arrived before their reference and waited for it (decoded later, or
    counted in ``need_keyframe`` when it did not come in time)."""
    duplicates: int = 0
    """Second copies of decoded packets (a repair that crossed the original), skipped."""
    late: int = 0
    """Packets that arrived after a newer one (counted as lost first, then not)."""
    first_seq: int | None = None
    last_seq: int | None = None
    first_decoded_at: int | None = None
    """1-based index (among this stream's received packets) of the first decoded one."""
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    """Live capture-to-decode latencies (a compact array of doubles, not a list of objects)."""
    backfill: int = 0
    """Backfill packets received (stored history sent on joining)."""
    backfill_ages_ms: array[float] = field(default_factory=lambda: array("d"))
    """Capture-to-decode age of each decoded backfill packet."""
    clock_corrected: bool = True
    """False when the publisher's clock offset was unknown for some frame."""
    bad_member_records: int = 0
    """Times the publisher's member record was refused (e.g. an absurd clock offset)."""
    bad_record: bool = False
    last_keyframe_request: float = -1e9
    bf_remaining: int = 0
    """Packets still to come of the announced backfill."""
    bf_last: int | None = None
    """Sequence number of the last announced backfill packet."""
    join_ref: int | None = None
    """The newest sequence number before the first live packet of this session."""
    live_last: int | None = None
    """The newest live sequence number of this session (None before the first one)."""

    def on_backfill(self, bf: Backfill) -> None:
        self.bf_remaining = bf.count
        self.bf_last = bf.last_seq

    def new_session(self) -> None:
        """A (re)join: the next live packet starts a new sequence run."""
        self.join_ref = self.last_seq
        self.live_last = None
        self.bf_remaining = 0

    def count(self, seq: int, keyframe: bool) -> bool:
        """Account one received packet; True when it is backfill."""
        self.received += 1
        if self.first_seq is None:
            self.first_seq = seq
        if self.last_seq is None or seq > self.last_seq or keyframe:
            self.last_seq = seq
        if self.bf_remaining > 0:
            self.bf_remaining = 0 if seq == self.bf_last else self.bf_remaining - 1
            self.backfill += 1
            self.join_ref = seq
            return True
        if self.live_last is None:
            if self.join_ref is not None and seq > self.join_ref:
                self.join_gap += seq - self.join_ref - 1
            self.live_last = seq
        elif seq > self.live_last:
            self.lost += seq - self.live_last - 1
            self.live_last = seq
        elif keyframe:  # a restarted publisher: a new sequence
            self.live_last = seq
        elif self.lost > 0:  # it was counted lost when a newer one came first
            self.lost -= 1
            self.late += 1
        return False

    def summary(self) -> dict[str, Any]:
        ages = self.backfill_ages_ms
        return {
            "stream_id": self.stream_id,
            "member_id": self.member_id,
            "subject": self.subject,
            "received": self.received,
            "decoded": self.decoded,
            "lost": self.lost,
            "join_gap": self.join_gap,
            "need_keyframe": self.need_keyframe,
            "bad_packets": self.bad_packets,
            "keyframe_requests": self.keyframe_requests,
            "held": self.held,
            "duplicates": self.duplicates,
            "late": self.late,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_decoded_at": self.first_decoded_at,
            "latency_ms": latency_summary(self.latencies_ms),
            "backfill": {
                "count": self.backfill,
                "age_ms": {
                    "min": min(ages) if ages else None,
                    "p50": percentiles(ages, (50,))[0] if ages else None,
                    "max": max(ages) if ages else None,
                },
            },
            "clock_corrected": self.clock_corrected,
            "bad_member_records": self.bad_member_records,
        }


def _text(value: object) -> str | None:
    """A string field of a member record (anything else: None), at most 256 characters."""
    return value[:256] if isinstance(value, str) else None


class Receiver:
    """A decoding member of one room (see the module docstring)."""

    def __init__(
        self,
        url: str | Sequence[str],
        room: str,
        token: str,
        *,
        name: str | None = None,
        connect_timeout_s: float = 3.0,
        keep_poses: bool = False,
        on_pose: Callable[[ReceivedPose], None] | None = None,
        on_state: Callable[[StateChange], None] | None = None,
        transport: MemberTransport | None = None,
        transport_kind: str = "websocket",
        ice_servers: Sequence[IceServer] = (),
        rtc: RtcConfig | None = None,
        ca_file: Path | None = None,
        warm: bool = True,
        on_item: Callable[[Packet | Control | StateChange], None] | None = None,
        keep_events: bool = True,
        audio: Path | bool | None = None,
        audio_sync: bool = True,
    ) -> None:
        self.audio: AudioPlayer | None = None
        """Plays the audio streams when ``audio`` is given (a path: the first one's WAV)."""
        if audio:
            from pipeline.audio.player import AudioPlayer  # libopus: only when asked for

            wav = audio if isinstance(audio, Path) else None
            self.audio = AudioPlayer(wav, self._now_server_ns, sync=audio_sync)
        self.audio_ignored = 0
        """Audio packets received without ``audio`` (skipped)."""
        self.transport_kind = transport_kind
        self.transport = transport or member_transport(
            transport_kind,
            url,
            room,
            token,
            name or "receiver",
            connect_timeout_s,
            ice_servers=ice_servers,
            rtc=rtc,
            ca_file=ca_file,
        )
        self.room = room
        self.keep_poses = keep_poses
        self.on_pose = on_pose
        self.on_state = on_state
        self.on_item = on_item
        """Called with every item before it is handled (``receive --record``)."""
        self.warm = warm
        self.keep_events = keep_events
        """Keep presence, broadcasts and state changes in :attr:`events` (a long-lived
        client that hands them on through ``on_item`` does not)."""
        self.poses: list[ReceivedPose] = []
        self.streams: dict[int, StreamStats] = {}
        self.events: list[Control | StateChange] = []
        self.disconnects = 0
        self._decoders: dict[int, HoldingDecoder[tuple[int, bool]]] = {}
        self._started: float | None = None
        self._ended: float | None = None
        self.error: BaseException | None = None

    async def connect(self) -> None:
        """Load the codec kernels, then join (the first decode must not pay for them)."""
        if self.warm:
            warm()
        await self.transport.connect()
        self.started()

    def started(self) -> None:
        """Start the clock of the report (:meth:`connect` does; the client API, whose
        :class:`~pipeline.transports.sender.Sender` connects the transport, calls it)."""
        self._started = time.monotonic()

    async def close(self) -> None:
        if self._ended is None:
            self._ended = time.monotonic()
        if self.audio is not None:
            await self.audio.close()
        await self.transport.close()

    def _now_server_ns(self) -> int:
        return time.time_ns() + (self.transport.clock_offset_ns or 0)

    def _clock(self, stream_id: int) -> tuple[int, int]:
        """(our clock offset, the stream publisher's) to the server, 0 when unknown."""
        owner = self.transport.stream_owner(stream_id)
        pub = clock_offset(owner)[0] if owner is not None else None
        return self.transport.clock_offset_ns or 0, pub or 0

    def _on_audio(self, data: bytes, received_ns: int) -> None:
        """An audio packet: to the player (a malformed one counted and skipped)."""
        if self.audio is None:
            self.audio_ignored += 1
        elif not self.audio.on_packet(data, self._clock, received_ns):
            self._stream(-1).bad_packets += 1

    async def __aenter__(self) -> Receiver:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(
        self,
        duration_s: float | None = None,
        *,
        until: Callable[[], bool] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Receive until ``duration_s`` passes, ``until()`` is true, or ``stop`` is set.

        Raises the transport's fatal error (token refused, kicked, room closed).
        """
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while True:
            if until is not None and until():
                return
            if stop is not None and stop.is_set():
                return
            timeout = 0.25
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    return
            try:
                async with asyncio.timeout(timeout):
                    item = await self.transport.recv()
            except TimeoutError:
                continue
            await self.handle(item)

    async def handle(self, item: Packet | Control | StateChange) -> None:
        if self.on_item is not None:
            self.on_item(item)
        if isinstance(item, Packet):
            await self._on_packet(item)
        elif isinstance(item, StateChange):
            if self.keep_events:
                self.events.append(item)
            if self.on_state is not None:
                self.on_state(item)
            if not item.connected:
                self.disconnects += 1
            else:
                # a new server (or a new membership) starts every stream again
                for sid, holding in self._decoders.items():
                    self._stream(sid).need_keyframe += holding.held(sid)
                self._decoders.clear()
                for st in self.streams.values():
                    st.new_session()
        elif item.type == "backfill":
            with contextlib.suppress(RefusedError):  # a malformed announcement: all live
                bf = Backfill.parse(dict(item.body))
                self._stream(bf.stream_id).on_backfill(bf)
        elif item.type in ("presence", "broadcast", "kicked", "error") and self.keep_events:
            self.events.append(item)

    async def _on_packet(self, item: Packet) -> None:
        data = item.data
        if is_audio(data):
            self._on_audio(data, item.received_ns)
            return
        try:
            h = peek_header(data)
        except ProtocolError:
            st = self._stream(-1)
            st.bad_packets += 1
            return
        st = self._stream(h.stream_id)
        decoder = self._decoders.get(h.stream_id)
        if decoder is None:
            decoder = self._decoders[h.stream_id] = HoldingDecoder()
        if not h.keyframe and decoder.has(h.stream_id, h.seq):
            st.duplicates += 1  # a repaired packet that crossed its original
            return
        is_backfill = st.count(h.seq, h.keyframe)
        now = time.monotonic()
        try:
            done, missing = decoder.feed(data, (item.received_ns, is_backfill), now)
        except ProtocolError:
            st.bad_packets += 1
            return
        st.need_keyframe += decoder.expire(now)
        if missing is not None:
            st.held += 1
            await self._ask_for(st, h.stream_id, missing.missing_ref, now)
        for res, (received_ns, backfill) in done:
            self._deliver(st, res, received_ns, backfill)

    async def _ask_for(self, st: StreamStats, stream_id: int, ref: int, now: float) -> None:
        """A packet waits for reference ``ref``: ask the server for it (a NACK it answers
        from its history when it has the packet, else with a keyframe; docs/webrtc.md),
        at most every :data:`NACK_INTERVAL_S` per stream."""
        if now - st.last_keyframe_request < NACK_INTERVAL_S:
            return
        st.last_keyframe_request = now
        st.keyframe_requests += 1
        with contextlib.suppress(TransportError):
            await self.transport.request_keyframe(stream_id, ref)

    def _deliver(self, st: StreamStats, res: Decoded, received_ns: int, is_backfill: bool) -> None:
        stream_id = res.header.stream_id
        t_dec = time.time_ns()
        st.decoded += 1
        if st.first_decoded_at is None:
            st.first_decoded_at = st.received
        owner = self.transport.stream_owner(stream_id)
        pub_off: int | None = None
        bad = False
        if owner is not None:
            st.member_id = _text(owner.get("id"))
            st.subject = _text(owner.get("subject"))
            pub_off, bad = clock_offset(owner)
        if bad and not st.bad_record:
            st.bad_member_records += 1
            log.warning(
                "stream %d: member %s sent an invalid clock offset: ignored (latency uncorrected)",
                stream_id,
                st.member_id,
            )
        st.bad_record = bad
        if pub_off is None:
            pub_off = 0
            st.clock_corrected = False
        my_off = self.transport.clock_offset_ns or 0
        capture = res.frame.capture_ts_ns
        latency_ms = ((t_dec + my_off) - (capture + pub_off)) / 1e6
        samples = st.backfill_ages_ms if is_backfill else st.latencies_ms
        if len(samples) < MAX_LATENCY_SAMPLES:
            samples.append(latency_ms)
        pose = ReceivedPose(
            stream_id, st.member_id, res.frame, received_ns, t_dec, latency_ms, is_backfill
        )
        if self.audio is not None and not is_backfill:
            self.audio.on_pose(stream_id, capture + pub_off, t_dec + my_off)
        if self.keep_poses:
            self.poses.append(pose)
        if self.on_pose is not None:
            self.on_pose(pose)

    def _stream(self, stream_id: int) -> StreamStats:
        st = self.streams.get(stream_id)
        if st is None:
            st = self.streams[stream_id] = StreamStats(stream_id)
        return st

    @property
    def decoded(self) -> int:
        return sum(s.decoded for s in self.streams.values())

    def live_latencies(self) -> array[float]:
        """The live capture-to-decode latencies (ms) of every stream."""
        lat = array("d")
        for s in self.streams.values():
            lat.extend(s.latencies_ms)
        return lat

    def report(self) -> dict[str, Any]:
        """The figures of this receiver (see ``docs/room-protocol.md`` for the fields)."""
        lat = self.live_latencies()
        ages = array("d")
        for s in self.streams.values():
            ages.extend(s.backfill_ages_ms)
        end = self._ended if self._ended is not None else time.monotonic()
        stats = self.transport.statistics()
        live = latency_summary(lat)
        return {
            "room": self.room,
            "server": self.transport.url,
            "member_id": self.transport.member_id,
            "duration_s": (end - self._started) if self._started is not None else 0.0,
            "clock_offset_ns": stats.clock_offset_ns,
            "clock_rtt_ms": stats.clock_rtt_ms,
            "reconnects": stats.reconnects,
            "dropped_received": stats.dropped_received,
            "frames_received": sum(s.received for s in self.streams.values()),
            "frames_decoded": self.decoded,
            "frames_live": len(lat),
            "frames_lost": sum(s.lost for s in self.streams.values()),
            "join_gap_frames": sum(s.join_gap for s in self.streams.values()),
            "latency_ms": {"p50": live["p50"], "p95": live["p95"], "p99": live["p99"]},
            "backfill": {
                "count": sum(s.backfill for s in self.streams.values()),
                "age_ms": {
                    "p50": percentiles(ages, (50,))[0] if ages else None,
                    "max": max(ages) if ages else None,
                },
            },
            "publishers": {str(k): s.summary() for k, s in sorted(self.streams.items())},
            "bad_member_records": sum(s.bad_member_records for s in self.streams.values()),
            "bad_messages": stats.bad_messages,
            "audio": self.audio.report() if self.audio is not None else {},
            "audio_ignored": self.audio_ignored,
            "transport": {
                "requested": self.transport_kind,
                "kind": stats.kind,
                "why_not_webrtc": stats.extra.get("webrtc_unavailable"),
                "stats": stats.as_dict(),
            },
        }
