"""End to end, all real processes on loopback: a sender pipeline publishing into its embedded
room server over the WebSocket transport, and ``python -m pipeline receive`` processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.server.tokens import mint_token
from tests.procutil import ROOT, TRACE, sender_config, start, stop, wait_for, wait_stages

pytestmark = pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")

SECRET = "e2e-test-secret-" + "x" * 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sender_config(tmp_path: Path, port: int) -> Path:
    return sender_config(tmp_path, port)


def _receive(port: int, room: str, name: str, duration: float, tmp: Path) -> subprocess.Popen[str]:
    token = mint_token(SECRET, room=room, role="subscriber", subject=name)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "receive",
            "--server",
            f"http://127.0.0.1:{port}",
            "--room",
            room,
            "--token",
            token,
            "--duration",
            str(duration),
            "--report",
            str(tmp / f"{name}.json"),
            "--connect-timeout",
            "10",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "POSEWIRE_SECRET": SECRET},
    )


def test_sender_pipeline_to_receivers_rooms_and_late_joiner(tmp_path: Path) -> None:
    port = _free_port()
    sender = start(_sender_config(tmp_path, port), env={"POSEWIRE_SECRET": SECRET})
    try:
        wait_stages(sender.pid, {"capture", "encode", "transmit", "server"})
        a1 = _receive(port, "A", "a1", 6, tmp_path)
        a2 = _receive(port, "A", "a2", 6, tmp_path)
        b = _receive(port, "B", "b", 6, tmp_path)
        time.sleep(3)
        late = _receive(port, "A", "late", 3, tmp_path)
        for p in (a1, a2, b, late):
            _, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
    finally:
        code, _, err = stop(sender)
    assert code == 0, err[-3000:]
    reps = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a1", "a2", "b", "late")}
    for name in ("a1", "a2"):
        (stream,) = reps[name]["publishers"].values()
        assert stream["decoded"] > 100, (name, stream)
        assert stream["lost"] == 0 and stream["need_keyframe"] == 0, (name, stream)
        assert reps[name]["latency_ms"]["p50"] is not None
    assert reps["b"]["frames_received"] == 0 and reps["b"]["publishers"] == {}
    (late_stream,) = reps["late"]["publishers"].values()
    assert late_stream["first_decoded_at"] == 1, late_stream  # decodable from its first packet
    assert late_stream["decoded"] > 30


@pytest.mark.timing  # asserts a time or a latency: runs alone (Makefile)
def test_kill9_of_embedded_server_streams_again_within_3s(tmp_path: Path) -> None:
    from pipeline.cli.receive import Receiver
    from tests.procutil import stage_pids

    port = _free_port()
    report = tmp_path / "report.json"
    sender = start(
        _sender_config(tmp_path, port), "--report", str(report), env={"POSEWIRE_SECRET": SECRET}
    )
    try:
        pids = wait_stages(sender.pid, {"capture", "encode", "transmit", "server"})

        async def scenario() -> float:
            token = mint_token(SECRET, room="A", role="subscriber", subject="watcher")
            rec = Receiver(f"http://127.0.0.1:{port}", "A", token, connect_timeout_s=15)
            await rec.connect()
            runner = asyncio.create_task(rec.run(None))
            try:
                deadline = time.monotonic() + 15
                while rec.decoded < 30 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert rec.decoded >= 30, "no poses before the kill"
                os.kill(pids["server"], signal.SIGKILL)
                t_kill = time.monotonic()
                await asyncio.sleep(0.2)
                before = rec.decoded
                while rec.decoded <= before + 5 and time.monotonic() - t_kill < 10:
                    await asyncio.sleep(0.02)
                return time.monotonic() - t_kill
            finally:
                runner.cancel()
                await rec.close()

        back_after = asyncio.run(scenario())
        assert back_after < 3.0, f"streaming again only after {back_after:.2f} s"
        assert wait_for(lambda: "server" in stage_pids(sender.pid), 5)
    finally:
        code, out, err = stop(sender)
    assert code == 0, err[-3000:]
    # the embedded server says where the browser viewer is, after each (re)start
    assert out.count(f"viewer: http://127.0.0.1:{port}/room/A") == 2, out[-2000:]
    data = json.loads(report.read_text())
    assert data["stages"]["server"]["restarts"] == 1
    print(f"streaming again {back_after:.2f} s after kill -9 of the server")


def test_embedded_server_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        proc = start(_sender_config(tmp_path, port), env={"POSEWIRE_SECRET": SECRET})
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "server.port" in last and "address already in use" in last, last
    assert "Traceback" not in err
