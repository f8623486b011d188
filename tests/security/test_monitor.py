"""Issue 11, findings 2, 12 and the monitor part of 9, against a real pipeline's monitor.

* 2: a web page in the user's browser must not control the pipeline (CSRF, DNS
  rebinding): text/plain, a foreign Origin, a foreign Host or a missing/wrong control
  secret are refused and the pipeline keeps running; ``python -m pipeline ctl`` (the
  run's secret from the private run directory) is obeyed.
* 12: idle and trickling connections do not cost a thread each (bounded by
  ``monitor.max_connections``) and are closed after ``monitor.request_timeout_s``;
  ``set`` refuses non-finite and out-of-range numbers and unknown arguments, naming them.
* 9: a deeply nested body is a 400, not a thread traceback.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipeline.model.prometheus import parse_exposition
from tests.procutil import ROOT, STARTED, TRACE, start, stop, trace_config, wait_for

pytestmark = pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")

MAX_CONNECTIONS = 8
REQUEST_TIMEOUT_S = 1.0


@dataclass
class Run:
    proc: subprocess.Popen[str]
    run_dir: Path
    base: str
    port: int
    token: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("monitor")
    run_id = f"mon{os.getpid()}"
    cfg = trace_config(
        tmp,
        monitor=f"  port: 0\n  status: 'off'\n  sample_interval_s: 0.5\n"
        f"  max_connections: {MAX_CONNECTIONS}\n  request_timeout_s: {REQUEST_TIMEOUT_S}",
    )
    proc = start(cfg, "--run-id", run_id, "--duration", "120")
    STARTED.remove(proc)  # shared by this module's tests: stopped here, not after each test
    run_dir = tmp / "run" / run_id
    try:
        assert wait_for((run_dir / "monitor.url").exists, 30), "monitor did not start"
        base = (run_dir / "monitor.url").read_text().strip()
        secret = run_dir / "control.token"
        token = secret.read_text().strip() if secret.exists() else ""  # checked by a test
        r = Run(proc, run_dir, base, int(base.rsplit(":", 1)[1]), token)
        assert wait_for(lambda: (_metric(r, "packets_sent_total") or 0) > 10, 30)
        yield r
    finally:
        code, _, err = stop(proc)
        assert "Traceback" not in err, err[-3000:]
        assert code == 0, err[-3000:]


def _metrics(r: Run) -> dict[Any, float]:
    with urllib.request.urlopen(f"{r.base}/metrics", timeout=5) as resp:
        return parse_exposition(resp.read().decode())


def _metric(r: Run, name: str, stage: str = "transmit") -> float | None:
    key = ("posewire_stage_metric", frozenset({"stage": stage, "metric": name}.items()))
    return _metrics(r).get(key)


def _post(
    r: Run, path: str, body: bytes | str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _legit(r: Run) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Posewire-Control-Token": r.token}


def _state(r: Run, stage: str) -> str:
    with urllib.request.urlopen(f"{r.base}/status", timeout=5) as resp:
        return str(json.loads(resp.read())["stages"][stage]["state"])


def test_control_secret_is_private(run: Run) -> None:
    assert (run.run_dir / "control.token").exists()
    mode = stat.S_IMODE((run.run_dir / "control.token").stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert len(run.token) >= 32


def test_csrf_and_dns_rebinding_are_refused(run: Run) -> None:
    evil = "http://evil.example"
    attacks: list[tuple[str, dict[str, str]]] = [
        # what a web page can send without a preflight: text/plain, its own Origin
        ("text/plain, foreign Origin", {"Content-Type": "text/plain", "Origin": evil}),
        ("form, no Origin", {"Content-Type": "application/x-www-form-urlencoded"}),
        # even with the secret: foreign Origin / rebinding Host / wrong type
        ("json + secret, foreign Origin", {**_legit(run), "Origin": evil}),
        ("json + secret, Origin null", {**_legit(run), "Origin": "null"}),
        ("json + secret, rebinding Host", {**_legit(run), "Host": f"evil.example:{run.port}"}),
        ("text/plain + secret", {**_legit(run), "Content-Type": "text/plain"}),
        # same origin but no or a wrong secret
        ("json, no secret", {"Content-Type": "application/json"}),
        (
            "json, wrong secret",
            {"Content-Type": "application/json", "X-Posewire-Control-Token": "x" * 43},
        ),
    ]
    for what, headers in attacks:
        status, body = _post(run, "/control/capture/pause", "{}", headers)
        assert status in (403, 415), (what, status, body)
        assert body.get("error"), (what, body)
    status, _ = _post(run, "/control/capture/stop", "{}", attacks[0][1])
    assert status == 403
    time.sleep(1.0)
    assert _state(run, "capture") == "running"
    assert run.proc.poll() is None
    sent = _metric(run, "packets_sent_total") or 0
    assert wait_for(lambda: (_metric(run, "packets_sent_total") or 0) > sent, 5)


def test_ctl_command_sends_with_the_run_secret(run: Run) -> None:
    where = ["--run-dir", str(run.run_dir.parent), "--run-id", run.run_dir.name]
    cmd = [sys.executable, "-m", "pipeline", "ctl", *where, "transmit", "set"]
    cmd.append('{"max_bandwidth_kbps": 5000}')
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sent"] is True
    assert wait_for(lambda: _metric(run, "bandwidth_limit_kbps") == 5000, 10, 0.2)
    # a refusal is an exit 1 with the reason, no traceback
    bad = subprocess.run(
        [*cmd[:-1], '{"max_bandwidth_kbps": 1e308}'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1 and "max_bandwidth_kbps" in bad.stdout, bad
    assert "Traceback" not in bad.stderr


def test_bad_command_arguments_are_refused_naming_them(run: Run) -> None:
    headers = _legit(run)
    cases: list[tuple[str, str, str]] = [
        ("set", '{"max_bandwidth_kbps": 1e999}', "finite"),  # was: cap = inf
        ("set", '{"max_bandwidth_kbps": 1e308}', "max_bandwidth_kbps"),
        ("set", '{"max_bandwidth_kbps": -1}', "max_bandwidth_kbps"),
        ("set", '{"max_bandwidth_kbps": "fast"}', "max_bandwidth_kbps"),
        ("set", '{"max_bandwith_kbps": 10}', "max_bandwith_kbps"),  # a typo, was ignored
        ("set", '{"max_bandwidth_kbps": 10, "x": 1}', "'x'"),
        ("set", "{}", "no argument"),
        ("stop", '{"now": true}', "'now'"),
        ("switch_transport", '{"to": "pigeon"}', "to"),
        ("set", '{"max_bandwidth_kbps": ' + "1" * 400 + "}", "range"),
        ("set", "[" * 5000 + "]" * 5000, "nested"),  # finding 9: no RecursionError
        ("set", '{"a":' * 3000 + "1" + "}" * 3000, "nested"),
    ]
    for cmd, body, named in cases:
        status, answer = _post(run, f"/control/transmit/{cmd}", body, headers)
        assert status == 400, (cmd, body[:40], status, answer)
        assert named in answer["error"], (named, answer)
    limit = _metric(run, "bandwidth_limit_kbps")
    assert limit is not None and limit < 1e7, limit
    assert run.proc.poll() is None and _state(run, "transmit") == "running"


def _threads(r: Run) -> int:
    return int(psutil.Process(r.proc.pid).num_threads())


def test_idle_and_trickling_connections_are_bounded_and_timed_out(run: Run) -> None:
    before = _threads(run)
    socks: list[socket.socket] = []
    try:
        for _ in range(150):  # idle partial requests (the probe: 300 -> 300 threads)
            s = socket.create_connection(("127.0.0.1", run.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        time.sleep(0.3)
        during = _threads(run)
        assert during <= before + MAX_CONNECTIONS + 2, (before, during)
        # over the bound: answered at once (503, or a reset) and closed, not left hanging
        t0 = time.monotonic()
        status = _get_status(run)
        assert status in (0, 200, 503) and time.monotonic() - t0 < 3.0, status
        # after the request timeout every idle connection has been closed by the server
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 3.0
        closed = 0
        for s in socks:
            s.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                while s.recv(4096):
                    pass
                closed += 1
            except ConnectionResetError:  # closed by the server with our bytes unread
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(socks), f"{len(socks) - closed} connections still open"
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: _get_status(run) == 200, 5)
    assert _threads(run) <= before + 2

    # a slowloris: one byte every 0.2 s never completes a request; closed in time
    s = socket.create_connection(("127.0.0.1", run.port), timeout=5)
    t0 = time.monotonic()
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        alive = True
        for _ in range(50):  # at most 10 s
            try:
                s.sendall(b"X")
            except ConnectionError:
                alive = False
                break
            s.settimeout(0.2)
            try:
                if s.recv(4096) == b"":
                    alive = False
                    break
            except TimeoutError:
                pass
        lasted = time.monotonic() - t0
    finally:
        s.close()
    assert not alive and lasted < REQUEST_TIMEOUT_S + 2.0, lasted
    print(
        f"threads before {before}, with 150 idle connections {during}; "
        f"slowloris closed after {lasted:.2f} s"
    )


def _get_status(r: Run) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()
