"""``python -m bench redisbus``: Redis pub/sub against Redis streams for the backplane.

One real ``redis-server`` (bench/redisproc.py) on 127.0.0.1, started afresh
for every case. Traffic: real pose packets (the codec's :class:`Encoder` on a
CMU trace), ``--publishers`` streams in ``--rooms`` rooms at an aggregate
``--rate`` packets/s (3,000 = 100 publishers at 30 Hz), each message as the
backplane builds it (``b"P"``, origin, flags byte, packet) prefixed with its
send time (``time.monotonic_ns``, 8 bytes) so the readers measure latency on
one clock. Everything runs in this process, one asyncio loop; the writes use
the backplane's reply-off :class:`~pipeline.server.resp.Writer`, one write per
packet. Cases:

* ``pub/sub, N reader(s)``: ``PUBLISH`` on the room channel; every reader
  node is a :class:`~pipeline.server.resp.Subscriber` of every room channel;
* ``streams, N reader(s)``: ``XADD <room key> MAXLEN ~ --maxlen * d <msg>``;
  every reader loops ``XREAD BLOCK COUNT STREAMS <every room key> <its last ids>``
  on its own connection (:func:`~pipeline.server.resp.reply` parses the nested
  arrays);
* ``baseline (shipped): PUBLISH + history``: what the backplane sends per
  packet: ``PUBLISH`` and the stream's history list (``RPUSH``, ``LTRIM``
  every 8th, ``DEL``/``RPUSH``/``PEXPIRE`` on a keyframe:
  :func:`pipeline.server.backplane.history_cmds`), 1 reader.

Figures per case: delivered / sent (over every reader), latency send -> read
p50/p95/p99 (ms, all readers' samples), Redis CPU (utime+stime of
``/proc/PID/stat``) per 1,000 packets sent, reader CPU per 1,000 packets
delivered (``time.thread_time`` around each reader's handling of what it
read, and the ``XREAD`` it sends; the socket reads of the event loop are not
in it), writer CPU per 1,000 packets sent (the same clock around the writes),
this whole process's CPU per 1,000 packets sent, Redis ``used_memory`` at the
end and its growth over the case. The one target: every case delivered every
packet; the comparisons (streams over pub/sub: p99, Redis CPU, reader CPU,
memory) are printed as figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.cluster import cpu_s
from bench.common import (
    add_json_flag,
    all_met,
    markdown_table,
    percentile,
    progress,
    report,
    target,
)
from bench.fanout import TRACES, _encode_stream
from bench.redisproc import RedisProcess

STAMP = struct.Struct(">Q")
ORIGIN = b"\x05bench"
DRAIN_S = 5.0
"""After the last write: how long the readers may take to catch up."""
XREAD_COUNT = 512
XREAD_BLOCK_MS = 1000


@dataclass
class Case:
    name: str
    mode: str
    """``pubsub``, ``streams`` or ``baseline``."""
    readers: int


CASES = (
    Case("pub/sub, 1 reader", "pubsub", 1),
    Case("pub/sub, 2 readers", "pubsub", 2),
    Case("streams, 1 reader", "streams", 1),
    Case("streams, 2 readers", "streams", 2),
    Case("baseline (shipped): PUBLISH + history, 1 reader", "baseline", 1),
)


@dataclass
class Reading:
    """What one reader node got."""

    latencies_ms: list[float] = field(default_factory=list)
    cpu_ns: int = 0


@dataclass
class Traffic:
    """The packets to send: ``(room, stream id, keyframe, message)`` in send order."""

    packets: list[tuple[int, int, bool, bytes]]
    rooms: int


def build_traffic(args: argparse.Namespace) -> Traffic:
    from pipeline.codec import peek_header
    from pipeline.server.roomsync import PACKET

    with np.load(TRACES / "cmu02_05_punch_strike.npz") as d:
        trace = np.asarray(d["image"], np.float32)
    total = int(args.rate * args.seconds)
    frames = -(-total // args.publishers)
    streams = [_encode_stream(p + 1, frames, trace) for p in range(args.publishers)]
    packets = []
    for i in range(total):
        p, f = i % args.publishers, i // args.publishers
        data = streams[p][f]
        msg = PACKET + ORIGIN + b"\x00" + data
        packets.append((p % args.rooms, p + 1, peek_header(data).keyframe, msg))
    return Traffic(packets, args.rooms)


def _used_memory(redis: RedisProcess) -> int:
    for line in redis.command("INFO", "memory").decode().splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError("INFO memory has no used_memory")


async def _pubsub_reader(url: str, channels: list[str], out: Reading,
                         ready: asyncio.Event, on_msg: Callable[[], None]) -> None:  # fmt: skip
    from pipeline.server.resp import Subscriber

    sub = await Subscriber.connect(url)
    try:
        sub.subscribe(*channels)
        confirmed = 0
        lat = out.latencies_ms
        while True:
            pushes = await sub.pushes()
            t0 = time.thread_time_ns()
            now = time.monotonic_ns()
            for push in pushes:
                if push[0] == b"message":
                    lat.append((now - STAMP.unpack_from(push[2])[0]) / 1e6)
                    on_msg()
                elif push[0] == b"subscribe":
                    confirmed += 1
                    if confirmed == len(channels):
                        ready.set()
            out.cpu_ns += time.thread_time_ns() - t0
    finally:
        sub.close()


async def _stream_reader(url: str, keys: list[str], out: Reading,
                         ready: asyncio.Event, on_msg: Callable[[], None]) -> None:  # fmt: skip
    from pipeline.server.resp import encode, open_connection, reply

    reader, writer = await open_connection(url)
    last = dict.fromkeys(keys, b"0-0")  # fresh keys: from the start, nothing missed
    lat = out.latencies_ms
    buf = b""
    try:
        ready.set()
        while True:
            t0 = time.thread_time_ns()
            writer.write(encode("XREAD", "BLOCK", XREAD_BLOCK_MS, "COUNT", XREAD_COUNT,
                                "STREAMS", *last.keys(), *last.values()))  # fmt: skip
            out.cpu_ns += time.thread_time_ns() - t0
            while True:
                got = reply(buf)
                if got is not None:
                    break
                chunk = await reader.read(1 << 16)
                if not chunk:
                    raise ConnectionError("redis closed the XREAD connection")
                buf += chunk
            t0 = time.thread_time_ns()
            now = time.monotonic_ns()
            value, pos = got
            buf = buf[pos:]
            for key, entries in value or ():
                for _id, fields in entries:
                    lat.append((now - STAMP.unpack_from(fields[1])[0]) / 1e6)
                    on_msg()
                last[key.decode()] = entries[-1][0]
            out.cpu_ns += time.thread_time_ns() - t0
    finally:
        writer.close()


def _commands(case: Case, args: argparse.Namespace) -> Callable[[int, int, bool, bytes, int],
                                                               list[tuple[Any, ...]]]:  # fmt: skip
    """``(room, stream id, keyframe, payload, n-th of its stream) -> commands`` of a case."""
    from pipeline.server.backplane import history_cmds

    if case.mode == "pubsub":
        return lambda room, sid, key, body, n: [("PUBLISH", f"P:pkt:r{room}", body)]
    if case.mode == "streams":
        return lambda room, sid, key, body, n: [
            ("XADD", f"P:xpkt:r{room}", "MAXLEN", "~", args.maxlen, "*", "d", body)
        ]

    def baseline(room: int, sid: int, key: bool, body: bytes, n: int) -> list[tuple[Any, ...]]:
        cmds: list[tuple[Any, ...]] = [("PUBLISH", f"P:pkt:r{room}", body)]
        if n == 0:
            cmds.append(("HSET", f"P:streams:r{room}", sid, "bench"))
        return cmds + history_cmds(
            f"P:hist:r{room}:{sid}", body, n, keyframe=key, keep=args.history
        )

    return baseline


async def _run_case(case: Case, url: str, traffic: Traffic, args: argparse.Namespace,
                    redis_pid: int, tick: Callable[[int], None]) -> dict[str, Any]:  # fmt: skip
    from pipeline.server.resp import Writer, encode

    rooms = range(traffic.rooms)
    names = [f"P:xpkt:r{r}" if case.mode == "streams" else f"P:pkt:r{r}" for r in rooms]
    total = len(traffic.packets)
    expected = total * case.readers
    done = asyncio.Event()
    received = 0

    def on_msg() -> None:
        nonlocal received
        received += 1
        if received >= expected:
            done.set()

    readings = [Reading() for _ in range(case.readers)]
    readies = [asyncio.Event() for _ in readings]
    run = _stream_reader if case.mode == "streams" else _pubsub_reader
    tasks = [asyncio.create_task(run(url, names, r, e, on_msg))
             for r, e in zip(readings, readies, strict=True)]  # fmt: skip
    wr = await Writer.connect(url)
    waiting: list[Awaitable[Any]] = [e.wait() for e in readies]
    async with asyncio.timeout(10.0):
        await asyncio.gather(*waiting)
    cmds_of = _commands(case, args)
    count: dict[int, int] = {}
    writer_ns = 0
    proc0, redis0 = time.process_time(), cpu_s(redis_pid)
    start = time.monotonic()
    stop_at = start + args.seconds * 2 + DRAIN_S  # bound in time as well as in count
    i = dropped = 0
    while i < total and time.monotonic() < stop_at:
        due = min(total, int((time.monotonic() - start) * args.rate) + 1)
        t0 = time.thread_time_ns()
        while i < due:
            room, sid, key, msg = traffic.packets[i]
            n = count.get(sid, 0)
            count[sid] = n + 1
            body = STAMP.pack(time.monotonic_ns()) + msg
            if not wr.write(b"".join([encode(*c) for c in cmds_of(room, sid, key, body, n)])):
                dropped += 1
            i += 1
        writer_ns += time.thread_time_ns() - t0
        tick(i)
        await asyncio.sleep(0.002)  # pacing to --rate, not synchronisation
    sent = i - dropped
    expected = sent * case.readers  # on_msg sees the new count
    if received < expected:
        done.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_S):
                await done.wait()
    wall = time.monotonic() - start
    proc_cpu, redis_cpu = time.process_time() - proc0, cpu_s(redis_pid) - redis0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wr.close()
    lat = [x for r in readings for x in r.latencies_ms]
    per_k = 1000.0 / max(sent, 1)
    return {
        "name": case.name,
        "sent": sent,
        "delivered": received,
        "delivered_fraction": received / max(sent * case.readers, 1),
        "rate_per_s": sent / args.seconds,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "redis_cpu_ms_per_1k": redis_cpu * 1000 * per_k,
        "reader_cpu_ms_per_1k": sum(r.cpu_ns for r in readings) / 1e6 * 1000 / max(received, 1),
        "writer_cpu_ms_per_1k": writer_ns / 1e6 * per_k,
        "process_cpu_ms_per_1k": proc_cpu * 1000 * per_k,
        "wall_s": wall,
    }


def _case(
    case: Case, traffic: Traffic, args: argparse.Namespace, tmp: Path, k: int
) -> dict[str, Any]:
    redis = RedisProcess(tmp / f"case{k}")
    total = len(traffic.packets)
    try:
        redis.start()
        mem0 = _used_memory(redis)

        def tick(i: int) -> None:
            progress(k * total + i, len(CASES) * total, case.name)

        row = asyncio.run(_run_case(case, redis.url, traffic, args, redis.pid, tick))
        mem = _used_memory(redis)
    finally:
        redis.stop()
    row["used_memory_kb"] = mem / 1024
    row["memory_growth_kb"] = (mem - mem0) / 1024
    return row


COLUMNS = [
    "name", "sent", "delivered_fraction", "p50_ms", "p95_ms", "p99_ms", "redis_cpu_ms_per_1k",
    "reader_cpu_ms_per_1k", "writer_cpu_ms_per_1k", "process_cpu_ms_per_1k", "used_memory_kb",
    "memory_growth_kb",
]  # fmt: skip


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streams over pub/sub (same readers), and the shipped pattern over bare pub/sub."""
    by = {r["name"]: r for r in rows}
    out = []
    for n in (1, 2):
        s = by[f"streams, {n} reader{'s' if n > 1 else ''}"]
        p = by[f"pub/sub, {n} reader{'s' if n > 1 else ''}"]
        for fig in ("p99_ms", "redis_cpu_ms_per_1k", "reader_cpu_ms_per_1k"):
            out.append({"name": f"streams / pub/sub, {fig}, {n} reader(s)",
                        "value": s[fig] / p[fig] if p[fig] else float("nan")})  # fmt: skip
    base, p1 = by[CASES[4].name], by[CASES[0].name]
    for fig in ("redis_cpu_ms_per_1k", "writer_cpu_ms_per_1k"):
        out.append({"name": f"shipped (PUBLISH + history) / pub/sub alone, {fig}",
                    "value": base[fig] / p1[fig] if p1[fig] else float("nan")})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench redisbus", description=__doc__)
    parser.add_argument("--rate", type=float, default=3000.0, help="packets/s in all (3000)")
    parser.add_argument("--publishers", type=int, default=100, help="streams (100)")
    parser.add_argument("--rooms", type=int, default=10, help="rooms (10)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per case (20)")
    parser.add_argument("--maxlen", type=int, default=1000, help="XADD MAXLEN ~ (1000)")
    parser.add_argument("--history", type=int, default=64,
                        help="the baseline's history_packets (64)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="2 s per case")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2.0
    for opt in ("rate", "publishers", "rooms", "seconds", "maxlen", "history"):
        if getattr(args, opt) <= 0:
            parser.error(f"--{opt} must be > 0")
    traffic = build_traffic(args)
    with tempfile.TemporaryDirectory(prefix="posewire-redisbus-") as tmp:
        rows = [_case(c, traffic, args, Path(tmp), k) for k, c in enumerate(CASES)]
    ok = all(r["delivered_fraction"] == 1.0 for r in rows)
    worst = min(r["delivered_fraction"] for r in rows)
    targets = [target("every case delivered every packet (worst fraction)", worst, "== 1", ok)]
    comp = comparisons(rows)
    params = {k: getattr(args, k) for k in ("rate", "publishers", "rooms", "seconds", "maxlen",
                                             "history")}  # fmt: skip
    report("redisbus", rows, targets, as_json=args.json, columns=COLUMNS,
           comparisons=comp, params=params)  # fmt: skip
    if not args.json:
        print("\ncomparisons:\n")
        print(markdown_table(comp, ["name", "value"]))
    return 0 if all_met(targets) else 1


if __name__ == "__main__":
    sys.exit(main())
