"""The degradation ladder (issue 13): its levels, the encode stage's side (frames skipped,
a coarser quantization the standard decoder decodes), the supervisor's decisions on
stage metrics, and a real pipeline under a bandwidth cap below the stream's rate."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.codec import CodecConfig, Decoded, Decoder, Encoder
from pipeline.config import TransmitConfig, parse_config
from pipeline.errors import CommandError, ConfigError
from pipeline.model.pose import PoseFrame
from pipeline.runtime.ladder import DegradationLadder, Degrader, LadderStep, ladder_steps
from tests.procutil import TRACE, sender_config, start, stop, wait_for
from tests.test_monitor import _get, _post, _sample
from tests.test_server_support import free_port, load_trace

FRAME_NS = 33_333_333


def _tx(**kw: object) -> TransmitConfig:
    return TransmitConfig.model_validate(kw)


def test_levels_rate_first_then_precision_and_bad_settings_are_named() -> None:
    assert ladder_steps(_tx()) == [
        LadderStep(None, None),
        LadderStep(15.0, None),
        LadderStep(10.0, None),
        LadderStep(10.0, 2.0),
    ]
    assert ladder_steps(_tx(degrade={"fps": [], "precision_px": []})) == [LadderStep(None, None)]
    for body, field in (
        ("transmit:\n  degrade:\n    fps: [10, 15]\n", "transmit.degrade.fps"),
        ("transmit:\n  degrade:\n    precision_px: [4, 2]\n", "transmit.degrade.precision_px"),
        ("encode:\n  precision_px: 3\n", "transmit.degrade.precision_px"),
        ("transmit:\n  send_queue: 0\n", "transmit.send_queue"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_config(body)


def test_the_encode_side_skips_frames_to_the_level_rate_and_refuses_bad_levels() -> None:
    d = Degrader(_tx())
    ts = [i * FRAME_NS for i in range(30)]
    assert sum(map(d.keep, ts)) == 30
    assert d.on_degrade({"level": 1}) == {"level": 1, "setting": "<= 15 fps"}
    assert sum(d.keep(t + 30 * FRAME_NS) for t in ts) == 15
    d.on_degrade({"level": 2})
    assert sum(d.keep(t + 60 * FRAME_NS) for t in ts) == 10
    for bad in (-1, 4, "1", True, None):
        with pytest.raises(CommandError, match=r"'level' must be an integer in 0\.\.3"):
            d.on_degrade({"level": bad})
    d.on_degrade({"level": 0})
    m = d.metrics()
    assert (m["degradation_level"], m["degradation_steps_down_total"]) == (0, 2)
    assert (m["degradation_steps_up_total"], m["degradation_skipped_total"]) == (1, 35)


def test_a_coarser_precision_mid_stream_decodes_with_the_standard_decoder() -> None:
    """What the encode stage does on a precision step: a new encoder (same stream id and
    epoch) whose first packet is a keyframe carrying the coarser quantization."""
    trace = load_trace()
    codec = CodecConfig(references="previous")
    enc = Encoder(codec, 77)
    dec = Decoder()
    packets: list[tuple[bytes, float]] = []
    for seq in range(1, 61):
        if seq == 31:
            enc = Encoder(dataclasses.replace(codec, precision_px=2.0), 77, epoch=enc.epoch)
        frame = PoseFrame(seq=seq, capture_ts_ns=seq * FRAME_NS, image=trace[seq][None].copy())
        packet = enc.encode(frame)
        packets.append((packet, 2.0 if seq >= 31 else 0.5))
        out = dec.decode(packet)
        assert isinstance(out, Decoded), (seq, out)
        err_px = np.abs(out.frame.image[0, :, :2] - trace[seq][:, :2]).max() * 1920
        assert err_px <= packets[-1][1]
    fine = np.mean([len(p) for p, px in packets[5:30]])
    coarse = np.mean([len(p) for p, px in packets[35:60]])
    assert coarse < fine


def _metrics(
    t: float, offered_kbps: float, cap: float | None, latency: float = 10.0, depth: int = 0
) -> dict[str, dict[str, float]]:
    return {
        "encode": {"degradation_level": 0.0},
        "transmit": {
            "sendqueue_queued_bytes_total": offered_kbps * 125 * t,
            "bandwidth_limit_kbps": cap or 0.0,
            "latency_ms_p95": latency,
            "sendqueue_depth": float(depth),
            "ack_rtt_ms": 1.0,
        },
    }


def test_the_ladder_steps_once_per_window_and_back_only_where_the_cap_leaves_room() -> None:
    """The real ladder on stage metrics: a cap below the offered rate steps it down one
    level per window; a rate that fits holds it; only the lifted cap lets it back up."""
    sent: list[dict[str, object]] = []
    ladder = DegradationLadder(
        _tx(window_s=1.0, hold_s=2.0), lambda s, c, a: sent.append({"stage": s, **a}) or 1
    )
    rates = {0: 12.0, 1: 7.0, 2: 5.0, 3: 4.0}  # kbit/s offered at each level
    t = 0.0
    while t < 10.0:  # cap 6: level 0 and 1 are over it, level 2 fits
        ladder.step(_metrics(t, rates[ladder.level], 6.0), now=t)
        t += 0.1
    assert [a["level"] for a in sent] == [1, 2]
    assert [a["reason"] for a in sent] == ["bandwidth", "bandwidth"]
    assert all(a["stage"] == "encode" for a in sent)
    while t < 20.0:  # still capped: level 1 (7 kbit/s) would not fit
        ladder.step(_metrics(t, rates[ladder.level], 6.0), now=t)
        t += 0.1
    assert ladder.level == 2
    while t < 30.0:  # the cap lifted: up one level per hold
        ladder.step(_metrics(t, rates[ladder.level], None), now=t)
        t += 0.1
    assert [a["level"] for a in sent] == [1, 2, 1, 0]
    assert [s["reason"] for s in ladder.steps][2:] == ["recovered", "recovered"]
    # with an audio stage (32 kbit/s configured): down to the floor at the first step,
    # back to its configured bitrate at level 0
    cmds: list[tuple[str, str, dict[str, object]]] = []
    ladder3 = DegradationLadder(
        _tx(window_s=1.0, hold_s=2.0), lambda s, c, a: cmds.append((s, c, a)) or 1
    )
    for i in range(300):
        t = i * 0.1
        m = _metrics(t, rates[ladder3.level], 6.0 if t < 10.0 else None)
        ladder3.step({**m, "audio": {"audio_bitrate_kbps": 32.0}}, now=t)
    audio_sets = [a["bitrate_kbps"] for s, c, a in cmds if s == "audio" and c == "set"]
    assert audio_sets[0] == 16 and audio_sets[-1] == 32 and ladder3.level == 0, cmds
    # latency alone steps down only while packets wait in the send queue (the link's fault)
    ladder2 = DegradationLadder(_tx(window_s=1.0), lambda s, c, a: 1)
    for i in range(30):
        ladder2.step(_metrics(i * 0.1, 5.0, None, latency=400.0, depth=0), now=i * 0.1)
    assert ladder2.level == 0
    for i in range(30, 60):
        ladder2.step(_metrics(i * 0.1, 5.0, None, latency=400.0, depth=5), now=i * 0.1)
    assert ladder2.level >= 1 and ladder2.steps[0]["reason"] == "latency"


def _monitored(
    tmp_path: Path, transmit: str = "", extra: str = ""
) -> tuple[subprocess.Popen[str], Path, str, str]:
    """A trace pipeline (``window_s`` and ``hold_s`` 1 s, ``transmit`` lines more) with its
    monitor on: the process, its report path, the monitor's URL and control secret."""
    run_id = f"ladder{int(time.time() * 1000) % 10**8}"
    report = tmp_path / "report.json"
    cfg = sender_config(
        tmp_path,
        free_port(),
        transmit_extra=transmit + "  window_s: 1\n  hold_s: 1\n",
        monitor=True,
        monitor_extra="  sample_interval_s: 0.2\n  alert_hold_s: 1",
        extra=extra,
    )
    proc = start(cfg, "--run-id", run_id, "--report", str(report))
    url_file = tmp_path / "run" / run_id / "monitor.url"
    assert wait_for(url_file.exists, 30), "monitor did not start"
    secret = (url_file.parent / "control.token").read_text().strip()
    return proc, report, url_file.read_text().strip(), secret


@pytest.mark.timing
@pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")
def test_a_bandwidth_cap_engages_the_ladder_and_lifting_it_releases_it(tmp_path: Path) -> None:
    """A real pipeline (trace, 30 fps, ~13 kbit/s, WebSocket to its embedded server) with
    ``max_bandwidth_kbps: 6``: the ladder steps down (level > 0 in /metrics), the latency
    alert clears while still capped; the cap lifted with a ``set`` command: level 0."""
    proc, report, base, secret = _monitored(tmp_path, "  max_bandwidth_kbps: 6\n")
    try:

        def sample(name: str, **labels: str) -> float:
            return _sample(_get(f"{base}/metrics"), name, **labels) or 0.0

        assert wait_for(lambda: sample("posewire_degradation_level") >= 1, 40, 0.2), (
            "the ladder never engaged"
        )
        assert sample("posewire_degradation_steps_total", direction="down") >= 1
        # the cap backs packets up in the send queue before the ladder has stepped far enough
        assert wait_for(
            lambda: sample("posewire_alerts_raised_total", alert="latency") >= 1, 30, 0.2
        ), "the latency alert was never raised under the cap"
        assert wait_for(
            lambda: (
                sample("posewire_alert_active", alert="latency") == 0
                and sample("posewire_degradation_level") >= 1
            ),
            30,
            0.2,
        ), "the latency alert did not clear under the cap"
        status, _ = _post(f"{base}/control/transmit/set", {"max_bandwidth_kbps": None}, secret)
        assert status == 202
        assert wait_for(lambda: sample("posewire_degradation_level") == 0, 30, 0.2), (
            "the ladder did not release after the cap was lifted"
        )
        assert sample("posewire_degradation_steps_total", direction="up") >= 1
    finally:
        code, _, err = stop(proc)
    assert code == 0, err[-3000:]
    assert "degradation down 0 -> 1" in err and "degradation up 1 -> 0" in err, err[-3000:]
    data = json.loads(report.read_text())
    steps = data["degradation"]["steps"]
    assert steps[0]["from"] == 0 and steps[0]["reason"] in ("bandwidth", "latency")
    assert steps[-1]["to"] == 0 and steps[-1]["reason"] == "recovered"
    latency_alerts = [a for a in data["alerts"] if a["name"] == "latency"]
    assert all(a["cleared_at"] is not None for a in latency_alerts), latency_alerts
    tx = data["stages"]["transmit"]["metrics"]
    assert tx["sendqueue_dropped_keyframe_total"] == 0


@pytest.mark.timing
@pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")
def test_audio_in_a_capped_run_steps_to_16_kbit_and_keeps_flowing(tmp_path: Path) -> None:
    """Issue 14's bandwidth item end to end: a real pipeline with the tone (Opus 32 kbit/s,
    ~38 kbit/s on the wire) beside the trace (~13 kbit/s), then a 45 kbit/s cap set while
    both stream (the audio alone fits, not both): the ladder steps down and sets the audio stage to
    16 kbit/s; audio keeps going out at its 50 packets a second and the queue never drops
    it (pose deltas give way); the cap lifted, the ladder returns to level 0 and the audio
    to 32 kbit/s."""
    audio = "audio:\n  enabled: true\n  source: tone\n  bitrate_kbps: 32\n"
    proc, report, base, secret = _monitored(tmp_path, extra=audio)
    try:

        def stage(stage: str, metric: str) -> float:
            got = _sample(_get(f"{base}/metrics"), "posewire_stage_metric", stage=stage,
                          metric=metric)  # fmt: skip
            return got if got is not None else -1.0

        def level() -> float:
            return _sample(_get(f"{base}/metrics"), "posewire_degradation_level") or 0.0

        assert wait_for(lambda: stage("transmit", "audio_packets_sent_total") > 100, 40, 0.2)
        status, _ = _post(f"{base}/control/transmit/set", {"max_bandwidth_kbps": 45}, secret)
        assert status == 202
        assert wait_for(lambda: level() >= 1, 40, 0.2), "the ladder never engaged"
        assert wait_for(lambda: stage("audio", "audio_bitrate_kbps") == 16, 10, 0.2), (
            "the audio stage was not set to 16 kbit/s"
        )
        a0, t0 = stage("transmit", "audio_packets_sent_total"), time.monotonic()
        time.sleep(3.0)
        a1, t1 = stage("transmit", "audio_packets_sent_total"), time.monotonic()
        audio_rate = (a1 - a0) / (t1 - t0)
        degraded_level = level()
        status, _ = _post(f"{base}/control/transmit/set", {"max_bandwidth_kbps": None}, secret)
        assert status == 202
        assert wait_for(lambda: level() == 0, 30, 0.2), "the ladder did not release"
        assert wait_for(lambda: stage("audio", "audio_bitrate_kbps") == 32, 10, 0.2), (
            "the audio bitrate did not come back"
        )
    finally:
        code, _, err = stop(proc)
    assert code == 0, err[-3000:]
    tx = json.loads(report.read_text())["stages"]["transmit"]["metrics"]
    drops = {k: v for k, v in tx.items() if k.startswith("sendqueue_dropped")}
    print(f"capped at 45 kbit/s: ladder level {degraded_level:.0f}, audio at 16 kbit/s, "
          f"{audio_rate:.1f} audio packets/s sent; queue drops {drops}")  # fmt: skip
    assert audio_rate >= 45, audio_rate  # 50 a second: none held back or dropped
    assert tx.get("sendqueue_dropped_audio_total", 0) == 0, drops
    # no flapping under the cap: the audio sent beside the queue counts in the offered
    # rate, so the ladder never stepped up while capped (the ups come after the lift)
    steps = json.loads(report.read_text())["degradation"]["steps"]
    first_up = next((i for i, st in enumerate(steps) if st["to"] < st["from"]), len(steps))
    assert all(st["to"] < st["from"] for st in steps[first_up:]), steps
