"""Audio beside the pose (issue 14): the packet format, Opus, the jitter buffer, the relay,
and a tone through a real pipeline to a real ``receive --audio`` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from pipeline.audio.opus import FRAME_SAMPLES, OpusDecoder, OpusEncoder
from pipeline.audio.playout import FRAME_NS, Playout
from pipeline.audio.sources import read_pcm, tone_samples
from pipeline.codec import peek_header
from pipeline.codec.audio import AudioPacket, is_audio, pack_audio, parse_audio
from pipeline.config import parse_config
from pipeline.errors import ConfigError, ProtocolError
from pipeline.model.prometheus import samples_as_written
from pipeline.transports.base import Packet
from tests.procutil import TRACE
from tests.test_server_support import PoseSource, member, running_server, until

if TYPE_CHECKING:
    from bench.netns import Topology

T0 = 1_790_000_000_000_000_000
STEP = np.arange(FRAME_SAMPLES, dtype=np.int64) * FRAME_NS // FRAME_SAMPLES


def _tone(k: int) -> Any:
    return tone_samples(T0 + k * FRAME_NS + STEP, 440.0, 250_000_000)


# --------------------------------------------------------------------------- packets


def test_audio_packet_round_trip_and_told_apart_from_pose() -> None:
    pkt = pack_audio(10364, 2**40, T0, 960, b"\x01" * 80)
    assert pkt[0] == 0xA1 and is_audio(pkt) and len(pkt) == 1 + 1 + 2 + 6 + 8 + 2 + 1 + 80 + 4
    assert parse_audio(pkt) == AudioPacket(10364, 2**40, T0, 960, b"\x01" * 80)
    pose = PoseSource(3).next()
    assert not is_audio(pose)
    with pytest.raises(ProtocolError):
        peek_header(pkt)  # a pose parser refuses audio (and the server branches first)
    with pytest.raises(ProtocolError):
        parse_audio(pose)


def test_audio_packet_strict_checks_raise_only_protocol_error() -> None:
    good = pack_audio(5, 7, T0, 960, bytes(range(60)))
    for bad, what in (
        (good[:-1], "checksum"),
        (b"\xa2" + good[1:], "version"),
        (good[:10], "shorter"),
        (b"\xa1" + bytes(2000), "not under"),
    ):
        with pytest.raises(ProtocolError, match=what):
            parse_audio(bad)
    for args, what in (
        ((5, 7, T0, 100, b"x"), "duration"),
        ((5, 7, T0, 960, b""), "payload"),
        ((5, -1, T0, 960, b"x"), "seq"),
        ((2**32, 7, T0, 960, b"x"), "stream id"),
    ):
        with pytest.raises(ProtocolError, match=what):
            pack_audio(*args)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    for i in range(2000):  # every single-byte mutation and random junk: ProtocolError or a packet
        data = bytearray(good)
        data[i % len(data)] = int(rng.integers(256))
        junk = bytes(rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8))
        for candidate in (bytes(data), b"\xa1" + junk):
            with contextlib.suppress(ProtocolError):
                parse_audio(candidate)


# --------------------------------------------------------------------------- config, sources


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("audio:\n  enabled: true\n  source: file\n", "audio.path"),
        ("audio:\n  enabled: true\n  bitrate_kbps: 8\n", "audio.bitrate_kbps"),
        ("audio:\n  enabled: true\n  frame_ms: 10\n", "audio.frame_ms"),
        ("audio:\n  enabled: true\n  source: radio\n", "audio.source"),
    ],
)
def test_bad_audio_config_names_the_field(body: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(body)
    assert field in str(err.value), str(err.value)


def test_a_file_without_audio_names_audio_path(tmp_path: Path) -> None:
    import av

    video = tmp_path / "silent.mp4"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 64
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = i
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    with pytest.raises(ConfigError, match=r"audio\.path: .* has no audio stream"):
        read_pcm(video)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF" + bytes(100))
    with pytest.raises(ConfigError, match=r"audio\.path: "):
        read_pcm(junk)


def test_no_microphone_is_one_message_naming_audio_source() -> None:
    from pipeline.audio.sources import microphone_source

    try:
        source = microphone_source(lambda: True)
    except ConfigError as exc:
        assert str(exc).startswith("audio.source: microphone: no ALSA capture device"), exc
        assert "goes on without audio" in str(exc)
    else:  # a machine with a capture device: nothing to check here
        source.close()  # type: ignore[attr-defined]


def test_receiver_counts_and_skips_a_malformed_audio_packet(tmp_path: Path) -> None:
    from pipeline.client.receiver import Receiver

    async def run() -> dict[str, Any]:
        rx = Receiver("http://127.0.0.1:9", "R", "t", audio=tmp_path / "a.wav", warm=False)
        bad = bytearray(pack_audio(4, 1, T0, 960, b"\xfc" + bytes(20)))
        bad[5] ^= 1  # checksum mismatch
        await rx.handle(Packet(bytes(bad), T0))
        ignored = Receiver("http://127.0.0.1:9", "R", "t", warm=False)
        await ignored.handle(Packet(pack_audio(4, 1, T0, 960, b"\xfc"), T0))
        assert ignored.audio_ignored == 1 and ignored.audio is None
        return rx.report()

    rep = asyncio.run(run())
    assert rep["publishers"]["-1"]["bad_packets"] == 1 and rep["audio"] == {}


# --------------------------------------------------------------------------- Opus, playout


def test_opus_fec_and_concealment_through_libopus() -> None:
    enc, dec = OpusEncoder(32, fec=True), OpusDecoder()
    payloads = [p for k in range(50) for _, p in enc.encode(_tone(k))]
    assert 40 <= len(payloads) <= 51 and all(20 < len(p) < 400 for p in payloads)
    assert any(dec.has_fec(p) for p in payloads)  # in-band FEC is on
    out = dec.decode(payloads[0])
    assert len(out) == FRAME_SAMPLES
    assert len(dec.decode_fec(payloads[2])) == FRAME_SAMPLES  # frame 1 from frame 2's copy
    assert len(dec.conceal()) == FRAME_SAMPLES


def test_playout_recovers_a_loss_with_fec_and_writes_what_is_heard(tmp_path: Path) -> None:
    enc = OpusEncoder(32, fec=True)
    clock = [T0]
    wav = tmp_path / "out.wav"
    play = Playout(wav, lambda: clock[0], sync=False)
    packets = []
    for k in range(60):
        for pts, payload in enc.encode(_tone(k)):
            ts = T0 + pts * FRAME_NS // FRAME_SAMPLES
            packets.append(AudioPacket(1, 100 + len(packets), ts, 960, payload))
    lost = {30, 40, 41}  # one loss (FEC from the next packet), two in a row (PLC first)
    for i, pkt in enumerate(packets):
        clock[0] = pkt.capture_ts_ns + 25_000_000  # arrives 25 ms after capture
        if i not in lost:
            play.on_packet(pkt, pkt.capture_ts_ns, clock[0])
        play.tick()
    while play.buffer:
        clock[0] += FRAME_NS
        play.tick()
    play.close()
    st = play.stats
    assert st.received == st.played == len(packets) - 3
    assert st.fec + st.concealed == 3 and st.concealed >= 1 and st.fec >= 1, st
    assert st.late == st.discarded == st.stretched == 0, st
    assert play.content_gap_ms() <= 40.0  # at most 40 and 41 missing from what is heard
    with wave.open(str(wav), "rb") as w:
        assert w.getframerate() == 48000 and w.getnchannels() == 1
        assert w.getnframes() == FRAME_SAMPLES * len(play.frame_capture)


# --------------------------------------------------------------------------- server relay


def test_server_relays_audio_never_stores_it_and_refuses_a_malformed_one() -> None:
    async def run() -> None:
        async with running_server() as srv:
            pub = member(srv, "R", "publisher", publish=True, subscribe=False, subject="p")
            sub = member(srv, "R", "subscriber", subject="s")
            await pub.connect()
            await sub.connect()
            pose = PoseSource(9)
            await pub.send(pose.next())
            for k in range(5):
                await pub.send(pack_audio(9, 1000 + k, T0 + k * FRAME_NS, 960, b"\xfc" + bytes(40)))
            got = await until(
                sub,
                lambda items: sum(isinstance(i, Packet) and is_audio(i.data) for i in items) == 5,
            )
            assert [
                parse_audio(i.data).seq for i in got if isinstance(i, Packet) and is_audio(i.data)
            ] == [1000 + k for k in range(5)]
            m = srv.state.metrics
            assert m.audio_packets_in == 5 and m.audio_packets_out == 5
            late = member(srv, "R", "subscriber", subject="late")
            await late.connect()
            history = await until(late, lambda items: any(isinstance(i, Packet) for i in items))
            assert not any(isinstance(i, Packet) and is_audio(i.data) for i in history)
            await late.close()
            bad = bytearray(pack_audio(9, 2000, T0, 960, b"\xfc" + bytes(40)))
            bad[-1] ^= 0xFF
            await pub.send(bytes(bad))
            deadline = time.monotonic() + 10
            while m.audio_bad_packets == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the server's counter is the event
            assert m.audio_bad_packets == 1 and m.rejections["bad_packet"] == 1
            text = srv.state.metrics.render(rooms=1, members=1, connections=1, ready=True)
            assert "posewire_server_audio_bad_packets_total 1" in text
            await sub.close()
            await pub.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- end to end


@pytest.mark.timing
@pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")
def test_tone_through_the_pipeline_in_sync_and_across_transport_switches(
    net: Topology, tmp_path: Path, record_property: Any
) -> None:
    """Acceptance (issue 14), one real pipeline and one real ``receive --audio`` process:
    a hot-standby sender (WebRTC primary, WebSocket standby, the room server in another
    namespace) with the tone, switched to the WebSocket and back mid-stream. The received
    WAV matches the tone (normalized cross-correlation >= 0.9, the reference rebuilt from
    each frame's capture time, so timestamps are checked too; the clicks land where their
    capture time says), |pose/audio skew| p95 <= 20 ms, and no source audio is
    missing for more than 60 ms across the switches."""
    from bench.audio import tone_match
    from tests.procutil import stop, wait_for
    from tests.test_switch import _ctl, _hot_sender
    from tests.test_webrtc import Receive, _server, figure

    server = _server(net)
    wav = tmp_path / "rx.wav"
    a = net.host("a")
    metrics_args = ("--metrics-port", "0", "--metrics-host", a.address)
    rx = Receive(a, server.url, "rx", "websocket", tmp_path, ("--audio", str(wav), *metrics_args))
    sender = None
    try:
        rx.line("joined room A", 20)
        audio = "audio:\n  enabled: true\n  source: tone\n"
        sender, sender_report = _hot_sender(net, tmp_path, server, 40.0, monitor=True, extra=audio)
        assert wait_for(lambda: len(rx.poses()) > 60, 40), rx.tail()
        for to in ("websocket", "webrtc"):
            seen = len(rx.poses())
            _ctl(net, tmp_path, "switch_transport", json.dumps({"to": to}))
            assert wait_for(lambda n=seen: len(rx.poses()) > n + 45, 20), rx.tail()  # type: ignore[misc]
        # the receiving side's audio figures in its /metrics (read inside host a)
        url = rx.line("metrics: ", 5).split()[1]
        fetch = (
            "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
        )
        scraped = a.run([sys.executable, "-c", fetch, url]).stdout
        rep = rx.finish()
    finally:
        rx.kill()
        if sender is not None and sender.poll() is None:
            stop(sender, timeout=20)
        server.stop()
    (got,) = rep["audio"].values()
    frames = json.loads(wav.with_suffix(".frames.json").read_text(encoding="utf-8"))
    match = tone_match(wav, frames)
    for name in ("longest_content_gap_ms", "longest_gap_ms", "frames_concealed", "late"):
        figure(record_property, f"audio_{name}", got[name])
    figure(record_property, "audio_abs_skew_p95_ms", got["abs_skew_ms"]["p95"])
    figure(record_property, "audio_tone_ncc", match["ncc"])
    offsets = [abs(v) for v in match["click_offsets_ms"]]
    figure(record_property, "audio_click_offset_max_ms", max(offsets, default=-1.0))
    figure(record_property, "audio_mouth_to_ear_p95_ms", got["mouth_to_ear_ms"]["p95"])
    assert got["frames_played"] > 150, got
    assert got["longest_content_gap_ms"] <= 60.0, got
    assert match["ncc"] >= 0.9, match["ncc"]
    # the clicks where their capture time says (a click cut by a dropped or concealed
    # frame is found late, up to its 2 ms length and the codec's smearing)
    assert len(offsets) >= 10 and float(np.median(offsets)) < 1.0, offsets
    assert sum(o < 2.0 for o in offsets) >= 0.9 * len(offsets), offsets
    assert got["abs_skew_ms"]["p95"] is not None and got["abs_skew_ms"]["p95"] <= 20.0, got
    (pose,) = rep["publishers"].values()
    assert str(pose["stream_id"]) in rep["audio"]  # audio rides the pose stream's id
    # the sender's run report: audio sent, and its send rate in the series of the plots
    run = json.loads(sender_report.read_text(encoding="utf-8"))
    assert run["audio"]["packets_sent"] >= got["frames_played"] * 0.9, run["audio"]
    audio_kbps = [v for v in run["series"]["audio_kbps"] if v]
    assert audio_kbps and 20.0 < float(np.median(audio_kbps)) < 80.0, audio_kbps
    # the receiving side: /metrics during the run, the report's series (its plots)
    seen = samples_as_written(scraped)
    sid = str(pose["stream_id"])
    assert seen[f'posewire_receive_audio_frames_total{{stream="{sid}",kind="played"}}'] > 50, (
        scraped
    )
    assert 0 < seen['posewire_receive_audio_mouth_to_ear_ms{quantile="0.95"}'] < 1000, scraped
    assert 'posewire_receive_audio_abs_skew_ms{quantile="0.95"}' in seen, scraped
    series = rep["series"]
    for key in ("audio_delay_ms", "audio_mouth_to_ear_p95_ms", "audio_abs_skew_p95_ms"):
        assert any(v is not None for v in series[key]), (key, series[key])
