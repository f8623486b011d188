"""The room server's WebRTC members (docs/webrtc.md), with real processes in namespaces.

`python -m pipeline serve` runs in host b (10.77.2.2); every member is a
tests/rtc_client.py process in host a (an aiohttp WebSocket plus, when it offers,
one pipeline.rtc.PeerLink), driven over stdin/stdout JSON. One server for the
module; each test uses its own room. The blackout test runs last but one (it
leaves a dead link behind), the metrics test last.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.common import stop_process
from bench.netns import Peer, Topology, python_env, topology, unavailable_reason
from pipeline.model.prometheus import parse_exposition
from pipeline.server.streams import StoredPacket, StreamState
from tests.test_server_support import SECRET, RawWS, raw_join, running_server, token

pytestmark = pytest.mark.timing  # asserts times or rates: runs alone (Makefile)

CLIENT = "tests.rtc_client"
PORT = 8765
#: the server declares a path dead after server.webrtc.dead_after_ms (1000 ms by default)
DEAD_LIMIT_S = 1.5


@dataclass
class Rig:
    net: Topology
    url: str
    logs: Path
    server: subprocess.Popen[str]
    serial: int = 0

    def client(self, max_seconds: float = 60.0) -> Peer:
        self.serial += 1
        log_dir = self.logs / f"client{self.serial}"
        log_dir.mkdir()
        return self.net.start_python(
            "a", CLIENT, ["--url", self.url, "--max-seconds", str(max_seconds)], log_dir
        )

    def member(
        self, room: str, *, publish: bool = False, subscribe: bool = False, offer: int = 0
    ) -> Peer:
        """A joined member (offering session ``offer`` and waiting for its channels, if > 0)."""
        peer = self.client()
        role = "publisher" if publish else "subscriber"
        cmd = {"cmd": "join", "token": token(room, role), "room": room}
        peer.send(cmd | {"publish": publish, "subscribe": subscribe})
        welcome = peer.expect("welcome", timeout=20)["msg"]
        assert welcome["type"] == "welcome" and welcome["webrtc"] == {"enabled": True}
        if offer:
            peer.send({"cmd": "offer", "session": offer})
            peer.expect("open", timeout=20)
        return peer

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        peer = self.client()
        peer.send({"cmd": "metrics", "url": self.url + "/metrics"})
        text = peer.expect("metrics", timeout=20)["text"]
        peer.close()
        return parse_exposition(text)


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(f"posewire_server_{name}", frozenset(labels.items()))]


def report(peer: Peer) -> dict[str, Any]:
    peer.send({"cmd": "report"})
    return peer.expect("report", timeout=10)


def seqs(
    rep: dict[str, Any], stream_id: int, paths: tuple[str, ...] = ("pose", "control", "ws")
) -> list[int]:
    return [p[1] for p in rep["packets"] if p[0] == stream_id and p[3] in paths]


def publish(
    peer: Peer, stream_id: int, count: int, path: str, interval_ms: float = 15
) -> list[int]:
    peer.send(
        {"cmd": "publish", "stream_id": stream_id, "count": count, "path": path,
         "interval_ms": interval_ms}
    )  # fmt: skip
    published: list[int] = peer.expect("published", timeout=30)["seqs"]
    time.sleep(0.3)  # the last packets in flight
    return published


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("rtc")
    with topology(("a", "b")) as net:
        host = net.host("b")
        env = python_env() | {"POSEWIRE_SECRET": SECRET}
        config = logs / "server.yaml"  # a fresh store: stream ids bound by earlier runs
        config.write_text(f"server:\n  data_dir: {logs / 'state'}\n", encoding="utf-8")
        err = (logs / "server.log").open("w")
        server = subprocess.Popen(
            host.python_argv("pipeline", "serve", "--host", host.address, "--port", str(PORT),
                             "--config", str(config), "--log-level", "INFO"),
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=Path(__file__).parents[1],
        )  # fmt: skip
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "listening" in line, (logs / "server.log").read_text()
        try:
            yield Rig(net, f"http://{host.address}:{PORT}", logs, server)
        finally:
            stop_process(server)
            server.stdout.close()
            err.close()


def test_webrtc_publisher_to_webrtc_and_websocket_subscribers(rig: Rig) -> None:
    room = "rtc-a"
    sub_rtc = rig.member(room, subscribe=True, offer=1)
    sub_ws = rig.member(room, subscribe=True)
    pub = rig.member(room, publish=True, offer=1)
    sent = publish(pub, 7, 90, "rtc")
    assert len(sent) == 90
    got_rtc, got_ws = report(sub_rtc), report(sub_ws)
    assert seqs(got_rtc, 7) == sent  # every packet, in order, on a clean path
    assert seqs(got_ws, 7) == sent
    assert not seqs(got_rtc, 7, ("ws",))  # all of it on the channels
    # keyframes reliable; deltas of a WebRTC publisher lossy (presumed self-contained),
    # but for the first anchor candidate (the 4th packet, 3 after the keyframe: reliable
    # until the next delta shows that this keyframe-mode stream does not predict from it)
    by_seq = {p[1]: (p[2], p[3]) for p in got_rtc["packets"] if p[0] == 7}
    assert {by_seq[s] for s in sent if by_seq[s][0]} == {(True, "control")}
    assert by_seq[sent[3]] == (False, "control")
    assert {by_seq[s] for s in sent[4:] if not by_seq[s][0]} == {(False, "pose")}
    assert report(pub)["acks"] == 90  # acks on the control channel (or the WebSocket)

    # a late joiner on WebRTC: a backfill first (on control when its channels open)
    late = rig.member(room, subscribe=True, offer=1)
    time.sleep(0.3)
    more = publish(pub, 7, 20, "rtc")
    rep = report(late)
    backfills = [t for t in rep["texts"] if t["type"] == "backfill" and t["_path"] == "ctl"]
    assert backfills, rep["texts"]
    bf = backfills[0]
    stored = [p for p in rep["packets"] if p[3] == "control" and p[1] <= bf["last_seq"]]
    assert [p[1] for p in stored][-bf["count"] :] == list(
        range(bf["first_seq"], bf["last_seq"] + 1)
    )
    assert stored[-bf["count"]][2]  # the backfill starts with a keyframe
    live = seqs(rep, 7, ("pose", "control"))
    assert live[-len(more) :] == more

    # a keyframe request from a member that was sent the keyframe (reliably, on control):
    # a delta overtook its keyframe; nothing is re-sent, the request is counted
    key = ("posewire_server_keyframe_repairs_skipped_total", frozenset())
    before = rig.metrics().get(key, 0.0)
    sub_rtc.send({"cmd": "keyframe_request", "stream_id": 7, "path": "rtc"})
    deadline = time.monotonic() + 5
    while rig.metrics().get(key, 0.0) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rig.metrics().get(key, 0.0) == before + 1


def test_websocket_publisher_to_webrtc_subscriber(rig: Rig) -> None:
    room = "rtc-b"
    sub = rig.member(room, subscribe=True, offer=3)
    pub = rig.member(room, publish=True)
    sent = publish(pub, 8, 60, "ws")
    rep = report(sub)
    assert seqs(rep, 8) == sent
    assert seqs(rep, 8, ("pose", "control")) == sent


def test_bad_input_closes_only_that_member(rig: Rig) -> None:
    room = "rtc-c"
    before = rig.metrics()
    watcher = rig.member(room, subscribe=True, offer=1)
    pub = rig.member(room, publish=True, offer=1)
    pub.send({"cmd": "publish", "stream_id": 9, "count": 200, "path": "rtc", "interval_ms": 15})
    bad: list[tuple[Peer, int]] = []

    early = rig.client()
    offer = json.dumps({"type": "rtc_offer", "session": 1, "sdp": "v=0"})
    early.send({"cmd": "join", "raw_first": offer})
    bad.append((early, 4018))
    for what, code in (
        ({"cmd": "offer", "session": 1, "sdp": "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\n"}, 4018),
        ({"cmd": "open_channel", "label": "evil"}, 4018),
        ({"cmd": "pose_text"}, 4004),
        ({"cmd": "pose_bytes", "size": 60}, 4004),
        ({"cmd": "pose_bytes", "size": 9000, "fill": 1}, 4009),
        ({"cmd": "flood", "count": 1500}, 4010),
    ):
        peer = rig.member(room, publish=True, offer=0 if "sdp" in what else 2)
        peer.send(what)
        bad.append((peer, code))
    for peer, code in bad:
        assert peer.expect("closed", timeout=10)["code"] == code
    sent = pub.expect("published", timeout=30)["seqs"]
    time.sleep(0.3)
    assert seqs(report(watcher), 9) == sent  # no gap in the good stream
    after = rig.metrics()
    for reason, n in (("bad_signaling", 3), ("bad_packet", 2), ("message_too_large", 1),
                      ("rate_limited", 1)):  # fmt: skip
        counted = metric(after, "rejections_total", reason=reason) - metric(
            before, "rejections_total", reason=reason
        )
        assert counted >= n, reason


def test_blackout_moves_the_member_back_to_the_websocket(rig: Rig) -> None:
    room = "rtc-d"
    sub = rig.member(room, subscribe=True, offer=1)
    pub = rig.member(room, publish=True)
    pub.send({"cmd": "publish", "stream_id": 10, "count": 200, "path": "ws", "interval_ms": 15})
    time.sleep(0.8)
    t_blackout = time.monotonic_ns()
    rig.net.blackout_udp()
    try:
        msg = sub.expect("ws", timeout=5)["msg"]
        while msg["type"] != "rtc_state":
            msg = sub.expect("ws", timeout=5)["msg"]
        assert msg["state"] == "closed" and "dead" in msg["reason"]
        noticed_s = (msg["_t_ns"] - t_blackout) / 1e9
        print(f"rtc figure: dead path noticed after {noticed_s * 1000:.0f} ms")
        assert noticed_s < DEAD_LIMIT_S
        sent = pub.expect("published", timeout=30)["seqs"]
        time.sleep(0.3)
        rep = report(sub)
        after = [p for p in rep["packets"] if p[0] == 10 and p[4] > msg["_t_ns"]]
        assert after and all(p[3] == "ws" for p in after)
        # back on the WebSocket, the stream goes on to its last packet
        assert after[-1][1] == sent[-1]
    finally:
        rig.net.clear_faults()


def test_metrics_show_the_webrtc_series(rig: Rig) -> None:
    rig.member("rtc-e", subscribe=True, offer=1)  # after the blackout: a new link opens
    m = rig.metrics()
    assert metric(m, "rtc_offers_total") >= 8
    assert metric(m, "rtc_open_total") >= 6
    assert metric(m, "rtc_dead_total") >= 1
    assert metric(m, "rtc_peers") >= 1
    assert metric(m, "keyframe_repairs_skipped_total") >= 1
    assert metric(m, "keyframe_repairs_total") >= 0
    for name in ("rtc_dropped_stale_total", "late_packets_total"):
        assert metric(m, name) >= 0
    for transport in ("websocket", "webrtc"):
        for what in ("messages_in", "messages_out", "bytes_in", "bytes_out"):
            assert metric(m, f"transport_{what}_total", transport=transport) > 0
        for q in ("0.5", "0.95", "0.99"):
            value = metric(m, "relay_latency_ms", transport=transport, quantile=q)
            print(f"rtc figure: relay latency {transport} p{float(q) * 100:g} = {value:.3f} ms")
            assert 0 <= value < 1000


def test_unordered_acceptance_drops_instead_of_refusing() -> None:
    """StreamState.unordered: duplicates, old keyframes and late deltas of an older
    keyframe interval are dropped; a keyframe overtaken by newer deltas (other channel)
    is still taken, and so is a late delta of the current interval that the stream lacks
    (an anchor repaired by NACK, docs/webrtc.md)."""
    stream = StreamState[object](1, history=10)

    def take(seq: int, keyframe: bool = False, epoch: int = 0) -> bool:
        ok = stream.unordered(seq, epoch, keyframe, time.monotonic()) is None
        if ok:
            stream.add(StoredPacket(1, seq, None if keyframe else seq - 1, keyframe, b"", epoch))
        return ok

    assert take(1, keyframe=True)
    assert take(3)
    assert take(2)  # late, but the stream lacks it: taken (last_seq stays)
    assert stream.last_seq == 3
    assert not take(2)  # now a duplicate
    assert not take(3)  # duplicate
    assert take(5)
    assert take(4, keyframe=True)  # a keyframe overtaken by delta 5: still the newest keyframe
    assert stream.keyframe is not None and stream.keyframe.seq == 4
    assert stream.last_seq == 5
    assert not take(3)  # late, of the interval before the stored keyframe
    assert not take(4, keyframe=True)  # duplicate keyframe
    assert not take(1, keyframe=True)  # older than the stored keyframe
    assert not take(2, epoch=1)  # a new epoch must start with a keyframe: dropped, not refused
    # the strict check (WebSocket) refuses what unordered drops
    assert stream.stale(2, 0, False, time.monotonic()) is not None


def test_refused_offers_and_early_candidates_on_loopback() -> None:
    """What is decided before any peer connection exists (no network needed): the
    non-closing refusals, and a candidate before its offer (closing, 4018)."""

    async def run() -> None:
        offer = {"type": "rtc_offer", "session": 1, "sdp": "v=0"}
        async with running_server(webrtc={"enabled": False}) as srv:
            ws = await raw_join(srv, "rtc-off")
            ws.send_json(offer)
            got = await ws.read_text()
            assert got["type"] == "error" and got["reason"] == "webrtc_disabled"
            ws.send_json({"type": "ping", "id": 1})  # the membership goes on
            assert (await ws.read_text())["type"] == "pong"
            ws.close()
        async with running_server(webrtc={"enabled": True, "max_peers": 0}) as srv:
            ws = await raw_join(srv, "rtc-full")
            ws.send_json(offer)
            got = await ws.read_text()
            assert got["type"] == "error" and got["reason"] == "too_many_peers"
            ws.send_json({"type": "rtc_candidate", "session": 2, "candidate": ""})
            code, _ = await ws.read_until_close()
            assert code == 4018
            assert srv.state.metrics.rejections["bad_signaling"] == 1
            assert srv.state.metrics.rtc_offers == 1
            ws.close()

    asyncio.run(run())


def test_a_stream_goes_lossy_only_after_a_whole_anchored_interval() -> None:
    """StreamState.anchored: deltas may take the lossy channel once a whole keyframe
    interval predicted from its keyframe; one delta chained on another revokes it."""
    stream = StreamState[object](1, history=64)

    def add(seq: int, ref: int | None) -> StoredPacket:
        pkt = StoredPacket(1, seq, ref, ref is None, b"", 0)
        stream.add(pkt)
        return pkt

    add(0, None)
    first = [add(s, 0) for s in range(1, 5)]
    assert not any(p.lossy for p in first)  # not yet known
    add(5, None)
    second = [add(s, 5) for s in range(6, 10)]
    assert all(p.lossy for p in second) and stream.anchored
    chained = add(10, 9)  # predicts from the previous packet: back to reliable
    assert not chained.lossy and not stream.anchored
    add(11, None)
    assert not add(12, 11).lossy  # the interval before was not anchored throughout
    stream.presume_anchored()  # a chained delta was seen: the presumption is refused
    assert not stream.anchored

    fresh = StreamState[object](2, history=64)
    fresh.presume_anchored()  # a WebRTC publisher: anchored from its first delta
    fresh.add(StoredPacket(2, 0, None, True, b"", 0))
    first = StoredPacket(2, 1, 0, False, b"", 0)
    fresh.add(first)
    assert first.lossy


def test_an_offer_cannot_reach_a_room_the_token_does_not_grant() -> None:
    """Signaling rides the joined member WebSocket, so the room is the join's: a token
    for another room is refused at the join (4103), and an offer sent anyway is never
    taken; an offer naming another room is answered for the joined room only."""

    async def run() -> None:
        offer = {"type": "rtc_offer", "session": 1, "sdp": "v=0"}
        async with running_server() as srv:
            ws = await RawWS.connect(srv.port)
            ws.send_json({"type": "join", "token": token("rtc-granted"), "room": "rtc-other"})
            ws.send_json(offer)
            code, _ = await ws.read_until_close()
            assert code == 4103  # wrong_room: closed at the join, the offer never read
            assert srv.state.metrics.rtc_offers == 0
            ws.close()
            # joined room A, an offer that names room B: the peer connection (if any) is
            # A's membership; here the SDP is unusable, so it closes with 4018, counted
            ws = await raw_join(srv, "rtc-granted")
            ws.send_json({**offer, "room": "rtc-other"})
            code, _ = await ws.read_until_close()
            assert code == 4018
            assert srv.state.metrics.rejections["bad_signaling"] == 1
            assert "rtc-other" not in srv.state.manager.rooms
            ws.close()

    asyncio.run(run())
