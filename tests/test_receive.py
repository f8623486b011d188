"""``python -m pipeline receive`` as a real process against a real ``serve`` process."""

from __future__ import annotations

import asyncio
import json
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


async def _publish(url: str, seconds: float, stop: Any = None, **codec: Any) -> None:
    """A publisher (stream 42, subject "cam") at 30 fps for ``seconds``."""
    pub = WebSocketTransport(
        url, "A", token("A", "publisher", subject="cam"), publish=True, subscribe=False
    )
    await pub.connect()
    src = PoseSource(42, **codec)
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end and not (stop is not None and stop()):
        while pub.recv_nowait() is not None:
            pass
        await pub.send(src.next())
        await asyncio.sleep(1 / 30)
    await pub.close()


async def _receive(
    *args: str, publish_to: str | None = None, seconds: float = 0
) -> tuple[int, str, str]:
    """Run the receive command; meanwhile publish ``seconds`` of poses at 30 fps."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "receive", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    if publish_to is not None:
        await _publish(publish_to, seconds, stop=lambda: proc.returncode is not None)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


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
            seconds=6,
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
            seconds=5,
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

    async def main() -> list[tuple[int, str, str]]:
        # each window (counted from its own join) must outlast the whole 4 s stream even
        # when a loaded machine starts the publisher late: 6 s was too short under coverage
        # beside other suites (one receiver's window closed 30 frames before the end)
        early = [
            asyncio.create_task(_receive(*cmd("A", "a1", 9))),
            asyncio.create_task(_receive(*cmd("A", "a2", 9))),
            asyncio.create_task(_receive(*cmd("B", "b", 9))),
        ]
        await asyncio.sleep(1.5)  # let them join before the first packet

        async def late() -> tuple[int, str, str]:
            await asyncio.sleep(2.0)
            return await _receive(*cmd("A", "late", 2.5))

        late_task = asyncio.create_task(late())
        await _publish(server.url, 4.0)
        return await asyncio.gather(*early, late_task)

    results = asyncio.run(main())
    for rc, _, err in results:
        assert rc == 0, err
    a1, a2, b, late = (
        json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a1", "a2", "b", "late")
    )
    for rep in (a1, a2):
        s = rep["publishers"]["42"]
        assert s["decoded"] == s["received"] > 60 and s["lost"] == 0 and s["need_keyframe"] == 0
        assert s["first_decoded_at"] == 1
    assert a1["publishers"]["42"]["decoded"] == a2["publishers"]["42"]["decoded"]
    assert b["frames_received"] == 0 and b["publishers"] == {}
    s = late["publishers"]["42"]
    assert s["first_decoded_at"] == 1 and s["need_keyframe"] == 0 and s["decoded"] > 0


def test_late_joiner_reports_live_latency_apart_from_backfill(
    server: ServeProcess, tmp_path: Path
) -> None:
    """A receiver joining a running room: the server's stored history (keyframe + packets
    after it: one keyframe every 90 frames, so up to 3 s old) is reported as backfill, not as
    live latency, and the join boundary is not a loss."""
    rep_path, poses_path = tmp_path / "late.json", tmp_path / "late.jsonl"

    async def main() -> tuple[int, str, str]:
        pub = asyncio.create_task(_publish(server.url, 9.0, keyframe_interval=90))
        # history builds up; the receive process joins ~1.5-2.5 s after the first keyframe,
        # before the second one (at 3 s)
        await asyncio.sleep(1.0)
        result = await _receive(
            "--server", server.url, "--room", "A", "--token", token("A", "subscriber"),
            "--duration", "5", "--report", str(rep_path), "--out", str(poses_path),
        )  # fmt: skip
        await pub
        return result

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
