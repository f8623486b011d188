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

from pipeline.server.tokens import mint_token
from pipeline.transports.websocket import WebSocketTransport
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


async def _receive(
    *args: str, publish_to: str | None = None, seconds: float = 0
) -> tuple[int, str, str]:
    """Run the receive command; meanwhile publish ``seconds`` of poses at 30 fps."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "receive", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    if publish_to is not None:
        pub = WebSocketTransport(
            publish_to, "A", token("A", "publisher", subject="cam"), publish=True, subscribe=False
        )
        await pub.connect()
        src = PoseSource(42)
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end and proc.returncode is None:
            while pub.recv_nowait() is not None:
                pass
            await pub.send(src.next())
            await asyncio.sleep(1 / 30)
        await pub.close()
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
