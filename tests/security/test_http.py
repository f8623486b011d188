"""Issue 11, the server's HTTP layer: the dev token endpoint (3), connections before
the WebSocket upgrade (7), REST body parsing (9), a 1 MB header and unmasked client
frames ("also noted"). Real servers (in this process or ``python -m pipeline serve``
subprocesses) and raw sockets on 127.0.0.1; every sending loop is bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.common import stop_process
from pipeline.model.prometheus import samples_as_written
from tests.test_server_support import ROOT, SECRET, RawWS, running_server, token

# --------------------------------------------------------------------------- helpers


async def http(
    port: int, head: str, body: bytes = b"", *, limit_s: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request (``head``: request line and headers, no blank line)."""
    async with asyncio.timeout(limit_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head.encode("latin-1") + b"\r\n")
            if body:
                writer.write(f"Content-Length: {len(body)}\r\n".encode())
            writer.write(b"Connection: close\r\n\r\n" + body)
            raw = await reader.read()
        finally:
            writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    headers = {}
    for line in header_block.decode("latin-1").split("\r\n"):
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers, payload


async def metrics(port: int) -> dict[str, float]:
    status, _, body = await http(port, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1")
    assert status == 200
    return samples_as_written(body.decode())


class Serve:
    """``python -m pipeline serve`` with a config file; its log goes to a file (a log
    storm must not block it on a full pipe)."""

    def __init__(
        self, tmp: Path, *, dev: bool = False, nofile: int | None = None, **server: Any
    ) -> None:
        cfg = tmp / "pipeline.yaml"
        cfg.write_text(json.dumps({"server": server}))  # JSON is YAML
        self.log = tmp / "server.log"
        limit = nofile

        def preexec() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "serve", "--host", "127.0.0.1",
                 "--port", "0", "--log-level", "INFO", "--config", str(cfg),
                 *(["--dev"] if dev else [])],
                cwd=ROOT, env={**os.environ, "POSEWIRE_SECRET": SECRET},
                stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=preexec,
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "http://127.0.0.1:" not in line:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r} {self.log.read_text()}")
        self.port = int(line.split("http://127.0.0.1:")[1].split()[0])

    def stop(self) -> str:
        stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.log.read_text(errors="replace")


async def slow_client(port: int, i: int, *, limit_s: float, trickle_s: float = 0.25) -> float:
    """A request line, then one header line every ``trickle_s``, never the blank line:
    seconds until the server closed the connection (``limit_s`` + 1 if it never did)."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return time.monotonic() - t0
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        while time.monotonic() - t0 < limit_s:
            try:
                async with asyncio.timeout(trickle_s):
                    data = await reader.read(4096)
            except TimeoutError:
                writer.write(b"X-Slow-%d: %d\r\n" % (i, int(time.monotonic() * 1000)))
                continue
            if not data:
                return time.monotonic() - t0
    except OSError:  # reset by the server
        return time.monotonic() - t0
    finally:
        writer.close()
    return limit_s + 1.0


async def join_time(port: int, room: str = "legit") -> float:
    """Seconds for a legitimate member to connect, join and get its welcome."""
    t0 = time.monotonic()
    ws = await RawWS.connect(port)
    ws.send_json({"type": "join", "token": token(room, "publisher"), "room": room})
    welcome = await ws.read_text(limit_s=5.0)
    assert welcome["type"] == "welcome", welcome
    elapsed = time.monotonic() - t0
    ws.close()
    return elapsed


async def timed(coro: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    result = await coro
    return time.monotonic() - t0, result


async def read_all(reader: asyncio.StreamReader, limit_s: float) -> bytes:
    """Everything until the server closes (a reset counts as closed)."""
    async with asyncio.timeout(limit_s):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


def traceback_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Traceback" in line]


# --------------------------------------------------------------------------- 3: dev token


def test_dev_token_refuses_foreign_host_origin_moderator_star_and_long_ttl() -> None:
    async def main() -> None:
        async with running_server(dev=True) as srv:
            port = srv.port
            own = f"127.0.0.1:{port}"

            async def mint(body: dict[str, Any], *headers: str) -> tuple[int, dict[str, Any]]:
                lines = ["POST /api/dev/token HTTP/1.1", *headers]
                if not any(h.lower().startswith("host:") for h in headers):
                    lines.append(f"Host: {own}")
                status, hdrs, payload = await http(
                    port, "\r\n".join(lines), json.dumps(body).encode()
                )
                assert not any(k.startswith("access-control-") for k in hdrs), hdrs
                return status, json.loads(payload)

            ok = {"room": "demo", "role": "publisher"}
            # the legitimate uses: curl on this machine, a page served by this server
            status, got = await mint(ok)
            assert status == 200, got
            claims = srv.state.verifier.verify(got["token"], room="demo", require=["publish_pose"])
            assert claims.exp - claims.iat == 600  # the default lifetime is 10 min
            assert (await mint(ok, "Host: localhost:1"))[0] == 200
            assert (await mint(ok, f"Origin: http://127.0.0.1:{port}"))[0] == 200
            assert (await mint(ok, f"Origin: http://[::1]:{port}", "Host: [::1]"))[0] == 200
            # DNS rebinding: a foreign name that resolves to 127.0.0.1
            for host in ("Host: evil.example", f"Host: evil.example:{port}", "Host: 10.0.0.1"):
                status, got = await mint(ok, host, "X-Forwarded-For: 127.0.0.1")
                assert (status, got["error"]) == (403, "dev_token_host"), (host, got)
            # a missing Host is no loopback Host either (HTTP/1.1 requires one)
            status, hdrs, payload = await http(
                port, "POST /api/dev/token HTTP/1.1", json.dumps(ok).encode()
            )
            assert status in (400, 403), payload
            # browser pages of other origins, also "simple" text/plain requests
            for origin in (
                "Origin: http://evil.example",
                "Origin: null",
                f"Origin: http://127.0.0.1:{port + 1}",
                f"Origin: https://127.0.0.1:{port}",
                f"Origin: http://evil.example:{port}",
            ):
                status, got = await mint(ok, origin, "Content-Type: text/plain")
                assert (status, got["error"]) == (403, "dev_token_origin"), (origin, got)
            status, got = await mint(ok, "Sec-Fetch-Site: cross-site")
            assert (status, got["error"]) == (403, "dev_token_origin")
            # what may be minted
            refused: list[tuple[dict[str, Any], str]] = [
                ({"room": "demo", "role": "moderator"}, "dev_token_role"),
                ({"room": "demo", "role": "admin"}, "dev_token_role"),
                ({"room": "*", "role": "subscriber"}, "dev_token_room"),
                ({"room": "demo\n", "role": "subscriber"}, "dev_token_room"),
                ({"room": "demo", "role": "subscriber", "ttl": 366 * 86400}, "dev_token_ttl"),
                ({"room": "demo", "role": "subscriber", "ttl": 3601}, "dev_token_ttl"),
                ({"room": "demo", "role": "subscriber", "ttl": -1}, "dev_token_ttl"),
                ({"room": "demo", "role": "subscriber", "ttl": 1e999}, "malformed_message"),
            ]
            for body, reason in refused:
                status, got = await mint(body)
                assert (status, got["error"]) == (400, reason), (body, got)
            status, got = await mint({"room": "demo", "role": "subscriber", "ttl": 3600})
            assert status == 200
            # a CORS preflight gets no permission either
            status, hdrs, _ = await http(
                port,
                f"OPTIONS /api/dev/token HTTP/1.1\r\nHost: {own}\r\nOrigin: http://evil.example\r\n"
                "Access-Control-Request-Method: POST",
            )
            assert status >= 400 and "access-control-allow-origin" not in hdrs
            m = await metrics(port)
            assert m['posewire_server_rejections_total{reason="dev_token_host"}'] >= 3
            assert m['posewire_server_rejections_total{reason="dev_token_origin"}'] == 6
            assert m['posewire_server_rejections_total{reason="dev_token_role"}'] == 2

    asyncio.run(main())


# --------------------------------------------------------------------------- 9: REST parsing


def test_rest_bodies_are_authenticated_first_and_parsed_bounded(tmp_path: Path) -> None:
    srv = Serve(tmp_path)
    mod = token("*", "moderator")
    sub = token("A", "subscriber")

    async def post(body: bytes, auth: str | None) -> tuple[int, dict[str, Any]]:
        head = "POST /api/rooms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
        if auth is not None:
            head += f"\r\nAuthorization: Bearer {auth}"
        status, _, payload = await http(srv.port, head, body)
        return status, json.loads(payload)

    async def main() -> None:
        deep = b"[" * 5000 + b"]" * 5000
        deep_obj = b'{"name": ' + b"[" * 3000 + b"]" * 3000 + b"}"
        # no token / a token without 'moderate': refused before the body is parsed
        assert (await post(deep, None))[0] == 401
        assert (await post(deep, sub))[0] == 403
        for body in (deep, deep_obj, b'{"name": 1e999}', b"\xff\xfe", b"[1, 2]"):
            status, got = await post(body, mod)
            assert (status, got["error"]) == (400, "malformed_message"), (body[:20], got)
        status, got = await post(b'{"name": "' + b"x" * 100_000 + b'"}', mod)
        assert (status, got["error"]) == (413, "body_too_large")
        status, got = await post(b'{"name": "ok-room"}', mod)
        assert status == 201, got
        assert (await metrics(srv.port))["posewire_server_ready"] == 1

    try:
        asyncio.run(main())
    finally:
        log = srv.stop()
    assert not traceback_lines(log), log[-3000:]


# ------------------------------------------------------------------ also noted: 1 MB header


def test_megabyte_authorization_header_answers_400_without_traceback(tmp_path: Path) -> None:
    srv = Serve(tmp_path)

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            writer.write(
                b"GET /api/rooms HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                + b"A" * 1_000_000
                + b"\r\n\r\n"
            )
            async with asyncio.timeout(5):
                raw = await reader.read(4096)
            return int(raw.split()[1])
        finally:
            writer.close()

    async def main() -> None:
        for _ in range(3):
            assert await one() in (400, 431)
        assert (await metrics(srv.port))["posewire_server_ready"] == 1

    try:
        asyncio.run(main())
    finally:
        log = srv.stop()
    assert not traceback_lines(log), log[-3000:]
    assert len([ln for ln in log.splitlines() if "Error handling request" in ln]) <= 3, log


# ------------------------------------------------------------------- 7: before the upgrade


def test_slow_header_clients_are_closed_and_the_server_keeps_serving(tmp_path: Path) -> None:
    timeout_s, n = 1.0, 300
    srv = Serve(tmp_path, header_timeout_s=timeout_s)  # max_pending_connections 200

    async def main() -> None:
        base = await metrics(srv.port)
        slow = [
            asyncio.create_task(slow_client(srv.port, i, limit_s=timeout_s + 4.0)) for i in range(n)
        ]
        await asyncio.sleep(0.5)  # all connected and trickling
        t_metrics, during = await timed(metrics(srv.port))
        t_join = await join_time(srv.port)
        closed = await asyncio.gather(*slow)
        after = await metrics(srv.port)
        print(
            f"slow clients closed after max {max(closed):.2f} s, median "
            f"{sorted(closed)[n // 2]:.2f} s; /metrics {t_metrics * 1000:.0f} ms, join "
            f"{t_join * 1000:.0f} ms during; fds {base['posewire_server_open_fds']:.0f} -> "
            f"{during['posewire_server_open_fds']:.0f}; pending peak "
            f"{after.get('posewire_server_pending_connections_peak', -1):.0f}"
        )
        assert max(closed) <= timeout_s + 1.5, sorted(closed)[-10:]
        assert t_metrics < 1.0 and t_join < 1.0
        assert during["posewire_server_pending_connections"] <= 200
        assert during["posewire_server_open_fds"] <= base["posewire_server_open_fds"] + 200 + 20
        assert after["posewire_server_pending_connections_peak"] <= 200
        slow_closed = (
            after['posewire_server_header_timeouts_total{reason="slow_headers"}']
            + after["posewire_server_pending_evicted_total"]
        )
        assert slow_closed >= n - 5, after
        assert after["posewire_server_pending_connections"] <= 1  # our /metrics request

    try:
        asyncio.run(main())
    finally:
        log = srv.stop()
    assert not traceback_lines(log)
    assert len(log.splitlines()) < 60, log[-3000:]  # rate-limited per-connection lines


def test_pending_cap_closes_new_connections_at_once_when_all_are_being_answered(
    tmp_path: Path,
) -> None:
    cap = 20
    srv = Serve(tmp_path, header_timeout_s=1.5, max_pending_connections=cap)
    mod = token("*", "moderator")

    async def main() -> None:
        # requests whose body never comes: being answered, not evictable
        held = []
        for _ in range(cap):
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(
                f"POST /api/rooms HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {mod}\r\n"
                "Content-Length: 100\r\n\r\n".encode()
            )
            held.append((reader, writer))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert await read_all(reader, 1.0) == b""  # closed at once, unanswered
        assert time.monotonic() - t0 < 0.5
        writer.close()
        for r, w in held:  # the held requests end at the deadline
            assert b"201" not in await read_all(r, 3.0)
            w.close()
        m = await metrics(srv.port)
        assert m["posewire_server_pending_refused_total"] >= 1
        assert m['posewire_server_header_timeouts_total{reason="slow_request"}'] == cap
        assert await join_time(srv.port) < 1.0

    try:
        asyncio.run(main())
    finally:
        log = srv.stop()
    assert not traceback_lines(log), log[-3000:]


def test_low_fd_limit_keeps_the_log_bounded_and_the_server_recovers(tmp_path: Path) -> None:
    timeout_s, n = 1.0, 300
    srv = Serve(tmp_path, nofile=160, header_timeout_s=timeout_s)

    async def main() -> None:
        slow = [
            asyncio.create_task(slow_client(srv.port, i, limit_s=timeout_s + 4.0)) for i in range(n)
        ]
        await asyncio.sleep(0.5)
        t_join = await join_time(srv.port)
        closed = await asyncio.gather(*slow)
        # from connect: a connection may wait in the listen backlog while accept()
        # pauses for a second after EMFILE (asyncio's retry), then the header timeout
        assert max(closed) <= timeout_s + 3.5, sorted(closed)[-10:]
        # recovered: answers and joins promptly once the slow clients are gone
        t_metrics, m = await timed(metrics(srv.port))
        t_join_after = await join_time(srv.port)
        print(
            f"fd limit 160: join during {t_join * 1000:.0f} ms, after "
            f"{t_join_after * 1000:.0f} ms, /metrics {t_metrics * 1000:.0f} ms; "
            f"accept errors {m.get('posewire_server_accept_errors_total', -1):.0f}, pending peak "
            f"{m.get('posewire_server_pending_connections_peak', -1):.0f}, fds "
            f"{m['posewire_server_open_fds']:.0f}"
        )
        assert t_join < 2.0 and t_metrics < 1.0 and t_join_after < 1.0
        assert m["posewire_server_open_fds"] < 160

    try:
        asyncio.run(main())
    finally:
        log = srv.stop()
    lines = log.splitlines()
    print(f"{len(lines)} log lines, {len(log)} bytes")
    assert len(lines) < 60 and not traceback_lines(log), log[-3000:]


# --------------------------------------------------------------- also noted: unmasked frames


def test_unmasked_client_frame_is_closed_with_1002() -> None:
    async def main() -> None:
        async with running_server() as srv:
            ws = await RawWS.connect(srv.port)
            join = json.dumps({"type": "join", "token": token("A", "publisher"), "room": "A"})
            payload = join.encode()
            assert 126 <= len(payload) < 65536
            ws.writer.write(struct.pack("!BBH", 0x81, 126, len(payload)) + payload)  # no mask
            code, got = await ws.read_until_close(limit_s=3.0)
            assert code == 1002, (code, got)
            assert not any(isinstance(g, dict) and g.get("type") == "welcome" for g in got)
            ws.close()
            assert srv.state.metrics.rejections["unmasked_frame"] == 1
            # masked clients are unaffected, also with large frames
            assert await join_time(srv.port) < 1.0
            ws = await RawWS.connect(srv.port)
            ws.send_json({"type": "join", "token": token("A", "publisher"), "room": "A"})
            assert (await ws.read_text())["type"] == "welcome"
            ws.send_json({"type": "ping", "pad": "x" * 70_000})  # 64-bit length, > max
            code, _ = await ws.read_until_close(limit_s=3.0)
            assert code == 4009  # too large, not a mask error
            ws.close()

    asyncio.run(main())


def test_accept_retry_after_close_is_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio 3.11 re-arms accepting a second after EMFILE and fires that timer on the
    closed listening socket at shutdown (ValueError, fd -1): no traceback for that;
    any other callback error still reaches the default handler."""
    from pipeline.server.guard import install_loop_handler
    from pipeline.server.metrics import ServerMetrics

    class Handle:
        def __repr__(self) -> str:
            return "<TimerHandle BaseSelectorEventLoop._start_serving(...)>"

    loop = asyncio.new_event_loop()
    try:
        undo = install_loop_handler(loop, ServerMetrics())
        with caplog.at_level(logging.DEBUG):
            loop.call_exception_handler(
                {
                    "message": "Exception in callback BaseSelectorEventLoop._start_serving",
                    "exception": ValueError("Invalid file descriptor: -1"),
                    "handle": Handle(),
                }
            )
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            loop.call_exception_handler({"message": "boom", "exception": KeyError("x")})
        assert [r for r in caplog.records if r.levelno >= logging.ERROR]
        undo()
    finally:
        loop.close()
