"""Processes that tests/test_netns.py runs inside the namespace hosts (bench/netns.py).

    python -m tests.netns_peer rtc --role offer|answer [--max-seconds S]
                                  [--ice-servers JSON] [--relay-only] [--open-timeout S]
    python -m tests.netns_peer udp-echo --port P [--count N] [--max-seconds S]
    python -m tests.netns_peer udp-ping --to ADDR --port P [--count N]
    python -m tests.netns_peer outside --to ADDR

Every process talks JSON lines: commands on stdin ({"cmd": ...}), events on stdout
({"ev": ...}). Times are `time.monotonic_ns()`, which is one clock for every process
on the machine (the namespaces share it), so the parent and both peers can compare them.

The `rtc` peer is one aiortc RTCPeerConnection (iceServers=[] unless --ice-servers
gives a JSON list of {"urls", "username", "credential"}: no STUN, no internet; with
--relay-only iceTransportPolicy "relay", i.e. TURN relay candidates only) with two
negotiated data channels, the shape the WebRTC transport will have:

* ``pose`` (id 0, ordered=False, maxRetransmits=0): 64-byte datagrams
  ``!BIq`` (kind, seq, send time ns); kind 0 is data, which the other side records
  (one-way latency) and echoes back as kind 1 (the sender records the round trip);
* ``control`` (id 1, reliable, ordered): JSON text; an application heartbeat every
  HEARTBEAT_MS from both sides; a side that hears nothing on it for
  HEARTBEAT_TIMEOUT_MS reports {"ev": "dead"} (and {"ev": "alive"} when it hears
  again). aiortc's ICE consent checks need ~30 s to notice a dead path; this is
  the mechanism the transport needs instead.

Every sending loop is bounded in count and in time (--max-seconds; the process
exits by itself then, and when its stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import selectors
import socket
import struct
import sys
import time
from typing import Any

#: heartbeat period and the silence after which the path is declared dead
HEARTBEAT_MS = 50
HEARTBEAT_TIMEOUT_MS = 150
#: how often the silence is checked
WATCH_MS = 5

POSE = struct.Struct("!BIq")
POSE_SIZE = 64
DATA, ECHO = 0, 1


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def now_ns() -> int:
    return time.monotonic_ns()


class RtcPeer:
    def __init__(
        self,
        role: str,
        max_seconds: float,
        ice_servers: list[dict[str, Any]] | None = None,
        relay_only: bool = False,
        open_timeout: float = 15.0,
    ) -> None:
        from aiortc import (
            RTCConfiguration,
            RTCIceServer,
            RTCIceTransportPolicy,
            RTCPeerConnection,
        )

        self.role = role
        self.max_seconds = max_seconds
        self.open_timeout = open_timeout
        self.started = time.monotonic()
        # an explicit list (empty by default): without it aiortc asks a public STUN server
        servers = [RTCIceServer(**server) for server in ice_servers or []]
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers, iceTransportPolicy=policy))
        self.pose = self.pc.createDataChannel(
            "pose", ordered=False, maxRetransmits=0, negotiated=True, id=0
        )
        self.control = self.pc.createDataChannel("control", negotiated=True, id=1)
        self.opened: asyncio.Event = asyncio.Event()
        self.stop: asyncio.Event = asyncio.Event()
        self.latency_ms: dict[int, float] = {}  # seq -> one-way latency of data received
        self.rtt_ms: dict[int, float] = {}  # seq -> round trip of data sent and echoed back
        self.pongs_ms: list[float] = []
        self.last_heard_ns = 0
        self.dead = False
        self.tasks: list[asyncio.Task[None]] = []

        for channel in (self.pose, self.control):
            channel.on("open", self._on_open)
        self.pose.on("message", self._on_pose)
        self.control.on("message", self._on_control)

    def _on_open(self) -> None:
        if self.pose.readyState == "open" and self.control.readyState == "open":
            self.opened.set()

    def _on_pose(self, message: bytes | str) -> None:
        if not isinstance(message, bytes) or len(message) < POSE.size:
            return
        kind, seq, sent = POSE.unpack_from(message)
        elapsed_ms = (now_ns() - sent) / 1e6
        if kind == DATA:
            self.latency_ms[seq] = elapsed_ms
            self.pose.send(POSE.pack(ECHO, seq, sent).ljust(POSE_SIZE, b"\0"))
        elif kind == ECHO:
            self.rtt_ms[seq] = elapsed_ms

    def _on_control(self, message: bytes | str) -> None:
        self.last_heard_ns = now_ns()
        if self.dead:
            self.dead = False
            emit({"ev": "alive", "t_ns": self.last_heard_ns})
        if not isinstance(message, str):
            return
        body = json.loads(message)
        if "ping" in body:
            self.control.send(json.dumps({"pong": body["ping"], "t": body["t"]}))
        elif "pong" in body:
            self.pongs_ms.append((now_ns() - int(body["t"])) / 1e6)

    def time_left(self) -> float:
        return self.max_seconds - (time.monotonic() - self.started)

    # -- tasks -----------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Send a heartbeat every HEARTBEAT_MS (bounded: max_seconds / period beats)."""
        beats = int(self.max_seconds * 1000 / HEARTBEAT_MS)
        for seq in range(beats):
            if self.stop.is_set() or self.time_left() <= 0:
                return
            if self.control.readyState != "open":
                return
            self.control.send(json.dumps({"hb": seq, "t": now_ns()}))
            await asyncio.sleep(HEARTBEAT_MS / 1000)

    async def watch(self) -> None:
        """Report {"ev": "dead"} once the control channel was silent too long."""
        while not self.stop.is_set() and self.time_left() > 0:
            await asyncio.sleep(WATCH_MS / 1000)
            silent_ns = now_ns() - self.last_heard_ns
            if not self.dead and silent_ns > HEARTBEAT_TIMEOUT_MS * 1_000_000:
                self.dead = True
                emit({"ev": "dead", "t_ns": now_ns(), "last_heard_ns": self.last_heard_ns})

    async def stream(self, count: int, hz: float, grace_s: float) -> None:
        """Send `count` pose datagrams at `hz` on an absolute schedule, then report."""
        period_ns = int(1e9 / hz)
        start = now_ns()
        deadline = start + count * period_ns + 5_000_000_000
        sent = 0
        for seq in range(count):
            due = start + seq * period_ns
            wait = (due - now_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
            if now_ns() > deadline or self.pose.readyState != "open":
                break
            self.pose.send(POSE.pack(DATA, seq, now_ns()).ljust(POSE_SIZE, b"\0"))
            sent += 1
        await asyncio.sleep(grace_s)
        emit({"ev": "streamed", "sent": sent, "rtt_ms": list(self.rtt_ms.values())})

    async def ping(self, count: int, interval_s: float) -> None:
        """`count` pings on the reliable control channel; reports the round trips."""
        self.pongs_ms.clear()
        for n in range(count):
            self.control.send(json.dumps({"ping": n, "t": now_ns()}))
            await asyncio.sleep(interval_s)
        await asyncio.sleep(0.2)
        emit({"ev": "pinged", "sent": count, "rtt_ms": list(self.pongs_ms)})

    # -- signaling and commands -------------------------------------------------------

    async def run(self) -> None:
        from aiortc import RTCSessionDescription

        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        if self.role == "offer":
            await self.pc.setLocalDescription(await self.pc.createOffer())
            emit({"ev": "sdp", "type": "offer", "sdp": self.pc.localDescription.sdp})
        begun = now_ns()
        while not self.stop.is_set():
            try:
                line = await asyncio.wait_for(
                    reader.readline(), timeout=max(self.time_left(), 0.01)
                )
            except TimeoutError:
                break
            if not line:
                break  # the parent is gone
            command = json.loads(line)
            name = command.get("cmd")
            if name == "sdp":
                await self.pc.setRemoteDescription(
                    RTCSessionDescription(sdp=command["sdp"], type=command["type"])
                )
                if self.role == "answer":
                    await self.pc.setLocalDescription(await self.pc.createAnswer())
                    emit({"ev": "sdp", "type": "answer", "sdp": self.pc.localDescription.sdp})
                self.tasks.append(asyncio.create_task(self._when_open(begun)))
            elif name == "stream":
                self.tasks.append(
                    asyncio.create_task(
                        self.stream(
                            int(command["count"]),
                            float(command["hz"]),
                            float(command.get("grace_s", 0.5)),
                        )
                    )
                )
            elif name == "ping":
                self.tasks.append(
                    asyncio.create_task(
                        self.ping(int(command["count"]), float(command["interval_s"]))
                    )
                )
            elif name == "report":
                emit(
                    {
                        "ev": "received",
                        "latency_ms": list(self.latency_ms.values()),
                        "seqs": sorted(self.latency_ms),
                    }
                )
            elif name == "quit":
                break
        self.stop.set()
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.pc.close()

    async def _when_open(self, begun: int) -> None:
        try:
            await asyncio.wait_for(self.opened.wait(), timeout=self.open_timeout)
        except TimeoutError:
            emit({"ev": "no-open", "ice": self.pc.iceConnectionState})
            return
        self.last_heard_ns = now_ns()
        emit(
            {
                "ev": "open",
                "connect_ms": (now_ns() - begun) / 1e6,
                "ice": self.pc.iceConnectionState,
                "pair": self.selected_pair(),
            }
        )
        self.tasks.append(asyncio.create_task(self.heartbeat()))
        self.tasks.append(asyncio.create_task(self.watch()))

    def selected_pair(self) -> dict[str, Any] | None:
        """The nominated ICE candidate pair: each side's type, address and port.

        aiortc has no getStats() entry for it yet, so this reads aioice's connection
        (private attributes: a test helper, not the transport).
        """
        sctp = self.pc.sctp
        if sctp is None:
            return None
        connection = sctp.transport.transport._connection
        pair = connection._nominated.get(1)
        if pair is None:
            return None
        local, remote = pair.local_candidate, pair.remote_candidate
        return {
            "local": {"type": local.type, "address": local.host, "port": local.port},
            "remote": {"type": remote.type, "address": remote.host, "port": remote.port},
        }


async def _rtc(args: argparse.Namespace) -> None:
    # built inside the running loop: aiortc binds futures to it
    peer = RtcPeer(
        args.role,
        args.max_seconds,
        ice_servers=json.loads(args.ice_servers),
        relay_only=args.relay_only,
        open_timeout=args.open_timeout,
    )
    await peer.run()


def udp_echo(port: int, count: int, max_seconds: float) -> None:
    """Echo up to `count` datagrams for at most `max_seconds`, or until stdin quits."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        selectors.DefaultSelector() as sel,
    ):
        sock.bind(("0.0.0.0", port))
        sel.register(sock, selectors.EVENT_READ)
        sel.register(sys.stdin, selectors.EVENT_READ)
        emit({"ev": "ready", "port": port})
        deadline = time.monotonic() + max_seconds
        echoed = 0
        while echoed < count and time.monotonic() < deadline:
            ready = sel.select(timeout=max(deadline - time.monotonic(), 0.01))
            if any(key.fileobj is sys.stdin for key, _ in ready):
                line = sys.stdin.readline()
                if not line or json.loads(line).get("cmd") == "quit":
                    break
            if any(key.fileobj is sock for key, _ in ready):
                data, source = sock.recvfrom(2048)
                sock.sendto(data, source)
                echoed += 1
        emit({"ev": "echoed", "count": echoed})


def udp_ping(address: str, port: int, count: int) -> None:
    """`count` datagrams to address:port, one at a time, 1 s timeout each."""
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        for n in range(count):
            sent = now_ns()
            sock.sendto(n.to_bytes(4, "big"), (address, port))
            with contextlib.suppress(TimeoutError):
                data, _ = sock.recvfrom(2048)
                if int.from_bytes(data[:4], "big") == n:
                    rtts.append((now_ns() - sent) / 1e6)
    emit({"ev": "pinged", "sent": count, "rtt_ms": rtts})


def outside(address: str) -> None:
    """Whether `address` has a route: connect() on a UDP socket sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))
        except OSError as error:
            emit(
                {
                    "ev": "outside",
                    "reachable": False,
                    "errno": errno.errorcode.get(error.errno or 0, ""),
                }
            )
            return
    emit({"ev": "outside", "reachable": True, "errno": ""})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netns_peer")
    sub = parser.add_subparsers(dest="what", required=True)
    rtc = sub.add_parser("rtc")
    rtc.add_argument("--role", choices=("offer", "answer"), required=True)
    rtc.add_argument("--max-seconds", type=float, default=60.0)
    rtc.add_argument("--ice-servers", default="[]", help="JSON list of RTCIceServer fields")
    rtc.add_argument("--relay-only", action="store_true", help='iceTransportPolicy "relay"')
    rtc.add_argument("--open-timeout", type=float, default=15.0)
    echo = sub.add_parser("udp-echo")
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--count", type=int, default=100)
    echo.add_argument("--max-seconds", type=float, default=10.0)
    ping = sub.add_parser("udp-ping")
    ping.add_argument("--to", required=True)
    ping.add_argument("--port", type=int, required=True)
    ping.add_argument("--count", type=int, default=5)
    away = sub.add_parser("outside")
    away.add_argument("--to", required=True)
    args = parser.parse_args(argv)
    if args.what == "rtc":
        asyncio.run(_rtc(args))
    elif args.what == "udp-echo":
        udp_echo(args.port, args.count, args.max_seconds)
    elif args.what == "udp-ping":
        udp_ping(args.to, args.port, args.count)
    else:
        outside(args.to)


if __name__ == "__main__":
    main()
