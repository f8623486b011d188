"""bench/soak: the whole system for N minutes, watching for leaks.

One room server (``python -m pipeline serve``, or ``--server embedded``: a
stage of the sender's supervisor), ``--receivers`` receivers (``python -m
pipeline receive``, 2 by default) joined to one room, then a camera-free
sender pipeline (``source.kind: trace`` replaying a clip of
``data/pose-traces`` at its own 30 fps, looped) publishing into that
room through the WebSocket transport. Every ``--interval`` seconds this
process samples, per process (supervisor, every stage, server, receivers):
resident memory (RSS) and open file descriptors (psutil), plus the number of
``/dev/shm`` segments of the run, and the server's packet counters, asyncio
tasks and connections (its ``/metrics``).

After a warm-up (the first ``--warmup`` fraction of the run, 20 %, at least
10 s) it compares the start of the steady state with its end. A *baseline*
is the median of the first three samples after the warm-up, the *end* the
median of the last three. Targets:

* RSS growth per process, (end - baseline) / baseline: under 10 %;
* open fds per process, last sample - first sample after warm-up: within
  +-2 (flat);
* ``/dev/shm`` segments of the run: the same at the end as after warm-up,
  and none left once the pipeline stopped;
* server asyncio tasks and connections: flat;
* no stage restarts, the pipeline stops with exit 0, no process left behind;
* every receiver received at least 95 % of the packets the sender sent
  (sent: the transmit stage's count from the run report).

These are leak checks, not speed checks: the sender runs at the trace's own
rate (30 fps). ``--quick`` is a one-minute run.

Run: ``python -m bench soak [--minutes N] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from bench.common import (
    add_json_flag,
    all_met,
    at_least,
    at_most,
    markdown_table,
    progress,
    report,
    result,
    save_result,
    stop_process,
    target,
    targets_table,
)
from pipeline.config import traces_dir

NAME = "soak"
ROOT = Path(__file__).resolve().parents[1]
TRACES = traces_dir()
DEFAULT_TRACE = TRACES / "cmu02_05_punch_strike.npz"
ROOM = "soak"
RSS_GROWTH_MAX_PCT = 10.0
FD_TOLERANCE = 2
TASK_TOLERANCE = 2
DELIVERY_MIN = 0.95
WARMUP_MIN_S = 10.0
EDGE_SAMPLES = 3
SERVER_GAUGES = ("members", "connections", "tasks", "open_fds")
SERVER_COUNTERS = ("packets_in_total", "packets_out_total", "drops_total")


@dataclass(slots=True)
class ProcSample:
    """One process at one sampling instant."""

    pid: int
    rss_bytes: int
    fds: int
    threads: int


@dataclass(slots=True)
class Sample:
    """Everything sampled at one instant, ``t_s`` seconds after the sender started."""

    t_s: float
    procs: dict[str, ProcSample]
    shm_segments: int
    server: dict[str, float]


@dataclass
class Soak:
    """The processes of one soak run and what was sampled from them."""

    workdir: Path
    run_id: str
    port: int
    secret: str
    embedded: bool
    server: subprocess.Popen[bytes] | None = None
    receivers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sender: subprocess.Popen[bytes] | None = None
    samples: list[Sample] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["POSEWIRE_SECRET"] = self.secret
        env.setdefault("GLOG_minloglevel", "2")
        for hook in ("POSEWIRE_BENCH_RESULT", "POSEWIRE_BENCH_PROGRESS"):
            env.pop(hook, None)
        return env

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """``python ARGV`` in its own session, output to ``<workdir>/<name>.log``."""
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed in close_logs)
        self.logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.seen_pids.add(proc.pid)
        return proc

    def close_logs(self) -> None:
        for log in self.logs:
            log.close()
        self.logs.clear()

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """``(status, body)``; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def server_metrics(url: str) -> dict[str, float | int]:
    """The unlabelled ``posewire_server_*`` figures of the server's ``/metrics``."""
    status, body = http_get(f"{url}/metrics")
    out: dict[str, float | int] = {}
    if status != 200:
        return out
    prefix = "posewire_server_"
    for line in body.splitlines():
        if not line.startswith(prefix) or "{" in line:
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            number = float(value)
            out[name[len(prefix) :]] = int(number) if number.is_integer() else number
    return out


def wait_until(pred: Any, timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    if not pred():
        raise RuntimeError(f"soak: timed out after {timeout:g} s waiting for {what}")


def shm_count(run_id: str) -> int:
    """``/dev/shm`` entries of this run (``posewire-<run_id>-<ring>`` and companions)."""
    try:
        return sum(1 for name in os.listdir("/dev/shm") if f"-{run_id}-" in name)
    except OSError:
        return -1


def stage_pids(sup_pid: int) -> dict[str, int]:
    """Stage name -> pid, from the process titles ``posewire:<stage>``."""
    from pipeline.runtime.stage import stage_processes

    return {name: proc.pid for name, proc in stage_processes(sup_pid).items()}


def proc_sample(pid: int) -> ProcSample | None:
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return ProcSample(pid, int(p.memory_info().rss), p.num_fds(), p.num_threads())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def stop_proc(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGINT, wait ``timeout``; then SIGKILL the process group. Returns the exit code."""
    if proc is None:
        return None
    return stop_process(proc, timeout, sig=signal.SIGINT, kill_group=True)


def stop_all(procs: list[subprocess.Popen[bytes] | None], timeout: float) -> None:
    """SIGINT every process still running at once, then SIGKILL the groups of the slow ones."""
    running = [p for p in procs if p is not None and p.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_config(soak: Soak, trace: Path) -> Path:
    server = (
        f"server:\n  embedded: true\n  host: 127.0.0.1\n  port: {soak.port}\n"
        if soak.embedded
        else "server:\n  embedded: false\n"
    )
    body = f"""# written by bench/soak.py
source:
  kind: trace
  path: {trace}
  loop: true
transmit:
  primary: websocket
  server_url: {soak.url}
  room: {ROOM}
{server}supervisor:
  run_dir: {soak.workdir / "run"}
  run_id: {soak.run_id}
monitor:
  enabled: false
  status: "off"
"""
    path = soak.workdir / "pipeline.yaml"
    path.write_text(body, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the run


def start_server(soak: Soak, config: Path) -> None:
    if soak.embedded:
        return
    soak.server = soak.spawn(
        "server",
        [
            "-m",
            "pipeline",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(soak.port),
            "--config",
            str(config),
            "--log-level",
            "WARNING",
        ],
    )
    server = soak.server

    def ready() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"soak: the server exited early:\n{soak.log_tail('server')}")
        return http_get(f"{soak.url}/readyz")[0] == 200

    wait_until(ready, 30.0, "the room server")


def start_receivers(soak: Soak, count: int) -> None:
    from pipeline.wire.tokens import mint_token

    for i in range(count):
        token = mint_token(
            soak.secret, room=ROOM, role="subscriber", subject=f"soak-rx{i}", ttl_s=24 * 3600.0
        )
        soak.receivers.append(
            soak.spawn(
                f"receiver{i}",
                [
                    "-m",
                    "pipeline",
                    "receive",
                    "--server",
                    soak.url,
                    "--room",
                    ROOM,
                    "--token",
                    token,
                    "--connect-timeout",
                    "30",
                    "--report",
                    str(soak.workdir / f"receiver{i}.json"),
                ],
            )
        )


def wait_receivers_joined(soak: Soak, count: int) -> None:
    def joined() -> bool:
        for i, rx in enumerate(soak.receivers):
            if rx.poll() is not None:
                raise RuntimeError(
                    f"soak: receiver {i} exited early:\n{soak.log_tail(f'receiver{i}')}"
                )
        return server_metrics(soak.url).get("members", 0.0) >= count

    wait_until(joined, 60.0, f"{count} receivers to join")


def start_sender(soak: Soak, config: Path) -> None:
    soak.sender = soak.spawn(
        "sender", ["-m", "pipeline", str(config), "--report", str(soak.workdir / "report.json")]
    )
    sender = soak.sender
    names = {"capture", "encode", "transmit"} | ({"server"} if soak.embedded else set())

    def up() -> bool:
        if sender.poll() is not None:
            raise RuntimeError(f"soak: the sender exited early:\n{soak.log_tail('sender')}")
        return names <= set(stage_pids(sender.pid))

    wait_until(up, 60.0, "the sender's stages")


def processes(soak: Soak) -> dict[str, int]:
    """Role -> pid of every process watched now."""
    out: dict[str, int] = {}
    if soak.sender is not None:
        out["supervisor"] = soak.sender.pid
        for stage, pid in stage_pids(soak.sender.pid).items():
            out[stage] = pid
    if soak.server is not None:
        out["server"] = soak.server.pid
    for i, rx in enumerate(soak.receivers):
        out[f"receiver{i}"] = rx.pid
    soak.seen_pids.update(out.values())
    return out


def take_sample(soak: Soak, t0: float) -> Sample:
    procs: dict[str, ProcSample] = {}
    for role, pid in processes(soak).items():
        s = proc_sample(pid)
        if s is not None:
            procs[role] = s
    metrics = server_metrics(soak.url)
    server = {k: metrics[k] for k in (*SERVER_GAUGES, *SERVER_COUNTERS) if k in metrics}
    return Sample(time.monotonic() - t0, procs, shm_count(soak.run_id), server)


def run_soak(
    seconds: float,
    *,
    interval: float | None = None,
    warmup: float = 0.2,
    receivers: int = 2,
    embedded: bool = False,
    trace: Path = DEFAULT_TRACE,
    log: IO[str] | None = None,
) -> dict[str, Any]:
    """Run the soak for ``seconds`` (after start-up); return rows, targets and params."""
    if interval is None:
        interval = min(5.0, max(1.0, seconds / 30.0))
    warmup_s = max(WARMUP_MIN_S, warmup * seconds)
    if warmup_s + interval * (2 * EDGE_SAMPLES) > seconds:
        raise ValueError(
            f"soak: {seconds:g} s is too short for a {warmup_s:g} s warm-up and "
            f"{2 * EDGE_SAMPLES} samples at {interval:g} s"
        )
    if not trace.exists():
        raise FileNotFoundError(f"soak: trace not found: {trace}")
    with tempfile.TemporaryDirectory(prefix="posewire-soak-") as tmp:
        soak = Soak(
            workdir=Path(tmp),
            run_id=f"soak{os.getpid()}{secrets.token_hex(3)}"[:24],
            port=free_port(),
            secret=secrets.token_urlsafe(32),
            embedded=embedded,
        )
        exits: dict[str, int | None] = {}
        shm_after = -1
        final_metrics: dict[str, float] = {}
        try:
            config = write_config(soak, trace)
            _say(log, f"soak: server on {soak.url} ({'embedded' if embedded else 'process'})")
            start_server(soak, config)
            if embedded:
                # the server is a stage: the sender first, then the receivers
                start_sender(soak, config)
                wait_until(lambda: http_get(f"{soak.url}/readyz")[0] == 200, 30.0, "the server")
                start_receivers(soak, receivers)
                wait_receivers_joined(soak, receivers)
            else:
                start_receivers(soak, receivers)
                wait_receivers_joined(soak, receivers)
                start_sender(soak, config)
            t0 = time.monotonic()
            _say(log, f"soak: running {seconds:g} s, sampling every {interval:g} s")
            next_at = t0
            while True:
                now = time.monotonic()
                if now - t0 >= seconds:
                    break
                if now >= next_at:
                    soak.samples.append(take_sample(soak, t0))
                    next_at += interval
                    if soak.sender is not None and soak.sender.poll() is not None:
                        raise RuntimeError(
                            f"soak: the sender exited during the run:\n{soak.log_tail('sender')}"
                        )
                phase = "warm-up" if now - t0 < warmup_s else "steady"
                progress(min(now - t0, seconds), seconds, f"{phase}, {len(soak.samples)} samples")
                time.sleep(max(0.0, min(next_at - time.monotonic(), 0.5)))
            soak.samples.append(take_sample(soak, t0))
            if embedded:  # the server stops with the sender: read it first
                final_metrics = server_metrics(soak.url)
            exits["sender"] = stop_proc(soak.sender, 30.0)
            time.sleep(1.0)  # the last packets reach the receivers
            if not embedded:
                final_metrics = server_metrics(soak.url)
            shm_after = shm_count(soak.run_id)
            for i, rx in enumerate(soak.receivers):
                exits[f"receiver{i}"] = stop_proc(rx, 15.0)
            exits["server"] = stop_proc(soak.server, 15.0)
        finally:
            stop_all([soak.sender, *soak.receivers, soak.server], 5.0)
            soak.close_logs()
        left = [pid for pid in soak.seen_pids if _alive(pid)]
        report_path = soak.workdir / "report.json"
        run_report = _read_json(report_path)
        rx_reports = [_read_json(soak.workdir / f"receiver{i}.json") for i in range(receivers)]
        shm_after_cleanup = shm_count(soak.run_id)
        return analyse(
            soak,
            seconds=seconds,
            warmup_s=warmup_s,
            interval=interval,
            trace=trace,
            exits=exits,
            leftover=left,
            run_report=run_report,
            rx_reports=rx_reports,
            final_metrics=final_metrics,
            shm_after_stop=max(shm_after, shm_after_cleanup),
        )


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _say(log: IO[str] | None, text: str) -> None:
    if log is not None:
        print(text, file=log, flush=True)


# --------------------------------------------------------------------------- analysis


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def analyse(
    soak: Soak,
    *,
    seconds: float,
    warmup_s: float,
    interval: float,
    trace: Path,
    exits: dict[str, int | None],
    leftover: list[int],
    run_report: dict[str, Any],
    rx_reports: list[dict[str, Any]],
    final_metrics: dict[str, float],
    shm_after_stop: int,
) -> dict[str, Any]:
    """Rows (one per process, then totals) and targets from the samples."""
    steady = [s for s in soak.samples if s.t_s >= warmup_s]
    roles: list[str] = []
    for s in soak.samples:
        for role in s.procs:
            if role not in roles:
                roles.append(role)
    rows: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    worst_growth = -float("inf")
    worst_growth_name = ""
    worst_fd = 0
    worst_fd_name = ""
    missing: list[str] = []
    for role in roles:
        series = [(s.t_s, s.procs[role]) for s in steady if role in s.procs]
        pids = {p.pid for _, p in series}
        if len(series) < 2 * EDGE_SAMPLES or len(pids) != 1:
            missing.append(role if len(pids) <= 1 else f"{role} (pid changed)")
            rows.append({"name": role, "pid": ",".join(map(str, sorted(pids))) or None})
            continue
        head = [p for _, p in series[:EDGE_SAMPLES]]
        tail = [p for _, p in series[-EDGE_SAMPLES:]]
        rss0 = _median([p.rss_bytes for p in head])
        rss1 = _median([p.rss_bytes for p in tail])
        growth = (rss1 - rss0) / rss0 * 100.0 if rss0 > 0 else float("nan")
        fd0 = series[0][1].fds
        fd1 = series[-1][1].fds
        fds_all = [p.fds for _, p in series]
        row: dict[str, Any] = {
            "name": role,
            "pid": series[0][1].pid,
            "rss_warm_mb": rss0 / 2**20,
            "rss_end_mb": rss1 / 2**20,
            "rss_max_mb": max(p.rss_bytes for _, p in series) / 2**20,
            "rss_growth_pct": growth,
            "fds_warm": fd0,
            "fds_end": fd1,
            "fds_min": min(fds_all),
            "fds_max": max(fds_all),
            "fd_drift": fd1 - fd0,
            "threads_warm": series[0][1].threads,
            "threads_end": series[-1][1].threads,
        }
        rows.append(row)
        if growth > worst_growth:
            worst_growth, worst_growth_name = growth, role
        if abs(fd1 - fd0) > abs(worst_fd):
            worst_fd, worst_fd_name = fd1 - fd0, role
    for row in rows:
        if "rss_growth_pct" in row:
            targets.append(
                at_most(
                    f"RSS growth % after warm-up: {row['name']}",
                    row["rss_growth_pct"],
                    RSS_GROWTH_MAX_PCT,
                )
            )
    targets.append(
        target(
            "fd drift after warm-up, worst process"
            + (f" ({worst_fd_name})" if worst_fd_name else ""),
            worst_fd,
            f"within +-{FD_TOLERANCE}",
            abs(worst_fd) <= FD_TOLERANCE,
        )
    )
    targets.append(
        target(
            "processes sampled through the whole run (no restarts)",
            ", ".join(missing) or "all",
            "all",
            not missing and bool(rows),
        )
    )
    shm0 = steady[0].shm_segments if steady else -1
    shm1 = steady[-1].shm_segments if steady else -1
    targets.append(
        target(
            "/dev/shm segments of the run: end - warm-up",
            shm1 - shm0,
            "== 0",
            steady != [] and shm1 == shm0 and shm0 >= 0,
        )
    )
    targets.append(
        target(
            "/dev/shm segments of the run left after stop",
            shm_after_stop,
            "== 0",
            shm_after_stop == 0,
        )
    )
    server0 = steady[0].server if steady else {}
    server1 = steady[-1].server if steady else {}
    for key, tol in (("tasks", TASK_TOLERANCE), ("connections", 0)):
        if key in server0 and key in server1:
            drift = server1[key] - server0[key]
            targets.append(
                target(
                    f"server asyncio {key}: end - warm-up"
                    if key == "tasks"
                    else f"server {key}: end - warm-up",
                    drift,
                    f"within +-{tol}",
                    abs(drift) <= tol,
                )
            )

    count_rows: list[dict[str, Any]] = [
        {
            "name": "/dev/shm segments of the run",
            "warm": shm0,
            "end": shm1,
            "after_stop": shm_after_stop,
        }
    ]
    for key in SERVER_GAUGES:
        if key in server0 or key in server1:
            count_rows.append(
                {
                    "name": f"server {key}",
                    "warm": server0.get(key),
                    "end": server1.get(key),
                    "after_stop": None,
                }
            )

    # frames
    frames = run_report.get("frames", {}) if isinstance(run_report.get("frames"), dict) else {}
    sent = frames.get("sent")
    if not isinstance(sent, int | float):
        sent = final_metrics.get("packets_in_total")
    sent_n = int(sent) if isinstance(sent, int | float) else None
    restarts = {
        name: int(st.get("restarts", 0))
        for name, st in (run_report.get("stages") or {}).items()
        if isinstance(st, dict)
    }
    totals: dict[str, Any] = {
        "name": "frames",
        "sent": sent_n,
        "server_in": final_metrics.get("packets_in_total"),
        "server_out": final_metrics.get("packets_out_total"),
        "server_drops": final_metrics.get("drops_total"),
        "dropped_sender": frames.get("dropped"),
    }
    for i, rep in enumerate(rx_reports):
        received = rep.get("frames_received")
        totals[f"rx{i}_received"] = received
        totals[f"rx{i}_decoded"] = rep.get("frames_decoded")
        totals[f"rx{i}_lost"] = rep.get("frames_lost")
        ratio = received / sent_n if isinstance(received, int | float) and sent_n else float("nan")
        targets.append(
            at_least(f"receiver{i}: frames received / sent", ratio, DELIVERY_MIN)
            if ratio == ratio
            else target(f"receiver{i}: frames received / sent", None, f">= {DELIVERY_MIN:g}", False)
        )
    rows.append(totals)
    rows.extend(count_rows)
    targets.append(
        target(
            "stage restarts",
            sum(restarts.values()) if restarts else None,
            "== 0",
            bool(restarts) and sum(restarts.values()) == 0,
        )
    )
    bad_exits = {k: v for k, v in exits.items() if v not in (0, None)}
    targets.append(
        target(
            "every process stopped with exit 0",
            json.dumps(bad_exits) if bad_exits else "all",
            "all",
            not bad_exits and exits.get("sender") == 0,
        )
    )
    targets.append(target("processes left behind", len(leftover), "== 0", not leftover))
    return {
        "rows": rows,
        "targets": targets,
        "params": {
            "seconds": seconds,
            "warmup_s": warmup_s,
            "interval_s": interval,
            "samples": len(soak.samples),
            "steady_samples": len(steady),
            "receivers": len(rx_reports),
            "server": "embedded" if soak.embedded else "process",
            "trace": str(trace),
            "transport": "websocket",
            "run_id": soak.run_id,
            "exits": exits,
            "restarts": restarts,
            "worst_rss_growth": {"process": worst_growth_name, "pct": worst_growth},
        },
        "series": {
            "t_s": [round(s.t_s, 2) for s in soak.samples],
            "shm_segments": [s.shm_segments for s in soak.samples],
            "rss_mb": {
                role: [
                    round(s.procs[role].rss_bytes / 2**20, 2) if role in s.procs else None
                    for s in soak.samples
                ]
                for role in roles
            },
            "fds": {
                role: [s.procs[role].fds if role in s.procs else None for s in soak.samples]
                for role in roles
            },
            "server": {
                key: [s.server.get(key) for s in soak.samples]
                for key in (*SERVER_GAUGES, *SERVER_COUNTERS)
            },
        },
    }


# --------------------------------------------------------------------------- main

COLUMNS = [
    "name", "pid", "rss_warm_mb", "rss_end_mb", "rss_max_mb", "rss_growth_pct",
    "fds_warm", "fds_end", "fds_min", "fds_max", "fd_drift", "threads_warm", "threads_end",
]  # fmt: skip


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="run time (default 5)")
    parser.add_argument("--quick", action="store_true", help="a one-minute run")
    parser.add_argument(
        "--interval", type=float, help="seconds between samples (default: run/30, 1..5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.2, help="warm-up fraction of the run (0.2, >= 10 s)"
    )
    parser.add_argument("--receivers", type=int, default=2, help="receiver processes (2)")
    parser.add_argument(
        "--server",
        choices=("process", "embedded"),
        default="process",
        help="the room server as its own process (python -m pipeline serve) or a stage",
    )
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="pose trace (.npz)")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    minutes = 1.0 if args.quick else args.minutes
    if minutes <= 0 or args.receivers < 1 or not 0 <= args.warmup < 1:
        parser.error("--minutes must be > 0, --receivers >= 1, 0 <= --warmup < 1")
    # Ctrl-C and SIGTERM stop the run and every process it started; SIGINT is handled even
    # when inherited as ignored, so that the processes started here get it by default too
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        out = run_soak(
            minutes * 60.0,
            interval=args.interval,
            warmup=args.warmup,
            receivers=args.receivers,
            embedded=args.server == "embedded",
            trace=args.trace,
            log=sys.stderr,
        )
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    extra = {"params": out["params"] | {"minutes": minutes}, "series": out["series"]}
    if args.json:
        report(NAME, out["rows"], out["targets"], as_json=True, **extra)
    else:
        save_result(result(NAME, out["rows"], out["targets"], **extra))
        print_tables(out, minutes)
    return 0 if all_met(out["targets"]) else 1


def print_tables(out: dict[str, Any], minutes: float) -> None:
    """The soak's own tables: per process, frames, targets."""
    p = out["params"]
    print(
        f"## soak: {minutes:g} min, {p['receivers']} receivers, server {p['server']}, "
        f"warm-up {p['warmup_s']:g} s, {p['samples']} samples every {p['interval_s']:g} s\n"
    )
    print(markdown_table([r for r in out["rows"] if "pid" in r], COLUMNS))
    print()
    print(markdown_table([r for r in out["rows"] if "after_stop" in r]))
    print()
    print(markdown_table([r for r in out["rows"] if r["name"] == "frames"]))
    print("\ntargets:\n")
    print(targets_table(out["targets"]))


if __name__ == "__main__":
    raise SystemExit(main())
