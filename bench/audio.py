"""``python -m bench audio [--quick] [--json]``: audio beside the pose, end to end.

1. **Loopback** (no root needed): a real pipeline (trace replay + the ``tone`` audio
   source, embedded room server, WebSocket) and a real ``python -m pipeline receive
   --audio`` process. Figures: mouth-to-ear latency p50/p95 (capture of a frame's first
   sample -> the receiver's virtual sound card plays it, jitter buffer included), the
   |pose/audio skew| p50/p95, the tone's normalized cross-correlation with what the
   receiver wrote (the reference rebuilt from each played frame's capture timestamp:
   content and timestamps checked together), where the receiver put the clicks (their
   capture time read off the WAV minus the true one), audio bytes per second on the wire
   and the CPU of the audio stage.
2. **Baseline, same run and server**: 16-bit PCM, 10 ms per packet (960 bytes: 20 ms do
   not fit a packet under 1,100 bytes), published by this process in the audio packet
   format (the server relays bytes; it never decodes audio) to a subscriber on the same
   loopback path: transit (capture -> arrival) p50/p95 and bytes per second.
3. **Speech quality** (root, the namespace lab of :mod:`bench.netns`): the pipeline with
   ``source: speech`` (espeak-ng, 48 kbit/s) over WebRTC to a receiver across the router
   (``--no-audio-sync``: the audio path alone), 0, 5 and 20 % random UDP loss on the
   server -> receiver link; PESQ wide-band (PyPI ``pesq``) of the received WAV against
   what should have been heard (the looped speech at each played frame's capture time,
   :func:`speech_reference`), beside PESQ of Opus alone with the same loss rate.

Targets (issue 14): mouth-to-ear p95 <= 80 ms on loopback, skew p95 <= 20 ms, tone
correlation >= 0.9, PESQ clean >= 4.0, at 5 % loss >= 3.2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import add_json_flag, at_least, at_most, report, stop_process
from pipeline.audio.sources import tone_samples
from pipeline.codec.audio import SAMPLE_RATE
from pipeline.config import traces_dir

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-audio-secret-" + "0" * 32
TRACE = traces_dir() / "cmu02_05_punch_strike.npz"
TONE_HZ = 440.0
CLICK_MS = 250
PESQ_RATE = 16_000


# --------------------------------------------------------------------------- analysis


def read_wav(path: Path) -> npt.NDArray[np.float64]:
    import wave

    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)


def tone_match(wav: Path, frames: list[int], *, hz: float = TONE_HZ) -> dict[str, Any]:
    """The received tone against the tone rebuilt from each played frame's capture time:
    the best normalized cross-correlation within +-5 ms, and where the clicks landed
    (their capture time from the WAV minus the nearest true click time)."""
    x = read_wav(wav)
    n = min(len(frames), len(x) // 960)
    step = np.arange(960, dtype=np.int64) * 1_000_000_000 // SAMPLE_RATE
    interval = CLICK_MS * 1_000_000
    ref = np.zeros(n * 960)
    keep = np.zeros(n * 960, bool)
    for i in range(n):
        if frames[i] >= 0:
            ref[i * 960 : (i + 1) * 960] = tone_samples(frames[i] + step, hz, interval)
            keep[i * 960 : (i + 1) * 960] = True
    x = x[: n * 960]
    best = -1.0
    for lag in range(-240, 241, 4):
        a = x[max(lag, 0) : len(x) + min(lag, 0)]
        b = ref[max(-lag, 0) : len(ref) - max(lag, 0)]
        m = keep[max(-lag, 0) : len(ref) - max(lag, 0)]
        a, b = a[m], b[m]
        den = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
        if den > 0:
            best = max(best, float(np.dot(a, b)) / den)
    offsets: list[float] = []
    loud = np.flatnonzero(np.abs(x) > 0.6 * 32767)
    last = -(10**9)
    for j in loud:
        if j - last < 960 or frames[j // 960] < 0:
            last = j if j - last < 960 else last
            continue
        last = j
        t = frames[j // 960] + (j % 960) * 1_000_000_000 // SAMPLE_RATE
        offsets.append(((t + interval // 2) % interval - interval // 2) / 1e6)
    return {"ncc": best, "click_offsets_ms": offsets}


def speech_reference(
    received: npt.NDArray[np.float64], frames: list[int], loop: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """What the listener should have heard, frame by frame: the looped source at each
    played frame's capture time (its phase found by circular cross-correlation of the
    longest run of regular frames), the lost frames' content where the receiver concealed
    a loss, silence where it stretched (no source time passed)."""
    n, size = len(frames), len(loop)
    cap = np.array(frames[:n], np.int64)
    run = best = (0, 0)
    for i in range(1, n + 1):  # the longest run of frames 20 ms apart
        if (
            i < n
            and cap[i] >= 0
            and cap[i - 1] >= 0
            and abs(cap[i] - cap[i - 1] - 20_000_000) < 100_000
        ):
            run = (run[0], i + 1) if run[1] == i else (i - 1, i + 1)
            best = max(best, run, key=lambda r: r[1] - r[0])
    a, b = best
    seg = received[a * 960 : b * 960]
    cc = np.fft.irfft(np.conj(np.fft.rfft(seg, size)) * np.fft.rfft(loop), size)
    phase, c0 = int(np.argmax(cc)), int(cap[a])
    good = np.flatnonzero(cap >= 0)
    out = np.zeros(n * 960)
    for i in range(n):
        t = int(cap[i])
        if t < 0:  # concealed: a loss (the timeline moved on) or a stretch (it did not)
            before, after = good[good < i], good[good > i]
            if not len(before) or not len(after):
                continue
            j, k = int(before[-1]), int(after[0])
            if abs((cap[k] - cap[j]) - (k - j) * 20_000_000) > 100_000:
                continue  # a stretch: silence is what should have been heard
            t = int(cap[j]) + (i - j) * 20_000_000
        s0 = round((t - c0) * SAMPLE_RATE / 1e9) + phase
        out[i * 960 : (i + 1) * 960] = loop[(s0 + np.arange(960)) % size]
    return out


def pesq_wb(reference: npt.NDArray[np.float64], received: npt.NDArray[np.float64]) -> float:
    """PESQ wide-band (16 kHz) of two aligned 48 kHz signals."""
    from pesq import pesq
    from scipy.signal import resample_poly

    n = min(len(reference), len(received))
    ref = resample_poly(reference[:n], 1, 3).astype(np.float32)
    deg = resample_poly(received[:n], 1, 3).astype(np.float32)
    return float(pesq(PESQ_RATE, ref, deg, "wb"))


def codec_only(loop: npt.NDArray[np.float64], bitrate: int, loss_pct: int) -> float:
    """PESQ of the speech through Opus alone (no network): seeded random loss, the next
    packet's FEC copy when it arrived, else PLC (the receiver's rules)."""
    from pipeline.audio.opus import OpusDecoder, OpusEncoder

    sig = np.concatenate([loop, loop]).astype(np.int16)
    enc, dec = OpusEncoder(bitrate), OpusDecoder()
    packets = [
        p for k in range(len(sig) // 960) for _, p in enc.encode(sig[k * 960 : (k + 1) * 960])
    ]
    lost = np.random.default_rng(loss_pct).random(len(packets)) < loss_pct / 100
    out = []
    for i, p in enumerate(packets):
        if not lost[i]:
            out.append(dec.decode(p))
        elif i + 1 < len(packets) and not lost[i + 1]:
            out.append(dec.decode_fec(packets[i + 1]))
        else:
            out.append(dec.conceal())
    y = np.concatenate(out).astype(np.float64)[312:]  # the encoder's look-ahead
    return pesq_wb(sig.astype(np.float64)[: len(y)], y)


# --------------------------------------------------------------------------- processes


def config(
    work: Path,
    port: int,
    *,
    source: str,
    host: str = "127.0.0.1",
    transport: str = "websocket",
    bitrate: int = 32,
    embedded: bool = True,
) -> Path:
    server = f"server:\n  embedded: true\n  host: {host}\n  port: {port}\n" if embedded else ""
    path = work / f"pipeline-{source}.yaml"
    path.write_text(
        f"source:\n  kind: trace\n  path: {TRACE}\n  loop: true\n"
        f"transmit:\n  primary: {transport}\n  server_url: http://{host}:{port}\n  room: A\n"
        f"{server}"
        f"audio:\n  enabled: true\n  source: {source}\n  bitrate_kbps: {bitrate}\n"
        f"supervisor:\n  run_dir: {work / 'run'}\n  heartbeat_interval_ms: 100\n"
        f"  heartbeat_timeout_ms: 5000\nmonitor:\n  enabled: false\n",
        encoding="utf-8",
    )  # fmt: skip
    return path


def token(room: str, role: str, subject: str) -> str:
    from pipeline.wire.tokens import mint_token

    return mint_token(SECRET, room=room, role=role, subject=subject)


def env() -> dict[str, str]:
    return {**os.environ, "POSEWIRE_SECRET": SECRET, "PYTHONPATH": str(ROOT)}


def wait_line(log: Path, text: str, proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait until ``text`` appears in ``log`` (the event), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(encoding="utf-8", errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)  # polling a file for the event, with a limit
    tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{text!r} not seen in {log.name} within {timeout:g} s:\n{tail}")


@contextlib.contextmanager
def pipeline(cfg: Path, work: Path, prefix: Sequence[str] = ()) -> Iterator[subprocess.Popen[Any]]:
    """The pipeline running (its audio stage encoding) until the block ends."""
    log = work / f"{cfg.stem}.log"
    with log.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pipeline", str(cfg)], cwd=ROOT, env=env(),
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_line(log, "transport ", proc, 90)  # transmit connected
            wait_line(log, "audio: ", proc, 60)  # the audio stage encodes
            yield proc
        finally:
            stop_process(proc)


def receive(
    url: str,
    work: Path,
    seconds: float,
    *,
    transport: str = "websocket",
    prefix: Sequence[str] = (),
    name: str = "rx",
    sync: bool = True,
) -> tuple[dict[str, Any], Path]:
    """``python -m pipeline receive --audio`` for ``seconds``: its report and WAV."""
    wav = work / f"{name}.wav"
    rep = work / f"{name}.json"
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "pipeline", "receive", "--server", url, "--room", "A",
         "--token", token("A", "subscriber", name), "--duration", str(seconds),
         "--transport", transport, "--audio", str(wav), "--report", str(rep),
         "--connect-timeout", "20", *(() if sync else ("--no-audio-sync",))],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=seconds + 90,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"receive failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(rep.read_text(encoding="utf-8")), wav


def stage_cpu(sup_pid: int, stage: str) -> float | None:
    """CPU use of a stage process since it started (fraction of one core)."""
    from pipeline.runtime.stage import stage_processes

    proc = stage_processes(sup_pid).get(stage)
    if proc is None:
        return None
    t = proc.cpu_times()
    return float((t.user + t.system) / max(time.time() - proc.create_time(), 1e-3))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- measurements


def loopback(work: Path, seconds: float, *, baseline: bool = True) -> dict[str, Any]:
    """Tone through a real pipeline to a real receiver on loopback; its figures (and,
    with ``baseline``, the 16-bit PCM baseline's through the same server)."""
    port = free_port()
    with pipeline(config(work, port, source="tone"), work) as proc:
        rep, wav = receive(f"http://127.0.0.1:{port}", work, seconds)
        cpu = stage_cpu(proc.pid, "audio")
        pcm = pcm_baseline(f"http://127.0.0.1:{port}", min(seconds, 5.0)) if baseline else {}
    (audio,) = rep["audio"].values()
    frames = json.loads(wav.with_suffix(".frames.json").read_text(encoding="utf-8"))
    match = tone_match(wav, frames)
    offsets = [abs(v) for v in match["click_offsets_ms"]]
    return {
        "report": rep,
        "audio": audio,
        "ncc": match["ncc"],
        "click_offset_ms_max": max(offsets) if offsets else None,
        "clicks": len(offsets),
        "audio_cpu": cpu,
        "pcm": pcm,
        "seconds": rep["duration_s"],
    }


def pcm_baseline(url: str, seconds: float) -> dict[str, Any]:
    """16-bit PCM at 10 ms per packet through the same server: transit and bytes/s."""
    import asyncio

    from pipeline.codec.audio import pack_audio, parse_audio
    from pipeline.transports.base import Packet
    from pipeline.transports.websocket import WebSocketTransport

    async def run() -> dict[str, Any]:
        pub = WebSocketTransport(url, "pcm", token("pcm", "publisher", "pcm-pub"),
                                 publish=True, subscribe=False)  # fmt: skip
        sub = WebSocketTransport(url, "pcm", token("pcm", "subscriber", "pcm-sub"),
                                 publish=False, subscribe=True)  # fmt: skip
        await sub.connect()
        await pub.connect()
        transit: list[float] = []
        nbytes = 0
        n = int(seconds * 100)
        t0 = time.time_ns()
        m0 = time.monotonic()
        payload = (np.sin(np.arange(480) / 10) * 8000).astype("<i2").tobytes()
        for k in range(n):  # bounded: n packets, one per 10 ms
            due = m0 + (k + 1) * 0.01
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # pacing a sound card
            await pub.send(pack_audio(7, k, t0 + k * 10_000_000, 480, payload))
            while (item := sub.recv_nowait()) is not None:
                if isinstance(item, Packet):
                    a = parse_audio(item.data)
                    transit.append((item.received_ns - a.capture_ts_ns) / 1e6)
                    nbytes += len(item.data)
        await pub.close()
        await sub.close()
        return {"transit": transit, "bytes_per_s": nbytes / seconds}

    got = asyncio.run(run())
    tr = got["transit"]
    return {
        "transit_p50_ms": float(np.percentile(tr, 50)) if tr else None,
        "transit_p95_ms": float(np.percentile(tr, 95)) if tr else None,
        "bytes_per_s": got["bytes_per_s"],
        "packets": len(tr),
    }


def speech_quality(
    work: Path, seconds: float, losses: Sequence[int], bitrate: int
) -> list[dict[str, Any]]:
    """PESQ of speech through the pipeline over WebRTC with loss on the receiver's link."""
    from bench.netns import topology, unavailable_reason
    from pipeline.audio.sources import read_pcm, render_speech
    from pipeline.config import SPEECH_TEXT

    why = unavailable_reason()
    if why is not None:
        return [{"name": f"speech {loss}% loss", "skipped": why} for loss in losses]
    pcm = read_pcm(render_speech(SPEECH_TEXT, work), "audio.text").astype(np.float64)
    loop = pcm[: len(pcm) // 960 * 960]
    rows: list[dict[str, Any]] = []
    with topology(("s", "c")) as net:
        s, c = net.host("s"), net.host("c")
        port = 8765
        cfg = config(work, port, source="speech", host=s.address, transport="webrtc",
                     bitrate=bitrate)  # fmt: skip
        with pipeline(cfg, work, prefix=s.exec_argv([])):
            # warm-up, not measured: the first receiver meets the pipeline's start-up
            receive(f"http://{s.address}:{port}", work, 3.0, transport="webrtc",
                    prefix=c.exec_argv([]), name="warmup")  # fmt: skip
            for loss in losses:
                net.clear_faults()
                if loss:
                    net.add_drop("udp", loss, host="c", direction="to", name="loss")
                try:
                    rep, wav = receive(f"http://{s.address}:{port}", work, seconds,
                                       transport="webrtc", prefix=c.exec_argv([]),
                                       name=f"speech{loss}", sync=False)  # fmt: skip
                except RuntimeError as exc:  # e.g. the WebRTC session declared dead
                    rows.append({"name": f"speech {loss}% loss, whole path",
                                 "loss_pct": loss, "error": str(exc)[-300:]})  # fmt: skip
                    continue
                (audio,) = rep["audio"].values() if rep["audio"] else ({},)
                received = read_wav(wav)
                frames = json.loads(wav.with_suffix(".frames.json").read_text(encoding="utf-8"))
                skip = 50  # the first second: the jitter buffer settles
                expected = speech_reference(received, frames, loop)
                score = pesq_wb(expected[skip * 960 :], received[skip * 960 : len(expected)])
                rows.append({
                    "name": f"speech {loss}% loss, whole path", "bitrate_kbps": bitrate,
                    "transport": rep["transport"]["kind"], "loss_pct": loss, "pesq_wb": score,
                    "codec_only_pesq_wb": codec_only(loop, bitrate, loss),
                    "mouth_to_ear_p95_ms": audio.get("mouth_to_ear_ms", {}).get("p95"),
                    "frames_discarded": audio.get("discarded"),
                    "frames_fec": audio.get("frames_fec"),
                    "frames_concealed": audio.get("frames_concealed"),
                    "frames_received": audio.get("frames_received"),
                    "dropped_by_router": net.drop_counters().get("loss", 0),
                })  # fmt: skip
        net.clear_faults()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench audio", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--no-speech", action="store_true", help="skip the PESQ part")
    parser.add_argument("--speech-bitrate", type=int, default=48, help="kbit/s (default 48)")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    seconds = 6.0 if args.quick else 20.0
    rows: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pw-bench-audio-") as tmp:
        work = Path(tmp)
        lb = loopback(work, seconds)
        a = lb["audio"]
        m2e, skew = a["mouth_to_ear_ms"], a["abs_skew_ms"]
        rows.append({
            "name": "opus 32 kbit/s, loopback websocket",
            "mouth_to_ear_p50_ms": m2e["p50"], "mouth_to_ear_p95_ms": m2e["p95"],
            "abs_skew_p50_ms": skew["p50"], "abs_skew_p95_ms": skew["p95"],
            "tone_ncc": lb["ncc"], "click_offset_max_ms": lb["click_offset_ms_max"],
            "bytes_per_s": a["bytes"] / max(lb["seconds"], 1e-3),
            "frames_concealed": a["frames_concealed"],
            "jitter_buffer_depth_p95": a["jitter_buffer_depth"]["p95"],
            "audio_stage_cpu_pct": None if lb["audio_cpu"] is None else 100 * lb["audio_cpu"],
        })  # fmt: skip
        pcm = lb["pcm"]
        rows.append({
            "name": "baseline: 16-bit PCM 10 ms packets, same server",
            "transit_p50_ms": pcm["transit_p50_ms"], "transit_p95_ms": pcm["transit_p95_ms"],
            "bytes_per_s": pcm["bytes_per_s"],
        })  # fmt: skip
        targets += [
            at_most("mouth-to-ear p95 (ms), loopback", m2e["p95"], 80.0),
            at_most("|pose/audio skew| p95 (ms)", skew["p95"], 20.0),
            at_least("tone cross-correlation", lb["ncc"], 0.9),
        ]
        if not args.no_speech:
            speech = speech_quality(
                work, 8.0 if args.quick else 15.0, (0, 5, 20), args.speech_bitrate
            )
            rows += speech
            by = {r.get("loss_pct"): r.get("pesq_wb") for r in speech}
            for loss, goal in ((0, 4.0), (5, 3.2)):
                value = by.get(loss)
                if isinstance(value, float):
                    targets.append(at_least(f"PESQ wb {loss}% loss", value, goal))
    report("audio", rows, targets, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
