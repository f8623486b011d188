"""``python -m pipeline receive`` as a real process against a real ``serve`` process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from pipeline.transports.websocket import WebSocketTransport
from pipeline.wire.tokens import mint_token
from tests.test_server_support import (
    ROOT,
    SECRET,
    PoseSource,
    ServeProcess,
    free_port,
    token,
)


@pytest.fixture
def server() -> Any:
    srv = ServeProcess()
    yield srv
    assert srv.stop() == 0  # an orderly SIGTERM shutdown exits 0


async def _publish(
    url: str, seconds: float, stop: Any = None, *, frames: int | None = None, **codec: Any
) -> None:
    """A publisher (stream 42, subject "cam") at 30 fps for ``seconds`` (or ``frames``)."""
    pub = await _publisher(url)
    src = PoseSource(42, **codec)
    await _send(pub, src, seconds=seconds, frames=frames, stop=stop)
    await pub.close()


async def _publisher(url: str) -> WebSocketTransport:
    pub = WebSocketTransport(
        url, "A", token("A", "publisher", subject="cam"), publish=True, subscribe=False
    )
    await pub.connect()
    return pub


async def _send(
    pub: WebSocketTransport,
    src: PoseSource,
    *,
    seconds: float = 1e9,
    frames: int | None = None,
    stop: Any = None,
) -> int:
    """Send ``src``'s next poses at 30 fps until ``seconds`` passed, ``frames`` were sent or
    ``stop()`` is true; the number sent."""
    t_end, sent = time.monotonic() + seconds, 0
    while time.monotonic() < t_end and (frames is None or sent < frames):
        if stop is not None and stop():
            break
        while pub.recv_nowait() is not None:
            pass
        await pub.send(src.next())
        sent += 1
        await asyncio.sleep(1 / 30)
    return sent


async def _members(url: str, room: str) -> list[dict[str, Any]]:
    """The members of ``room`` now, from the rooms API (none while it does not exist)."""
    mod = {"Authorization": f"Bearer {token('*', 'moderator', subject='admin')}"}
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{url}/api/rooms/{room}", headers=mod)
        return [] if r.status == 404 else list((await r.json())["members"])


async def _until_members(url: str, room: str, n: int, limit_s: float = 30.0) -> None:
    """Wait until ``room`` has ``n`` members: processes start slowly on a loaded machine,
    so a test waits for the join it needs instead of sleeping for a guessed time."""
    t_end = time.monotonic() + limit_s
    while len(await _members(url, room)) < n:
        assert time.monotonic() < t_end, f"room {room} never had {n} members"
        await asyncio.sleep(0.05)


class _ReceiveProc:
    """A ``python -m pipeline receive`` process started now; :meth:`finish` stops it with
    SIGTERM (an orderly end: the report is written) or waits for its own end."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> _ReceiveProc:
        cmd = [sys.executable, "-m", "pipeline", "receive", *args]
        pipe = asyncio.subprocess.PIPE
        return cls(await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=pipe, stderr=pipe))

    async def finish(self, *, terminate: bool = False) -> tuple[int, str, str]:
        if terminate and self.proc.returncode is None:
            self.proc.terminate()
        out, err = await asyncio.wait_for(self.proc.communicate(), 60)
        return int(self.proc.returncode or 0), out.decode(), err.decode()


async def _receive(*args: str, publish_to: str | None = None) -> tuple[int, str, str]:
    """Run the receive command; meanwhile publish poses at 30 fps until it exits (its
    ``--duration`` counts from its join, which a loaded machine may delay by seconds)."""
    rx = await _ReceiveProc.start(*args)
    if publish_to is not None:
        await _publish(publish_to, 60.0, stop=lambda: rx.proc.returncode is not None)
    return await rx.finish()


def test_receive_decodes_reports_and_writes_jsonl(server: ServeProcess, tmp_path: Path) -> None:
    out, rep = tmp_path / "poses.jsonl", tmp_path / "report.json"
    rc, stdout, stderr = asyncio.run(
        _receive(
            "--server",
            server.url,
            "--room",
            "A",
            "--token",
            token("A", "subscriber"),
            "--duration",
            "4",
            "--out",
            str(out),
            "--report",
            str(rep),
            publish_to=server.url,
        )
    )
    assert rc == 0, stderr
    report = json.loads(rep.read_text())
    s = report["publishers"]["42"]
    assert s["decoded"] > 20 and s["decoded"] == s["received"]
    assert s["lost"] == 0 and s["need_keyframe"] == 0 and s["first_decoded_at"] == 1
    assert s["subject"] == "cam"
    for q in ("p50", "p95", "p99"):
        assert report["latency_ms"][q] is not None
    assert report["clock_offset_ns"] is not None
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == s["decoded"]
    assert np.asarray(lines[0]["image"]).shape == (1, 33, 4)
    assert "p95" in stdout


def test_receive_writes_npz(server: ServeProcess, tmp_path: Path) -> None:
    out = tmp_path / "poses.npz"
    rc, _, stderr = asyncio.run(
        _receive(
            "--server",
            server.url,
            "--room",
            "A",
            "--token",
            token("A", "subscriber"),
            "--duration",
            "3",
            "--out",
            str(out),
            publish_to=server.url,
        )
    )
    assert rc == 0, stderr
    with np.load(out) as d:
        assert list(d["streams"]) == [42]
        assert d["s42_image"].shape[1:] == (33, 4) and len(d["s42_seq"]) > 10


def test_receive_refusals_are_precise_and_non_zero(server: ServeProcess) -> None:
    expired = mint_token(SECRET, room="A", role="subscriber", now=time.time() - 7200, ttl_s=60)
    rc, _, err = asyncio.run(
        _receive("--server", server.url, "--room", "A", "--token", expired, "--duration", "1")
    )
    assert rc == 1 and "token refused (expired)" in err and "Traceback" not in err
    rc, _, err = asyncio.run(
        _receive("--server", server.url, "--room", "A", "--token", token("B", "subscriber"))
    )
    assert rc == 1 and "wrong_room" in err and "Traceback" not in err
    port = free_port()
    rc, _, err = asyncio.run(
        _receive(
            "--server",
            f"http://127.0.0.1:{port}",
            "--room",
            "A",
            "--token",
            token("A", "subscriber"),
            "--connect-timeout",
            "1",
        )
    )
    assert rc == 1 and "cannot connect" in err and "Traceback" not in err


def test_receive_reports_a_closed_room(server: ServeProcess) -> None:
    async def main() -> tuple[int, str, str]:
        mod = {"Authorization": f"Bearer {token('*', 'moderator')}"}
        recv = asyncio.create_task(
            _receive(
                "--server",
                server.url,
                "--room",
                "A",
                "--token",
                token("A", "subscriber"),
                "--duration",
                "30",
            )
        )
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = await http.get(f"{server.url}/api/rooms/A", headers=mod)
                if r.status == 200 and (await r.json())["members"]:
                    break
                await asyncio.sleep(0.1)
            r = await http.delete(f"{server.url}/api/rooms/A", headers=mod)
            assert r.status == 200
        return await recv

    rc, _, err = asyncio.run(main())
    assert rc == 1 and "room 'A' was closed" in err and "Traceback" not in err
    # joining a closed room: refused at once
    rc, _, err = asyncio.run(
        _receive("--server", server.url, "--room", "A", "--token", token("A", "subscriber"))
    )
    assert rc == 1 and "room_closed" in err


def test_processes_two_receivers_in_a_one_in_b_and_a_late_joiner(
    server: ServeProcess, tmp_path: Path
) -> None:
    """All real processes but the publisher: serve, and four ``receive`` processes."""

    def cmd(room: str, name: str, duration: float) -> list[str]:
        return [
            "--server", server.url, "--room", room, "--token", token(room, "subscriber"),
            "--duration", str(duration), "--report", str(tmp_path / f"{name}.json"),
        ]  # fmt: skip

    sent: list[int] = []

    async def main() -> list[tuple[int, str, str]]:
        # every step waits for the joins it needs (a loaded machine starts processes
        # slowly); the windows are long and end by SIGTERM once the stream is over
        early = [
            await _ReceiveProc.start(*cmd(r, n, 120))
            for r, n in (("A", "a1"), ("A", "a2"), ("B", "b"))
        ]
        await _until_members(server.url, "A", 2)
        await _until_members(server.url, "B", 1)
        pub, src = await _publisher(server.url), PoseSource(42)
        sent.append(await _send(pub, src, frames=60))  # 2 s before the late joiner
        late = await _ReceiveProc.start(*cmd("A", "late", 120))
        joined = asyncio.create_task(_until_members(server.url, "A", 4))  # a1 a2 pub late
        sent.append(await _send(pub, src, stop=joined.done))
        await joined
        sent.append(await _send(pub, src, frames=60))
        await asyncio.sleep(0.5)  # the last packets reach every receiver
        await pub.close()
        return [await rx.finish(terminate=True) for rx in (*early, late)]

    results = asyncio.run(main())
    for rc, _, err in results:
        assert rc == 0, err
    a1, a2, b, late = (
        json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a1", "a2", "b", "late")
    )
    for rep in (a1, a2):
        s = rep["publishers"]["42"]
        assert s["decoded"] == s["received"] == sum(sent) and s["lost"] == 0
        assert s["first_decoded_at"] == 1 and s["need_keyframe"] == 0
    assert b["frames_received"] == 0 and b["publishers"] == {}
    s = late["publishers"]["42"]
    assert s["first_decoded_at"] == 1 and s["need_keyframe"] == 0 and s["decoded"] > 0


@pytest.mark.timing
def test_late_joiner_reports_live_latency_apart_from_backfill(
    server: ServeProcess, tmp_path: Path
) -> None:
    """A receiver joining a running room: the server's stored history (keyframe + packets
    after it: one keyframe every 90 frames, so up to 3 s old) is reported as backfill, not as
    live latency, and the join boundary is not a loss."""
    rep_path, poses_path = tmp_path / "late.json", tmp_path / "late.jsonl"

    async def main() -> tuple[int, str, str]:
        pub, src = await _publisher(server.url), PoseSource(42, keyframe_interval=90)
        # 40 frames of history after the first keyframe, then the stream pauses until the
        # receiver has joined: its backfill is at least 40 frames (1.3 s) old however slowly
        # its process starts, and no second keyframe comes before it
        await _send(pub, src, frames=40)
        rx = await _ReceiveProc.start(
            "--server", server.url, "--room", "A", "--token", token("A", "subscriber"),
            "--duration", "120", "--report", str(rep_path), "--out", str(poses_path),
        )  # fmt: skip
        await _until_members(server.url, "A", 2)
        await _send(pub, src, frames=150)
        await asyncio.sleep(0.5)
        await pub.close()
        return await rx.finish(terminate=True)

    rc, stdout, stderr = asyncio.run(main())
    assert rc == 0, stderr
    rep = json.loads(rep_path.read_text())
    s = rep["publishers"]["42"]
    bf = rep["backfill"]
    poses = [json.loads(x) for x in poses_path.read_text().splitlines()]
    assert sum(p["backfill"] for p in poses) == bf["count"]
    assert all(p["backfill"] for p in poses[: bf["count"]])  # the history comes first
    mixed = np.percentile([p["latency_ms"] for p in poses], [95, 99])
    print(
        f"late joiner: live p50 {rep['latency_ms']['p50']:.2f} ms, "
        f"p95 {rep['latency_ms']['p95']:.2f} ms, p99 {rep['latency_ms']['p99']:.2f} ms "
        f"({rep['frames_live']} live frames); backfill {bf['count']} frames, "
        f"age p50 {bf['age_ms']['p50']:.1f} ms, max {bf['age_ms']['max']:.1f} ms; "
        f"lost {rep['frames_lost']}, join gap {rep['join_gap_frames']}; "
        f"backfill and live mixed: p95 {mixed[0]:.1f} ms, p99 {mixed[1]:.1f} ms"
    )
    assert bf["count"] > 0 and s["backfill"]["count"] == bf["count"]
    assert bf["age_ms"]["max"] > 500  # the history is old: it must not count as live
    assert s["first_decoded_at"] == 1 and s["need_keyframe"] == 0
    assert s["decoded"] == s["received"] == bf["count"] + rep["frames_live"]
    assert rep["frames_live"] > 100
    assert rep["frames_lost"] == 0 and s["lost"] == 0
    assert rep["latency_ms"]["p95"] < 60.0, rep["latency_ms"]
    assert "backfill" in stdout


def test_receive_serves_metrics_and_its_report_renders(
    server: ServeProcess, tmp_path: Path
) -> None:
    """``receive --metrics-port 0``: /metrics (posewire_receive_*) and /status while it
    receives; the report's once-a-second series; ``pipeline report`` draws it."""
    from pipeline.model.prometheus import samples_as_written

    report = tmp_path / "rx.json"

    async def go() -> tuple[str, dict[str, Any], int, str]:
        rx = await _ReceiveProc.start(
            "--server", server.url, "--room", "A", "--token",
            token("A", "subscriber", subject="watch"), "--metrics-port", "0",
            "--report", str(report),
        )  # fmt: skip
        assert rx.proc.stdout is not None
        line = (await asyncio.wait_for(rx.proc.stdout.readline(), 30)).decode()
        assert line.startswith("metrics: http://127.0.0.1:"), line
        url = line.split()[1]
        await _until_members(server.url, "A", 1)
        pub = await _publisher(server.url)
        await _send(pub, PoseSource(42), frames=90)
        async with aiohttp.ClientSession() as http:
            text = await (await http.get(url)).text()
            status = await (await http.get(url.replace("/metrics", "/status"))).json()
        await pub.close()
        code, _, err = await rx.finish(terminate=True)
        return text, status, code, err

    text, status, code, err = asyncio.run(go())
    assert code == 0, err[-2000:]
    got = samples_as_written(text)
    assert got['posewire_receive_frames_total{kind="decoded"}'] >= 60, text
    assert got['posewire_receive_transport_info{kind="websocket"}'] == 1, text
    assert 0 < got['posewire_receive_latency_ms{quantile="0.95"}'] < 1000, text
    assert max(v for v in status["series"]["fps"] if v is not None) > 20, status["series"]
    rep = json.loads(report.read_text())
    assert len(rep["series"]["t_s"]) >= 2 and any(rep["series"]["latency_p95_ms"]), rep["series"]
    out = tmp_path / "plots"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", str(report), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"latency.png", "audio.png", "index.html"}
    assert "posewire receiver in room A" in (out / "index.html").read_text()


def test_receive_metrics_port_taken_starts_nothing(server: ServeProcess) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = asyncio.run(
            _receive("--server", server.url, "--room", "A", "--token",
                     token("A", "subscriber", subject="w"), "--metrics-port", str(port))
        )  # fmt: skip
    assert code == 2, err
    assert f"--metrics-port {port}" in err and "Traceback" not in err, err
