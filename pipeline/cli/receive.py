"""``python -m pipeline receive``: join a room, decode every publisher, report latency.

The receiving is :class:`~pipeline.client.receiver.Receiver`; this module
parses the arguments, writes the poses (JSON lines or ``.npz``) and the
report, and prints the summary: live latency (capture -> decode) apart from
the backfill the server sends on joining.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
from pydantic import ValidationError

from pipeline.cli import add_server_arguments, check_server_arguments
from pipeline.client.receiver import TRANSPORT_CHOICES, ReceivedPose, Receiver
from pipeline.client.recording import Recorder, RecordingWriter
from pipeline.client.vmc import VmcSender, parse_target
from pipeline.config import IceServer, RtcConfig
from pipeline.errors import BrokenResourceError, ConfigError, RecordingError, TransportError
from pipeline.model.pose import NUM_LANDMARKS
from pipeline.monitor.receive import ReceiveSeries, serve_metrics
from pipeline.transports.base import StateChange

__all__ = ["Receiver", "add_arguments", "main", "pose_json", "write_npz"]

#: seconds between two samples of the receive series
SAMPLE_S = 1.0

HELP = (
    "Join a room and decode every publisher's pose stream; report live latency (capture -> "
    "decode) p50/p95/p99 apart from the joining backfill, and frames received/lost per "
    "publisher; optionally write the poses."
)


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
        "backfill": p.backfill,
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
    add_server_arguments(parser)
    parser.add_argument("--room", required=True, help="room to join")
    parser.add_argument("--token", required=True, help="access token with 'subscribe'")
    parser.add_argument("--duration", type=float, help="seconds to receive (default: until ^C)")
    parser.add_argument("--out", type=Path, help="write the poses: FILE.jsonl or FILE.npz")
    parser.add_argument("--report", type=Path, help="write the report as JSON")
    parser.add_argument(
        "--vmc", metavar="HOST[:PORT]", help="send VMC bundles (OSC/UDP, default port 39539)"
    )
    parser.add_argument(
        "--osc-landmarks", action="store_true", help="with --vmc: also /posewire/<member>/landmarks"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=3.0, help="give up connecting after S seconds"
    )
    parser.add_argument(
        "--transport",
        choices=TRANSPORT_CHOICES,
        default="auto",
        help="webrtc (data channels), websocket, or auto (default): webrtc when the server "
        "takes offers and this host can reach it (not on loopback), else websocket, saying why",
    )
    parser.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="WebRTC STUN/TURN server, e.g. turn:turn.example.org:3478 (repeatable; default: "
        "none, host candidates only)",
    )
    parser.add_argument(
        "--ice-user",
        metavar="USER:PASSWORD",
        help="credentials for the turn: servers of --ice-server",
    )
    parser.add_argument(
        "--ice-relay-only",
        action="store_true",
        help="WebRTC through the TURN relay only (iceTransportPolicy relay)",
    )
    parser.add_argument(
        "--record",
        type=Path,
        metavar="FILE",
        help="store every packet as it came, with arrival times (docs/recordings.md)",
    )
    parser.add_argument(
        "--audio",
        type=Path,
        metavar="OUT.wav",
        help="play the audio streams through a jitter buffer (Opus FEC/PLC) and write what a "
        "listener hears to OUT.wav (48 kHz mono); OUT.frames.json: each frame's capture time",
    )
    parser.add_argument(
        "--no-audio-sync",
        action="store_true",
        help="with --audio: the audio delay covers the audio's own jitter only, not the "
        "poses' transit (a listener that shows no skeleton)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics (Prometheus text: posewire_receive_*) and /status (the report "
        "as JSON) on this port while receiving (0: any free port; the URL is printed)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of --metrics-port (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--record-max-mb",
        type=float,
        default=1024.0,
        metavar="MB",
        help="with --record: never grow the recording past this size (default 1024)",
    )


def ice_settings(args: argparse.Namespace) -> tuple[list[IceServer], RtcConfig]:
    """The WebRTC ICE servers and settings of ``--ice-server/--ice-user/--ice-relay-only``
    (:class:`ConfigError` naming the option when one is wrong)."""
    user, password = None, None
    if args.ice_user is not None:
        user, sep, password = str(args.ice_user).partition(":")
        if not sep or not user:
            raise ConfigError(["--ice-user must be USER:PASSWORD"])
    servers: list[IceServer] = []
    for url in args.ice_server:
        fields: dict[str, Any] = {"urls": [url]}
        if url.startswith("turn"):
            fields |= {"username": user, "credential": password}
        try:
            servers.append(IceServer.model_validate(fields))
        except ValidationError as exc:
            problems = "; ".join(str(e["msg"]) for e in exc.errors())
            raise ConfigError([f"--ice-server {url}: {problems}"]) from None
    if args.ice_relay_only and not any(u.startswith("turn") for s in servers for u in s.urls):
        raise ConfigError(["--ice-relay-only needs a turn: server (--ice-server)"])
    policy = "relay" if args.ice_relay_only else "all"
    return servers, RtcConfig.model_validate({"ice_transport_policy": policy})


def _print_summary(rep: dict[str, Any]) -> None:
    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    lat = rep["latency_ms"]
    bf = rep["backfill"]
    print(
        f"room {rep['room']}: {rep['frames_decoded']} frames decoded, "
        f"{rep['frames_lost']} lost; live latency capture->decode "
        f"p50 {ms(lat['p50'])} ms, p95 {ms(lat['p95'])} ms, p99 {ms(lat['p99'])} ms; "
        f"backfill {bf['count']} frames (age p50 {ms(bf['age_ms']['p50'])} ms, "
        f"max {ms(bf['age_ms']['max'])} ms)"
    )
    tr = rep["transport"]
    st = tr["stats"]
    extra = st["extra"]
    line = f"  transport {tr['kind']} (asked: {tr['requested']})"
    if tr["why_not_webrtc"]:
        line += f": {tr['why_not_webrtc']}"
    if tr["kind"] == "webrtc":
        line += (
            f": {extra.get('packets_via_webrtc')} packets over the data channels, "
            f"{extra.get('packets_via_websocket')} over the WebSocket; opened "
            f"{extra.get('rtc_opens')}x (last in {ms(extra.get('rtc_open_ms'))} ms), dead paths "
            f"{extra.get('rtc_dead_detections')}"
        )
    print(line)
    if rep["bad_member_records"] or rep["bad_messages"]:
        print(
            f"  refused from the room: {rep['bad_member_records']} bad member records, "
            f"{rep['bad_messages']} bad messages (ignored)"
        )
    for sid, a in rep["audio"].items():
        m2e, skew = a["mouth_to_ear_ms"], a["abs_skew_ms"]
        print(
            f"  audio {sid}: received {a['frames_received']}, played {a['frames_played']}, "
            f"FEC {a['frames_fec']}, concealed {a['frames_concealed']} (longest gap "
            f"{a['longest_gap_ms']:.0f} ms), late {a['late']}; mouth-to-ear p50 "
            f"{ms(m2e['p50'])} ms, p95 {ms(m2e['p95'])} ms; |pose/audio skew| p50 "
            f"{ms(skew['p50'])} ms, p95 {ms(skew['p95'])} ms"
        )
    for sid, s in rep["publishers"].items():
        sl = s["latency_ms"]
        print(
            f"  stream {sid} ({s['subject'] or s['member_id'] or '?'}): received {s['received']}, "
            f"decoded {s['decoded']}, backfill {s['backfill']['count']}, lost {s['lost']}, "
            f"join gap {s['join_gap']}, need_keyframe {s['need_keyframe']}, "
            f"live p50 {ms(sl['p50'])} ms, p95 {ms(sl['p95'])} ms, p99 {ms(sl['p99'])} ms"
        )


async def _sample(series: ReceiveSeries) -> None:
    """One sample of the receive series a second (the report's ``series``)."""
    while True:
        await asyncio.sleep(SAMPLE_S)
        series.sample()


def main(args: argparse.Namespace) -> int:
    out: Path | None = args.out
    if out is not None and out.suffix not in (".jsonl", ".npz"):
        raise TransportError(f"--out must end in .jsonl or .npz, not {out.name!r}")
    if args.duration is not None and args.duration <= 0:
        raise TransportError("--duration must be positive")
    ice_settings(args)  # refuse bad ICE options before connecting
    check_server_arguments(args)
    if args.audio is not None and args.audio.suffix != ".wav":
        raise TransportError(f"--audio must end in .wav, not {args.audio.name!r}")
    if not args.record_max_mb > 0:
        raise RecordingError("--record-max-mb must be positive")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError([f"--metrics-port: {args.metrics_port} is not a port (0..65535)"])
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    out: Path | None = args.out
    jsonl: IO[str] | None = None
    stop = asyncio.Event()
    vmc = VmcSender(*parse_target(args.vmc), landmarks=args.osc_landmarks) if args.vmc else None
    ice_servers, rtc = ice_settings(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_pose(p: ReceivedPose) -> None:
        if jsonl is not None:
            jsonl.write(json.dumps(pose_json(p), separators=(",", ":")) + "\n")
        if vmc is not None:
            vmc.send(p.frame, p.member_id)

    def on_state(change: StateChange) -> None:
        what = "up" + (" (resumed)" if change.resumed else "") if change.connected else "down"
        print(f"{time.time_ns()} transport {what} {change.reason}".rstrip(), flush=True)

    writer: RecordingWriter | None = None
    if args.record is not None:
        header = {"room": args.room, "server": ",".join(args.server), "tool": "posewire receive"}
        writer = RecordingWriter(
            args.record, header, max_bytes=int(args.record_max_mb * 1024 * 1024)
        )
    receiver = Receiver(
        args.server,
        args.room,
        args.token,
        connect_timeout_s=args.connect_timeout,
        transport_kind=args.transport,
        ice_servers=ice_servers,
        rtc=rtc,
        ca_file=args.ca_file,
        keep_poses=out is not None and out.suffix == ".npz",
        on_pose=on_pose,
        on_state=on_state,
        audio=args.audio,
        audio_sync=not args.no_audio_sync,
    )
    if writer is not None:
        t = receiver.transport
        receiver.on_item = Recorder(
            writer,
            members=lambda: list(t.members.values()),
            clock_offset=lambda: t.clock_offset_ns,
        )
    failure: BrokenResourceError | None = None
    series = ReceiveSeries(receiver)
    runner = None
    try:
        if args.metrics_port is not None:  # before joining: a taken port starts nothing
            try:
                runner, url = await serve_metrics(
                    receiver, series, args.metrics_host, args.metrics_port
                )
            except OSError as exc:
                raise ConfigError([f"--metrics-port {args.metrics_port}: {exc.strerror}"]) from None
            print(f"metrics: {url}/metrics", flush=True)
        await receiver.connect()
    except BaseException:
        if writer is not None:
            writer.close()
        if runner is not None:
            await runner.cleanup()
        raise
    series.started()
    if writer is not None:
        t = receiver.transport
        writer.event(
            {"type": "members", "member_id": t.member_id, "members": list(t.members.values())},
            time.time_ns(),
        )
    stats = receiver.transport.statistics()
    print(
        f"joined room {args.room} as member {receiver.transport.member_id} over {stats.kind}",
        flush=True,
    )
    sampling = loop.create_task(_sample(series), name="posewire-receive-series")
    try:
        if out is not None and out.suffix == ".jsonl":
            jsonl = out.open("w", encoding="utf-8")
        try:
            await receiver.run(args.duration, stop=stop)
            # what already arrived is handled (written, recorded) before leaving
            while (item := receiver.transport.recv_nowait()) is not None:
                await receiver.handle(item)
        except BrokenResourceError as exc:
            failure = exc
    finally:
        sampling.cancel()
        if runner is not None:
            await runner.cleanup()
        await receiver.close()
        if jsonl is not None:
            jsonl.close()
        if vmc is not None:
            vmc.close()
        if writer is not None:
            writer.close()
    if out is not None and out.suffix == ".npz":
        write_npz(out, receiver.poses)
    rep = receiver.report()
    rep["series"] = series.report()
    if args.audio is not None and receiver.audio is not None:
        frames = receiver.audio.frames()
        args.audio.with_suffix(".frames.json").write_text(json.dumps(frames), encoding="utf-8")
    if args.report is not None:
        args.report.write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
    _print_summary(rep)
    if writer is not None:
        print(f"recorded {writer.records} records ({writer.size} bytes) to {writer.path}")
        if writer.full:
            print(
                f"  the recording reached --record-max-mb {args.record_max_mb:g}: "
                f"{writer.refused} records not written"
            )
    if failure is not None:
        if failure.reason == "room_closed":
            raise TransportError(f"room {args.room!r} was closed by a moderator") from failure
        raise failure
    return 0
