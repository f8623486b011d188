"""``python -m bench fanout``: relay throughput and latency of one room server process.

One server process (``python -m pipeline serve``) on 127.0.0.1; client worker
processes run the publishers and subscribers (real
:class:`~pipeline.transports.websocket.WebSocketTransport` clients). Every
publisher sends pose packets encoded from the pose traces at ``--fps``; every
subscriber of the room receives them. A room's publishers and subscribers live
in the same worker, so the relay latency (publisher ``send`` -> subscriber
receive, both on one clock) needs no clock correction.

Reported per scenario: delivered messages per second (pose packets written by
the server, from its ``/metrics``), relay latency p50/p95/p99, the server's CPU
(cores, from its process times) and delivered messages per second per core.
The first row is the baseline (one room, one publisher, one subscriber).

``--clients N --seconds S`` adds the endurance scenario: N clients in rooms of
10 (1 publisher + 9 subscribers) for S seconds; it counts errors (refusals,
reconnects, send failures, lost packets) and checks afterwards that the
server's and the workers' open file descriptors and asyncio tasks are back to
where they were.

Targets: >= 20,000 delivered msgs/s per server core with p95 relay <= 10 ms;
the endurance run: zero errors, no leaked fds or tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import (
    add_json_flag,
    all_met,
    at_least,
    at_most,
    percentile,
    report,
    stop_process,
    target,
)
from pipeline.config import traces_dir

ROOT = Path(__file__).resolve().parents[1]
TRACES = traces_dir()
SECRET = "bench-fanout-secret-" + "0" * 24
MAX_LAT_SAMPLES = 200_000


@dataclass(frozen=True)
class Scenario:
    name: str
    rooms: int
    publishers: int
    subscribers: int
    seconds: float
    fps: float

    @property
    def clients(self) -> int:
        return self.rooms * (self.publishers + self.subscribers)


# --------------------------------------------------------------------------- server process


def _server_config(path: Path, clients: int) -> None:
    path.write_text(
        "server:\n"
        f"  max_connections: {max(clients * 2, 100)}\n"
        f"  max_rooms: {max(clients, 100)}\n"
        "  max_members_per_room: 1000\n"
        "  max_messages_per_s: 1000\n"
        "  subscriber_queue: 256\n"
        "  heartbeat_s: 30\n",
        encoding="utf-8",
    )


class ServerProcess:
    """``python -m pipeline serve`` on 127.0.0.1 sized for ``clients``; ``extra``: more
    options (``--redis URL --node-id NAME``: a node of a cluster, bench/cluster.py)."""

    def __init__(self, clients: int, *extra: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="posewire-fanout-")
        cfg = Path(self._tmp.name) / "server.yaml"
        _server_config(cfg, clients)
        env = {**os.environ, "POSEWIRE_SECRET": SECRET}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--host", "127.0.0.1", "--port", "0",
             "--config", str(cfg), "--log-level", "WARNING", *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m is None:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"server did not start: {line!r} {err}")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        stop_process(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self._tmp.cleanup()


# --------------------------------------------------------------------------- worker process


def _encode_stream(stream_id: int, frames: int, trace: Any) -> list[bytes]:
    from pipeline.codec import CodecConfig, Encoder
    from pipeline.model.pose import PoseFrame

    enc = Encoder(CodecConfig(), stream_id)
    out = []
    t0 = time.time_ns()
    for i in range(frames):
        img = trace[(stream_id * 7 + i) % len(trace)][None].copy()
        out.append(enc.encode(PoseFrame(seq=i + 1, capture_ts_ns=t0 + i * 33_333_333, image=img)))
    return out


def _worker(
    rooms: list[str],
    sc: Scenario,
    url: str,
    trace_path: str,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    try:
        res = asyncio.run(_worker_main(rooms, sc, url, trace_path, ready, go))
    except BaseException as exc:  # noqa: BLE001 - report any worker failure to the parent
        res = {"fatal": f"{type(exc).__name__}: {exc}"}
        ready.put("failed")
    results.put(res)


async def _worker_main(
    rooms: list[str], sc: Scenario, url: str, trace_path: str, ready: Any, go: Any
) -> dict[str, Any]:
    from pipeline.codec import peek_header
    from pipeline.transports.base import Packet, StateChange
    from pipeline.transports.websocket import WebSocketTransport
    from pipeline.wire.tokens import mint_token

    fds_before = len(os.listdir("/proc/self/fd"))
    with np.load(trace_path) as d:
        trace = np.asarray(d["image"], np.float32)
    frames = int(sc.seconds * sc.fps) + 1
    sent_at: dict[tuple[int, int], int] = {}
    latencies: list[float] = []
    errors: list[str] = []
    received = 0
    lost = 0
    pubs: list[tuple[WebSocketTransport, list[bytes]]] = []
    subs: list[WebSocketTransport] = []
    for room in rooms:
        base = int(room.rsplit("-", 1)[1]) * 16
        for p in range(sc.publishers):
            tok = mint_token(SECRET, room=room, role="publisher", subject=f"{room}-p{p}")
            t = WebSocketTransport(url, room, tok, publish=True, subscribe=False, recv_queue=100000)
            pubs.append((t, _encode_stream(base + p, frames, trace)))
        for s in range(sc.subscribers):
            tok = mint_token(SECRET, room=room, role="subscriber", subject=f"{room}-s{s}")
            subs.append(WebSocketTransport(url, room, tok, recv_queue=100000))
    everyone = [t for t, _ in pubs] + subs
    for i in range(0, len(everyone), 20):
        await asyncio.gather(*(t.connect() for t in everyone[i : i + 20]))
    ready.put("ready")
    while not go.is_set():
        await asyncio.sleep(0.01)
    t_go = time.monotonic()
    stop_at = t_go + sc.seconds

    async def publisher(t: WebSocketTransport, pkts: list[bytes], offset: float) -> None:
        sid = peek_header(pkts[0]).stream_id
        i = 0
        start = t_go + offset
        while True:
            when = start + i / sc.fps
            if when >= stop_at or i >= len(pkts):
                return
            delay = when - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[(sid, i + 1)] = time.time_ns()
            await t.send(pkts[i])
            i += 1

    async def drainer(t: WebSocketTransport) -> None:
        while True:
            item = await t.recv()
            if isinstance(item, StateChange):
                errors.append(f"state change: {item}")

    async def subscriber(t: WebSocketTransport) -> None:
        nonlocal received, lost
        last: dict[int, int] = {}
        while True:
            item = await t.recv()
            if isinstance(item, Packet):
                h = peek_header(item.data)
                received += 1
                prev = last.get(h.stream_id)
                if prev is not None and h.seq > prev + 1:
                    lost += h.seq - prev - 1
                last[h.stream_id] = h.seq
                sent = sent_at.get((h.stream_id, h.seq))
                if sent is not None and len(latencies) < MAX_LAT_SAMPLES:
                    latencies.append((item.received_ns - sent) / 1e6)
            elif isinstance(item, StateChange):
                errors.append(f"state change: {item}")

    n_pubs = len(pubs)
    tasks = [
        asyncio.create_task(publisher(t, pk, (k / max(n_pubs, 1)) / sc.fps))
        for k, (t, pk) in enumerate(pubs)
    ]
    side = [asyncio.create_task(drainer(t)) for t, _ in pubs]
    side += [asyncio.create_task(subscriber(t)) for t in subs]
    await asyncio.gather(*tasks)
    await asyncio.sleep(0.5)  # in-flight packets
    for task in side:
        task.cancel()
    await asyncio.gather(*side, return_exceptions=True)
    acks = 0
    for t in everyone:
        st = t.statistics()
        acks += st.acks
        if t.error is not None:
            errors.append(f"transport error: {t.error}")
        if st.reconnects:
            errors.append(f"{st.reconnects} reconnects")
        if st.send_failures:
            errors.append(f"{st.send_failures} send failures")
        if st.dropped_received:
            errors.append(f"{st.dropped_received} received items dropped by the client")
    for i in range(0, len(everyone), 50):
        await asyncio.gather(*(t.close() for t in everyone[i : i + 50]))
    everyone.clear()
    pubs.clear()
    subs.clear()
    await asyncio.sleep(0.3)
    leaked_tasks = len(asyncio.all_tasks()) - 1
    fds_after = len(os.listdir("/proc/self/fd"))
    return {
        "received": received,
        "lost": lost,
        "sent": len(sent_at),
        "acks": acks,
        "latencies": latencies,
        "errors": errors,
        "leaked_tasks": leaked_tasks,
        "leaked_fds": fds_after - fds_before,
    }


# --------------------------------------------------------------------------- orchestration


def run_scenario(sc: Scenario, workers: int, trace: Path) -> dict[str, Any]:
    server = ServerProcess(sc.clients)
    try:
        return _run(server, sc, workers, trace)
    finally:
        server.stop()


def _run(server: ServerProcess, sc: Scenario, workers: int, trace: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    rooms = [f"bench-{i}" for i in range(sc.rooms)]
    workers = max(1, min(workers, sc.rooms))
    split = [rooms[i::workers] for i in range(workers)]
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    before = server.metrics()
    procs = [
        ctx.Process(target=_worker, args=(r, sc, server.url, str(trace), ready, go, results))
        for r in split
    ]
    for p in procs:
        p.start()
    states = [ready.get(timeout=120) for _ in procs]
    if "failed" in states:
        go.set()
        res = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
        raise RuntimeError(f"a worker failed: {[r.get('fatal') for r in res if 'fatal' in r]}")
    m0 = server.metrics()
    cpu0, t0 = server.cpu_s(), time.monotonic()
    go.set()
    time.sleep(sc.seconds)
    cpu1, t1 = server.cpu_s(), time.monotonic()
    m1 = server.metrics()
    res = [results.get(timeout=sc.seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    fatal = [r["fatal"] for r in res if "fatal" in r]
    if fatal:
        raise RuntimeError(f"a worker failed: {fatal}")
    # the server settles: every member gone, fds and tasks back to where they were
    after = server.metrics()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        after.get("posewire_server_connections", 0) > 0
        or after["posewire_server_open_fds"] > before["posewire_server_open_fds"]
        or after["posewire_server_tasks"] > before["posewire_server_tasks"]
    ):
        time.sleep(0.2)
        after = server.metrics()
    wall = t1 - t0
    delivered = m1["posewire_server_packets_out_total"] - m0["posewire_server_packets_out_total"]
    cores = (cpu1 - cpu0) / wall
    lat = [v for r in res for v in r["latencies"]]
    errors = [e for r in res for e in r["errors"]]
    drops = after["posewire_server_drops_total"] - before["posewire_server_drops_total"]
    rejections = sum(v for k, v in after.items() if k.startswith("posewire_server_rejections"))
    sent = sum(r["sent"] for r in res)
    acks = sum(r["acks"] for r in res)
    if acks != sent:
        errors.append(f"{sent - acks} packets not acknowledged")
    lost = sum(r["lost"] for r in res)
    return {
        "name": sc.name,
        "rooms": sc.rooms,
        "publishers_per_room": sc.publishers,
        "subscribers_per_room": sc.subscribers,
        "clients": sc.clients,
        "seconds": round(wall, 2),
        "delivered_msgs_per_s": delivered / wall,
        "relay_p50_ms": percentile(lat, 50),
        "relay_p95_ms": percentile(lat, 95),
        "relay_p99_ms": percentile(lat, 99),
        "server_cpu_cores": cores,
        "msgs_per_s_per_core": delivered / wall / cores if cores > 0 else float("nan"),
        "received": sum(r["received"] for r in res),
        "lost": lost,
        "drops": int(drops),
        "errors": len(errors) + int(rejections),
        "leaked_server_fds": int(
            after["posewire_server_open_fds"] - before["posewire_server_open_fds"]
        ),
        "leaked_server_tasks": int(
            after["posewire_server_tasks"] - before["posewire_server_tasks"]
        ),
        "leaked_client_fds": sum(r["leaked_fds"] for r in res),
        "leaked_client_tasks": sum(r["leaked_tasks"] for r in res),
        "_errors": errors[:10],
    }


COLUMNS = [
    "name", "rooms", "publishers_per_room", "subscribers_per_room", "clients", "seconds",
    "delivered_msgs_per_s", "relay_p50_ms", "relay_p95_ms", "relay_p99_ms", "server_cpu_cores",
    "msgs_per_s_per_core", "lost", "drops", "errors",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench fanout", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rooms", type=int, default=20, help="rooms (default 20)")
    parser.add_argument("--publishers", type=int, default=2, help="publishers per room (2)")
    parser.add_argument("--subscribers", type=int, default=10, help="subscribers per room (10)")
    parser.add_argument("--fps", type=float, default=30.0, help="frames per second (30)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--workers", type=int, default=2, help="client worker processes (2)")
    parser.add_argument(
        "--clients", type=int, default=0, help="also run N clients in rooms of 10 (e.g. 200)"
    )
    parser.add_argument("--trace", type=Path, default=TRACES / "cmu02_05_punch_strike.npz")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 1x1x1 baseline row")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    if not args.trace.exists():
        print(f"trace not found: {args.trace}", file=sys.stderr)
        return 2
    scenarios = []
    if not args.no_baseline:
        scenarios.append(Scenario("baseline 1x1x1", 1, 1, 1, min(args.seconds, 5.0), args.fps))
    scenarios.append(
        Scenario(
            f"fanout {args.rooms}x{args.publishers}x{args.subscribers}",
            args.rooms,
            args.publishers,
            args.subscribers,
            args.seconds,
            args.fps,
        )
    )
    if args.clients:
        rooms = max(1, args.clients // 10)
        scenarios.append(
            Scenario(f"{rooms * 10} clients", rooms, 1, 9, args.seconds, args.fps)
            if args.clients >= 10
            else Scenario(f"{args.clients} clients", 1, 1, args.clients - 1, args.seconds, args.fps)
        )
    rows = [run_scenario(sc, args.workers, args.trace) for sc in scenarios]
    load = rows[1] if not args.no_baseline else rows[0]
    targets = [
        at_least("delivered msgs/s per server core", load["msgs_per_s_per_core"], 20000),
        at_most("p95 relay latency (ms)", load["relay_p95_ms"], 10),
    ]
    if args.clients:
        end = rows[-1]
        targets.append(target(f"{end['name']}: errors", end["errors"], "== 0", end["errors"] == 0))
        leaks = {
            k: end[k]
            for k in ("leaked_server_fds", "leaked_server_tasks", "leaked_client_fds",
                      "leaked_client_tasks")
        }  # fmt: skip
        targets.append(
            target(
                f"{end['name']}: leaked fds/tasks",
                json.dumps(leaks),
                "all <= 0",
                all(v <= 0 for v in leaks.values()),
            )
        )
    errors = {r["name"]: r.pop("_errors") for r in rows}
    report(
        "fanout",
        rows,
        targets,
        as_json=args.json,
        columns=COLUMNS,
        title="fanout: one room server process, loopback",
        params=vars(args) | {"trace": str(args.trace)},
    )
    for name, errs in errors.items():
        if errs and not args.json:
            print(f"\n{name}: first errors: {errs}")
    return 0 if all_met(targets) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
