"""A real ``redis-server`` on a loopback port with its own data directory (tests, bench).

Persistence is on (``appendonly yes``, ``appendfsync always``), so records
survive a restart of the process; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import free_port, stop_process

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisProcess:
    """``redis-server`` on 127.0.0.1:``port`` with data in ``data_dir``; :meth:`start`
    returns once it answers PING (at most ``limit_s``)."""

    def __init__(
        self, data_dir: Path, port: int | None = None, *extra: str, prefix: Sequence[str] = ()
    ) -> None:
        self.data_dir = data_dir
        self.port = port if port is not None else free_port()
        self.extra = extra
        self.prefix = list(prefix)
        """Started through this (``ip netns exec NS``: on that namespace's loopback)."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, limit_s: float = 10.0) -> float:
        """Start it; returns the monotonic time it first answered PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*self.prefix, REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--protected-mode", "yes", "--loglevel", "warning", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return time.monotonic()
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {limit_s}s")

    def ping(self) -> bool:
        if self.prefix:
            cli = [*self.prefix, "redis-cli", "-p", str(self.port), "ping"]
            done = subprocess.run(cli, capture_output=True, text=True, timeout=5, check=False)
            return done.stdout.strip() == "PONG"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command (RESP), its raw reply (``redis-cli``'s output with a prefix)."""
        if self.prefix:
            cli = [*self.prefix, "redis-cli", "-p", str(self.port), *args]
            return subprocess.run(cli, capture_output=True, timeout=5, check=False).stdout
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            parts.append(f"${len(a.encode())}\r\n{a}\r\n".encode())
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"".join(parts))
            return s.recv(65536)

    def stop(self) -> None:
        """SIGTERM (Redis writes its append-only file and exits)."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
