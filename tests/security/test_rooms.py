"""Issue 11, room logic and the member protocol: attacks on a real server over loopback.

Each test plays the attacker with raw WebSockets (``RawWS``: frames exactly as
written) or real clients against a real server (in this process, ``serve`` as a
subprocess, or the embedded server stage under the real supervisor) and asserts
the refusal (close code), that it is counted (``rejections``), what the others
see, and that a legitimate publisher/subscriber pair in the same room keeps
every packet (no gap) while the attack goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest

from bench.common import stop_process
from pipeline.codec import CodecConfig, Encoder
from pipeline.errors import RefusedError
from pipeline.transports.base import Control, Received
from pipeline.wire import messages
from pipeline.wire.close import CloseCode
from tests import procutil
from tests.test_server_support import (
    SECRET,
    PoseSource,
    RawWS,
    ServeProcess,
    Server,
    free_port,
    member,
    running_server,
    seqs,
    token,
    until,
)

DAY_NS = 86_400 * 10**9
# literal values (not the new constants), so that this file also runs on the unfixed code
STALE_PACKET = 4017  # CloseCode.STALE_PACKET
MAX_BROADCAST_BYTES = 4096  # messages.MAX_BROADCAST_BYTES


# --------------------------------------------------------------------------- helpers


async def join_as(
    port: int, room: str, role: str, subject: str, **join: Any
) -> tuple[RawWS, dict[str, Any]]:
    """A raw member of ``subject``: (socket, welcome); fails on anything but a welcome."""
    ws = await RawWS.connect(port)
    ws.send_json(
        {"type": "join", "token": token(room, role, subject=subject), "room": room, **join}
    )
    welcome = await ws.read_text()
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def refused(ws: RawWS) -> int | None:
    """The close code the server closes ``ws`` with (None: dropped without a close frame)."""
    code, _ = await ws.read_until_close(5.0)
    ws.close()
    return code


async def wait_type(ws: RawWS, kind: str, limit_s: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(limit_s):
        while True:
            msg = await ws.read_text(limit_s)
            if msg["type"] == kind:
                return msg


async def join_refused(port: int, room: str, tok: str, **join: Any) -> int | None:
    ws = await RawWS.connect(port)
    ws.send_json({"type": "join", "token": tok, "room": room, **join})
    return await refused(ws)


class Legit:
    """A legitimate publisher (stream 1) and subscriber in ``room``: no gap allowed."""

    def __init__(self, srv: Server, room: str = "A") -> None:
        self.pub = member(srv, room, publish=True, subscribe=False, subject="legit-pub")
        self.sub = member(srv, room, "subscriber", subject="legit-sub")
        self.src = PoseSource(1)
        self.sent = 0
        self.got: list[Received] = []

    async def start(self) -> None:
        await self.pub.connect()
        await self.sub.connect()
        await self.step(3)

    async def step(self, n: int = 2) -> None:
        for _ in range(n):
            await self.pub.send(self.src.next())
            self.sent += 1
            await asyncio.sleep(0.005)

    async def until(self, pred: Callable[[list[Received]], bool], limit_s: float = 10.0) -> None:
        """Receive (keeping everything in ``got``) until ``pred(got)``."""
        async with asyncio.timeout(limit_s):
            while not pred(self.got):
                self.got.append(await self.sub.recv())

    async def check(self) -> None:
        """Every packet the publisher sent reached the subscriber, in order."""
        await self.until(lambda xs: len(seqs(xs, 1)) >= self.sent)
        assert seqs(self.got, 1) == list(range(1, self.sent + 1))
        await self.pub.close()
        await self.sub.close()


@asynccontextmanager
async def legit_room(data_dir: Path, **cfg: Any) -> AsyncIterator[tuple[Server, Legit]]:
    async with running_server(data_dir=data_dir, **cfg) as srv:
        legit = Legit(srv)
        await legit.start()
        yield srv, legit


def rejections(srv: Server, reason: str) -> int:
    return srv.state.metrics.rejections[reason]


def http(method: str, url: str, body: Any = None, tok: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if tok is not None:
        req.add_header("Authorization", f"Bearer {tok}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# --------------------------------------------------------------------------- finding 4


BAD_NUMBERS = [
    '{"type":"clock","offset_ns":1' + "0" * 400 + "}",  # 10**400: crashed every receiver
    f'{{"type":"clock","offset_ns":{2 * DAY_NS}}}',
    '{"type":"clock","offset_ns":1e300}',
    '{"type":"clock","offset_ns":NaN}',
    '{"type":"clock","offset_ns":"5"}',
    '{"type":"clock","offset_ns":0,"rtt_ns":-1}',
    '{"type":"clock","offset_ns":0,"rtt_ns":61000000000}',
    '{"type":"keyframe_request","stream_id":4294967296}',
    '{"type":"ack","stream_id":1,"seq":-5}',
    '{"type":"ping","id":1,"t0":-1}',
    '{"type":"ping","id":true,"t0":1}',
]


def test_out_of_range_numbers_close_only_the_sender_and_are_counted(tmp_path: Path) -> None:
    async def main() -> None:
        async with legit_room(tmp_path) as (srv, legit):
            for i, text in enumerate(BAD_NUMBERS):
                ws, _ = await join_as(srv.port, "A", "publisher", f"evil{i}")
                ws.send_text(text)
                assert await refused(ws) == CloseCode.MALFORMED_MESSAGE, text
                await legit.step()
            assert rejections(srv, "malformed_message") == len(BAD_NUMBERS)
            # nobody's member record ever carried a bad offset
            for m in legit.sub.members.values():
                off = m.get("clock_offset_ns")
                assert off is None or abs(off) <= DAY_NS, m
            # an in-range clock is still accepted and reaches the others
            ws, welcome = await join_as(srv.port, "A", "publisher", "honest")
            ws.send_text('{"type":"clock","offset_ns":-1234,"rtt_ns":250000}')
            await legit.until(
                lambda xs: (
                    legit.sub.members.get(welcome["member_id"], {}).get("clock_offset_ns") == -1234
                )
            )
            ws.close()
            await legit.check()

    asyncio.run(main())


def test_clients_validate_what_the_server_sends_with_the_same_validators(tmp_path: Path) -> None:
    """Everything a real server sends passes ``messages.parse(..., SERVER_TYPES)``; an
    absurd offset in a member record (what crashed ``pipeline receive``) does not."""

    async def main() -> None:
        async with legit_room(tmp_path) as (srv, legit):
            ws = await RawWS.connect(srv.port)
            ws.send_json({"type": "join", "token": token("A", "moderator", subject="m"),
                          "room": "A", "publish": True})  # fmt: skip
            ws.send_text(f'{{"type":"ping","id":7,"t0":{time.time_ns()}}}')
            ws.send_text('{"type":"clock","offset_ns":5,"rtt_ns":9}')
            ws.send_text('{"type":"broadcast","data":{"x":[1,2]}}')
            ws.send_bytes(PoseSource(9).next())
            ws.send_text('{"type":"kick","member":"nobody"}')
            await legit.step()
            texts: list[str] = []
            async with asyncio.timeout(5):
                while {"welcome", "pong", "ack", "presence", "error"} - {
                    json.loads(t)["type"] for t in texts
                }:
                    op, payload = await ws.read_frame()
                    if op == 0x1:
                        texts.append(payload.decode())
            for text in texts:
                messages.parse(text, messages.SERVER_TYPES)
            ws.close()
            await legit.check()
        record = {"id": "m1", "subject": "s", "role": "publisher", "streams": [1]}
        ok = {"type": "presence", "event": "update", "member": {**record, "clock_offset_ns": 5}}
        messages.parse(json.dumps(ok), messages.SERVER_TYPES)
        for off in (10**30, 2 * DAY_NS, 1.5, "1"):
            bad = {**ok, "member": {**record, "clock_offset_ns": off}}
            with pytest.raises(RefusedError) as info:
                messages.parse(json.dumps(bad), messages.SERVER_TYPES)
            assert info.value.code == CloseCode.MALFORMED_MESSAGE
        with pytest.raises(RefusedError):
            messages.parse('{"type":"presence","member":' + "[" * 500 + "]" * 500 + "}",
                           messages.SERVER_TYPES)  # fmt: skip

    asyncio.run(main())


# --------------------------------------------------------------------------- finding 9


def test_deeply_nested_json_closes_with_malformed_message_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with legit_room(tmp_path) as (srv, legit):
            deep = "[" * 4000 + "]" * 4000  # ~1,000 levels were enough for RecursionError
            ws = await RawWS.connect(srv.port)
            ws.send_text(deep)  # as the first message
            assert await refused(ws) == CloseCode.MALFORMED_MESSAGE
            await legit.step()
            ws, _ = await join_as(srv.port, "A", "moderator", "mod")
            ws.send_text('{"type":"broadcast","data":' + deep[:3000] + deep[-3000:] + "}")
            assert await refused(ws) == CloseCode.MALFORMED_MESSAGE
            await legit.step()
            assert rejections(srv, "malformed_message") == 2
            await legit.check()

    asyncio.run(main())
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


# --------------------------------------------------------------------------- finding 5


def test_stream_ids_are_bound_to_the_subject_the_owner_always_wins(tmp_path: Path) -> None:
    async def main() -> None:
        async with legit_room(tmp_path) as (srv, legit):
            cam, _ = await join_as(srv.port, "A", "publisher", "cam", publish=True)
            cam.send_bytes(PoseSource(7).next())
            assert (await wait_type(cam, "ack"))["stream_id"] == 7
            cam.close()  # the owner leaves
            await asyncio.sleep(0.2)
            eve, _ = await join_as(srv.port, "A", "publisher", "eve", publish=True)
            eve.send_bytes(PoseSource(7).next())
            assert await refused(eve) == CloseCode.STREAM_SPOOF
            await legit.step()
            eve, _ = await join_as(srv.port, "A", "publisher", "eve", publish=True)
            eve.send_bytes(PoseSource(8).next())  # a stream id of its own is fine
            assert (await wait_type(eve, "ack"))["stream_id"] == 8
            # the owner always wins: a second connection of cam takes stream 7 from the first
            cam1, _ = await join_as(srv.port, "A", "publisher", "cam", publish=True)
            cam1.send_bytes(PoseSource(7).next())
            await wait_type(cam1, "ack")
            cam2, _ = await join_as(srv.port, "A", "publisher", "cam", publish=True)
            cam2.send_bytes(PoseSource(7).next())
            assert (await wait_type(cam2, "ack"))["stream_id"] == 7
            assert await refused(cam1) == CloseCode.STREAM_SPOOF
            await legit.step()
            assert rejections(srv, "stream_spoof") == 2
            cam2.close()
            eve.close()
            await legit.check()
        # a restart (same data dir) frees nothing: eve still cannot take 7, cam can
        async with running_server(data_dir=tmp_path) as srv2:
            eve, _ = await join_as(srv2.port, "A", "publisher", "eve", publish=True)
            eve.send_bytes(PoseSource(7).next())
            assert await refused(eve) == CloseCode.STREAM_SPOOF
            cam, _ = await join_as(srv2.port, "A", "publisher", "cam", publish=True)
            cam.send_bytes(PoseSource(7).next())
            assert (await wait_type(cam, "ack"))["stream_id"] == 7
            cam.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- finding 6


def test_broadcast_needs_moderate_and_is_bounded_in_size_and_rate(tmp_path: Path) -> None:
    async def main() -> None:
        async with legit_room(tmp_path) as (srv, legit):
            sub, _ = await join_as(srv.port, "A", "subscriber", "nosy")
            sub.send_json({"type": "broadcast", "data": "x" * 60_000})
            assert await refused(sub) == CloseCode.MESSAGE_TOO_LARGE  # over 8 KB of control
            sub, _ = await join_as(srv.port, "A", "subscriber", "nosy")
            sub.send_json({"type": "broadcast", "data": "hello"})
            assert await refused(sub) == CloseCode.TOKEN_MISSING_PERMISSION
            await legit.step()
            mod, _ = await join_as(srv.port, "A", "moderator", "mod")
            mod.send_json({"type": "broadcast", "data": "y" * (MAX_BROADCAST_BYTES + 1)})
            assert await refused(mod) == CloseCode.MESSAGE_TOO_LARGE
            mod, _ = await join_as(srv.port, "A", "moderator", "mod")
            for i in range(40):  # a flood: the burst passes, then the moderator is closed
                mod.send_json({"type": "broadcast", "data": {"i": i, "pad": "z" * 1000}})
            assert await refused(mod) == CloseCode.RATE_LIMITED
            await legit.step()
            await legit.until(lambda xs: len(seqs(xs, 1)) >= legit.sent)
            data = [c.body.get("data") for c in legit.got if isinstance(c, Control)
                    and c.type == "broadcast"]  # fmt: skip
            print(f"flood of 40 broadcasts: {len(data)} relayed")
            assert "hello" not in data
            assert 1 <= len(data) <= 11
            for reason in ("message_too_large", "missing_permission", "rate_limited"):
                assert rejections(srv, reason) >= 1, reason
            await legit.check()

    asyncio.run(main())


# --------------------------------------------------------------------------- finding 10


def test_only_the_same_subject_resumes_a_member_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with legit_room(tmp_path) as (srv, legit):
            alice, welcome = await join_as(srv.port, "A", "subscriber", "alice")
            mid = welcome["member_id"]
            alice.send_text(messages.LEAVE)
            await refused(alice)
            mallory, w = await join_as(srv.port, "A", "subscriber", "mallory", resume=mid)
            assert not w["resumed"] and w["member_id"] != mid
            mallory.close()
            await legit.step()
            alice, w = await join_as(srv.port, "A", "subscriber", "alice", resume=mid)
            assert w["resumed"] and w["member_id"] == mid
            alice.close()
            await legit.check()
        async with running_server(data_dir=tmp_path) as srv2:  # restarted
            mallory, w = await join_as(srv2.port, "A", "subscriber", "mallory", resume=mid)
            assert not w["resumed"] and w["member_id"] != mid
            mallory.close()
            alice, w = await join_as(srv2.port, "A", "subscriber", "alice", resume=mid)
            assert w["resumed"] and w["member_id"] == mid
            alice.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- finding 11


def test_names_and_ids_are_matched_whole_no_trailing_newline(tmp_path: Path) -> None:
    async def main() -> None:
        async with legit_room(tmp_path) as (srv, legit):
            # a token for "A\n" from another issuer (mint_token refuses such a room now)
            claims = {"sub": "nl", "room": "A\n", "role": "subscriber", "perms": ["subscribe"],
                      "iat": int(time.time()), "nbf": int(time.time()),
                      "exp": int(time.time()) + 60, "jti": "nl-1"}  # fmt: skip
            nl_token = jwt.encode(claims, SECRET, algorithm="HS256")
            code = await join_refused(srv.port, "A\n", nl_token)
            assert code == CloseCode.MALFORMED_MESSAGE
            code = await join_refused(srv.port, "A", token("A", "subscriber"), resume="m1\n")
            assert code == CloseCode.MALFORMED_MESSAGE
            mod, _ = await join_as(srv.port, "A", "moderator", "mod")
            mod.send_json({"type": "kick", "member": f"{legit.sub.member_id}\n"})
            assert await refused(mod) == CloseCode.MALFORMED_MESSAGE
            await legit.step()
            admin = token("*", "moderator", subject="admin")
            status, body = await asyncio.to_thread(
                http, "POST", f"{srv.url}/api/rooms", {"name": "B\n"}, admin
            )
            assert status == 400, body
            assert "B\n" not in srv.state.manager.rooms
            assert rejections(srv, "malformed_message") == 3
            await legit.check()

    asyncio.run(main())


# --------------------------------------------------------------------------- keyframe replay


def test_a_publisher_cannot_replay_its_keyframe(tmp_path: Path) -> None:
    async def main() -> None:
        async with legit_room(tmp_path) as (srv, legit):
            watcher = member(srv, "A", "subscriber", subject="watcher")
            await watcher.connect()
            rp, _ = await join_as(srv.port, "A", "publisher", "rp", publish=True)
            key = PoseSource(5).next(keyframe=True)
            rp.send_bytes(key)
            await wait_type(rp, "ack")
            for _ in range(50):  # replayed: the first copy closes it
                rp.send_bytes(key)
            assert await refused(rp) == STALE_PACKET
            assert rejections(srv, "stale_packet") == 1
            await legit.step()
            # a reconnect starts afresh: a new encoder's keyframe with seq 1 is fine
            rp, _ = await join_as(srv.port, "A", "publisher", "rp", publish=True)
            enc = Encoder(CodecConfig(), 5, epoch=0)
            src = PoseSource(5)
            rp.send_bytes(enc.encode(src.frame(1), keyframe=True))
            await wait_type(rp, "ack")
            rp.send_bytes(enc.encode(src.frame(2)))
            await wait_type(rp, "ack")
            # an encoder restart on the same connection: a new epoch's keyframe once ...
            enc = Encoder(CodecConfig(), 5, epoch=1)
            rp.send_bytes(enc.encode(src.frame(1), keyframe=True))
            await wait_type(rp, "ack")
            # ... but not epoch after epoch
            enc = Encoder(CodecConfig(), 5, epoch=2)
            rp.send_bytes(enc.encode(src.frame(1), keyframe=True))
            assert await refused(rp) == STALE_PACKET
            await legit.step()
            got = await until(watcher, lambda xs: len(seqs(xs, 5)) >= 4, 5.0)
            await asyncio.sleep(0.2)
            assert seqs(got, 5) == [1, 1, 2, 1]  # one copy each: no replay was relayed
            await watcher.close()
            await legit.check()

    asyncio.run(main())


# --------------------------------------------------------------------------- finding 8


def _metrics_line(url: str, reason: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("posewire_server_rejections_total") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _kick_bob_and_close_z(url: str, port: int) -> str:
    """Bob joins A and is kicked through the REST API; room Z is created and closed."""
    admin = token("*", "moderator", subject="admin")
    bob_token = token("A", "publisher", subject="bob")
    bob = await RawWS.connect(port)
    bob.send_json({"type": "join", "token": bob_token, "room": "A"})
    welcome = await bob.read_text()
    status, _ = await asyncio.to_thread(
        http, "POST", f"{url}/api/rooms/A/kick", {"member": welcome["member_id"]}, admin
    )
    assert status == 200
    assert await refused(bob) == CloseCode.KICKED
    assert (await asyncio.to_thread(http, "POST", f"{url}/api/rooms", {"name": "Z"}, admin))[0] in (
        200,
        201,
    )
    assert (await asyncio.to_thread(http, "DELETE", f"{url}/api/rooms/Z", None, admin))[0] == 200
    return bob_token


async def _still_refused(port: int, bob_token: str) -> None:
    assert await join_refused(port, "A", bob_token) == CloseCode.TOKEN_KICKED
    fresh = token("A", "publisher", subject="bob")  # a new token of the kicked subject
    assert await join_refused(port, "A", fresh) == CloseCode.TOKEN_KICKED
    assert await join_refused(port, "Z", token("Z", "subscriber")) == CloseCode.ROOM_CLOSED
    ws, _ = await join_as(port, "A", "publisher", "carol")  # others are fine
    ws.close()


def test_kicks_and_closed_rooms_survive_kill9_of_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # serve's default data dir

    async def main() -> None:
        srv = await asyncio.to_thread(ServeProcess)
        try:
            bob_token = await _kick_bob_and_close_z(srv.url, srv.port)
            srv.kill9()
            srv = await asyncio.to_thread(ServeProcess)
            await _still_refused(srv.port, bob_token)
            assert _metrics_line(srv.url, "kicked_token") == 2
            assert _metrics_line(srv.url, "room_closed") == 1
        finally:
            srv.stop()
        assert list((tmp_path / "state" / "posewire").glob("server-*.sqlite3"))

    asyncio.run(main())


def test_kicks_and_closed_rooms_survive_kill9_of_the_embedded_server_stage(
    tmp_path: Path,
) -> None:
    port = free_port()
    cfg = procutil.trace_config(
        tmp_path,
        extra=f"server:\n  embedded: true\n  host: 127.0.0.1\n  port: {port}\n"
        f"  secret: {SECRET}\n  data_dir: {tmp_path / 'server-data'}\n",
    )
    sup = procutil.start(cfg, env={"POSEWIRE_SECRET": ""})
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    async def main() -> None:
        assert await asyncio.to_thread(procutil.wait_for, healthy, 30.0), "server stage not up"
        bob_token = await _kick_bob_and_close_z(url, port)
        pid = procutil.stage_pids(sup.pid)["server"]
        os.kill(pid, signal.SIGKILL)

        def restarted() -> bool:
            new = procutil.stage_pids(sup.pid).get("server")
            return new is not None and new != pid and healthy()

        assert await asyncio.to_thread(procutil.wait_for, restarted, 20.0), "not restarted"
        await _still_refused(port, bob_token)

    try:
        asyncio.run(main())
    finally:
        stop_process(sup, 15, sig=signal.SIGINT)
        for stream in (sup.stdout, sup.stderr):
            if stream is not None:
                stream.close()
    assert list((tmp_path / "server-data").glob("server-*.sqlite3"))


# --------------------------------------------------------------------------- the store itself


def test_the_store_is_bounded_private_and_survives_reopening(tmp_path: Path) -> None:
    from pipeline.server.store import MAX_BINDINGS_PER_SUBJECT, SqliteStore, store_path

    path = store_path(tmp_path, SECRET)
    assert SECRET not in path.name
    now = time.time()
    st = SqliteStore(path)
    for i in range(3 * MAX_BINDINGS_PER_SUBJECT):  # a join flood of one subject
        st.bind("A", f"member:m{i}", "flood", now + 60)
    st.bind("A", "stream:7", "cam", now + 60)
    st.bind("A", "stream:8", "old", now - 1)  # already expired
    st.revoke("A", "bob", "jti-1", now + 60)
    st.close_room("Z", 1)
    st.close()
    assert path.stat().st_mode & 0o077 == 0
    st = SqliteStore(path)
    kept = [i for i in range(3 * MAX_BINDINGS_PER_SUBJECT)
            if st.bound_subject("A", f"member:m{i}", now) == "flood"]  # fmt: skip
    assert kept == list(range(2 * MAX_BINDINGS_PER_SUBJECT, 3 * MAX_BINDINGS_PER_SUBJECT))
    assert st.bound_subject("A", "stream:7", now) == "cam"
    assert st.bound_subject("A", "stream:8", now) is None
    assert st.is_revoked("A", "bob", "other-jti", now)  # the subject, in room A
    assert st.is_revoked("B", "carol", "jti-1", now)  # the token, everywhere
    assert not st.is_revoked("B", "bob", "jti-2", now)
    assert st.is_closed("Z") and not st.is_closed("A")
    st.reopen_room("Z")
    st.prune(now + 3600)
    st.close()
    st = SqliteStore(path)
    assert not st.is_closed("Z") and not st.is_revoked("A", "bob", "jti-1", now + 3600)
    assert st.bound_subject("A", "stream:7", now + 3600) is None
    st.close()
