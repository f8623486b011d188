"""``python -m pipeline receive``: join a room, decode every publisher, report latency.

:class:`Receiver` is the reusable part (tests, benchmarks and the monitor use
it): it joins a room over :class:`~pipeline.transports.websocket.WebSocketTransport`,
decodes every publisher stream with its own :class:`~pipeline.codec.Decoder`,
asks for a keyframe when a packet cannot be decoded, and keeps per stream
the frames received, decoded and lost (gaps in the sequence numbers) and the
latency from capture to decode.

Latency across hosts: the transport estimates this host's clock offset to the
server (minimum-RTT ping sample) before the first packet is counted, and
every publisher reports its own offset to the server (``clock_offset_ns`` in
its member record); the latency is ``(decode time + our offset) - (capture
time + publisher offset)``, both sides on the server's clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.codec import Decoded, Decoder, NeedKeyframe, peek_header
from pipeline.errors import ProtocolError, TransportError
from pipeline.model.pose import NUM_LANDMARKS, PoseFrame
from pipeline.transports.base import Control, Packet, StateChange, TransportBroken
from pipeline.transports.websocket import WebSocketTransport

HELP = (
    "Join a room and decode every publisher's pose stream; report latency (capture -> decode) "
    "p50/p95/p99 and frames received/lost per publisher; optionally write the poses."
)

KEYFRAME_REQUEST_INTERVAL_S = 0.1
#: latency samples kept per stream for the report (8 bytes each: 8 MB at the cap, ~9 h at 30 fps)
MAX_LATENCY_SAMPLES = 1_000_000


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(slots=True)
class ReceivedPose:
    """One decoded frame of one publisher stream."""

    stream_id: int
    member_id: str | None
    frame: PoseFrame
    received_ns: int
    decoded_ns: int
    latency_ms: float


@dataclass
class StreamStats:
    """What one publisher stream delivered to this receiver."""

    stream_id: int
    member_id: str | None = None
    subject: str | None = None
    received: int = 0
    decoded: int = 0
    lost: int = 0
    """Sequence numbers never received (gaps), counted per packet."""
    need_keyframe: int = 0
    """Packets that could not be decoded for lack of their reference."""
    bad_packets: int = 0
    keyframe_requests: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_decoded_at: int | None = None
    """1-based index (among this stream's received packets) of the first decoded one."""
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    """Capture-to-decode latencies (a compact array of doubles, not a list of objects)."""
    clock_corrected: bool = True
    """False when the publisher's clock offset was unknown for some frame."""
    last_keyframe_request: float = -1e9

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "stream_id": self.stream_id,
            "member_id": self.member_id,
            "subject": self.subject,
            "received": self.received,
            "decoded": self.decoded,
            "lost": self.lost,
            "need_keyframe": self.need_keyframe,
            "bad_packets": self.bad_packets,
            "keyframe_requests": self.keyframe_requests,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_decoded_at": self.first_decoded_at,
            "latency_ms": {
                "p50": _percentile(lat, 50),
                "p95": _percentile(lat, 95),
                "p99": _percentile(lat, 99),
                "mean": float(np.mean(lat)) if lat else None,
                "max": max(lat) if lat else None,
            },
            "clock_corrected": self.clock_corrected,
        }


class Receiver:
    """A decoding member of one room (see the module docstring)."""

    def __init__(
        self,
        url: str,
        room: str,
        token: str,
        *,
        name: str | None = None,
        connect_timeout_s: float = 3.0,
        keep_poses: bool = False,
        on_pose: Callable[[ReceivedPose], None] | None = None,
        transport: WebSocketTransport | None = None,
    ) -> None:
        self.transport = transport or WebSocketTransport(
            url,
            room,
            token,
            publish=False,
            subscribe=True,
            name=name or "receiver",
            connect_timeout_s=connect_timeout_s,
        )
        self.room = room
        self.keep_poses = keep_poses
        self.on_pose = on_pose
        self.poses: list[ReceivedPose] = []
        self.streams: dict[int, StreamStats] = {}
        self.events: list[Control | StateChange] = []
        self.disconnects = 0
        self._decoders: dict[int, Decoder] = {}
        self._started: float | None = None
        self._ended: float | None = None
        self.error: BaseException | None = None

    async def connect(self) -> None:
        await self.transport.connect()
        self._started = time.monotonic()

    async def close(self) -> None:
        if self._ended is None:
            self._ended = time.monotonic()
        await self.transport.close()

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
        if isinstance(item, Packet):
            await self._on_packet(item)
        elif isinstance(item, StateChange):
            self.events.append(item)
            if not item.connected:
                self.disconnects += 1
            else:
                # a new server (or a new membership) starts every stream again
                self._decoders.clear()
        else:
            if item.type in ("presence", "broadcast", "kicked", "error"):
                self.events.append(item)

    async def _on_packet(self, item: Packet) -> None:
        data = item.data
        try:
            h = peek_header(data)
        except ProtocolError:
            st = self._stream(-1)
            st.bad_packets += 1
            return
        st = self._stream(h.stream_id)
        st.received += 1
        if st.first_seq is None:
            st.first_seq = h.seq
        last = st.last_seq
        if last is not None:
            if h.seq > last:
                st.lost += h.seq - last - 1
            elif h.keyframe:
                pass  # a restarted publisher: a new sequence
        st.last_seq = h.seq if last is None or h.seq > last or h.keyframe else last
        decoder = self._decoders.get(h.stream_id)
        if decoder is None:
            decoder = self._decoders[h.stream_id] = Decoder()
        try:
            res = decoder.decode(data)
        except ProtocolError:
            st.bad_packets += 1
            return
        if isinstance(res, NeedKeyframe):
            st.need_keyframe += 1
            now = time.monotonic()
            if now - st.last_keyframe_request >= KEYFRAME_REQUEST_INTERVAL_S:
                st.last_keyframe_request = now
                st.keyframe_requests += 1
                with contextlib.suppress(TransportError):
                    await self.transport.request_keyframe(h.stream_id)
            return
        assert isinstance(res, Decoded)
        t_dec = time.time_ns()
        st.decoded += 1
        if st.first_decoded_at is None:
            st.first_decoded_at = st.received
        owner = self.transport.stream_owner(h.stream_id)
        if owner is not None:
            st.member_id = owner.get("id")
            st.subject = owner.get("subject")
        pub_off = owner.get("clock_offset_ns") if owner is not None else None
        if not isinstance(pub_off, int):
            pub_off = 0
            st.clock_corrected = False
        my_off = self.transport.clock_offset_ns or 0
        capture = res.frame.capture_ts_ns
        latency_ms = ((t_dec + my_off) - (capture + pub_off)) / 1e6
        if len(st.latencies_ms) < MAX_LATENCY_SAMPLES:
            st.latencies_ms.append(latency_ms)
        pose = ReceivedPose(
            h.stream_id, st.member_id, res.frame, item.received_ns, t_dec, latency_ms
        )
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

    def report(self) -> dict[str, Any]:
        lat = array("d")
        for s in self.streams.values():
            lat.extend(s.latencies_ms)
        end = self._ended if self._ended is not None else time.monotonic()
        stats = self.transport.statistics()
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
            "frames_lost": sum(s.lost for s in self.streams.values()),
            "latency_ms": {
                "p50": _percentile(lat, 50),
                "p95": _percentile(lat, 95),
                "p99": _percentile(lat, 99),
            },
            "publishers": {str(k): s.summary() for k, s in sorted(self.streams.items())},
        }


# --------------------------------------------------------------------------- outputs


def pose_json(p: ReceivedPose) -> dict[str, Any]:
    f = p.frame
    return {
        "stream_id": p.stream_id,
        "member_id": p.member_id,
        "seq": f.seq,
        "capture_ts_ns": f.capture_ts_ns,
        "received_ns": p.received_ns,
        "decoded_ns": p.decoded_ns,
        "latency_ms": round(p.latency_ms, 3),
        "image": np.round(f.image.astype(np.float64), 6).tolist(),
        "world": None if f.world is None else np.round(f.world.astype(np.float64), 5).tolist(),
    }


def write_npz(path: Path, poses: list[ReceivedPose]) -> None:
    """Per stream S: ``sS_seq``, ``sS_capture_ts_ns``, ``sS_latency_ms`` [T] and
    ``sS_image`` [T, 33, 4] (the first person; NaN when nobody was found)."""
    arrays: dict[str, Any] = {}
    by_stream: dict[int, list[ReceivedPose]] = {}
    for p in poses:
        by_stream.setdefault(p.stream_id, []).append(p)
    for sid, items in by_stream.items():
        image = np.full((len(items), NUM_LANDMARKS, 4), np.nan, np.float32)
        for i, p in enumerate(items):
            if p.frame.num_poses:
                image[i] = p.frame.image[0]
        arrays[f"s{sid}_image"] = image
        arrays[f"s{sid}_seq"] = np.array([p.frame.seq for p in items], np.int64)
        arrays[f"s{sid}_capture_ts_ns"] = np.array([p.frame.capture_ts_ns for p in items], np.int64)
        arrays[f"s{sid}_latency_ms"] = np.array([p.latency_ms for p in items], np.float64)
    arrays["streams"] = np.array(sorted(by_stream), np.int64)
    np.savez_compressed(path, **arrays)


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8765")
    parser.add_argument("--room", required=True, help="room to join")
    parser.add_argument("--token", required=True, help="access token with 'subscribe'")
    parser.add_argument("--duration", type=float, help="seconds to receive (default: until ^C)")
    parser.add_argument("--out", type=Path, help="write the poses: FILE.jsonl or FILE.npz")
    parser.add_argument("--report", type=Path, help="write the report as JSON")
    parser.add_argument(
        "--connect-timeout", type=float, default=3.0, help="give up connecting after S seconds"
    )


def _print_summary(rep: dict[str, Any]) -> None:
    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    lat = rep["latency_ms"]
    print(
        f"room {rep['room']}: {rep['frames_decoded']} frames decoded, "
        f"{rep['frames_lost']} lost; latency capture->decode "
        f"p50 {ms(lat['p50'])} ms, p95 {ms(lat['p95'])} ms, p99 {ms(lat['p99'])} ms"
    )
    for sid, s in rep["publishers"].items():
        sl = s["latency_ms"]
        print(
            f"  stream {sid} ({s['subject'] or s['member_id'] or '?'}): received {s['received']}, "
            f"decoded {s['decoded']}, lost {s['lost']}, need_keyframe {s['need_keyframe']}, "
            f"p50 {ms(sl['p50'])} ms, p95 {ms(sl['p95'])} ms, p99 {ms(sl['p99'])} ms"
        )


def main(args: argparse.Namespace) -> int:
    out: Path | None = args.out
    if out is not None and out.suffix not in (".jsonl", ".npz"):
        raise TransportError(f"--out must end in .jsonl or .npz, not {out.name!r}")
    if args.duration is not None and args.duration <= 0:
        raise TransportError("--duration must be positive")
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    out: Path | None = args.out
    jsonl: IO[str] | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_pose(p: ReceivedPose) -> None:
        if jsonl is not None:
            jsonl.write(json.dumps(pose_json(p), separators=(",", ":")) + "\n")

    receiver = Receiver(
        args.server,
        args.room,
        args.token,
        connect_timeout_s=args.connect_timeout,
        keep_poses=out is not None and out.suffix == ".npz",
        on_pose=on_pose,
    )
    failure: TransportBroken | None = None
    await receiver.connect()
    try:
        if out is not None and out.suffix == ".jsonl":
            jsonl = out.open("w", encoding="utf-8")
        try:
            await receiver.run(args.duration, stop=stop)
        except TransportBroken as exc:
            failure = exc
    finally:
        await receiver.close()
        if jsonl is not None:
            jsonl.close()
    if out is not None and out.suffix == ".npz":
        write_npz(out, receiver.poses)
    rep = receiver.report()
    if args.report is not None:
        args.report.write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
    _print_summary(rep)
    if failure is not None:
        if failure.reason == "room_closed":
            raise TransportError(f"room {args.room!r} was closed by a moderator") from failure
        raise failure
    return 0
