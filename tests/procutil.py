"""Helpers for process-level tests: start a real pipeline, find its stages, read its output."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.config import traces_dir
from pipeline.runtime.stage import stage_processes

ROOT = Path(__file__).resolve().parents[1]
TRACES = traces_dir()
TRACE = TRACES / "cmu02_05_punch_strike.npz"


def write_config(tmp_path: Path, body: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def trace_source(loop: bool = True) -> str:
    """The ``source`` section of a camera-free pipeline: the test trace, replayed."""
    return f"source:\n  kind: trace\n  path: {TRACE}\n  loop: {'true' if loop else 'false'}\n"


def trace_config(
    tmp_path: Path, *, loop: bool = True, monitor: str = "  enabled: false", extra: str = ""
) -> Path:
    """A camera-free pipeline: trace replay -> encode -> transmit to a file."""
    return write_config(
        tmp_path,
        f"""
{trace_source(loop)}transmit:
  primary: file
  file: {tmp_path / "packets.bin"}
supervisor:
  run_dir: {tmp_path / "run"}
  heartbeat_interval_ms: 100
  heartbeat_timeout_ms: 1500
  max_restarts: 10
  period_s: 30
monitor:
{monitor}
{extra}
""",
    )


def sender_config(
    tmp_path: Path,
    port: int,
    *,
    primary: str = "websocket",
    host: str = "127.0.0.1",
    embedded: bool = True,
    room: str = "A",
    loop: bool = True,
    transmit_extra: str = "",
    monitor: bool = False,
    monitor_extra: str = "",
    extra: str = "",
) -> Path:
    """A trace-replay pipeline publishing into room ``room`` of the server at
    ``host:port`` (its embedded server there, or an external one); ``transmit_extra``:
    more lines of the ``transmit`` section (indented two spaces); ``monitor``: its
    monitor and control endpoint on (any free port, for ``python -m pipeline ctl``),
    with ``monitor_extra`` lines more in its section; ``extra``: more top-level sections
    (e.g. ``audio``)."""
    server = f"server:\n  embedded: true\n  port: {port}\n" if embedded else ""
    return write_config(
        tmp_path,
        f"""
{trace_source(loop)}transmit:
  primary: {primary}
  server_url: http://{host}:{port}
  room: {room}
{transmit_extra}{server}supervisor:
  run_dir: {tmp_path / "run"}
  heartbeat_interval_ms: 100
  heartbeat_timeout_ms: 1500
monitor:
  {"port: 0" if monitor else "enabled: false"}
{monitor_extra if monitor else ""}
{extra}""",
    )


#: every pipeline a test started; tests/conftest.py kills what is still alive after each test
STARTED: list[subprocess.Popen[str]] = []


def kill_leftovers() -> None:
    """SIGKILL the process group of every started pipeline that is still running."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                proc.communicate(timeout=10)


def start(
    config: Path, *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """``python -m pipeline CONFIG ARGS`` in its own process group (started through
    ``prefix``, e.g. ``ip netns exec NS``, when given)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "pipeline", str(config), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    STARTED.append(proc)
    return proc


def stage_pids(sup_pid: int) -> dict[str, int]:
    """Stage name -> pid, from the process titles ``posewire:<stage>``."""
    return {name: proc.pid for name, proc in stage_processes(sup_pid).items()}


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def wait_stages(sup_pid: int, names: set[str], timeout: float = 30.0) -> dict[str, int]:
    assert wait_for(lambda: names <= set(stage_pids(sup_pid)), timeout), (
        f"stages {names} not all up: {stage_pids(sup_pid)}"
    )
    return stage_pids(sup_pid)


def shm_segments(run_id: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").iterdir() if run_id in p.name)


def stop(proc: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, str, str]:
    """SIGINT the supervisor; return (exit code, stdout, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"pipeline did not stop within {timeout} s:\n{err[-3000:]}") from None
    return proc.returncode, out, err


def packet_seqs(path: Path) -> list[int]:
    from pipeline.codec import peek_header
    from pipeline.transports.file import read_packets

    if not path.exists():
        return []
    seqs = []
    for packet in read_packets(path):
        seqs.append(peek_header(packet).seq)
    return seqs
