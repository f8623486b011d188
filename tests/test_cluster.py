"""Room-server nodes sharing rooms through a real Redis (issue 16; docs/scaling.md).

A real ``redis-server`` on a free loopback port with its own data directory
(append-only file on) and two real ``python -m pipeline serve --redis``
processes. Waits are for events (readyz, a member in the rooms API, a packet),
never guessed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench.netns import Peer, topology, unavailable_reason
from bench.redisproc import REDIS_SERVER, RedisProcess
from pipeline.cli.serve import with_redis
from pipeline.client.receiver import Receiver
from pipeline.config import ServerConfig
from pipeline.errors import ConfigError, PosewireError
from pipeline.transports.base import Control, StateChange
from pipeline.transports.endpoints import ws_url
from pipeline.transports.websocket import WebSocketTransport
from tests.test_server_rtc import CLIENT as RTC_CLIENT
from tests.test_server_rtc import publish as rtc_publish
from tests.test_server_rtc import report as rtc_report
from tests.test_server_rtc import seqs as rtc_seqs
from tests.test_server_support import ROOT, SECRET, PoseSource, ServeProcess, token

pytestmark = pytest.mark.skipif(
    not os.path.exists(REDIS_SERVER) and not os.environ.get("CI"),
    reason="redis-server is not installed (CI installs it)",
)
ROOM = "gym"


def _get(url: str, bearer: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError:
        return 0, ""


async def _until(pred: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit_s}s: {what}")
        await asyncio.sleep(0.02)


def _ready(node: ServeProcess) -> bool:
    return _get(node.url + "/readyz")[0] == 200


def _members(node: ServeProcess, room: str = ROOM) -> list[dict[str, Any]]:
    status, body = _get(f"{node.url}/api/rooms/{room}", token(room, "moderator", subject="mod"))
    if status != 200:
        return []
    return list(json.loads(body)["members"])


def _metric(node: ServeProcess, name: str) -> float:
    for line in _get(node.url + "/metrics")[1].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


NODE_TTL_S = 1.5
"""server.redis.node_ttl_s of the test nodes: a killed node's members leave sooner."""


def _node(redis: RedisProcess, name: str, port: int = 0) -> ServeProcess:
    config = redis.data_dir.parent / f"node-{name}.yaml"
    config.write_text(
        f"server:\n  redis: {{url: '{redis.url}', node_id: {name}, node_ttl_s: {NODE_TTL_S}}}\n",
        encoding="utf-8",
    )
    node = ServeProcess(port, "--config", str(config))
    deadline = time.monotonic() + 20
    while not _ready(node):
        assert time.monotonic() < deadline, f"node {name} not ready"
        time.sleep(0.02)
    return node


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    proc = RedisProcess(tmp_path / "redis")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(tmp_path / "redis", ignore_errors=True)


def _two_nodes(redis: RedisProcess) -> list[ServeProcess]:
    """Nodes A and B, started side by side (a process start takes seconds in CI)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda name: _node(redis, name), ("A", "B")))


@pytest.fixture
def nodes(redis: RedisProcess) -> Iterator[list[ServeProcess]]:
    out = _two_nodes(redis)
    try:
        yield out
    finally:
        for n in out:
            n.stop()


async def _publish(pub: WebSocketTransport, stop: asyncio.Event, limit: int = 3000) -> int:
    """30 fps from trace frames; a keyframe after (re)connecting or when asked."""
    src = PoseSource(7)
    force = True
    for _ in range(limit):
        if stop.is_set():
            break
        while (item := pub.recv_nowait()) is not None:
            if (isinstance(item, Control) and item.type == "keyframe_request") or (
                isinstance(item, StateChange) and item.connected
            ):
                force = True
        if pub.connected:
            await pub.send(src.next(keyframe=force))
            force = False
        await asyncio.sleep(1 / 30)
    return src.seq


def _publisher(node: ServeProcess) -> WebSocketTransport:
    tok = token(ROOM, "publisher", subject="coach")
    return WebSocketTransport(node.url, ROOM, tok, publish=True, subscribe=False,
                              connect_timeout_s=10)  # fmt: skip


def _receiver(node: ServeProcess, subject: str) -> Receiver:
    tok = token(ROOM, "subscriber", subject=subject)
    return Receiver(node.url, ROOM, tok, connect_timeout_s=10)


async def _clients(
    a: ServeProcess, b: ServeProcess
) -> tuple[Receiver, Receiver, WebSocketTransport]:
    """Receivers on A and B, then the publisher on A, all connected."""
    ra, rb = _receiver(a, "viewer-a"), _receiver(b, "viewer-b")
    await ra.connect()
    await rb.connect()
    pub = _publisher(a)
    await pub.connect()
    return ra, rb, pub


def test_cli_options_are_named_in_errors() -> None:
    with pytest.raises(ConfigError) as err:
        with_redis(ServerConfig(secret=SECRET), "http://x", None)  # type: ignore[call-arg]
    assert "--redis" in str(err.value) and "--node-id" in str(err.value)
    cfg = with_redis(ServerConfig(secret=SECRET), "redis://127.0.0.1:1/0", "n1")  # type: ignore[call-arg]
    assert cfg.redis is not None and cfg.redis.node_id == "n1"


def test_publisher_on_a_reaches_subscribers_on_a_and_b(nodes: list[ServeProcess]) -> None:
    a, b = nodes

    async def main() -> None:
        ra, rb, pub = await _clients(a, b)
        # presence crosses: the publisher on A is in B's member list
        await _until(lambda: any(m["subject"] == "coach" for m in _members(b)), 10, "B sees A")
        stop, done = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(_publish(pub, stop))
        runs = [asyncio.create_task(r.run(60, stop=done)) for r in (ra, rb)]
        try:
            await _until(lambda: ra.decoded >= 30 and rb.decoded >= 30, 15, "30 frames on A and B")
            late = _receiver(b, "late-b")  # a late joiner on B decodes from its first message
            await late.connect()
            await late.run(15, until=lambda: late.decoded >= 30)
            stop.set()
            sent = await task
            await _until(
                lambda: all(7 in r.streams and r.streams[7].last_seq == sent for r in (ra, rb)),
                10,
                "the last frame on A and B",
            )
            for r in (ra, rb):
                st = r.streams[7]
                assert st.bad_packets == 0 and st.need_keyframe == 0 and st.lost == 0, st.summary()
                assert st.decoded == st.received == sent, st.summary()
            st = late.streams[7]
            assert st.first_decoded_at == 1 and st.bad_packets == 0, st.summary()
            assert st.backfill >= 1, st.summary()
            assert _metric(a, "posewire_server_cluster_packets_out_total") >= sent
            assert _metric(b, "posewire_server_cluster_packets_in_total") >= sent
            await late.close()
            # B without subscribers drops the stream; a joiner there now gets the keyframe and
            # history B fetches from Redis, and decodes from its first message
            done.set()
            await asyncio.gather(*runs)
            await rb.transport.close()
            await _until(lambda: len(_members(b)) == 2, 10, "only A's members left on B")
            fresh = _receiver(b, "fresh-b")
            await fresh.connect()
            streams = fresh.streams
            await fresh.run(10, until=lambda: 7 in streams and streams[7].last_seq == sent)
            st = streams[7]  # the backfill: the stream's keyframe and the packets after it
            assert st.first_decoded_at == 1 and st.backfill >= 1 and st.bad_packets == 0, st
            assert st.decoded == st.received == st.backfill, st.summary()
            await fresh.close()
        finally:
            stop.set()
            done.set()
            await task
            await asyncio.gather(*runs)
            for t in (pub, ra.transport, rb.transport):
                await t.close()

    asyncio.run(main())


def test_kicked_member_is_refused_by_every_node_and_after_restarts(
    redis: RedisProcess, nodes: list[ServeProcess]
) -> None:
    a, b = nodes
    tok = token(ROOM, "subscriber", subject="troll")
    mod = token(ROOM, "moderator", subject="mod")

    async def join(node: ServeProcess) -> WebSocketTransport:
        t = WebSocketTransport(node.url, ROOM, tok, publish=False, subscribe=True,
                               connect_timeout_s=10)  # fmt: skip
        await t.connect()
        return t

    async def refused(node: ServeProcess) -> None:
        t = WebSocketTransport(node.url, ROOM, tok, publish=False, subscribe=True,
                               connect_timeout_s=10)  # fmt: skip
        with pytest.raises(PosewireError, match="kicked"):
            await t.connect()
        await t.close()

    async def main() -> None:
        watcher = WebSocketTransport(a.url, ROOM, mod, publish=False, subscribe=True,
                                     connect_timeout_s=10)  # fmt: skip
        await watcher.connect()  # the room is open on A too
        troll = await join(b)
        await _until(lambda: any(m["subject"] == "troll" for m in _members(a)), 10, "A sees B")
        mid = next(m["id"] for m in _members(a) if m["subject"] == "troll")
        req = urllib.request.Request(
            f"{a.url}/api/rooms/{ROOM}/kick", method="POST",
            data=json.dumps({"member": mid}).encode(),
            headers={"Authorization": f"Bearer {mod}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        await _until(lambda: not troll.connected, 10, "the member on B kicked through A")
        await troll.close()
        await refused(a)
        await refused(b)
        await watcher.close()

    asyncio.run(main())
    # every node and Redis restarted: the kick is still there (Redis' append-only file)
    for n in nodes:
        n.stop()
    redis.stop()
    redis.start()
    nodes[:] = _two_nodes(redis)
    asyncio.run(refused(nodes[0]))
    asyncio.run(refused(nodes[1]))


def _cut_by_the_output_buffer_limit(redis: RedisProcess, node: ServeProcess) -> None:
    assert redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 1mb 256kb 1")
    flood = b"E\x05flood" + json.dumps({"t": "flood", "pad": "x" * 32_000}).encode()
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as s:
            s.settimeout(10)
            channel = f"posewire:room:{ROOM}".encode()
            one = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                len(channel),
                channel,
                len(flood),
                flood,
            )
            bad = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$1\r\nE\r\n" % (len(channel), channel)
            s.sendall(bad + one * 640)  # 20 MB: far past the node's socket buffers
            got = b""
            while got.count(b"\r\n") < 641:
                chunk = s.recv(65536)
                assert chunk, "redis closed the publishing connection"
                got += chunk
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)


@pytest.mark.timing
def test_redis_restart_cross_node_delivery_resumes_within_2s(
    redis: RedisProcess, nodes: list[ServeProcess]
) -> None:
    a, b = nodes

    async def main() -> None:
        ra, rb, pub = await _clients(a, b)
        stop = asyncio.Event()
        task = asyncio.create_task(_publish(pub, stop))
        try:
            await rb.run(15, until=lambda: rb.decoded >= 10)
            redis.stop()
            await _until(lambda: not _ready(a), 10, "A not ready while Redis is down")
            before = ra.decoded  # local relaying goes on during the outage
            await ra.run(10, until=lambda: ra.decoded >= before + 15)
            t_up = await asyncio.to_thread(redis.start)
            seen = rb.decoded
            await rb.run(10, until=lambda: rb.decoded > seen)
            resumed = time.monotonic() - t_up
            print(f"cross-node delivery resumed {resumed * 1000:.0f} ms after Redis was up")
            assert resumed <= 2.0, f"cross-node delivery resumed {resumed:.2f}s after Redis was up"
            assert rb.streams[7].bad_packets == 0
            await _until(lambda: _ready(a) and _ready(b), 10, "ready again")
            for n in (a, b):
                assert _metric(n, "posewire_server_cluster_reconnects_total") >= 1
            assert _metric(b, "posewire_server_cluster_resyncs_total") >= 1
            # a slow node: Redis' real output-buffer limit cuts its subscription (node B
            # stopped while 20 MB go out on a room channel it subscribes to), the node
            # notices, counts it and resyncs; the flood's messages (a kind the nodes do not
            # know) and a malformed one are skipped
            await asyncio.to_thread(_cut_by_the_output_buffer_limit, redis, b)
            await _until(
                lambda: _metric(b, "posewire_server_cluster_pubsub_cuts_total") >= 1, 10, "a cut"
            )
            assert _metric(b, "posewire_server_cluster_bad_messages_total") >= 1
            seen = rb.decoded
            await rb.run(10, until=lambda: rb.decoded > seen + 5)
            assert rb.decoded > seen + 5 and rb.streams[7].bad_packets == 0
        finally:
            stop.set()
            await task
            for t in (pub, ra.transport, rb.transport):
                await t.close()

    asyncio.run(main())


@pytest.mark.timing
def test_node_kill9_member_resumes_on_the_other_node_within_1_5s(
    nodes: list[ServeProcess],
) -> None:
    a, b = nodes

    async def main() -> None:
        tok = token(ROOM, "subscriber", subject="student")
        viewer = _receiver(b, "viewer-b")  # the room spans both nodes
        await viewer.connect()
        gone = WebSocketTransport(a.url, ROOM, token(ROOM, "subscriber", subject="gone"),
                                  publish=False, subscribe=True, connect_timeout_s=10)  # fmt: skip
        await gone.connect()  # a member of A that does not come back
        # the client's list of server URLs (docs/deployment.md): A first, then B
        first = WebSocketTransport([a.url, b.url], ROOM, tok, publish=False, subscribe=True,
                                   connect_timeout_s=10)  # fmt: skip
        await first.connect()
        mid = first.member_id
        assert mid is not None and first.url == ws_url(a.url)
        await _until(lambda: any(m["id"] == mid for m in _members(b)), 10, "B sees the member")
        t_kill = time.monotonic()
        a.kill9()

        async def back() -> None:
            while True:
                item = await first.recv()
                if isinstance(item, StateChange) and item.connected:
                    return

        await asyncio.wait_for(back(), 10)
        took = time.monotonic() - t_kill
        print(f"member resumed on node B {took * 1000:.0f} ms after kill -9 of node A")
        assert first.url == ws_url(b.url) and first.member_id == mid
        assert first.welcome.get("resumed") is True
        assert took <= 1.5, f"resumed {took:.2f}s after kill -9"
        # A's heartbeat expires: B drops A's other member (presence leave), keeps the resumed
        await _until(lambda: all(m["subject"] != "gone" for m in _members(b)),
                     NODE_TTL_S + 5, "A's member gone from B")  # fmt: skip
        assert any(m["id"] == mid for m in _members(b))
        assert _metric(b, "posewire_server_cluster_dead_nodes_total") >= 1
        await gone.close()
        await first.close()
        await viewer.close()

    asyncio.run(main())
    nodes.remove(a)


def test_webrtc_subscriber_on_b_gets_every_packet_of_a_publisher_on_a(tmp_path: Path) -> None:
    """WebRTC needs non-loopback addresses: Redis and both nodes in namespace host b
    (Redis on b's own loopback), the members are tests/rtc_client.py processes in host a."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with topology(("a", "b")) as net:
        host = net.host("b")
        prefix = host.exec_argv([])
        redis = RedisProcess(tmp_path / "redis", prefix=prefix)
        redis.start()
        nodes: list[ServeProcess] = []
        try:
            with ThreadPoolExecutor(2) as pool:
                nodes = list(pool.map(
                    lambda n: ServeProcess(8765 + n, "--redis", redis.url, "--node-id", f"n{n}",
                                           host=host.address, prefix=prefix),
                    (0, 1),
                ))  # fmt: skip
            deadline = time.monotonic() + 20  # each node's heartbeat: connected, store loaded
            while len(redis.command("KEYS", "posewire:node:*").split()) != 2:
                assert time.monotonic() < deadline, "nodes not connected to Redis"
                time.sleep(0.02)
            a, b = nodes

            def member(node: ServeProcess, subject: str, role: str, **join: Any) -> Peer:
                log_dir = tmp_path / subject
                log_dir.mkdir()
                peer = net.start_python("a", RTC_CLIENT, ["--url", node.url, "--max-seconds",
                                                          "60"], log_dir)  # fmt: skip
                tok = token(ROOM, role, subject=subject)
                peer.send({"cmd": "join", "token": tok, "room": ROOM} | join)
                msg = peer.expect("welcome", timeout=20)["msg"]
                assert msg["type"] == "welcome", msg
                return peer

            sub_rtc = member(b, "rtc-b", "subscriber", subscribe=True, publish=False)
            sub_rtc.send({"cmd": "offer", "session": 1})
            sub_rtc.expect("open", timeout=20)
            sub_ws = member(a, "ws-a", "subscriber", subscribe=True, publish=False)
            pub = member(a, "cam-a", "publisher", subscribe=False, publish=True)
            sent = rtc_publish(pub, 8, 60, "ws")
            assert len(sent) == 60
            got_b, got_a = rtc_report(sub_rtc), rtc_report(sub_ws)
            assert rtc_seqs(got_a, 8) == sent
            assert rtc_seqs(got_b, 8) == sent  # every packet across nodes, on the channels
            assert rtc_seqs(got_b, 8, ("pose", "control")) == sent
            for peer in (sub_rtc, sub_ws, pub):
                peer.close()
        finally:
            for n in nodes:
                n.stop()
            redis.stop()


def test_a_single_node_never_imports_redis() -> None:
    code = (
        "import sys, asyncio\n"
        "from pipeline.config import ServerConfig\n"
        "from pipeline.server.app import create_app\n"
        "async def main():\n"
        f"    create_app(ServerConfig(secret={SECRET!r}), host='127.0.0.1')\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))\n"
    )
    env = {**os.environ, "POSEWIRE_SECRET": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True, env=env, cwd=ROOT)  # fmt: skip
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_audio_crosses_nodes_and_is_never_kept_in_the_history(nodes: list[ServeProcess]) -> None:
    """Audio packets (docs/audio.md) of a publisher on A reach a subscriber on B; a late
    joiner on B gets the pose history from Redis but no audio from before it joined."""
    from pipeline.codec.audio import is_audio, pack_audio
    from pipeline.transports.base import Packet

    a, b = nodes

    async def main() -> None:
        rb = Receiver(b.url, ROOM, token(ROOM, "subscriber", subject="ear-b"),
                      connect_timeout_s=10, audio=True)  # fmt: skip
        await rb.connect()
        pub = _publisher(a)
        await pub.connect()
        await _until(lambda: any(m["subject"] == "coach" for m in _members(b)), 10, "B sees A")
        src = PoseSource(7)
        run = asyncio.create_task(rb.run(30, until=lambda: rb.audio is not None
                                         and rb.audio.report().get("7", {}).get(
                                             "frames_received", 0) >= 20))  # fmt: skip
        t0 = time.time_ns()
        for k in range(300):  # bounded: until B has 20 audio frames, at most 300 x 20 ms
            if run.done():
                break
            if k % 2 == 0:
                await pub.send(src.next(keyframe=k == 0))
            await pub.send(pack_audio(7, 10**6 + k, t0 + k * 20_000_000, 960, b"\xfc" + bytes(30)))
            await asyncio.sleep(0.02)
        await run
        assert rb.audio is not None and rb.audio.report()["7"]["frames_received"] >= 20
        late = _receiver(b, "late-ear")
        got: list[bytes] = []
        late.on_item = lambda item: got.append(item.data) if isinstance(item, Packet) else None
        await late.connect()
        await late.run(10, until=lambda: late.decoded >= 1)
        assert got and not any(is_audio(d) for d in got[: late.streams[7].backfill])
        for r in (rb, late):
            await r.close()
        await pub.close()

    asyncio.run(main())
