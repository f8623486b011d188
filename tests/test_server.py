"""Room server: relay, rooms, late join, back-pressure, bad input, limits, API, metrics.

Every test runs a real aiohttp server on a random 127.0.0.1 port and real
WebSocket clients in the same event loop; packets are real encoder output from
the pose traces (or, where the relay alone is tested, valid packets with
padded payloads).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from pipeline.client.receiver import Receiver
from pipeline.codec import CodecConfig, Encoder, peek_header
from pipeline.config import ServerConfig
from pipeline.errors import BrokenResourceError, ConfigError, TransportError
from pipeline.model.pose import PoseFrame
from pipeline.server.app import create_app
from pipeline.transports.base import Control, Packet, StateChange
from tests.test_server_support import (
    PoseSource,
    RawWS,
    Server,
    controls,
    drain,
    load_trace,
    member,
    packets,
    raw_join,
    running_server,
    seqs,
    token,
    until,
)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def receiver(srv: Server, room: str, subject: str) -> Receiver:
    return Receiver(srv.url, room, token(room, "subscriber", subject=subject))


async def publish(pub: Any, src: PoseSource, n: int, fps: float | None = None) -> None:
    for _ in range(n):
        await pub.send(src.next())
        if fps is not None:
            await asyncio.sleep(1 / fps)


def big_packets(sid: int, n: int) -> list[bytes]:
    """``n`` real packets of about 600 bytes (8 noisy poses per frame), keyframe every 30."""
    trace = load_trace()
    rng = np.random.default_rng(0)
    enc = Encoder(CodecConfig(keyframe_interval=30), sid)
    out = []
    for i in range(n):
        img = np.repeat(trace[i % len(trace)][None], 8, axis=0)
        img[..., :2] = np.clip(img[..., :2] + rng.normal(0, 0.02, img[..., :2].shape), 0, 1)
        frame = PoseFrame(seq=i + 1, capture_ts_ns=time.time_ns(), image=img.astype(np.float32))
        out.append(enc.encode(frame))
    return out


# --------------------------------------------------------------------------- relay


def test_two_receivers_decode_every_publisher_and_other_room_gets_nothing() -> None:
    async def main() -> None:
        async with running_server() as srv:
            r1, r2, rb = (
                receiver(srv, "A", "r1"),
                receiver(srv, "A", "r2"),
                receiver(srv, "B", "rb"),
            )
            for r in (r1, r2, rb):
                await r.connect()
            p1 = member(srv, "A", publish=True, subscribe=False, subject="p1")
            p2 = member(srv, "A", publish=True, subscribe=False, subject="p2")
            await p1.connect()
            await p2.connect()
            s1, s2 = PoseSource(11), PoseSource(12)
            await asyncio.gather(publish(p1, s1, 60, fps=120), publish(p2, s2, 60, fps=120))
            for r in (r1, r2):
                await r.run(5.0, until=lambda r=r: r.decoded >= 120)
            await rb.run(0.5)
            for r in (r1, r2):
                rep = r.report()
                assert set(rep["publishers"]) == {"11", "12"}
                for sid in ("11", "12"):
                    s = rep["publishers"][sid]
                    assert (s["received"], s["decoded"], s["lost"], s["need_keyframe"]) == (
                        60, 60, 0, 0,
                    )  # fmt: skip
                    assert s["subject"] == ("p1" if sid == "11" else "p2")
                    assert s["latency_ms"]["p50"] is not None
            assert rb.report()["frames_received"] == 0
            for t in (p1, p2):
                stats = t.statistics()
                assert stats.acks == 60 and stats.send_failures == 0
                await t.close()
            for r in (r1, r2, rb):
                await r.close()

    run(main())


def test_late_joiner_decodes_from_its_first_packet() -> None:
    async def main() -> None:
        async with running_server() as srv:
            pub = member(srv, "A", publish=True, subscribe=False)
            await pub.connect()
            src = PoseSource(5, keyframe_interval=30)
            await publish(pub, src, 45)  # keyframes at 1 and 31: history = 31..45
            await until(pub, lambda xs: len(controls(xs, "ack")) >= 45)
            late = receiver(srv, "A", "late")
            await late.connect()
            await late.run(3.0, until=lambda: late.decoded >= 15)
            st = late.streams[5]
            assert st.first_decoded_at == 1 and st.first_seq == 31
            assert (st.received, st.decoded, st.need_keyframe) == (15, 15, 0)
            await publish(pub, src, 10)
            await late.run(3.0, until=lambda: late.decoded >= 25)
            assert (st.decoded, st.lost, st.need_keyframe) == (25, 0, 0)
            await late.close()
            await pub.close()

    run(main())


def test_late_joiner_gets_every_stream_whole_while_publishers_keep_streaming() -> None:
    """Big snapshots (6 streams x ~29 packets x ~600 bytes) while live packets arrive and
    the subscriber queue is tiny: the snapshot is never cut, every stream decodes at once."""

    async def main() -> None:
        async with running_server(subscriber_queue=4) as srv:
            pubs = [member(srv, "A", publish=True, subscribe=False) for _ in range(6)]
            for p in pubs:
                await p.connect()
            streams = [big_packets(100 + i, 200) for i in range(6)]

            async def stream(i: int, start: int, stop: int) -> None:
                for pkt in streams[i][start:stop]:
                    await pubs[i].send(pkt)
                    while pubs[i].recv_nowait() is not None:
                        pass
                    await asyncio.sleep(1 / 60)

            await asyncio.gather(*(stream(i, 0, 45) for i in range(6)))
            late = receiver(srv, "A", "late")
            live = asyncio.gather(*(stream(i, 45, 75) for i in range(6)))
            await late.connect()
            await live
            await late.run(5.0, until=lambda: late.decoded >= 6 * 45)
            assert sorted(late.streams) == list(range(100, 106))
            for st in late.streams.values():
                assert st.first_decoded_at == 1 and st.need_keyframe == 0, st.summary()
            await late.close()
            for p in pubs:
                await p.close()

    run(main())


def test_acks_keyframe_requests_presence_broadcast_and_clock() -> None:
    async def main() -> None:
        async with running_server() as srv:
            pub = member(srv, "A", publish=True, subscribe=False, subject="pub")
            await pub.connect()
            assert pub.clock_offset_ns is not None and abs(pub.clock_offset_ns) < 50_000_000
            # a moderator: broadcasting needs the 'moderate' permission (issue 11, finding 6)
            sub = member(srv, "A", "moderator", subject="sub")
            await sub.connect()
            joined = await until(pub, lambda xs: controls(xs, "presence"))
            assert controls(joined, "presence")[0]["member"]["subject"] == "sub"
            await pub.send(PoseSource(9).next())
            acks = controls(await until(pub, lambda xs: controls(xs, "ack")), "ack")
            assert acks == [{"type": "ack", "stream_id": 9, "seq": 1}]
            await sub.request_keyframe(9)
            got = await until(pub, lambda xs: controls(xs, "keyframe_request"))
            assert controls(got, "keyframe_request")[0]["stream_id"] == 9
            await sub.send_control({"type": "broadcast", "data": {"hello": [1, 2]}})
            got = await until(pub, lambda xs: controls(xs, "broadcast"))
            b = controls(got, "broadcast")[0]
            assert b["data"] == {"hello": [1, 2]} and b["from"] == sub.member_id
            # the publisher's clock offset reached the subscriber's member list
            owner = sub.stream_owner(9)
            assert owner is not None and isinstance(owner["clock_offset_ns"], int)
            await sub.close()
            left = await until(
                pub, lambda xs: any(c["event"] == "leave" for c in controls(xs, "presence"))
            )
            assert [c for c in controls(left, "presence") if c["event"] == "leave"]
            await pub.close()

    run(main())


def test_slow_subscriber_drops_oldest_and_only_gets_decodable_chains() -> None:
    async def main() -> None:
        # the slow member reads nothing until the publisher is done, so it cannot answer
        # the server's pings: a long heartbeat keeps a slow run (coverage) from dropping it
        async with running_server(
            subscriber_queue=256, max_messages_per_s=100000, heartbeat_s=300
        ) as srv:
            fast = member(srv, "A", "subscriber", subject="fast")
            await fast.connect()
            slow = await raw_join(srv, "A", "subscriber", rcvbuf=4096)
            pub = member(srv, "A", publish=True, subscribe=False)
            await pub.connect()
            n = 9000
            pkts = big_packets(4, n)
            reading = asyncio.create_task(until(fast, lambda xs: len(packets(xs)) >= n, 120))
            for seq, pkt in enumerate(pkts, 1):
                await pub.send(pkt)
                if seq % 20 == 0:
                    await asyncio.sleep(0.002)
            got_fast = await reading
            assert seqs(got_fast) == list(range(1, n + 1))  # the fast one lost nothing
            assert srv.state.metrics.drops > 0  # the slow one was dropped from
            # now the slow one reads: every packet it gets decodes (its chain is intact)
            slow_seqs: list[tuple[int, bool, int | None]] = []
            while True:
                try:
                    async with asyncio.timeout(0.5):
                        op, payload = await slow.read_frame()
                except TimeoutError:
                    break
                if op == 0x2:
                    h = peek_header(payload)
                    slow_seqs.append((h.seq, h.keyframe, h.ref_seq))
            have: set[int] = set()
            for seq, kf, ref in slow_seqs:
                if kf:
                    have = {seq}
                else:
                    assert ref in have, f"packet {seq} sent without its reference {ref}"
                    have.add(seq)
            assert len(slow_seqs) < n
            assert slow_seqs[-1][0] == n or srv.state.metrics.skipped_undecodable > 0
            slow.close()
            await fast.close()
            await pub.close()

    run(main())


# --------------------------------------------------------------------------- bad input


async def _offender_closed(
    srv: Server, act: Any, *, join: bool = True, role: str = "publisher"
) -> tuple[int | None, list[Any]]:
    raw = await (raw_join(srv, "A", role) if join else RawWS.connect(srv.port))
    act(raw)
    code, got = await raw.read_until_close()
    raw.close()
    return code, got


def test_bad_input_closes_the_offender_while_a_stream_continues_without_gap() -> None:
    async def main() -> None:
        async with running_server(
            max_message_bytes=2000, max_messages_per_s=100, auth_timeout_s=0.5
        ) as srv:
            sub = member(srv, "A", "subscriber", subject="watcher")
            await sub.connect()
            pub = member(srv, "A", publish=True, subscribe=False)
            await pub.connect()
            src = PoseSource(1)
            await pub.send(src.next())
            streaming = asyncio.create_task(publish(pub, src, 10_000, fps=30))

            cases: list[tuple[str, Any, dict[str, Any], int]] = [
                ("malformed JSON", lambda w: w.send_text("{not json"), {}, 4002),
                ("JSON but not an object", lambda w: w.send_text("[1, 2]"), {}, 4002),
                ("unknown type", lambda w: w.send_json({"type": "teleport"}), {}, 4003),
                ("oversized", lambda w: w.send_text("x" * 5000), {}, 4009),
                ("garbage as packet", lambda w: w.send_bytes(b"\xb1garbage-bytes" * 3), {}, 4004),
                ("flood", lambda w: [w.send_json({"type": "ping"}) for _ in range(500)], {}, 4010),
                ("spoofed stream id", lambda w: w.send_bytes(PoseSource(1).next()), {}, 4005),
                ("packet before join", lambda w: w.send_bytes(PoseSource(8).next()),
                 {"join": False}, 4006),
                ("second join", lambda w: w.send_json({"type": "join"}), {}, 4006),
                ("silent, never joins", lambda w: None, {"join": False}, 4001),
            ]  # fmt: skip
            for name, act, kw, want in cases:
                code, got = await _offender_closed(srv, act, **kw)
                assert code == want, (name, code, got)
                errors = [g for g in got if isinstance(g, dict) and g.get("type") == "error"]
                assert errors and errors[-1]["code"] == want, (name, got)
            streaming.cancel()
            await pub.send(src.next())
            last = src.seq
            items = await until(sub, lambda xs: last in seqs(xs), limit_s=10)
            got_seqs = seqs(items, 1)
            assert got_seqs == list(range(1, last + 1)), "the stream had a gap"
            assert len(got_seqs) > 10
            rej = srv.state.metrics.rejections
            for reason in (
                "malformed_message",
                "unknown_message_type",
                "message_too_large",
                "bad_packet",
                "rate_limited",
                "stream_spoof",
                "not_joined",
                "auth_timeout",
            ):
                assert rej[reason] >= 1, (reason, rej)
            await sub.close()
            await pub.close()

    run(main())


# --------------------------------------------------------------------------- limits


def test_connection_member_and_room_limits() -> None:
    async def main() -> None:
        async with running_server(max_connections=4, max_members_per_room=2, max_rooms=2) as srv:
            a1, a2 = member(srv, "A", subject="a1"), member(srv, "A", subject="a2")
            await a1.connect()
            await a2.connect()
            # room_full is retryable: the client retries until its connect timeout
            with pytest.raises(TransportError, match="4012"):
                await member(srv, "A", subject="a3", connect_timeout_s=0.5).connect()
            b1 = member(srv, "B", subject="b1")
            await b1.connect()
            raw = await RawWS.connect(srv.port)
            raw.send_json({"type": "join", "token": token("C"), "room": "C"})
            code, _ = await raw.read_until_close()
            assert code == 4013  # too_many_rooms (A and B exist)
            raw.close()
            extra = [await RawWS.connect(srv.port) for _ in range(2)]
            code, _got = await extra[-1].read_until_close()
            assert code == 4011  # a1, a2, b1 and extra[0] hold the 4 connections
            for r in extra:
                r.close()
            rej = srv.state.metrics.rejections
            assert rej["room_full"] >= 1 and rej["too_many_rooms"] == 1
            assert rej["too_many_connections"] >= 1
            for t in (a1, a2, b1):
                await t.close()

    run(main())


def test_empty_room_is_cleaned_up_after_grace_period() -> None:
    async def main() -> None:
        async with running_server(empty_room_grace_s=0.3) as srv:
            t = member(srv, "A")
            await t.connect()
            assert "A" in srv.state.manager.rooms
            await t.close()
            await asyncio.sleep(0.1)
            assert "A" in srv.state.manager.rooms  # still within the grace period
            t2 = member(srv, "A")
            await t2.connect()  # a join within the grace period keeps the room
            await t2.close()
            deadline = time.monotonic() + 5
            while "A" in srv.state.manager.rooms and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert "A" not in srv.state.manager.rooms

    run(main())


# --------------------------------------------------------------------------- HTTP


def test_rooms_api_and_closed_room() -> None:
    async def main() -> None:
        async with running_server(auto_create_rooms=False) as srv:
            mod = {"Authorization": f"Bearer {token('*', 'moderator', subject='admin')}"}
            sub = {"Authorization": f"Bearer {token('A', 'subscriber')}"}
            async with aiohttp.ClientSession() as http:
                r = await http.get(f"{srv.url}/api/rooms")
                assert r.status == 401
                r = await http.post(f"{srv.url}/api/rooms", json={"name": "A"}, headers=sub)
                assert r.status == 403 and (await r.json())["error"] == "missing_permission"
                with pytest.raises(BrokenResourceError) as nf:
                    await member(srv, "A").connect()
                assert nf.value.reason == "room_not_found"
                r = await http.post(f"{srv.url}/api/rooms", json={"name": "A"}, headers=mod)
                assert r.status == 201
                t = member(srv, "A", subject="m1")
                await t.connect()
                r = await http.get(f"{srv.url}/api/rooms", headers=mod)
                assert (await r.json())["rooms"] == [{"name": "A", "members": 1, "streams": 0}]
                r = await http.get(f"{srv.url}/api/rooms/A", headers=mod)
                info = await r.json()
                assert [m["subject"] for m in info["members"]] == ["m1"]
                r = await http.post(
                    f"{srv.url}/api/rooms/A/broadcast", json={"data": "hi"}, headers=mod
                )
                assert r.status == 200
                got = await until(t, lambda xs: controls(xs, "broadcast"))
                assert controls(got, "broadcast")[0]["data"] == "hi"
                r = await http.delete(f"{srv.url}/api/rooms/A", headers=mod)
                assert r.status == 200
                with pytest.raises(BrokenResourceError) as closed:
                    async with asyncio.timeout(5):
                        while True:
                            await t.recv()
                assert closed.value.reason == "room_closed"
                await t.close()
                with pytest.raises(BrokenResourceError) as again:
                    await member(srv, "A").connect()
                assert again.value.reason == "room_closed"
                r = await http.get(f"{srv.url}/api/rooms/A", headers=mod)
                assert r.status == 404
                r = await http.post(f"{srv.url}/api/rooms", json={"name": "A"}, headers=mod)
                assert r.status == 201  # re-created: joins work again
                t3 = member(srv, "A")
                await t3.connect()
                await t3.close()

    run(main())


def test_health_ready_and_metrics() -> None:
    async def main() -> None:
        async with running_server() as srv:
            t = member(srv, "A")
            await t.connect()
            await t.send(PoseSource(2).next())
            await until(t, lambda xs: controls(xs, "ack"))
            async with aiohttp.ClientSession() as http:
                r = await http.get(f"{srv.url}/healthz")
                assert r.status == 200
                r = await http.get(f"{srv.url}/readyz")
                assert r.status == 200 and (await r.json())["ready"] is True
                r = await http.get(f"{srv.url}/metrics")
                text = await r.text()
            values = {
                line.split(" ")[0]: float(line.split(" ")[1])
                for line in text.splitlines()
                if line and not line.startswith("#")
            }
            assert values["posewire_server_rooms"] == 1
            assert values["posewire_server_members"] == 1
            assert values["posewire_server_messages_in_total"] >= 2
            assert values["posewire_server_messages_out_total"] >= 2
            assert "posewire_server_drops_total" in values
            assert "# TYPE posewire_server_rejections_total counter" in text
            await t.close()

    run(main())


def test_dev_token_minting_only_in_dev_mode_and_only_on_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        create_app(ServerConfig(secret="s" * 40), host="0.0.0.0", dev=True)

    async def main() -> None:
        async with running_server(dev=True) as srv, aiohttp.ClientSession() as http:
            r = await http.post(
                f"{srv.url}/api/dev/token", json={"room": "demo", "role": "publisher"}
            )
            tok = (await r.json())["token"]
            claims = srv.state.verifier.verify(tok, room="demo", require=["publish_pose"])
            assert claims.role == "publisher"
        async with running_server() as srv, aiohttp.ClientSession() as http:
            r = await http.post(f"{srv.url}/api/dev/token", json={})
            assert r.status in (404, 405)

    run(main())


# --------------------------------------------------------------------------- reconnect


async def _publisher_loop(pub: Any, src: PoseSource, stop: asyncio.Event) -> None:
    """Like the transmit stage: 30 fps, a keyframe whenever the server asks for one."""
    while not stop.is_set():
        force = False
        while True:
            item = pub.recv_nowait()
            if item is None:
                break
            if isinstance(item, Control) and item.type == "keyframe_request":
                force = True
            if isinstance(item, StateChange) and item.connected:
                force = True
        await pub.send(src.next(keyframe=force) if force else src.next())
        await asyncio.sleep(1 / 30)


@pytest.mark.timing
def test_clients_reconnect_and_resume_after_server_restart() -> None:
    async def main() -> None:
        async with running_server() as srv:
            port = srv.port
            pub = member(srv, "A", publish=True, subscribe=False, reconnect_max_s=0.5)
            rec = receiver(srv, "A", "r")
            await pub.connect()
            await rec.connect()
            stop = asyncio.Event()
            loop_task = asyncio.create_task(_publisher_loop(pub, PoseSource(3), stop))
            await rec.run(5, until=lambda: rec.decoded >= 10)
            old_id = rec.transport.member_id
        # the server is gone; start a new one on the same port
        before = rec.decoded
        async with running_server(port=port):
            t0 = time.monotonic()
            await rec.run(5, until=lambda: rec.decoded >= before + 10)
            elapsed = time.monotonic() - t0
            assert rec.decoded >= before + 10, "no poses after the restart"
            assert elapsed < 3.0
            assert rec.transport.member_id == old_id  # membership resumed
            assert rec.transport.statistics().reconnects >= 1
            assert pub.statistics().reconnects >= 1
            stop.set()
            await loop_task
            await pub.close()
            await rec.close()

    run(main())


def test_stream_ids_free_up_when_the_publisher_leaves() -> None:
    """For the same subject: a stream id stays bound to its subject (issue 11, finding 5;
    tests/security/test_rooms.py shows that another subject is refused)."""

    async def main() -> None:
        async with running_server() as srv:
            p1 = member(srv, "A", publish=True, subscribe=False, subject="cam")
            await p1.connect()
            await p1.send(PoseSource(7).next())
            await until(p1, lambda xs: controls(xs, "ack"))
            await p1.close()
            await asyncio.sleep(0.1)
            p2 = member(srv, "A", publish=True, subscribe=False, subject="cam")
            await p2.connect()
            await p2.send(PoseSource(7).next())
            got = await until(p2, lambda xs: controls(xs, "ack"))
            assert controls(got, "ack")[0]["stream_id"] == 7
            info = srv.state.manager.rooms["A"].info()
            assert info["streams"]["7"]["owner"] == p2.member_id
            await p2.close()

    run(main())


def test_join_message_shape_errors_are_precise() -> None:
    async def main() -> None:
        async with running_server() as srv:
            raw = await RawWS.connect(srv.port)
            raw.send_json({"type": "join", "token": token("A"), "room": "A", "publish": "yes"})
            code, got = await raw.read_until_close()
            raw.close()
            assert code == 4002 and "publish" in got[-1]["message"]
            raw = await RawWS.connect(srv.port)
            raw.send_json({"type": "join", "room": "A"})
            code, got = await raw.read_until_close()
            raw.close()
            assert code == 4108 and got[-1]["reason"] == "malformed"
            # Authorization header instead of a token field works too
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(
                    srv.ws_url, headers={"Authorization": f"Bearer {token('A')}"}
                )
                await ws.send_str(json.dumps({"type": "join", "room": "A"}))
                msg = await ws.receive_json(timeout=5)
                assert msg["type"] == "welcome"
                await ws.close()

    run(main())


def test_receiver_packets_are_from_other_members_only() -> None:
    async def main() -> None:
        async with running_server() as srv:
            both = member(srv, "A", publish=True, subject="both")
            await both.connect()
            other = member(srv, "A", publish=True, subject="other")
            await other.connect()
            await both.send(PoseSource(21).next())
            await other.send(PoseSource(22).next())
            got = await drain(both, quiet_s=0.3)
            assert {peek_header(p).stream_id for p in packets(got)} == {22}
            assert all(isinstance(x, Packet | Control) for x in got)
            await both.close()
            await other.close()

    run(main())


def test_transports_are_found_by_kind_and_a_toy_transport_is_one_registration(
    tmp_path: Path,
) -> None:
    from collections.abc import Mapping

    from pipeline.config import TransmitConfig
    from pipeline.errors import ClosedResourceError, RegistryError, RingError
    from pipeline.transports import TRANSPORTS, make_transport
    from pipeline.transports.base import Received, Transport, TransportContext, TransportStatistics
    from pipeline.transports.file import FileTransport, read_packets
    from pipeline.transports.websocket import WebSocketTransport

    assert {"file", "websocket"} <= set(TRANSPORTS.keys())
    cfg = TransmitConfig(file=Path("p.bin"))  # type: ignore[call-arg]
    ctx = TransportContext(token=lambda: token("demo"), resolve_path=lambda p: tmp_path / p)
    ft = make_transport("file", cfg, ctx)
    assert isinstance(ft, FileTransport) and ft.path == tmp_path / "p.bin"
    ws = make_transport("websocket", cfg, ctx)
    assert isinstance(ws, WebSocketTransport) and ws.publish and not ws.subscribe
    from pipeline.transports.webrtc import WebRtcTransport

    rtc = make_transport("webrtc", cfg, ctx)
    assert isinstance(rtc, WebRtcTransport) and rtc.publish and not rtc.subscribe
    with pytest.raises(RegistryError, match="unknown transport 'carrier-pigeon'"):
        make_transport("carrier-pigeon", cfg, ctx)

    class Memory(Transport):
        kind = "memory"

        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.open = False

        async def connect(self) -> None:
            self.open = True

        async def send(self, packet: bytes) -> None:
            if not self.open:
                raise ClosedResourceError("closed")
            self.sent.append(packet)

        async def send_control(self, message: Mapping[str, Any]) -> None:
            pass

        async def recv(self) -> Received:
            raise ClosedResourceError("closed")

        async def close(self) -> None:
            self.open = False

        def statistics(self) -> TransportStatistics:
            return TransportStatistics(kind=self.kind, packets_sent=len(self.sent))

        @property
        def connected(self) -> bool:
            return self.open

    TRANSPORTS.add("memory", TransmitConfig, lambda cfg, ctx: Memory())
    try:

        async def main() -> None:
            t = make_transport("memory", cfg, ctx)
            async with t:
                await t.send(b"x")
                assert [item async for item in t] == []  # closed-resource ends iteration
            with pytest.raises(ClosedResourceError) as info:
                await t.send(b"y")
            # one vocabulary: the same error is a ring error and a transport error
            assert isinstance(info.value, RingError) and isinstance(info.value, TransportError)
            assert t.statistics().packets_sent == 1

        run(main())
    finally:
        TRANSPORTS.remove("memory")

    async def file_roundtrip() -> None:
        f = make_transport("file", cfg, ctx)
        await f.connect()
        await f.send(b"abc")
        await f.close()
        with pytest.raises(ClosedResourceError):
            await f.send(b"d")

    run(file_roundtrip())
    assert list(read_packets(tmp_path / "p.bin")) == [b"abc"]


def test_throttle_and_switch_arguments_are_command_errors() -> None:
    from pipeline.errors import CommandError
    from pipeline.transports.sender import parse_kind
    from pipeline.transports.throttle import Throttle

    th = Throttle(None)
    assert th.on_set({"other": 1}) is None
    assert th.on_set({"max_bandwidth_kbps": 8}) == {"max_bandwidth_kbps": 8.0}
    th.consume(1000)
    assert th.delay() > 0.5  # 1000 bytes at 1000 bytes/s, minus the burst
    assert th.on_set({"max_bandwidth_kbps": 0}) == {"max_bandwidth_kbps": None}
    assert th.delay() == 0.0
    for bad in (-1, "fast", True):
        with pytest.raises(CommandError, match="max_bandwidth_kbps"):
            th.on_set({"max_bandwidth_kbps": bad})
    assert parse_kind("websocket").value == "websocket"
    assert parse_kind("webrtc").value == "webrtc"
    for bad_kind in ("carrier-pigeon", None):
        with pytest.raises(CommandError, match="one of file, websocket, webrtc"):
            parse_kind(bad_kind)


def test_wire_messages_validate_on_both_sides() -> None:
    from pipeline.errors import RefusedError
    from pipeline.wire import messages
    from pipeline.wire.close import CloseCode

    join = messages.Join("T", "A", publish=True, subscribe=False, resume="m1", name="n")
    obj = messages.parse(join.dumps())
    assert messages.Join.parse(obj) == join
    for text, code in (
        ("nope", CloseCode.MALFORMED_MESSAGE),
        ('{"type": 3}', CloseCode.MALFORMED_MESSAGE),
        ('{"type": "dance"}', CloseCode.UNKNOWN_MESSAGE_TYPE),
        ('{"type": "join", "publish": "yes"}', CloseCode.MALFORMED_MESSAGE),
        ('{"type": "join", "token": 5}', CloseCode.TOKEN_MALFORMED),
    ):
        with pytest.raises(RefusedError) as info:
            messages.Join.parse(messages.parse(text))
        assert info.value.code == code and info.value.reason == code.reason, text
    bf = messages.Backfill(7, 3, 10, 12)
    assert (
        messages.Backfill.parse(messages.parse(messages.dumps(bf.message()), messages.SERVER_TYPES))
        == bf
    )
