"""``python -m bench cluster``: one node vs two nodes vs two nodes sharing rooms via Redis.

Real processes on 127.0.0.1: ``python -m pipeline serve`` nodes and, for the
cluster rows, a real ``redis-server`` (bench/redisproc.py). The clients (real
:class:`~pipeline.transports.websocket.WebSocketTransport` publishers and
subscribers) run in this process; every publisher sends trace-encoded pose
packets at ``--fps``. Rows:

* ``1 node``: every room on one node;
* ``2 nodes``: rooms split between two independent nodes (no Redis);
* ``2 nodes + Redis, split``: every room spans both nodes: publishers on A,
  subscribers alternately on A (same node) and B (cross node);
* ``2 nodes + Redis, all on B``: publishers on A, every subscriber on B (all
  deliveries cross nodes).

Figures per row: delivered messages per second, msgs delivered per CPU-second
of ALL server-side processes (nodes, and Redis: utime+stime from
``/proc/PID/stat``), the clients' CPU apart, latency p50/p95/p99 per
subscriber (send -> receive on one clock; the percentiles of the subscribers'
p50/p95/p99, median and worst), join rate (subscribers' joins per second),
lost packets and errors. Targets (issue 16): the cross-node subscribers' p99
at most 2 ms above the same-node ones' (split row), CPU per delivered message
across nodes at most 2x the single node's, 0 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import add_json_flag, all_met, at_most, percentile, report, target
from bench.fanout import SECRET, TRACES, ServerProcess, _encode_stream
from bench.redisproc import RedisProcess

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def _run_row(
    name: str, urls: list[str], placement: str, args: argparse.Namespace, trace: Any,
    pids: list[int], redis_pid: bool,
) -> dict[str, Any]:  # fmt: skip
    from pipeline.codec import peek_header
    from pipeline.transports.base import Packet, StateChange
    from pipeline.transports.websocket import WebSocketTransport
    from pipeline.wire.tokens import mint_token

    frames = int(args.seconds * args.fps) + 1
    sent_at: dict[tuple[int, int], int] = {}
    errors: list[str] = []
    lat: dict[int, list[float]] = {}
    cross: dict[int, bool] = {}
    lost = received = 0
    pubs: list[tuple[WebSocketTransport, list[bytes]]] = []
    subs: list[WebSocketTransport] = []
    for r in range(args.rooms):
        room = f"bench-{r}"
        home = urls[r % len(urls)] if placement == "rooms" else urls[0]
        for p in range(args.publishers):
            tok = mint_token(SECRET, room=room, role="publisher", subject=f"{room}-p{p}")
            t = WebSocketTransport(home, room, tok, publish=True, subscribe=False,
                                   recv_queue=100000, connect_timeout_s=10)  # fmt: skip
            pubs.append((t, _encode_stream(r * 16 + p, frames, trace)))
        for s in range(args.subscribers):
            node = home
            if placement == "split":
                node = urls[s % 2]
            elif placement == "remote":
                node = urls[1]
            tok = mint_token(SECRET, room=room, role="subscriber", subject=f"{room}-s{s}")
            t = WebSocketTransport(node, room, tok, recv_queue=100000, connect_timeout_s=10)
            cross[len(subs)] = node != home
            subs.append(t)
    for t, _ in pubs:
        await t.connect()
    t_join = time.monotonic()
    for i in range(0, len(subs), 20):
        await asyncio.gather(*(t.connect() for t in subs[i : i + 20]))
    join_rate = len(subs) / (time.monotonic() - t_join)

    async def publisher(t: WebSocketTransport, pkts: list[bytes], start: float) -> None:
        sid = peek_header(pkts[0]).stream_id
        for i, pkt in enumerate(pkts):
            delay = start + i / args.fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[(sid, i + 1)] = time.time_ns()
            await t.send(pkt)

    async def subscriber(k: int, t: WebSocketTransport) -> None:
        nonlocal lost, received
        last: dict[int, int] = {}
        mine = lat.setdefault(k, [])
        while True:
            item = await t.recv()
            if isinstance(item, Packet):
                h = peek_header(item.data)
                sent = sent_at.get((h.stream_id, h.seq))
                if sent is None:
                    continue  # backfill of the warm-up
                received += 1
                prev = last.get(h.stream_id)
                if prev is not None and h.seq > prev + 1:
                    lost += h.seq - prev - 1
                last[h.stream_id] = h.seq
                mine.append((item.received_ns - sent) / 1e6)
            elif isinstance(item, StateChange) and not item.connected:
                errors.append(f"subscriber {k} disconnected")

    async def drain(t: WebSocketTransport) -> None:
        while True:
            await t.recv()

    side = [asyncio.create_task(subscriber(k, t)) for k, t in enumerate(subs)]
    side += [asyncio.create_task(drain(t)) for t, _ in pubs]
    me = os.getpid()
    cpu0 = [cpu_s(p) for p in pids]
    client0, t0 = cpu_s(me), time.monotonic()
    start = time.monotonic() + 0.05
    await asyncio.gather(
        *(publisher(t, pk, start + k / len(pubs) / args.fps) for k, (t, pk) in enumerate(pubs))
    )
    expected = len(sent_at) * args.subscribers
    deadline = time.monotonic() + 2.0
    while received < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    wall = time.monotonic() - t0
    per = [cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True)]
    cpu = sum(per)
    client_cpu = cpu_s(me) - client0
    for task in side:
        task.cancel()
    await asyncio.gather(*side, return_exceptions=True)
    for t in [t for t, _ in pubs] + subs:
        st = t.statistics()
        if st.reconnects or st.send_failures or st.dropped_received:
            errors.append(f"{st.reconnects} reconnects, {st.send_failures} send failures")
        await t.close()
    missing = expected - received

    def pcts(keys: list[int], q: float) -> float:
        vals = [percentile(lat[k], q) for k in keys if lat.get(k)]
        return statistics.median(vals) if vals else float("nan")

    same = [k for k in cross if not cross[k]]
    far = [k for k in cross if cross[k]]
    row: dict[str, Any] = {
        "name": name,
        "delivered_msgs_per_s": received / wall,
        "msgs_per_cpu_s": received / cpu if cpu > 0 else float("nan"),
        "server_cpu_cores": cpu / wall,
        "client_cpu_cores": client_cpu / wall,
        "redis_cpu_cores": per[0] / wall if redis_pid else 0.0,
        "node_cpu_cores": [round(c / wall, 3) for c in per[1 if redis_pid else 0 :]],
        "join_rate_per_s": join_rate,
    }
    for label, keys in (("same", same), ("cross", far)):
        if keys:
            for q in (50, 95, 99):
                row[f"{label}_p{q}_ms"] = pcts(keys, q)
            row[f"{label}_worst_p99_ms"] = max(percentile(lat[k], 99) for k in keys if lat.get(k))
    row["lost"] = lost
    row["missing"] = missing
    row["errors"] = len(errors)
    return row


def _row(name: str, nodes: int, placement: str, args: argparse.Namespace, trace: Any,
         redis_dir: Path | None) -> dict[str, Any]:  # fmt: skip
    clients = args.rooms * (args.publishers + args.subscribers)
    redis = RedisProcess(redis_dir) if redis_dir is not None else None
    servers: list[ServerProcess] = []
    try:
        pids = []
        if redis is not None:
            redis.start()
            pids.append(redis.pid)
        for i in range(nodes):
            extra = ("--redis", redis.url, "--node-id", f"n{i}") if redis is not None else ()
            servers.append(ServerProcess(clients, *extra))
        for s in servers:
            _wait_ready(s.url)
        pids += [s.proc.pid for s in servers]
        urls = [s.url for s in servers]
        return asyncio.run(_run_row(name, urls, placement, args, trace, pids, redis is not None))
    finally:
        for s in servers:
            s.stop()
        if redis is not None:
            redis.stop()


def _wait_ready(url: str) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready")


COLUMNS = [
    "name", "delivered_msgs_per_s", "msgs_per_cpu_s", "server_cpu_cores", "redis_cpu_cores",
    "client_cpu_cores",
    "join_rate_per_s", "same_p50_ms", "same_p95_ms", "same_p99_ms", "cross_p50_ms",
    "cross_p95_ms", "cross_p99_ms", "lost", "missing", "errors",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__)
    parser.add_argument("--nodes", type=int, default=2, help="nodes of the multi-node rows (2)")
    parser.add_argument("--rooms", type=int, default=4, help="rooms (4)")
    parser.add_argument("--publishers", type=int, default=1, help="publishers per room (1)")
    parser.add_argument("--subscribers", type=int, default=10, help="subscribers per room (10)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--fps", type=float, default=30.0, help="frames per second (30)")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes: at least 2")
    with np.load(TRACES / "cmu02_05_punch_strike.npz") as d:
        trace = np.asarray(d["image"], np.float32)
    n = args.nodes
    with tempfile.TemporaryDirectory(prefix="posewire-cluster-") as tmp:
        rows = [
            _row("1 node", 1, "one", args, trace, None),
            _row(f"{n} nodes (rooms split, no Redis)", n, "rooms", args, trace, None),
            _row(
                f"{n} nodes + Redis, subscribers split", n, "split", args, trace, Path(tmp) / "r1"
            ),
            _row(
                f"{n} nodes + Redis, all subscribers remote",
                n,
                "remote",
                args,
                trace,
                Path(tmp) / "r2",
            ),
        ]
    one, split, remote = rows[0], rows[2], rows[3]
    added = split["cross_p99_ms"] - split["same_p99_ms"]
    ratio = one["msgs_per_cpu_s"] / remote["msgs_per_cpu_s"]
    targets = [
        at_most("cross-node added latency p99 (ms)", added, 2.0),
        at_most("CPU per message, cross-node / single node", ratio, 2.0),
        target("errors, lost and missing packets", sum(
            r["errors"] + r["lost"] + r["missing"] for r in rows), "== 0",
            all(r["errors"] + r["lost"] + r["missing"] == 0 for r in rows)),
    ]  # fmt: skip
    report("cluster", rows, targets, as_json=args.json, columns=COLUMNS)
    return 0 if all_met(targets) else 1


if __name__ == "__main__":
    sys.exit(main())
