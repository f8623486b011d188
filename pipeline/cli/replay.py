"""``python -m pipeline replay FILE``: publish a recording into a room with its timing.

Every publisher stream of the recording becomes one member of the target room
(named ``replay <original name>``), publishing the same stream id, over the
transport ``--transport`` names (any registered kind; ``websocket`` by default).
A frame is sent when its packet arrived in the recording, relative to the
first one, divided by ``--speed``.

The frames are decoded and **re-encoded** (one :class:`~pipeline.codec.Encoder`
per stream, with the quantization the original keyframes carry, so the decoded
values are the same), not sent as recorded. The recorded bytes cannot be sent
unchanged: the server refuses a sequence number that does not go forward
(a loop, a recording whose publisher restarted) and relays only streams that
start with a keyframe, a subscriber of the new room may need a keyframe (or a
refresh from a frame it acknowledged) that a fixed list of packets cannot give,
and the packets carry the original capture times, which would make every frame
look minutes old. Re-encoding makes the replay an ordinary publisher: keyframes
where the original had them and whenever the server asks, sequence numbers that
go forward (the original ones, shifted only where they would not, e.g. at every
``--loop``, which starts with a keyframe; the encoder and its epoch stay the same,
so a short recording looped at high speed does not hit the server's limit on
epoch changes), and capture times moved by the same map as the send times (the
capture-to-arrival delay of the recording is kept). Details: ``docs/recordings.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import add_server_arguments, check_server_arguments
from pipeline.client import recording
from pipeline.codec import CodecConfig, Encoder, warm_kernels
from pipeline.codec.quant import Quant
from pipeline.codec.ranges import QUANT_GUARD
from pipeline.config import TransmitConfig, TransportKind
from pipeline.errors import RecordingError, TokenError, TransportError
from pipeline.model.pose import PoseFrame
from pipeline.transports import Control, StateChange, Transport, TransportContext, make_transport

HELP = (
    "Publish a recording (receive --record) into a room with its original timing "
    "(scaled by --speed), one member per recorded publisher stream."
)

#: makes the transport of one replayed stream, given the member name
TransportMaker = Callable[[str], Transport]


def codec_config(quant: Quant) -> CodecConfig:
    """A codec configuration whose quantization is exactly ``quant`` (keyframes only
    where asked: the replay puts them where the recording had them)."""
    for nudge in (1.0, 1.0 + 1e-12, 1.0 + 1e-9, 1.0 - 1e-12):
        cfg = CodecConfig(
            precision_px=1920 * QUANT_GUARD / (2 * quant.n_xy) * nudge,
            reference_width_px=1920,
            z_precision=QUANT_GUARD / (2 * quant.n_z) * nudge,
            world_precision_m=QUANT_GUARD / (2 * quant.n_world) * nudge,
            visibility_levels=quant.vis_levels,
            keyframe_interval=0,
            world=True,
        )
        if Quant.from_config(cfg) == quant:
            return cfg
    raise RecordingError(f"cannot reproduce the recorded quantization {quant}")


@dataclass
class _Stream:
    info: recording.StreamInfo
    transport: Transport
    encoder: Encoder | None = None
    quant: Quant | None = None
    offset: int = 0
    last_seq: int = -1
    sent: int = 0

    async def pump(self) -> None:
        """Acks and keyframe requests from the server go to the encoder (until the
        transport ends: a refusal is raised by the next send)."""
        while True:
            try:
                item = await self.transport.recv()
            except (TransportError, TokenError):
                return
            enc = self.encoder
            if enc is None:
                continue
            if isinstance(item, Control):
                if item.type == "ack" and type(item.body.get("seq")) is int:
                    enc.on_ack(int(item.body["seq"]))
                elif item.type == "keyframe_request":
                    enc.request_keyframe()
            elif isinstance(item, StateChange) and item.connected:
                enc.request_keyframe()


async def replay(
    rec: recording.Recording,
    make: TransportMaker,
    *,
    speed: float = 1.0,
    loop: bool = False,
    duration_s: float | None = None,
    stop: asyncio.Event | None = None,
) -> dict[int, dict[str, int]]:
    """Publish ``rec`` (see the module docstring); returns per stream the frames sent,
    those the transport could not deliver (``failed``: it was disconnected, e.g. closed
    by the server's message rate limit) and its reconnects."""
    dec = recording.decode(rec)
    if not dec.poses:
        raise RecordingError(f"{rec.path}: no decodable pose in the recording")
    warm_kernels()  # every codec signature loaded: the first frames are not late
    # the decoded recording and the codec's compiled code live to the end: keep them out of
    # the collector's full passes (one took ~100 ms in the middle of a 60 s replay)
    gc.freeze()
    streams: dict[int, _Stream] = {}
    pumps: list[asyncio.Task[None]] = []
    try:
        for sid in sorted(dec.streams):
            info = dec.streams[sid]
            streams[sid] = s = _Stream(info, make(f"replay {info.name}"[:64]))
            await s.transport.connect()
            pumps.append(asyncio.get_running_loop().create_task(s.pump()))
        await _publish(dec, streams, speed, loop, duration_s, stop)
    finally:
        for task in pumps:
            task.cancel()
        for s in streams.values():
            await s.transport.close()
    return {
        sid: {
            "sent": s.sent,
            "failed": s.transport.statistics().send_failures,
            "reconnects": s.transport.statistics().reconnects,
        }
        for sid, s in streams.items()
    }


async def _publish(
    dec: recording.Decoding,
    streams: dict[int, _Stream],
    speed: float,
    loop: bool,
    duration_s: float | None,
    stop: asyncio.Event | None,
) -> None:
    poses = dec.poses
    first = poses[0].arrival_ns
    span = poses[-1].arrival_ns - first
    gap = span // max(len(poses) - 1, 1)  # between the end of a loop and the next start
    m0 = time.monotonic_ns()
    w0 = time.time_ns()
    end = None if duration_s is None else time.monotonic() + duration_s
    elapsed = 0  # recording time (ns) at the start of this pass
    while True:
        for p in poses:
            due = m0 + int((elapsed + p.arrival_ns - first) / speed)
            delay = (due - time.monotonic_ns()) / 1e9
            if end is not None and time.monotonic() + max(delay, 0.0) > end:
                return
            if stop is not None:
                try:
                    async with asyncio.timeout(max(delay, 0.0)):
                        await stop.wait()
                    return
                except TimeoutError:
                    pass
            elif delay > 0:
                await asyncio.sleep(delay)
            # capture times move with the send times (recording ns since ``first``)
            await _send(streams[p.stream_id], p, dec, w0, elapsed - first, speed)
        if not loop:
            return
        elapsed += span + gap


async def _send(
    s: _Stream,
    p: recording.RecordedPose,
    dec: recording.Decoding,
    w0: int,
    shift: int,
    speed: float,
) -> None:
    keyframe = p.keyframe
    if p.quant is not None and p.quant != s.quant:
        s.quant = p.quant
        s.encoder = Encoder(
            codec_config(p.quant),
            p.stream_id,
            epoch=None if s.encoder is None else (s.encoder.epoch + 1) % 4,
        )
    if s.encoder is None:  # the recording starts without a keyframe (cannot happen)
        return
    seq = p.frame.seq + s.offset
    if seq <= s.last_seq:  # a loop or a restarted publisher: keep going forward
        s.offset += s.last_seq + 1 - seq
        seq = s.last_seq + 1
        keyframe = True
    s.last_seq = seq
    # capture times on this host's clock, moved like the send times
    capture = p.frame.capture_ts_ns
    pub_off, my_off = s.info.clock_offset_ns, dec.clock_offset_ns
    if pub_off is not None and my_off is not None:
        capture += pub_off - my_off
    f = p.frame
    frame = PoseFrame(seq, w0 + round((capture + shift) / speed), f.image, f.world)
    await s.transport.send(s.encoder.encode(frame, keyframe=keyframe))
    s.sent += 1


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a recording (receive --record FILE)")
    add_server_arguments(parser)
    parser.add_argument("--room", required=True, help="room to publish into")
    parser.add_argument("--token", required=True, help="access token with 'publish_pose'")
    parser.add_argument("--speed", type=float, default=1.0, help="time scale (2: twice as fast)")
    parser.add_argument("--loop", action="store_true", help="start again at the end, forever")
    parser.add_argument("--duration", type=float, help="stop after S seconds")
    parser.add_argument(
        "--transport",
        default="websocket",
        help="transport kind to publish with (a registered one; default websocket)",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=5.0, help="give up connecting after S seconds"
    )


def main(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.speed) and args.speed > 0):
        raise RecordingError("--speed must be a positive number")
    if args.duration is not None and not args.duration > 0:
        raise RecordingError("--duration must be positive")
    try:
        kind = TransportKind(args.transport)
    except ValueError:
        known = ", ".join(k.value for k in TransportKind)
        raise RecordingError(f"unknown --transport {args.transport!r} (known: {known})") from None
    check_server_arguments(args)
    rec = recording.read(args.file)
    if rec.problem:
        print(f"warning: {args.file}: {rec.problem}")
    try:
        cfg = TransmitConfig.model_validate(
            {
                "primary": kind,
                "servers": args.server,
                "ca_file": args.ca_file,
                "room": args.room,
                "connect_timeout_s": args.connect_timeout,
            }
        )
    except ValueError as exc:  # pydantic's ValidationError
        raise RecordingError(f"invalid --room or --connect-timeout: {exc}") from None

    def make(name: str) -> Transport:
        context = TransportContext(
            token=lambda: str(args.token), name=name, publish=True, subscribe=False
        )
        return make_transport(kind.value, cfg, context)

    async def run() -> dict[int, dict[str, int]]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await replay(
            rec, make, speed=args.speed, loop=args.loop, duration_s=args.duration, stop=stop
        )

    stats = asyncio.run(run())
    parts = ", ".join(f"stream {sid}: {st['sent']}" for sid, st in stats.items())
    total = sum(st["sent"] for st in stats.values())
    print(f"replayed {total} frames into room {args.room} ({parts})")
    failed = sum(st["failed"] for st in stats.values())
    if failed:
        reconnects = sum(st["reconnects"] for st in stats.values())
        print(
            f"warning: {failed} frames were not delivered (the connection dropped, "
            f"{reconnects} reconnects; a --speed above the server's message rate limit, "
            "max_messages_per_s, does that)"
        )
    return 0
