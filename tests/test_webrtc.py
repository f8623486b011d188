"""The WebRTC transport end to end, all real processes (issue 12, client side).

The room server (``python -m pipeline serve``) runs in namespace host b on 10.77.2.2;
the sender pipeline and the receivers run in host a (bench/netns.py: aioice never
offers loopback candidates, so WebRTC needs the namespaces). The loopback case
needs no namespace: there the WebRTC transport cannot work and says why.

Figures (dead-path detection time, latency) are printed (``pytest -s``) and recorded
as junit properties.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bench.netns import Host, Topology, python_env
from pipeline.wire.tokens import mint_token
from tests.procutil import ROOT, TRACE, sender_config, start, stop, wait_for
from tests.test_server_support import SECRET, ServeProcess, free_port

pytestmark = pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")

Record = Callable[[str, object], None]
#: acceptance: a dead path is reported within this long (issue 12)
DEAD_WITHIN_MS = 300.0


def figure(record: Record, name: str, value: float) -> None:
    record(name, round(float(value), 3))
    print(f"webrtc figure: {name} = {value:.3f}")


class Receive:
    """``python -m pipeline receive`` in a namespace host; stdout and stderr in files."""

    def __init__(
        self,
        host: Host,
        url: str,
        name: str,
        transport: str,
        tmp: Path,
        extra: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.report_path = tmp / f"{name}.json"
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        token = mint_token(SECRET, room="A", role="subscriber", subject=name)
        argv = [sys.executable, "-m", "pipeline", "receive", "--server", url, "--room", "A",
                "--token", token, "--transport", transport, "--report", str(self.report_path),
                "--out", str(tmp / f"{name}.jsonl"), "--connect-timeout", "10", *extra]  # fmt: skip
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                host.exec_argv(argv), cwd=ROOT, env=python_env(), stdout=out, stderr=err
            )

    def lines(self) -> list[str]:
        return self.out_path.read_text(encoding="utf-8").splitlines()

    def line(self, needle: str, timeout: float) -> str:
        """The first stdout line containing ``needle`` (waits for it)."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [x for x in self.lines() if needle in x]
            return bool(found) or self.proc.poll() is not None

        wait_for(seen, timeout, step=0.01)
        assert found, f"{self.name}: no {needle!r} within {timeout} s: {self.tail()}"
        return found[0]

    def tail(self) -> str:
        return (
            "\n".join(self.lines()[-10:])
            + "\n"
            + self.err_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        )

    def finish(self) -> dict[str, Any]:
        """SIGINT (the receiver writes its report), then the report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"{self.name} did not stop: {self.tail()}") from None
        assert self.proc.returncode == 0, self.tail()
        report: dict[str, Any] = json.loads(self.report_path.read_text())
        return report

    def poses(self) -> list[dict[str, Any]]:
        """The poses written so far: whole lines only (the receiver may be writing one)."""
        path = self.out_path.with_suffix(".jsonl")
        return [json.loads(x) for x in path.read_text().split("\n")[:-1] if x]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _server(net: Topology) -> ServeProcess:
    b = net.host("b")
    return ServeProcess(0, host=b.address, prefix=b.exec_argv([]))


def _sender(
    net: Topology,
    tmp: Path,
    server: ServeProcess,
    primary: str,
    duration: float,
    where: str = "a",
    transmit_extra: str = "",
    monitor: bool = False,
    extra: str = "",
) -> tuple[subprocess.Popen[str], Path]:
    cfg = sender_config(
        tmp,
        server.port,
        primary=primary,
        host=net.host("b").address,
        embedded=False,
        transmit_extra=transmit_extra,
        monitor=monitor,
        extra=extra,
    )
    report = tmp / "sender.json"
    proc = start(
        cfg,
        "--duration",
        str(duration),
        "--report",
        str(report),
        env={**python_env(), "POSEWIRE_SECRET": SECRET},
        prefix=net.host(where).exec_argv([]),
    )
    return proc, report


@pytest.mark.timing  # no false dead path: a 250 ms silence bound, runs alone (Makefile)
def test_webrtc_sender_to_webrtc_and_websocket_receivers(
    net: Topology, tmp_path: Path, record_property: Record
) -> None:
    server = _server(net)
    a = net.host("a")
    receivers = [
        Receive(a, server.url, "rx_rtc", "webrtc", tmp_path),
        Receive(a, server.url, "rx_ws", "websocket", tmp_path),
    ]
    try:
        for rx, kind in zip(receivers, ("webrtc", "websocket"), strict=True):
            assert rx.line("joined room A", 20).endswith(f"over {kind}"), rx.tail()
        sender, sender_report = _sender(net, tmp_path, server, "webrtc", 5.0)
        assert _wait(sender, 40), "the sender did not end"
        code, _, err = stop(sender)
        assert code == 0, err[-3000:]
        time.sleep(1.0)  # the last packets reach the receivers
        reports = {rx.name: rx.finish() for rx in receivers}
    finally:
        for rx in receivers:
            rx.kill()
        server.stop()
    metrics = json.loads(sender_report.read_text())["stages"]["transmit"]["metrics"]
    assert metrics["transport_active_webrtc"] == 1, metrics
    assert metrics["rtc_dead_detections"] == 0, err[-3000:]
    sent = int(metrics["packets_sent_total"])
    assert sent > 20, metrics
    assert metrics.get("rtc_pose_sent", 0) > 0 and metrics.get("rtc_control_sent", 0) > 0, metrics
    for name, rep in reports.items():
        (stream,) = rep["publishers"].values()
        assert stream["decoded"] == sent, (name, stream, sent)  # every frame, both receivers
        assert stream["lost"] == 0 and stream["need_keyframe"] == 0, (name, stream)
        lat = rep["latency_ms"]
        assert lat["p50"] is not None, (name, rep)
        figure(record_property, f"{name}_latency_p50_ms", lat["p50"])
        figure(record_property, f"{name}_latency_p95_ms", lat["p95"])
    rtc, ws = reports["rx_rtc"]["transport"], reports["rx_ws"]["transport"]
    assert rtc["kind"] == "webrtc" and ws["kind"] == "websocket", (rtc, ws)
    assert rtc["stats"]["extra"]["packets_via_webrtc"] >= sent, rtc
    assert rtc["stats"]["extra"]["rtc_dead_detections"] == 0, rtc
    figure(record_property, "rx_rtc_open_ms", rtc["stats"]["extra"]["rtc_open_ms"])


def _wait(proc: subprocess.Popen[str], timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


@pytest.mark.timing  # asserts a time or a latency: runs alone (Makefile)
def test_udp_blackout_is_detected_within_300ms_and_the_link_comes_back(
    net: Topology, tmp_path: Path, record_property: Record
) -> None:
    server = _server(net)
    a = net.host("a")
    rx = Receive(a, server.url, "rx", "webrtc", tmp_path)
    sender = None
    try:
        joined = rx.line("joined room A", 20)
        assert joined.endswith("over webrtc"), joined
        member = joined.split(" as member ")[1].split()[0]
        # the publisher on the WebSocket: the blackout (UDP only) hits the receiver's link
        sender, _ = _sender(net, tmp_path, server, "websocket", 30.0)
        assert wait_for(lambda: len(rx.poses()) > 30, 20), rx.tail()
        t_before = time.time_ns()
        net.blackout_udp()
        t_installed = time.time_ns()
        down = rx.line("transport down", 3)
        time.sleep(max(0.0, 1.0 - (time.time_ns() - t_installed) / 1e9))
        net.clear_faults()
        t_cleared = time.time_ns()
        up = rx.line("transport up", 15)
        t_up = int(up.split()[0])
        assert wait_for(lambda: any(p["decoded_ns"] > t_up for p in rx.poses()), 5), rx.tail()
        time.sleep(0.5)
        rep = rx.finish()
    finally:
        rx.kill()
        if sender is not None:
            stop(sender, timeout=20)
        server.stop()
    extra = rep["transport"]["stats"]["extra"]
    assert "rtc_dead" in down, down
    assert "(resumed)" in up, up
    assert extra["rtc_dead_detections"] == 1, extra
    assert extra["rtc_opens"] == 2, extra  # opened, dead, opened again
    assert rep["member_id"] == member, (rep["member_id"], member)  # the same membership
    detected_ms = (extra["rtc_last_dead_ns"] - t_installed) / 1e6
    detected_before_ms = (extra["rtc_last_dead_ns"] - t_before) / 1e6
    figure(record_property, "dead_detected_after_rule_ms", detected_ms)
    figure(record_property, "dead_detected_after_rule_call_ms", detected_before_ms)
    figure(record_property, "silence_at_detection_ms", extra["rtc_last_dead_silence_ms"])
    figure(record_property, "reopen_after_clear_ms", (t_up - t_cleared) / 1e6)
    assert detected_before_ms < DEAD_WITHIN_MS, extra
    # the stream went on over the WebSocket meanwhile: nothing lost for good
    (stream,) = rep["publishers"].values()
    assert stream["decoded"] > 60, stream


@pytest.mark.timing  # asserts a time or a latency: runs alone (Makefile)
def test_publisher_link_dies_and_reopens_keyframe_first(
    net: Topology, tmp_path: Path, record_property: Record
) -> None:
    server = _server(net)
    rx = Receive(net.host("a"), server.url, "rx", "websocket", tmp_path)
    try:
        rx.line("joined room A", 20)
        sender, sender_report = _sender(net, tmp_path, server, "webrtc", 8.0)
        assert wait_for(lambda: len(rx.poses()) > 20, 20), rx.tail()
        net.blackout_udp()
        t_installed = time.time_ns()
        time.sleep(1.0)
        net.clear_faults()
        assert _wait(sender, 40), "the sender did not end"
        code, _, err = stop(sender)
        assert code == 0, err[-3000:]
        time.sleep(0.5)
        rep = rx.finish()
        poses = rx.poses()
    finally:
        rx.kill()
        server.stop()
    metrics = json.loads(sender_report.read_text())["stages"]["transmit"]["metrics"]
    assert metrics["rtc_dead_detections"] == 1 and metrics["rtc_opens"] == 2, metrics
    assert "WebRTC path dead" in err, err[-3000:]
    silence = metrics["rtc_last_dead_silence_ms"]
    figure(record_property, "publisher_silence_at_detection_ms", silence)
    (stream,) = rep["publishers"].values()
    # after the reopen the publisher sends a keyframe first: nothing undecodable
    assert stream["need_keyframe"] == 0, stream
    after = [p for p in poses if p["capture_ts_ns"] > t_installed + 1_000_000_000]
    assert len(after) > 10, stream  # decoding resumed after the blackout
    # lost: only what went into the dead path before it was detected (~0.3 s at 30 fps)
    lost = metrics["packets_sent_total"] - stream["decoded"]
    figure(record_property, "publisher_packets_lost_in_blackout", lost)
    assert 0 <= lost <= 12, (stream, metrics)


def test_primary_webrtc_against_a_loopback_server_uses_the_websocket(tmp_path: Path) -> None:
    port = free_port()
    report = tmp_path / "report.json"
    proc = start(
        sender_config(tmp_path, port, primary="webrtc"),
        "--duration",
        "5",
        "--report",
        str(report),
        env={"POSEWIRE_SECRET": SECRET},
    )
    assert _wait(proc, 40), "the pipeline did not end"
    code, _, err = stop(proc)
    assert code == 0, err[-3000:]
    why = (
        "WebRTC cannot reach a server on 127.0.0.1: aioice offers no loopback candidates; "
        "using the WebSocket"
    )
    assert err.count(why) == 1, err[-3000:]
    metrics = json.loads(report.read_text())["stages"]["transmit"]["metrics"]
    assert metrics["transport_active_websocket"] == 1, metrics
    assert metrics["transport_active_webrtc"] == 0, metrics
    assert metrics["transport_unavailable_webrtc"] == 1, metrics
    assert metrics["packets_sent_total"] > 20, (metrics, err[-4000:])


def test_receive_over_webrtc_from_a_loopback_server_says_why() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "receive", "--server", "http://127.0.0.1:9",
         "--room", "A", "--token", "t", "--transport", "webrtc"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "WebRTC cannot reach a server on 127.0.0.1: aioice offers no loopback" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- loss and TURN

#: the loss phases of one run: percent of packets dropped on the server -> host a path
LOSS_PHASES = (0, 5, 20)
PHASE_S = 6.0
SETTLE_NS = 300_000_000
#: issue 13: decoded fraction >= 1 - LOSS_FACTOR x loss
LOSS_FACTOR = 1.3
"""Frames captured in the first 0.3 s of a phase are left out (the rule changed mid-flight)."""


def _live(rx: Receive) -> dict[int, dict[str, Any]]:
    return {p["seq"]: p for p in rx.poses() if not p["backfill"]}


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


@pytest.mark.timing  # asserts a time or a latency: runs alone (Makefile)
def test_loss_costs_webrtc_its_lost_frames_and_stalls_the_websocket(
    net: Topology, tmp_path: Path, record_property: Record
) -> None:
    """A real sender pipeline (WebRTC, ``encode.references: auto`` = anchor) in host a, the
    server in host b, two receivers in host a, one per transport; the router drops 0, 5,
    then 20 % of the UDP *and* TCP packets to and from host a, a phase each, so both legs
    lose (publisher -> server and server -> subscriber, acks, NACKs and repairs too).

    Loss does not multiply (issue 13): the WebRTC receiver decodes at least
    1 - 1.3 x the combined loss of the two legs (1 - (1 - p)^2): anchors travel reliably
    and are repaired by NACK (docs/webrtc.md, "Loss repair"), other deltas cost only
    themselves. The WebSocket receiver decodes every frame that reached the server, late
    (head-of-line blocking behind TCP retransmissions)."""
    server = _server(net)
    a = net.host("a")
    rx_rtc = Receive(a, server.url, "loss_rtc", "webrtc", tmp_path)
    rx_ws = Receive(a, server.url, "loss_ws", "websocket", tmp_path)
    phases: list[tuple[int, int, int]] = []
    try:
        for rx in (rx_rtc, rx_ws):
            rx.line("joined room A", 20)
        duration = len(LOSS_PHASES) * PHASE_S + 4.0
        sender, _ = _sender(net, tmp_path, server, "webrtc", duration)
        path = rx_rtc.out_path.with_suffix(".jsonl")
        wait_for(lambda: path.exists() and path.stat().st_size > 0, 30, step=0.05)
        for pct in LOSS_PHASES:
            net.clear_faults()
            if pct:
                net.add_drop("udp", pct, host="a", direction="both")
                net.add_drop("tcp", pct, host="a", direction="both")
            t0 = time.time_ns()
            time.sleep(PHASE_S)
            phases.append((pct, t0, time.time_ns()))
        net.clear_faults()
        assert _wait(sender, 30), "the sender did not end"
        code, _, err = stop(sender)
        assert code == 0, err[-3000:]
        time.sleep(1.0)
        rep_rtc = rx_rtc.finish()
        rx_ws.finish()
    finally:
        net.clear_faults()
        for rx in (rx_rtc, rx_ws):
            rx.kill()
        server.stop()
    assert rep_rtc["transport"]["kind"] == "webrtc", rep_rtc["transport"]
    (rtc_stream,) = rep_rtc["publishers"].values()
    print(f"webrtc figure: loss run receiver stream {rtc_stream}")
    rtc, ws = _live(rx_rtc), _live(rx_ws)
    figures: dict[int, dict[str, float]] = {}
    for pct, t0, t1 in phases:

        def in_phase(p: dict[str, Any], t0: int = t0, t1: int = t1) -> bool:
            return bool(t0 + SETTLE_NS <= p["capture_ts_ns"] < t1)

        # the sender numbers every frame it sends: the phase's frames are every sequence
        # number from the first to the last that reached a receiver (what the publisher
        # leg lost never reached the server)
        reached = sorted(s for s, p in ws.items() if in_phase(p))
        got = {s for s, p in rtc.items() if in_phase(p)}
        seen = [*reached, *got]  # (TCP may still hold the phase's last frames at the end)
        sent = set(range(min(seen), max(seen) + 1))
        assert len(sent) > PHASE_S * 20, (pct, len(sent))
        assert got <= sent
        for s in got & set(reached):  # the same packet decodes to the same pose on both
            assert rtc[s]["image"] == ws[s]["image"], s
        combined = 1 - (1 - pct / 100) ** 2
        f = figures[pct] = {
            "decoded": len(got) / len(sent),
            "target": 1 - LOSS_FACTOR * combined,
            "rtc_p50": _p([rtc[s]["latency_ms"] for s in got], 0.50),
            "rtc_p95": _p([rtc[s]["latency_ms"] for s in got], 0.95),
            "ws_p50": _p([ws[s]["latency_ms"] for s in reached], 0.50),
            "ws_p95": _p([ws[s]["latency_ms"] for s in reached], 0.95),
            "ws_p99": _p([ws[s]["latency_ms"] for s in reached], 0.99),
        }
        for name, value in f.items():
            figure(record_property, f"loss{pct}_{name}", value)
    assert figures[0]["decoded"] >= 0.98, figures
    # issue 13's target: decoded >= 1 - 1.3 x the combined loss (0.873 at 5 %, 0.532 at 20 %)
    for pct in LOSS_PHASES[1:]:
        assert figures[pct]["decoded"] >= figures[pct]["target"], figures
    assert rtc_stream["held"] > 0, rtc_stream  # frames waited for a repaired anchor
    # the WebSocket stalls behind its TCP retransmissions
    assert figures[20]["ws_p99"] >= 100.0, figures


TURN_USER, TURN_PASSWORD = "posewire", "turn-secret-2"


@pytest.mark.timing  # no false dead path: a 250 ms silence bound, runs alone (Makefile)
def test_turn_relay_carries_webrtc_when_direct_udp_is_dropped(
    net: Topology, tmp_path: Path, record_property: Record
) -> None:
    """coturn in the router; every UDP packet between the hosts dropped: the receiver's
    peer connection to the server is made through the TURN relay (both sides have the
    TURN server: server.ice_servers and --ice-server), and the poses flow over it."""
    from bench.turn import TURNSERVER

    if not Path(TURNSERVER).exists():
        pytest.skip(f"{TURNSERVER} is missing: apt-get install -y coturn")
    a, b = net.host("a"), net.host("b")
    with net.turn(TURN_USER, TURN_PASSWORD, log_dir=tmp_path) as turn:
        cfg = tmp_path / "server.yaml"
        cfg.write_text(
            json.dumps({"server": {"ice_servers": [turn.ice_server(b)]}}), encoding="utf-8"
        )  # JSON is YAML
        server = ServeProcess(0, "--config", str(cfg), host=b.address, prefix=b.exec_argv([]))
        net.blackout_udp()
        ice = turn.ice_server(a)
        extra = ["--ice-server", ice["urls"][0], "--ice-user", f"{TURN_USER}:{TURN_PASSWORD}"]
        rx = Receive(a, server.url, "rx_turn", "webrtc", tmp_path, extra)
        try:
            assert rx.line("joined room A", 30).endswith("over webrtc"), rx.tail()
            sender, _ = _sender(net, tmp_path, server, "websocket", 4.0, where="b")
            assert _wait(sender, 40), "the sender did not end"
            code, _, err = stop(sender)
            assert code == 0, err[-3000:]
            time.sleep(1.0)
            rep = rx.finish()
        finally:
            rx.kill()
            server.stop()
            net.clear_faults()
    (stream,) = rep["publishers"].values()
    extra_stats = rep["transport"]["stats"]["extra"]
    assert rep["transport"]["kind"] == "webrtc", rep["transport"]
    assert stream["decoded"] > 30 and extra_stats["packets_via_webrtc"] > 30, (stream, extra_stats)
    assert extra_stats["rtc_dead_detections"] == 0, extra_stats
    figure(record_property, "turn_open_ms", extra_stats["rtc_open_ms"])
    figure(record_property, "turn_latency_p50_ms", rep["latency_ms"]["p50"])
