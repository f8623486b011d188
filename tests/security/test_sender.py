"""Issue 11, findings 1 and 4 (client side), against real processes on loopback.

* 1: a real pipeline (trace -> encode -> transmit over WebSocket) publishes to a real
  ``serve`` process. A moderator kicks it over the REST API: the run must stop with
  exit 2 and a message, the report and the metrics must show the refusal. A moderator
  closes its room and reopens it: the refusal must be visible meanwhile (metrics,
  alert) and the sender must publish again once the room is back.
* 4: a fake publisher (a raw WebSocket) claims an absurd clock offset; a real
  ``pipeline receive`` process in the room keeps decoding, exits 0 and reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.model.prometheus import parse_exposition
from tests.procutil import ROOT, TRACE, start, stop, trace_source, wait_for, write_config
from tests.test_server_support import SECRET, PoseSource, RawWS, ServeProcess, token

pytestmark = pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")


@pytest.fixture
def server() -> Iterator[ServeProcess]:
    srv = ServeProcess(0)
    try:
        yield srv
    finally:
        srv.stop()


def _config(tmp_path: Path, url: str, room: str) -> Path:
    return write_config(
        tmp_path,
        f"""
{trace_source()}transmit:
  primary: websocket
  server_url: {url}
  room: {room}
supervisor:
  run_dir: {tmp_path / "run"}
  heartbeat_interval_ms: 100
  heartbeat_timeout_ms: 3000
monitor:
  port: 0
  sample_interval_s: 0.5
  status: 'off'
""",
    )


def _api(srv: ServeProcess, method: str, path: str, body: Any = None, room: str = "*") -> Any:
    req = urllib.request.Request(
        f"{srv.url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": f"Bearer {token(room, 'moderator', subject='mod')}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, **json.loads(exc.read())}


def _publisher(srv: ServeProcess, room: str) -> str | None:
    info = _api(srv, "GET", f"/api/rooms/{room}", room=room)
    pubs = info.get("publishers") or []
    return str(pubs[0]) if pubs else None


def _metric(base: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    key = ("posewire_stage_metric", frozenset({"stage": "transmit", "metric": name}.items()))
    return parse_exposition(text).get(key)


def _alert(base: str, name: str) -> float | None:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return parse_exposition(text).get(("posewire_alert_active", frozenset({("alert", name)})))


def _monitor_url(tmp_path: Path, run_id: str) -> str:
    url_file = tmp_path / "run" / run_id / "monitor.url"
    assert wait_for(url_file.exists, 30), "monitor did not start"
    return url_file.read_text().strip()


def _env() -> dict[str, str]:
    return {"POSEWIRE_SECRET": SECRET}


def test_kicked_publisher_stops_the_run_with_exit_2_and_a_message(
    tmp_path: Path, server: ServeProcess
) -> None:
    run_id = f"kick{os.getpid()}"
    report = tmp_path / "report.json"
    cfg = _config(tmp_path, server.url, "K")
    proc = start(cfg, "--run-id", run_id, "--report", str(report), "--duration", "60", env=_env())
    try:
        base = _monitor_url(tmp_path, run_id)
        assert wait_for(lambda: (_metric(base, "packets_sent_total") or 0) > 20, 40), (
            "no packets flowing"
        )
        member = _publisher(server, "K")
        assert member is not None
        assert _api(server, "POST", "/api/rooms/K/kick", {"member": member}, room="K") == {
            "kicked": member
        }
        t0 = time.monotonic()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the kicked sender kept running (silently)") from None
        stopped_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert "refused this publisher for good (kicked)" in err, err[-3000:]
    assert err.count("refused for good") == 1, err[-3000:]  # one log line, not per packet
    data = json.loads(report.read_text())
    assert data["exit_code"] == 2 and "kicked" in data["message"], data["message"]
    tx = data["stages"]["transmit"]["metrics"]
    assert tx["transport_refused"] == 1 and tx["transport_refused_kicked"] == 1, tx
    assert tx["transport_connected"] == 0 and tx["transport_refusals_total"] == 1, tx
    episodes = [a for a in data["alerts"] if a["name"] == "transport_refused"]
    assert episodes and episodes[-1]["active_at_exit"], data["alerts"]
    print(f"kick -> exit 2 after {stopped_after:.2f} s")


def test_closed_room_is_visible_then_recovers_when_reopened(
    tmp_path: Path, server: ServeProcess
) -> None:
    run_id = f"close{os.getpid()}"
    cfg = _config(tmp_path, server.url, "C")
    proc = start(cfg, "--run-id", run_id, "--duration", "60", env=_env())
    try:
        base = _monitor_url(tmp_path, run_id)
        assert wait_for(lambda: (_metric(base, "packets_sent_total") or 0) > 20, 40)
        assert _api(server, "DELETE", "/api/rooms/C", room="C") == {"closed": "C"}
        assert wait_for(lambda: _metric(base, "transport_refused") == 1, 10, 0.2), (
            "refusal not visible in the metrics"
        )
        assert _metric(base, "transport_refused_room_closed") == 1
        assert _metric(base, "transport_connected") == 0
        assert wait_for(lambda: _alert(base, "transport_refused") == 1, 10, 0.2)
        dropped0 = _metric(base, "packets_refused_total") or 0
        assert wait_for(lambda: (_metric(base, "packets_refused_total") or 0) > dropped0 + 10, 10)
        sent0 = _metric(base, "packets_sent_total") or 0

        created = _api(server, "POST", "/api/rooms", {"name": "C"}, room="C")
        assert created.get("name") == "C", created
        t0 = time.monotonic()
        assert wait_for(lambda: _metric(base, "transport_refused") == 0, 20, 0.2), (
            "the sender did not come back after the room was reopened"
        )
        recovered_after = time.monotonic() - t0
        assert wait_for(lambda: (_metric(base, "packets_sent_total") or 0) > sent0 + 20, 15)
        assert _metric(base, "transport_connected") == 1
        assert _metric(base, "transport_refused_room_closed") is None
        assert proc.poll() is None
    finally:
        code, _, err = stop(proc)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    assert err.count("refused (room_closed)") == 1, err[-3000:]  # logged once
    assert "accepted again" in err
    print(f"room reopened -> publishing again after {recovered_after:.2f} s")


# --------------------------------------------------------------------------- finding 4


async def _fake_publisher(port: int, room: str, offsets: list[int]) -> list[Any]:
    """Join as a publisher over a raw WebSocket, send packets, claim each offset, send more.
    Returns what the server said to it (an error + close when it validates offsets)."""
    ws = await RawWS.connect(port)
    ws.send_json({"type": "join", "token": token(room, "publisher"), "room": room})
    welcome = await ws.read_text()
    assert welcome["type"] == "welcome", welcome
    src = PoseSource(7)
    heard: list[Any] = []
    try:
        for i in range(60):
            ws.send_bytes(src.next(keyframe=i % 10 == 0))
            if i in (30, 45) and offsets:
                ws.send_text(f'{{"type":"clock","offset_ns":{offsets.pop(0)},"rtt_ns":1000}}')
            await ws.writer.drain()
            await asyncio.sleep(0.03)
        ws.send_json({"type": "leave"})
    except ConnectionError:  # the server closed us (it validates offsets)
        pass
    with contextlib.suppress(TimeoutError, ConnectionError):
        _code, heard = await ws.read_until_close(2.0)
    ws.close()
    return heard


def test_absurd_clock_offset_does_not_crash_a_receiver(
    tmp_path: Path, server: ServeProcess
) -> None:
    report = tmp_path / "receive.json"
    rx = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "receive", "--server", server.url, "--room", "O",
         "--token", token("O", "subscriber", subject="rx"), "--duration", "8",
         "--report", str(report)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        joined = lambda: len(_api(server, "GET", "/api/rooms/O").get("members", [])) >= 1  # noqa: E731
        assert wait_for(joined, 20), "the receiver did not join"
        heard = asyncio.run(_fake_publisher(server.port, "O", [10**18, 10**400]))
        out, err = rx.communicate(timeout=30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.communicate()
    assert rx.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "OverflowError" not in err
    rep = json.loads(report.read_text())
    assert rep["frames_decoded"] > 10, rep
    server_refused = any(isinstance(h, dict) and h.get("type") == "error" for h in heard)
    if not server_refused:  # the server relayed the offsets: the receiver refused them
        assert rep["bad_member_records"] >= 1, rep  # 10**18 ns: an int, but absurd
        assert rep["bad_messages"] >= 1, rep  # 10**400: not bounded JSON
        assert "refused from the room" in out
    stream = rep["publishers"]["7"]
    assert stream["decoded"] > 10 and stream["latency_ms"]["p50"] is not None, stream
    print(f"receiver: {rep['frames_decoded']} decoded, server refused offsets: {server_refused}")
