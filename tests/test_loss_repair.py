"""Loss does not multiply (issue 13): a lost packet costs its own frame, on both legs.

A real sender pipeline (WebRTC, ``encode.references: auto`` = anchor) in host a, the
room server in host b, and two receivers in host a: one on WebRTC, one on the WebSocket
(TCP from the server on: it decodes what reached the server). The router drops a share of the UDP
packets to *and* from host a, so both legs lose: publisher -> server and server ->
subscriber, the NACKs and repairs too. Anchors travel reliably and are repaired by NACK
from the server's history (subscriber leg) or from the publisher (publisher leg); other
deltas may be lost; the receiver holds a delta whose anchor is late for up to 200 ms.
Target: decoded fraction >= 1 - 1.3 x the combined loss of the two legs
(1 - (1 - p)^2). docs/webrtc.md, "Loss repair"."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench.netns import Topology
from tests.procutil import TRACE, stop, wait_for
from tests.test_webrtc import Receive, Record, _sender, _server, _wait, figure

pytestmark = [
    pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}"),
    pytest.mark.timing,
]

PHASES = (5, 20)
PHASE_S = 6.0
SETTLE_NS = 300_000_000
LOSS_FACTOR = 1.3


def _live(rx: Receive) -> dict[int, dict[str, Any]]:
    return {p["seq"]: p for p in rx.poses() if not p["backfill"]}


def test_both_legs_lossy_decoded_fraction_meets_the_target(
    net: Topology, tmp_path: Path, record_property: Record
) -> None:
    server = _server(net)
    a = net.host("a")
    rx_rtc = Receive(a, server.url, "rep_rtc", "webrtc", tmp_path)
    rx_ws = Receive(a, server.url, "rep_ws", "websocket", tmp_path)
    phases: list[tuple[int, int, int]] = []
    try:
        for rx in (rx_rtc, rx_ws):
            rx.line("joined room A", 20)
        sender, _ = _sender(net, tmp_path, server, "webrtc", len(PHASES) * PHASE_S + 4.0)
        path = rx_rtc.out_path.with_suffix(".jsonl")
        assert wait_for(lambda: path.exists() and path.stat().st_size > 0, 30, step=0.05)
        for pct in PHASES:
            net.clear_faults()
            net.add_drop("udp", pct, host="a", direction="both")
            t0 = time.time_ns()
            time.sleep(PHASE_S)
            phases.append((pct, t0, time.time_ns()))
        net.clear_faults()
        assert _wait(sender, 30), "the sender did not end"
        code, _, err = stop(sender)
        assert code == 0, err[-3000:]
        time.sleep(1.0)
        rep = rx_rtc.finish()
        rx_ws.finish()
    finally:
        net.clear_faults()
        for rx in (rx_rtc, rx_ws):
            rx.kill()
        server.stop()
    assert rep["transport"]["kind"] == "webrtc", rep["transport"]
    (stream,) = rep["publishers"].values()
    print(f"loss repair: receiver stream {stream}")
    rtc, ws = _live(rx_rtc), _live(rx_ws)
    for pct, t0, t1 in phases:

        def in_phase(p: dict[str, Any], t0: int = t0, t1: int = t1) -> bool:
            return bool(t0 + SETTLE_NS <= p["capture_ts_ns"] < t1)

        # the sender numbers every frame it sends: the phase's frames are every sequence
        # number between the first and the last one that reached the WebSocket receiver
        # (TCP from the server on: what the publisher leg lost never got there)
        reached = sorted(s for s, p in ws.items() if in_phase(p))
        sent = set(range(reached[0], reached[-1] + 1))
        got = {s for s, p in rtc.items() if in_phase(p)}
        assert len(sent) > PHASE_S * 20, (pct, len(sent))
        assert got <= sent
        combined = 1 - (1 - pct / 100) ** 2
        fraction = len(got) / len(sent)
        lat = sorted(rtc[s]["latency_ms"] for s in got)
        figure(record_property, f"repair{pct}_decoded", fraction)
        figure(record_property, f"repair{pct}_target", 1 - LOSS_FACTOR * combined)
        figure(record_property, f"repair{pct}_p95_ms", lat[int(0.95 * (len(lat) - 1))])
        assert fraction >= 1 - LOSS_FACTOR * combined, (pct, fraction, stream)
    assert stream["held"] > 0 and stream["need_keyframe"] <= stream["held"], stream
