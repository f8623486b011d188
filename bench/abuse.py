"""``python -m bench abuse``: a room server under abuse, and a legitimate pair beside it.

One server process (``python -m pipeline serve``, default limits, its own data
directory, its log in a file) on 127.0.0.1. A *pair* process runs a legitimate
publisher and subscriber (:class:`~pipeline.transports.websocket.WebSocketTransport`)
in room B at ``--fps`` (30 Hz) with real codec packets from a CMU trace
(``data/pose-traces``); both live in one process, so the relay latency
(publisher ``send`` -> subscriber receive) needs no clock correction.

1. **baseline**: the pair alone for ``--baseline-s`` seconds.
2. **attack**: an attacker process starts, all at once and bounded in time and
   count:

   * ``--slow-clients`` (500) TCP clients that send ``GET /ws HTTP/1.1`` and then
     trickle one byte of a header line every ``--trickle-s`` seconds, never
     finishing the request; a client the server closes reconnects (after 0.1 s,
     or 1 s when it was refused within a second; at most
     ``MAX_CONNECTS_PER_SLOW_CLIENT`` times), as a real attacker would;
   * a broadcast flood: a moderator member of room A sends ``broadcast``
     messages of ``--broadcast-bytes`` (60 KB) at ``--broadcast-rate`` x the
     server's ``max_messages_per_s`` (0.9: just under the limit);
   * a packet flood: a publisher member of room A sends real pose packets at
     ``--flood-rate`` x ``max_messages_per_s`` (1.25: over the limit; when the
     server closes it, it reconnects);
   * ``--a-subscribers`` (8) subscribers in room A receiving all of it, half of
     them reading, half stalled (a raw socket that never reads; whether the
     server closed them shows in the ``rejections`` column: ``too_slow``).

   After ``--ramp-s``, the pair is measured again for ``--attack-s`` seconds.
3. **after**: the attacker is gone; the server is sampled for ``--recover-s``.

Throughout, every 0.5 s: the server's open fds and RSS (psutil, so also when the
server does not answer) and its asyncio tasks, connections, members and pending connections
(``posewire_server_pending_connections``, from its ``/metrics``; a scrape that fails or takes longer
than 2 s is counted). The server's log is measured per phase (lines, bytes,
tracebacks, ``accept() out of system resource`` lines), and the refusals it
counted during the attack (``posewire_server_rejections_total`` by reason).

Targets (with the attack running): the pair's p99 relay latency <= 5 ms and 0
lost; the server's fds <= ``max_pending_connections`` + members + 64, its
asyncio tasks <= ``max_pending_connections`` + 3 x members + 64, its RSS <=
the baseline's + 128 MiB; every ``/metrics`` scrape answered; <= 1000 log lines
and no traceback; after the attack, fds back to the baseline's + 16.

``--quick`` (about 30 s): 6 s baseline, 10 s attack. ``--server-nofile N``
starts the server with a soft fd limit of N (e.g. 1024, a common default).
The bench raises its own soft fd limit as far as the hard limit allows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    add_json_flag,
    all_met,
    at_most,
    markdown_table,
    percentile,
    progress,
    report,
    stop_process,
    target,
    targets_table,
)
from pipeline.config import ServerConfig, traces_dir
from pipeline.model.prometheus import samples_as_written

ROOT = Path(__file__).resolve().parents[1]
TRACE = traces_dir() / "cmu02_05_punch_strike.npz"
SECRET = "bench-abuse-secret-" + "0" * 24
ROOM_A = "abuse-a"
ROOM_B = "abuse-b"
SAMPLE_S = 0.5
SCRAPE_TIMEOUT_S = 2.0
MAX_CONNECTS_PER_SLOW_CLIENT = 50
MAX_FLOOD_RECONNECTS = 200
LOG_LINES_MAX = 1000
RSS_SLACK_MB = 128.0
FD_SLACK = 64
TASK_SLACK = 64
SLOW_REQUEST = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
TRICKLE_LINE = b"X-Slow: a\r\n"


@dataclass(frozen=True)
class Params:
    baseline_s: float
    ramp_s: float
    attack_s: float
    recover_s: float
    fps: float
    slow_clients: int
    trickle_s: float
    broadcast_bytes: int
    broadcast_rate: float
    flood_rate: float
    a_subscribers: int
    max_messages_per_s: float
    trace: str


# --------------------------------------------------------------------------- the server


def raise_fd_limit(want: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    goal = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < goal:
        resource.setrlimit(resource.RLIMIT_NOFILE, (goal, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class ServerProcess:
    """``python -m pipeline serve`` with default limits, its log in a file."""

    def __init__(self, workdir: Path, nofile: int | None) -> None:
        self.log_path = workdir / "server.log"
        cfg = workdir / "server.yaml"
        cfg.write_text(f"server:\n  data_dir: {workdir / 'data'}\n", encoding="utf-8")
        env = {**os.environ, "POSEWIRE_SECRET": SECRET, "XDG_STATE_HOME": str(workdir)}

        def limit() -> None:  # in the child, before exec
            if nofile is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--host", "127.0.0.1", "--port", "0",
             "--config", str(cfg), "--log-level", "WARNING"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, preexec_fn=limit,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        port = None
        while time.monotonic() < deadline and port is None and self.proc.poll() is None:
            m = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", self.log_path.read_bytes())
            if m is not None:
                port = int(m.group(1))
            else:
                time.sleep(0.05)
        if port is None:
            self.stop()
            raise RuntimeError(f"server did not start: {self.log_path.read_text()[-2000:]}")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ps = psutil.Process(self.proc.pid)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_between(self, start: int, end: int | None = None) -> bytes:
        with open(self.log_path, "rb") as fh:
            fh.seek(start)
            return fh.read() if end is None else fh.read(max(0, end - start))

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class Sampler(threading.Thread):
    """Samples the server every :data:`SAMPLE_S`: fds, RSS, CPU (psutil), /metrics gauges."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True, name="abuse-sampler")
        self.server = server
        self.phase = "start"
        self.samples: list[dict[str, Any]] = []
        self._stop_evt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_evt.wait(SAMPLE_S):
            self.samples.append(self.sample())

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(5)

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t_s": round(time.monotonic() - self.t0, 2), "phase": self.phase}
        try:
            s["fds"] = self.server.ps.num_fds()
            s["rss_mb"] = self.server.ps.memory_info().rss / 2**20
            t = self.server.ps.cpu_times()
            s["cpu_s"] = t.user + t.system
        except psutil.Error:
            s["fds"] = s["rss_mb"] = s["cpu_s"] = None
        t0 = time.monotonic()
        try:
            url = f"{self.server.url}/metrics"
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as r:
                text = r.read().decode()
            s["scrape_ms"] = (time.monotonic() - t0) * 1000
            m = samples_as_written(text)
            s["tasks"] = m.get("posewire_server_tasks")
            s["connections"] = m.get("posewire_server_connections")
            s["members"] = m.get("posewire_server_members")
            s["pending"] = m.get("posewire_server_pending_connections")
            s["scrape_failed"] = 0
        except (OSError, ValueError):
            s["scrape_ms"] = (time.monotonic() - t0) * 1000
            s["tasks"] = s["connections"] = s["members"] = s["pending"] = None
            s["scrape_failed"] = 1
        return s


def _rejections(url: str) -> dict[str, float] | None:
    """``posewire_server_rejections_total`` by reason, or None when /metrics fails."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=SCRAPE_TIMEOUT_S) as r:
            m = samples_as_written(r.read().decode())
    except (OSError, ValueError):
        return None
    out = {}
    for k, v in m.items():
        got = re.match(r'posewire_server_rejections_total\{reason="([^"]+)"\}', k)
        if got:
            out[got.group(1)] = v
    return out


def _diff(before: dict[str, float] | None, after: dict[str, float] | None) -> str:
    if before is None or after is None:
        return "/metrics failed"
    d = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) > 0}
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(d.items())) or "none"


# --------------------------------------------------------------------------- the pair (room B)


def _pair_worker(url: str, p: Params, cmds: Any, results: Any) -> None:
    try:
        asyncio.run(_pair_main(url, p, cmds, results))
    except BaseException as exc:  # noqa: BLE001 - any failure goes back to the parent
        results.put({"fatal": f"{type(exc).__name__}: {exc}"})


async def _pair_main(url: str, p: Params, cmds: Any, results: Any) -> None:
    import numpy as np

    from pipeline.codec import CodecConfig, Encoder, peek_header
    from pipeline.errors import TransportError
    from pipeline.model.pose import PoseFrame
    from pipeline.transports.base import Packet, StateChange
    from pipeline.transports.websocket import WebSocketTransport
    from pipeline.wire.tokens import mint_token

    with np.load(p.trace) as d:
        trace = np.asarray(d["image"], np.float32)
    warm = Encoder(CodecConfig(), 21)  # compile the codec kernels before the clock starts
    warm.encode(PoseFrame(seq=1, capture_ts_ns=time.time_ns(), image=trace[0][None].copy()))
    enc = Encoder(CodecConfig(), 20)
    seq = 0
    send_failures = 0
    pub = WebSocketTransport(
        url, ROOM_B, mint_token(SECRET, room=ROOM_B, role="publisher", subject="b-pub"),
        publish=True, subscribe=False, connect_timeout_s=10.0,
    )  # fmt: skip
    sub = WebSocketTransport(
        url, ROOM_B, mint_token(SECRET, room=ROOM_B, role="subscriber", subject="b-sub"),
        connect_timeout_s=10.0, recv_queue=100_000,
    )  # fmt: skip
    await sub.connect()
    await pub.connect()
    sent_at: dict[int, int] = {}
    got: dict[int, int] = {}
    events: list[str] = []

    async def receiver() -> None:
        while True:
            item = await sub.recv()
            if isinstance(item, Packet):
                got.setdefault(peek_header(item.data).seq, item.received_ns)
            elif isinstance(item, StateChange):
                events.append(f"subscriber: {item}")

    async def drain_pub() -> None:
        while True:
            item = await pub.recv()
            if isinstance(item, StateChange):
                events.append(f"publisher: {item}")

    side = [asyncio.create_task(receiver()), asyncio.create_task(drain_pub())]
    results.put({"ready": True})
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, cmds.get)
        if cmd is None:
            break
        seconds = float(cmd)
        sent_at.clear()
        got.clear()
        events.clear()
        acks0 = pub.statistics().acks
        send_failures = 0
        start = time.monotonic()
        n = int(seconds * p.fps)
        for i in range(n):
            delay = start + i / p.fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            seq += 1
            img = trace[seq % len(trace)][None].copy()
            pkt = enc.encode(PoseFrame(seq=seq, capture_ts_ns=time.time_ns(), image=img),
                             keyframe=(i == 0))  # fmt: skip
            sent_at[seq] = time.time_ns()
            try:
                await pub.send(pkt)
            except TransportError as exc:
                send_failures += 1
                events.append(f"send failed: {exc}")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(set(got) & set(sent_at)) < len(sent_at):
            await asyncio.sleep(0.02)
        lat = [(got[s] - t) / 1e6 for s, t in sent_at.items() if s in got]
        results.put(
            {
                "sent": len(sent_at),
                "received": len(lat),
                "acks": pub.statistics().acks - acks0,
                "send_failures": send_failures,
                "latencies": lat,
                "events": events[:10],
                "pub_error": str(pub.error) if pub.error is not None else None,
                "sub_error": str(sub.error) if sub.error is not None else None,
            }
        )
    for t in side:
        t.cancel()
    await asyncio.gather(*side, return_exceptions=True)
    await pub.close()
    await sub.close()


# --------------------------------------------------------------------------- the attacker


def _attack_worker(url: str, port: int, p: Params, seconds: float, results: Any) -> None:
    try:
        raise_fd_limit(p.slow_clients * 2 + 1024)
        res = asyncio.run(_attack_main(url, port, p, seconds, results))
    except BaseException as exc:  # noqa: BLE001 - any failure goes back to the parent
        res = {"fatal": f"{type(exc).__name__}: {exc}"}
    results.put(res)


@dataclass
class Tally:
    """What one attacker did."""

    name: str
    sent: int = 0
    bytes_sent: int = 0
    received: int = 0
    connects: int = 0
    connect_failures: int = 0
    closed_by_server: int = 0
    open_at_end: int = 0
    close_codes: dict[str, int] | None = None
    lifetimes: list[float] | None = None

    def closed(self, code: Any, lifetime: float | None = None) -> None:
        self.closed_by_server += 1
        self.close_codes = self.close_codes or {}
        key = str(code)
        self.close_codes[key] = self.close_codes.get(key, 0) + 1
        if lifetime is not None:
            self.lifetimes = self.lifetimes or []
            self.lifetimes.append(lifetime)


async def _attack_main(url: str, port: int, p: Params, seconds: float, results: Any) -> Any:
    import aiohttp

    from pipeline.wire.tokens import mint_token

    deadline = time.monotonic() + seconds
    slow = Tally("slow clients")
    bcast = Tally("broadcast flood")
    flood = Tally("packet flood")
    subs = Tally("room A subscribers")

    def tok(role: str, subject: str) -> str:
        return mint_token(SECRET, room=ROOM_A, role=role, subject=subject)

    async def slow_client(i: int) -> None:
        await asyncio.sleep(i * 0.002)  # 500 connects spread over a second
        connects = 0
        while time.monotonic() < deadline and connects < MAX_CONNECTS_PER_SLOW_CLIENT:
            connects += 1
            try:
                async with asyncio.timeout(3.0):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except (OSError, TimeoutError):
                slow.connect_failures += 1
                await asyncio.sleep(0.5)
                continue
            slow.connects += 1
            t0 = time.monotonic()
            writer.write(SLOW_REQUEST)
            slow.bytes_sent += len(SLOW_REQUEST)
            answer = b""
            closed = False
            k = 0
            try:
                while time.monotonic() < deadline:
                    try:
                        async with asyncio.timeout(p.trickle_s):
                            data = await reader.read(4096)
                    except TimeoutError:
                        j = k % len(TRICKLE_LINE)
                        writer.write(TRICKLE_LINE[j : j + 1])
                        slow.sent += 1
                        slow.bytes_sent += 1
                        k += 1
                        continue
                    if not data:
                        closed = True
                        break
                    answer += data[:64]
                    slow.received += len(data)
            except ConnectionError:
                closed = True
            lifetime = time.monotonic() - t0
            if closed:
                slow.closed(_status_of(answer), lifetime)
            else:
                slow.open_at_end += 1
            writer.close()
            if closed:  # reconnect at once, or after 1 s when refused at once
                await asyncio.sleep(1.0 if lifetime < 1.0 else 0.1)

    async def member(name: str, tally: Tally, role: str, send: Any) -> None:
        reconnects = 0
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline and reconnects < MAX_FLOOD_RECONNECTS:
                reconnects += 1
                try:
                    ws = await session.ws_connect(
                        f"{url}/ws", timeout=aiohttp.ClientWSTimeout(ws_close=2.0), max_msg_size=0
                    )
                except (aiohttp.ClientError, OSError, TimeoutError):
                    tally.connect_failures += 1
                    await asyncio.sleep(0.5)
                    continue
                tally.connects += 1
                t0 = time.monotonic()
                join = {"type": "join", "token": tok(role, name), "room": ROOM_A}
                await ws.send_str(json.dumps(join | {"publish": role == "publisher"}))
                sender = asyncio.create_task(send(ws)) if send is not None else None
                code: Any = None
                try:
                    while time.monotonic() < deadline:
                        try:
                            async with asyncio.timeout(max(0.05, deadline - time.monotonic())):
                                msg = await ws.receive()
                        except TimeoutError:
                            break
                        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                            tally.received += 1
                        else:
                            code = ws.close_code
                            break
                finally:
                    if sender is not None:
                        sender.cancel()
                        await asyncio.gather(sender, return_exceptions=True)
                if code is None and not ws.closed:
                    tally.open_at_end += 1
                    await ws.close()
                    return
                tally.closed(code, time.monotonic() - t0)
                await asyncio.sleep(0.2)

    async def paced(ws: Any, rate: float, make: Any, tally: Tally) -> None:
        start = time.monotonic()
        i = 0
        while time.monotonic() < deadline and not ws.closed:
            due = int((time.monotonic() - start) * rate) + 1
            while i < due and not ws.closed:
                data = make(i)
                if isinstance(data, bytes):
                    await ws.send_bytes(data)
                else:
                    await ws.send_str(data)
                tally.sent += 1
                tally.bytes_sent += len(data)
                i += 1
            await asyncio.sleep(0.005)

    blob = json.dumps({"type": "broadcast", "data": "x" * p.broadcast_bytes})

    async def broadcaster(ws: Any) -> None:
        await paced(ws, p.broadcast_rate * p.max_messages_per_s, lambda i: blob, bcast)

    import numpy as np

    from pipeline.codec import CodecConfig, Encoder
    from pipeline.model.pose import PoseFrame

    with np.load(p.trace) as d:
        trace = np.asarray(d["image"], np.float32)
    enc = Encoder(CodecConfig(), 900)
    warm = Encoder(CodecConfig(), 901)  # compile the codec kernels before the attack starts
    warm.encode(PoseFrame(seq=1, capture_ts_ns=time.time_ns(), image=trace[0][None].copy()))
    fseq = [0]

    def next_packet(i: int) -> bytes:
        fseq[0] += 1
        img = trace[fseq[0] % len(trace)][None].copy()
        frame = PoseFrame(seq=fseq[0], capture_ts_ns=time.time_ns(), image=img)
        return enc.encode(frame, keyframe=(i == 0))

    async def flooder(ws: Any) -> None:
        await paced(ws, p.flood_rate * p.max_messages_per_s, next_packet, flood)

    async def stalled(i: int) -> None:
        """A subscriber on a raw socket with a tiny receive buffer that never reads."""
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            await reader.readuntil(b"\r\n\r\n")
            join = {"type": "join", "token": tok("subscriber", f"stalled-{i}"), "room": ROOM_A}
            writer.write(_masked_text(json.dumps(join)))
            subs.connects += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            subs.connect_failures += 1
            sock.close()
            return
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        # it never reads, so it cannot tell whether the server closed it: see the
        # attack row's ``rejections`` (``too_slow``)
        writer.close()

    tasks = [asyncio.create_task(slow_client(i)) for i in range(p.slow_clients)]
    n_read = p.a_subscribers - p.a_subscribers // 2
    tasks += [asyncio.create_task(member(f"a-sub-{i}", subs, "subscriber", None))
              for i in range(n_read)]  # fmt: skip
    tasks += [asyncio.create_task(stalled(i)) for i in range(p.a_subscribers // 2)]
    await asyncio.sleep(0.3)  # the receivers first
    tasks.append(asyncio.create_task(member("a-mod", bcast, "moderator", broadcaster)))
    tasks.append(asyncio.create_task(member("a-pub", flood, "publisher", flooder)))
    results.put({"started": True})
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"tallies": [asdict(t) for t in (slow, bcast, flood, subs)], "seconds": seconds}


def _status_of(data: bytes) -> str:
    """``eof`` or the HTTP status the server answered the slow client with."""
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data or b"")
    return f"http {m.group(1).decode()}" if m else "eof"


def _masked_text(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# --------------------------------------------------------------------------- orchestration


def _phase_stats(samples: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    ss = [s for s in samples if s["phase"] == phase]

    def mx(key: str) -> float | None:
        vals = [s[key] for s in ss if s.get(key) is not None]
        return max(vals) if vals else None

    cpu = [s["cpu_s"] for s in ss if s.get("cpu_s") is not None]
    span = (ss[-1]["t_s"] - ss[0]["t_s"]) if len(ss) > 1 else 0.0
    return {
        "server_fds_max": mx("fds"),
        "server_rss_mb_max": mx("rss_mb"),
        "server_tasks_max": mx("tasks"),
        "server_pending_max": mx("pending"),
        "server_cpu_cores": (cpu[-1] - cpu[0]) / span if len(cpu) > 1 and span > 0 else None,
        "scrape_max_ms": mx("scrape_ms"),
        "scrapes_failed": sum(s.get("scrape_failed", 0) for s in ss),
        "fds_last": ss[-1]["fds"] if ss else None,
    }


def _pair_row(name: str, res: dict[str, Any]) -> dict[str, Any]:
    lat = res["latencies"]
    sent = res["sent"]
    return {
        "name": name,
        "sent": sent,
        "delivered_fraction": res["received"] / sent if sent else None,
        "lost": sent - res["received"],
        "relay_p50_ms": percentile(lat, 50),
        "relay_p95_ms": percentile(lat, 95),
        "relay_p99_ms": percentile(lat, 99),
        "relay_max_ms": max(lat) if lat else None,
        "acked": res["acks"],
        "send_failures": res["send_failures"],
    }


def _log_figures(log: bytes) -> dict[str, Any]:
    return {
        "log_lines": log.count(b"\n"),
        "log_kb": len(log) / 1024,
        "tracebacks": log.count(b"Traceback"),
        "accept_errors": log.count(b"accept() out of system resource"),
    }


Rows = list[dict[str, Any]]


def run(p: Params, nofile: int | None) -> tuple[Rows, Rows, dict[str, Any]]:
    limits = raise_fd_limit(p.slow_clients * 2 + 1024)
    cfg = ServerConfig()  # type: ignore[call-arg]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="posewire-abuse-") as tmp:
        server = ServerProcess(Path(tmp), nofile)
        sampler = Sampler(server)
        pair_cmds, pair_res, attack_res = ctx.Queue(), ctx.Queue(), ctx.Queue()
        pair = ctx.Process(target=_pair_worker, args=(server.url, p, pair_cmds, pair_res))
        attacker: Any = None
        try:
            pair.start()
            ready = pair_res.get(timeout=120)
            if "fatal" in ready:
                raise RuntimeError(f"pair process failed: {ready['fatal']}")
            sampler.start()
            offsets = {"baseline": server.log_size()}
            sampler.phase = "baseline"
            total_s = p.baseline_s + p.ramp_s + p.attack_s + p.recover_s
            progress(0, total_s, "baseline")
            pair_cmds.put(p.baseline_s)
            base = pair_res.get(timeout=p.baseline_s + 60)
            if "fatal" in base:
                raise RuntimeError(f"pair process failed: {base['fatal']}")
            offsets["attack"] = server.log_size()
            sampler.phase = "ramp"
            progress(p.baseline_s, total_s, "attack starting")
            total = p.ramp_s + p.attack_s + 1.0
            attacker = ctx.Process(
                target=_attack_worker, args=(server.url, server.port, p, total, attack_res)
            )
            attacker.start()
            started = attack_res.get(timeout=120)
            if "fatal" in started:
                raise RuntimeError(f"attack process failed: {started['fatal']}")
            rej0 = _rejections(server.url)
            time.sleep(p.ramp_s)
            sampler.phase = "attack"
            progress(p.baseline_s + p.ramp_s, total_s, "attack")
            pair_cmds.put(p.attack_s)
            under = pair_res.get(timeout=p.attack_s + 60)
            if "fatal" in under:
                raise RuntimeError(f"pair process failed: {under['fatal']}")
            attack = attack_res.get(timeout=total + 60)
            if "fatal" in attack:
                raise RuntimeError(f"attack process failed: {attack['fatal']}")
            attacker.join(30)
            rejected = _diff(rej0, _rejections(server.url))
            offsets["after"] = server.log_size()
            sampler.phase = "after"
            progress(total_s - p.recover_s, total_s, "after the attack")
            time.sleep(p.recover_s)
            sampler.phase = "end"
            pair_cmds.put(None)
            pair.join(30)
            sampler.stop()
            alive = server.proc.poll() is None
            offsets["end"] = server.log_size()
        finally:
            if sampler.is_alive():
                sampler.stop()
            for proc in (pair, attacker):
                if proc is not None and proc.is_alive():
                    proc.terminate()
                    proc.join(10)
            server.stop()
        logs = {
            "baseline": server.log_between(offsets["baseline"], offsets["attack"]),
            "attack": server.log_between(offsets["attack"], offsets["after"]),
            "after": server.log_between(offsets["after"], offsets["end"]),
        }
        tail = "\n".join(server.log_between(0).decode("utf-8", "replace").splitlines()[-8:])
    samples = sampler.samples
    members = 2 + 2 + p.a_subscribers
    fd_bound = cfg.max_pending_connections + members + FD_SLACK
    task_bound = cfg.max_pending_connections + 3 * members + TASK_SLACK
    b = _pair_row("baseline: pair alone", base) | _phase_stats(samples, "baseline")
    b |= _log_figures(logs["baseline"])
    a = _pair_row("attack: pair + abuse", under) | _phase_stats(samples, "attack")
    a |= _log_figures(logs["attack"]) | {"rejections": rejected}
    after = {"name": "after: abuse stopped"} | _phase_stats(samples, "after")
    after |= _log_figures(logs["after"])
    rows = [b, a, after]
    for t in attack["tallies"]:
        lifetimes = t.pop("lifetimes") or []
        codes = t.pop("close_codes") or {}
        rows.append(
            t
            | {
                "sent_per_s": t["sent"] / attack["seconds"],
                "mb_sent": t.pop("bytes_sent") / 2**20,
                "lifetime_p50_s": percentile(lifetimes, 50),
                "lifetime_max_s": max(lifetimes) if lifetimes else None,
                "close_codes": ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())) or "-",
            }
        )
    rss_bound = (b["server_rss_mb_max"] or 0.0) + RSS_SLACK_MB
    targets = [
        at_most("attack: pair p99 relay latency (ms)", a["relay_p99_ms"], 5),
        target("attack: pair packets lost", a["lost"], "== 0", a["lost"] == 0),
        _bounded("attack: server fds max", a["server_fds_max"], fd_bound,
                 f"max_pending_connections {cfg.max_pending_connections} + {members} members"
                 f" + {FD_SLACK}"),
        _bounded("attack: server asyncio tasks max", a["server_tasks_max"], task_bound,
                 f"max_pending_connections + 3 x {members} members + {TASK_SLACK}"),
        _bounded("attack: server RSS max (MiB)", a["server_rss_mb_max"], rss_bound,
                 f"baseline + {RSS_SLACK_MB:g}"),
        target("attack: /metrics scrapes failed", a["scrapes_failed"], "== 0",
               a["scrapes_failed"] == 0),
        at_most("attack: server log lines", a["log_lines"], LOG_LINES_MAX),
        target("server alive, no traceback in its log",
               f"alive={alive}, tracebacks={sum(r.get('tracebacks', 0) for r in rows[:3])}",
               "alive, 0", alive and all(r.get("tracebacks", 0) == 0 for r in rows[:3])),
        _bounded("after: server fds", after["fds_last"], (b["server_fds_max"] or 0) + 16,
                 "baseline + 16"),
    ]  # fmt: skip
    extra = {
        "params": asdict(p) | {"server_nofile": nofile, "bench_nofile": list(limits)},
        "server_limits": {
            "max_pending_connections": cfg.max_pending_connections,
            "header_timeout_s": cfg.header_timeout_s,
            "max_connections": cfg.max_connections,
            "max_messages_per_s": cfg.max_messages_per_s,
        },
        "series": samples,
        "pair_events": {"baseline": base["events"], "attack": under["events"]},
        "server_log_tail": tail,
    }
    return rows, targets, extra


def _bounded(name: str, value: float | None, bound: float, why: str) -> dict[str, Any]:
    if value is None:
        return target(name, None, f"<= {bound:g} ({why})", False)
    return target(name, value, f"<= {bound:g} ({why})", value <= bound)


PAIR_COLUMNS = [
    "name", "sent", "delivered_fraction", "lost", "acked", "send_failures", "relay_p50_ms",
    "relay_p95_ms", "relay_p99_ms", "relay_max_ms", "server_fds_max", "server_rss_mb_max",
    "server_tasks_max",
    "server_pending_max", "server_cpu_cores", "scrape_max_ms", "scrapes_failed", "log_lines",
    "tracebacks", "accept_errors", "rejections",
]  # fmt: skip
ATTACK_COLUMNS = [
    "name", "connects", "connect_failures", "sent", "sent_per_s", "mb_sent", "received",
    "closed_by_server", "open_at_end", "lifetime_p50_s", "lifetime_max_s", "close_codes",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench abuse", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="about 30 s (6 s baseline, 10 s attack)"
    )
    parser.add_argument("--baseline-s", type=float, default=15.0)
    parser.add_argument("--attack-s", type=float, default=30.0)
    parser.add_argument("--ramp-s", type=float, default=3.0)
    parser.add_argument("--recover-s", type=float, default=6.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--slow-clients", type=int, default=500)
    parser.add_argument("--trickle-s", type=float, default=1.0)
    parser.add_argument("--broadcast-bytes", type=int, default=60_000)
    parser.add_argument("--broadcast-rate", type=float, default=0.9,
                        help="x max_messages_per_s (0.9)")  # fmt: skip
    parser.add_argument("--flood-rate", type=float, default=1.25,
                        help="x max_messages_per_s (1.25)")  # fmt: skip
    parser.add_argument("--a-subscribers", type=int, default=8)
    parser.add_argument("--server-nofile", type=int, default=None,
                        help="the server's soft fd limit (default: inherited)")  # fmt: skip
    parser.add_argument("--trace", type=Path, default=TRACE)
    add_json_flag(parser)
    args = parser.parse_args(argv)
    if not args.trace.exists():
        print(f"trace not found: {args.trace}", file=sys.stderr)
        return 2
    if args.quick:
        args.baseline_s, args.attack_s, args.ramp_s, args.recover_s = 6.0, 10.0, 2.0, 3.0
    p = Params(
        baseline_s=args.baseline_s, ramp_s=args.ramp_s, attack_s=args.attack_s,
        recover_s=args.recover_s, fps=args.fps, slow_clients=args.slow_clients,
        trickle_s=args.trickle_s, broadcast_bytes=args.broadcast_bytes,
        broadcast_rate=args.broadcast_rate, flood_rate=args.flood_rate,
        a_subscribers=args.a_subscribers,
        max_messages_per_s=ServerConfig().max_messages_per_s,  # type: ignore[call-arg]
        trace=str(args.trace),
    )  # fmt: skip
    rows, targets, extra = run(p, args.server_nofile)
    title = "abuse: one room server under slow clients and floods; a legitimate pair beside"
    if args.json:
        report("abuse", rows, targets, as_json=True, title=title, **extra)
    else:
        report("abuse", rows, targets, file=io.StringIO(), **extra)  # saved for the harness
        print(f"## {title}\n")
        print(markdown_table(rows[:3], [c for c in PAIR_COLUMNS if any(c in r for r in rows[:3])]))
        print()
        print(markdown_table(rows[3:], ATTACK_COLUMNS))
        print("\ntargets:\n")
        print(targets_table(targets))
    return 0 if all_met(targets) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise SystemExit(main())
