"""Fixtures of the security tests: a real ``python -m pipeline serve`` process.

:class:`LiveServer` runs the room server as its own process on a free loopback
port (``--port 0``: the kernel picks one, the server prints it), with its own
data directory and its whole output (stdout and stderr, ``--log-level INFO``)
captured to a file, never to a pipe that could fill up and stall it. Tests read
that log: :meth:`LiveServer.tracebacks` returns every traceback in it, with a few
lines of context, for an assertion message.

Fixtures: ``live_server`` (one server per test) and ``live_server_factory``
(start servers with a YAML ``server:`` section of your own; all stopped at the
end of the test).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.common import stop_process
from pipeline.model.prometheus import samples_as_written
from tests.test_server_support import ROOT, SECRET

READY_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 30.0


class LiveServer:
    """``python -m pipeline serve`` on 127.0.0.1 with its log in ``log_path``."""

    def __init__(
        self,
        workdir: Path,
        server_yaml: str = "",
        *,
        log_level: str = "INFO",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.config_path = workdir / "server.yaml"
        body = server_yaml.strip("\n")
        lines = ["server:", f"  data_dir: {self.data_dir}"]
        lines += [f"  {line}" for line in body.splitlines() if line.strip()]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.log_path = workdir / "server.log"
        env = {
            **os.environ,
            "POSEWIRE_SECRET": SECRET,
            "XDG_STATE_HOME": str(workdir / "state"),
            "PYTHONUNBUFFERED": "1",
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--host", "127.0.0.1", "--port", "0",
             "--config", str(self.config_path), "--log-level", log_level, *extra_args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.port = self._wait_ready()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = READY_RE.search(self.log_text())
            if m is not None:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"the server did not start; its log:\n{self.log_text()[-4000:]}")

    # ------------------------------------------------------------------ looking at it

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self, start: int = 0) -> str:
        """The log from byte offset ``start``."""
        with open(self.log_path, "rb") as fh:
            fh.seek(start)
            return fh.read().decode("utf-8", "replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def tracebacks(self, start: int = 0, context: int = 3) -> list[str]:
        """Every traceback in the log from byte ``start``: the lines before it and the
        traceback up to its exception line."""
        lines = self.log_text(start).splitlines()
        out: list[str] = []
        i = 0
        while i < len(lines):
            if lines[i].startswith("Traceback") or "Traceback (most recent call last)" in lines[i]:
                j = i + 1
                while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j]):
                    j += 1
                # the exception line, and chained tracebacks ("During handling ...")
                while j < len(lines) and (
                    lines[j].startswith(("During handling", "The above exception"))
                    or lines[j].startswith("Traceback")
                    or lines[j].startswith((" ", "\t"))
                    or not lines[j]
                ):
                    j += 1
                out.append("\n".join(lines[max(0, i - context) : j + 1]))
                i = j + 1
            else:
                i += 1
        return out

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """``GET path``: (status, body)."""
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
                return int(r.status), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode("utf-8", "replace")

    def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """``/metrics`` as ``{"name{labels}": value}``."""
        status, text = self.get("/metrics", timeout)
        assert status == 200, (status, text[:200])
        return samples_as_written(text)

    # ------------------------------------------------------------------ stopping

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 10 s); the exit status."""
        stop_process(self.proc, kill_group=True)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


@pytest.fixture
def live_server_factory(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """``factory(server_yaml="", log_level=..., extra_args=...)`` starts a
    :class:`LiveServer`; all of them are stopped at the end of the test."""
    started: list[LiveServer] = []

    def start(
        server_yaml: str = "", *, log_level: str = "INFO", extra_args: tuple[str, ...] = ()
    ) -> LiveServer:
        srv = LiveServer(
            tmp_path / f"server{len(started)}",
            server_yaml,
            log_level=log_level,
            extra_args=extra_args,
        )
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def live_server(live_server_factory: Callable[..., LiveServer]) -> LiveServer:
    """A room server process with the default limits (see :class:`LiveServer`)."""
    return live_server_factory()
