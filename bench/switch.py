"""``python -m bench switch [--quick] [--json]``: transport switching under faults, two baselines.

Everything runs in the namespace lab of :mod:`bench.netns` (root, ``ip``, ``nft``)::

    host a (10.77.1.2): the sender pipeline (trace replay, 30 fps) + a WebSocket receiver
        |  veth
    router: the faults (nftables drop rules, the NFQUEUE delay of bench/delay.py)
        |  veth
    host b (10.77.2.2): the room server (python -m pipeline serve, port 8765)

The receiver (``python -m pipeline receive --transport websocket``) uses TCP, so the UDP
faults hit only the sender's WebRTC path; it writes every decoded pose (seq, capture
time, decode time) to a JSON-lines file, from which the frames missing and the outage
are counted. Three sender modes, one after the other, each through the same timeline:

* ``policy``: primary webrtc, fallback websocket (hot standby, the supervisor's policy;
  ``recovery_interval_s`` 2, ``hold_s`` 1, ``max_switches_per_min`` 12: the timeline puts
  more than the default 6 switches into one minute, and the cap would then keep the
  dead-path failover of the server restart from happening);
* ``reconnect-only`` (baseline): webrtc alone: its dead-path detection drops the link and
  reconnects the same transport, no switch;
* ``no-policy`` (baseline): webrtc alone with ``webrtc.dead_after_ms`` 60000: nothing
  judges the path, the stream stays on the dead primary.

The degradation ladder is off (``transmit.degrade.enabled: false``): this measures the
switching. The scenarios, in order: ``blackout`` (all UDP dropped for 2 s), ``restore``
(the 6 s after it: back on WebRTC after the recovery interval plus hold), ``delay``
(UDP held 100 ms each way in the router, ack RTT +200 ms, over ``max_latency_ms`` 150,
for 5 s, then 7 s to come back), ``loss10`` (10 % of UDP dropped: quick 10 s, full 60 s),
``server_restart`` (kill -9 of the server process, restarted at once on the same port).

Per mode and scenario: ``detection_ms`` (fault to the policy's first switch decision,
from the sender's run report), ``switches`` (decisions in the scenario), ``frames_missing``
(frames captured during the scenario that never reached the receiver), ``outage_ms`` (the
longest time the receiver got nothing), ``latency_p95_ms`` (capture to decode at the
receiver), and for ``server_restart`` ``back_ms`` (kill to the first frame captured after
the kill decoded at the receiver)
and ``server_up_ms`` (kill to the restarted server's listening line: the floor of
``back_ms``, the start of a Python process with aiohttp and aiortc on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import add_json_flag, all_met, percentile, progress, report, stop_process
from bench.common import target as make_target
from bench.netns import ROOT, Host, Topology, python_env, topology, unavailable_reason
from pipeline.config import traces_dir
from pipeline.wire.tokens import mint_token

SECRET = "bench-switch-secret-" + "0" * 24
PORT = 8765
TRACE = traces_dir() / "cmu02_05_punch_strike.npz"
RECOVERY_S = 2.0
HOLD_S = 1.0
DELAY_MS = 100.0
MODES: dict[str, str] = {
    "policy": f"  fallback: websocket\n  recovery_interval_s: {RECOVERY_S}\n  hold_s: {HOLD_S}\n"
    "  max_switches_per_min: 12\n",
    "reconnect-only": "",
    "no-policy": "  webrtc:\n    dead_after_ms: 60000\n",
}
SCENARIOS = ("blackout", "restore", "delay", "loss10", "server_restart")


@dataclasses.dataclass(frozen=True)
class Plan:
    blackout_s: float = 2.0
    restore_s: float = 6.0
    delay_s: float = 5.0
    delay_back_s: float = 7.0
    loss_s: float = 60.0
    restart_wait_s: float = 8.0


QUICK = Plan(loss_s=10.0)
FULL = Plan()


@dataclasses.dataclass
class Window:
    """One scenario's span on the wall clock (ns)."""

    name: str
    t0: int
    t1: int = 0
    fault_end: int = 0


class Server:
    """``python -m pipeline serve`` in host b on :data:`PORT` (restartable on it)."""

    def __init__(self, host: Host, log: Path) -> None:
        self.host, self.log = host, log
        self.proc: subprocess.Popen[str] | None = None
        self.url = f"http://{host.address}:{PORT}"

    def start(self, timeout: float = 30.0) -> None:
        argv = [sys.executable, "-m", "pipeline", "serve", "--host", self.host.address,
                "--port", str(PORT), "--log-level", "WARNING"]  # fmt: skip
        env = {**python_env(), "POSEWIRE_SECRET": SECRET}
        with self.log.open("a") as err:
            self.proc = subprocess.Popen(self.host.exec_argv(argv), cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if self.url in line:
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"the server did not start; see {self.log}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def _poses(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the line being written
            out.append(json.loads(line))
    return out


@contextlib.contextmanager
def _receiver(host: Host, url: str, work: Path) -> Iterator[Path]:
    """A WebSocket receiver in ``host``; yields its poses file once it joined."""
    token = mint_token(SECRET, room="A", role="subscriber", subject="rx")
    out, jsonl = work / "rx.out", work / "rx.jsonl"
    argv = [sys.executable, "-m", "pipeline", "receive", "--server", url, "--room", "A",
            "--token", token, "--transport", "websocket", "--report", str(work / "rx.json"),
            "--out", str(jsonl), "--connect-timeout", "20"]  # fmt: skip
    with out.open("w") as so, (work / "rx.err").open("w") as se:
        proc = subprocess.Popen(host.exec_argv(argv), cwd=ROOT, env=python_env(), stdout=so,
                                stderr=se)  # fmt: skip
    try:
        _wait(lambda: "joined room A" in out.read_text(), 30, "the receiver's join")
        yield jsonl
    finally:
        stop_process(proc, sig=signal.SIGINT)


def _sender(host: Host, url: str, mode: str, work: Path) -> tuple[subprocess.Popen[str], Path]:
    cfg = work / "sender.yaml"
    cfg.write_text(
        f"source:\n  kind: trace\n  path: {TRACE}\n  loop: true\n"
        f"transmit:\n  primary: webrtc\n  server_url: {url}\n  room: A\n"
        f"  degrade:\n    enabled: false\n{MODES[mode]}"
        f"supervisor:\n  run_dir: {work / 'run'}\n  heartbeat_interval_ms: 100\n"
        "monitor:\n  enabled: false\n",
        encoding="utf-8",
    )
    rep = work / "sender.json"
    argv = [sys.executable, "-m", "pipeline", str(cfg), "--report", str(rep), "--duration",
            "600"]  # fmt: skip
    with (work / "sender.err").open("w") as se:
        proc = subprocess.Popen(host.exec_argv(argv), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=se, text=True, start_new_session=True,
                                env={**python_env(), "POSEWIRE_SECRET": SECRET})  # fmt: skip
    return proc, rep


def _timeline(net: Topology, server: Server, jsonl: Path, plan: Plan, work: Path) -> list[Window]:
    """The scenarios, one after the other (see the module docstring)."""
    out: list[Window] = []

    def hold(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    w = Window("blackout", time.time_ns())
    net.blackout_udp()
    hold(plan.blackout_s)
    net.clear_faults()
    w.fault_end = w.t1 = time.time_ns()
    out.append(w)
    w = Window("restore", time.time_ns())
    hold(plan.restore_s)
    w.t1 = time.time_ns()
    out.append(w)
    w = Window("delay", time.time_ns())
    with net.delay(DELAY_MS, "udp", log_dir=work):
        hold(plan.delay_s)
    w.fault_end = time.time_ns()
    hold(plan.delay_back_s)
    w.t1 = time.time_ns()
    out.append(w)
    w = Window("loss10", time.time_ns())
    net.drop_udp(10)
    hold(plan.loss_s)
    net.clear_faults()
    w.fault_end = w.t1 = time.time_ns()
    out.append(w)
    w = Window("server_restart", time.time_ns())
    server.kill9()
    server.start()
    w.fault_end = time.time_ns()  # the new server listens
    t_kill = w.t0
    with contextlib.suppress(RuntimeError):
        _wait(lambda: any(p["capture_ts_ns"] > t_kill for p in _poses(jsonl)), 20, "frames again")
    hold(plan.restart_wait_s / 2)
    w.t1 = time.time_ns()
    out.append(w)
    hold(2.0)  # frames after the last window bound its missing count
    return out


def _seq_at(poses: list[dict[str, Any]], t_ns: int) -> int | None:
    """The sequence number captured at ``t_ns``: from the last received frame captured
    before it, at the stream's frame interval (frames lost around ``t_ns`` have no
    capture time of their own at the receiver)."""
    before = [p for p in poses if p["capture_ts_ns"] <= t_ns]
    if not before or len(poses) < 2:
        return None
    first = min(poses, key=lambda p: p["seq"])
    last = max(poses, key=lambda p: p["seq"])
    interval = (last["capture_ts_ns"] - first["capture_ts_ns"]) / max(1, last["seq"] - first["seq"])
    ref = max(before, key=lambda p: p["capture_ts_ns"])
    return int(ref["seq"] + (t_ns - ref["capture_ts_ns"]) // max(interval, 1.0))


def _figures(
    mode: str, w: Window, poses: list[dict[str, Any]], decisions: list[dict[str, Any]]
) -> dict[str, Any]:
    got = {p["seq"] for p in poses}
    lo, hi = _seq_at(poses, w.t0), _seq_at(poses, w.t1)
    missing = None if lo is None or hi is None else sum(s not in got for s in range(lo + 1, hi + 1))
    arrivals = sorted(p["decoded_ns"] for p in poses if w.t0 <= p["decoded_ns"] <= w.t1)
    edges = [w.t0, *arrivals, w.t1]
    outage = max(b - a for a, b in itertools.pairwise(edges)) / 1e6
    lat = [(p["decoded_ns"] - p["capture_ts_ns"]) / 1e6 for p in poses
           if w.t0 <= p["capture_ts_ns"] <= w.t1]  # fmt: skip
    inside = [d for d in decisions if w.t0 / 1e9 <= d["t_wall"] <= w.t1 / 1e9]
    row: dict[str, Any] = {
        "name": f"{mode}/{w.name}",
        "mode": mode,
        "scenario": w.name,
        "detection_ms": round((inside[0]["t_wall"] - w.t0 / 1e9) * 1000, 1) if inside else None,
        "switches": len(inside),
        "switch_reasons": ",".join(f"{d['reason']}->{d['to']}" for d in inside),
        "frames_missing": missing,
        "outage_ms": round(outage, 1),
        "latency_p95_ms": round(percentile(lat, 95), 1) if lat else None,
    }
    if w.name == "server_restart":
        back = [p["decoded_ns"] for p in poses if p["capture_ts_ns"] > w.t0]  # after the kill
        row["back_ms"] = round((min(back) - w.t0) / 1e6, 1) if back else None
        row["server_up_ms"] = round((w.fault_end - w.t0) / 1e6, 1)
    return row


def run_mode(mode: str, plan: Plan, work: Path) -> list[dict[str, Any]]:
    """One sender mode through the whole timeline in a fresh namespace lab."""
    work.mkdir(parents=True, exist_ok=True)
    with topology(("a", "b")) as net:
        server = Server(net.host("b"), work / "server.err")
        server.start()
        sender: subprocess.Popen[str] | None = None
        try:
            with _receiver(net.host("a"), server.url, work) as jsonl:
                sender, rep = _sender(net.host("a"), server.url, mode, work)
                _wait(lambda: len(_poses(jsonl)) > 60, 90, "frames at the receiver")
                windows = _timeline(net, server, jsonl, plan, work)
                stop_process(sender, 30, sig=signal.SIGINT, kill_group=True)
            poses = _poses(jsonl)
        finally:
            if sender is not None:
                stop_process(sender, 30, sig=signal.SIGINT, kill_group=True)
            server.stop()
    (work / "windows.json").write_text(json.dumps([dataclasses.asdict(w) for w in windows]))
    decisions: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, json.JSONDecodeError):
        run = json.loads(rep.read_text())
        decisions = run.get("transport_policy", {}).get("decisions", [])
    return [_figures(mode, w, poses, decisions) for w in windows]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["name"]: r for r in rows}
    out = []

    def row(name: str) -> dict[str, Any]:
        return by.get(name, {})

    b = row("policy/blackout")
    det = b.get("detection_ms")
    out.append(make_target("policy: blackout to the switch (ms)", det, "<= 300",
                           det is not None and det <= 300))  # fmt: skip
    miss = b.get("frames_missing")
    out.append(make_target("policy: frames missing at the blackout", miss, "<= 10",
                           miss is not None and miss <= 10))  # fmt: skip
    r = row("policy/restore")
    out.append(make_target("policy: frames missing at the planned switch back",
                           r.get("frames_missing"), "0 (and a switch back)",
                           r.get("frames_missing") == 0 and r.get("switches", 0) >= 1))  # fmt: skip
    d = row("policy/delay")
    out.append(make_target("policy: switches in the delay scenario (away and back)",
                           d.get("switches"), ">= 2", (d.get("switches") or 0) >= 2))  # fmt: skip
    lo = row("policy/loss10")
    out.append(make_target("policy: switches under 10 % UDP loss", lo.get("switches"), "0",
                           lo.get("switches") == 0))  # fmt: skip
    s = row("policy/server_restart")
    back = s.get("back_ms")
    out.append(make_target("policy: kill -9 of the server to frames again (ms)", back,
                           "<= 1500", back is not None and back <= 1500))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench switch", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10 s of loss instead of 60 s")
    parser.add_argument("--only", choices=sorted(MODES), help="one sender mode only")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench switch needs the namespace lab: {reason}", file=sys.stderr)
        return 2
    if not TRACE.exists():
        print(f"bench switch needs the pose trace {TRACE}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    modes = [m for m in MODES if args.only in (None, m)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pw-switch-") as tmp:
        for i, mode in enumerate(modes):
            progress(i, len(modes), mode)
            rows += run_mode(mode, plan, Path(tmp) / mode)
        if os.environ.get("POSEWIRE_SWITCH_KEEP"):  # for a look at the logs
            subprocess.run(["cp", "-r", tmp, os.environ["POSEWIRE_SWITCH_KEEP"]], check=False)
    found = targets(rows)
    columns = ["name", "detection_ms", "switches", "switch_reasons", "frames_missing",
               "outage_ms", "latency_p95_ms", "back_ms", "server_up_ms"]  # fmt: skip
    report("switch", rows, found, as_json=args.json, columns=columns,
           params=dataclasses.asdict(plan))  # fmt: skip
    return 0 if all_met(found) else 1


if __name__ == "__main__":
    raise SystemExit(main())
