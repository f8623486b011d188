"""A delay fault for the namespace lab (bench/netns.py): NFQUEUE in the router namespace.

netem is not in this kernel, and neither is nft's native `queue` statement
(CONFIG_NFT_QUEUE is off), but nf_tables' xtables bridge (CONFIG_NFT_COMPAT) and the
`NFQUEUE` target (CONFIG_NETFILTER_XT_TARGET_NFQUEUE) and nfnetlink_queue are built
in. So::

    python -m bench.delay --queue N --delay-ms D [--jitter-ms J] [--proto udp]
                          [--link oifname:hb] [--link iifname:hb]
                          [--max-in-flight M] [--max-seconds S]

run inside the router namespace (`Topology.delay` starts it), does, in pure Python
over AF_NETLINK / NETLINK_NETFILTER (no compiled dependency):

1. binds nfnetlink_queue number N (copy mode: the first 64 bytes of each packet, which
   hold the IPv4 and UDP/TCP headers, i.e. the flow);
2. creates its own table ``ip pw_delay<N>`` with a forward chain (priority 10: after the
   lab's drop rules, which have priority 0, so a dropped packet is never held) and adds
   one rule per `--link` (none: every forwarded packet of the protocol), written as raw
   nf_tables netlink: ``meta l4proto P [meta oifname|iifname X] xt target NFQUEUE``
   (queue N, with queue-bypass: if this program dies, packets pass undelayed rather
   than vanish);
3. holds each queued packet and sends its NF_ACCEPT verdict at arrival + delay (+ a
   uniform jitter in [-J, +J] ms, never earlier than the previous packet of the same
   flow: a flow's packets leave in order);
4. on exit (``{"cmd": "quit"}``, stdin closed, SIGTERM, `--max-seconds`) deletes its
   table first, then releases every held packet at once.

Bounded: at most `--max-in-flight` packets held (more are dropped, counted, as a full
router queue would) and `--max-seconds` of life. JSON lines: ``{"ev": "ready"}`` once
the rules are in place, ``{"cmd": "stats"}`` -> ``{"ev": "stats", ...}`` (packets,
drops, hold error percentiles, CPU per packet), ``{"cmd": "set", "delay_ms",
"jitter_ms"}`` changes the delay of the packets queued from then on, and
``{"ev": "done", ...}`` (the same figures) at exit.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.netns import Host, Peer

#: every delay table of the lab starts with this (``pw_delay<queue>``)
DELAY_TABLE = "pw_delay"
#: after the lab's fault chain (priority 0): a packet it drops is never queued
CHAIN_PRIORITY = 10
PROTOCOL_NUMBERS = {"udp": 17, "tcp": 6}
LINK_KEYS = ("iifname", "oifname")

# -- netlink constants (linux/netlink.h, linux/netfilter/nfnetlink*.h, nf_tables.h) --------
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_SUBSYS_QUEUE, NFNL_SUBSYS_NFTABLES = 3, 10
NFT_MSG_NEWRULE = 6
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NF_DROP, NF_ACCEPT = 0, 1
NFQ_FLAG_BYPASS = 0x01
COPY_RANGE = 64
#: see DelayQueue.next_wait
WAKE_LEAD_NS = 1_000_000
NLMSG = struct.Struct("=IHHII")
NLA = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    body = NLA.pack(NLA.size + len(payload), kind) + payload
    return body + b"\0" * (-len(body) % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _be32(value: int) -> bytes:
    return struct.pack("!I", value)


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = struct.pack("!BBH", family, 0, res_id) + attrs
    return NLMSG.pack(NLMSG.size + len(body), kind, flags, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    """Top-level netlink attributes of a message body: type (without flags) -> payload."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + NLA.size <= len(data):
        length, kind = NLA.unpack_from(data, offset)
        if length < NLA.size:
            break
        found[kind & 0x3FFF] = data[offset + NLA.size : offset + length]
        offset += (length + 3) & ~3
    return found


# -- the rule: meta l4proto P [meta iifname|oifname X] xt target NFQUEUE -------------------


def _expr(name: str, *data: bytes) -> bytes:
    return _nest(1, _attr(1, name.encode() + b"\0"), _nest(2, *data))  # LIST_ELEM{NAME, DATA}


def _meta_cmp(key: int, value: bytes) -> bytes:
    load = _expr("meta", _attr(2, _be32(key)), _attr(1, _be32(1)))  # KEY, DREG reg 1
    compare = _expr("cmp", _attr(1, _be32(1)), _attr(2, _be32(0)), _nest(3, _attr(1, value)))
    return load + compare  # SREG 1, OP eq, DATA{VALUE}


def rule_message(
    seq: int, table: str, proto: str, link: tuple[str, str] | None, queue: int
) -> bytes:
    """NFT_MSG_NEWRULE appending the queueing rule to ``ip <table> forward``."""
    exprs = _meta_cmp(16, bytes([PROTOCOL_NUMBERS[proto]]))  # NFT_META_L4PROTO
    if link is not None:
        key, name = link
        exprs += _meta_cmp(6 if key == "iifname" else 7, name.encode().ljust(16, b"\0"))
    info = struct.pack("=HHH", queue, 1, NFQ_FLAG_BYPASS).ljust(8, b"\0")  # xt_NFQ_info_v3
    exprs += _expr("target", _attr(1, b"NFQUEUE\0"), _attr(2, _be32(3)), _attr(3, info))
    attrs = (
        _attr(1, table.encode() + b"\0")  # NFTA_RULE_TABLE
        + _attr(2, b"forward\0")  # NFTA_RULE_CHAIN
        + _nest(4, exprs)  # NFTA_RULE_EXPRESSIONS
    )
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK
    return _message(kind, flags, seq, socket.AF_INET, 0, attrs)


def add_rules(proto: str, links: Sequence[tuple[str, str] | None], queue: int) -> None:
    """Append the queueing rules to this namespace's ``ip pw_delay<queue>`` (one batch)."""
    table = f"{DELAY_TABLE}{queue}"
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        res = NFNL_SUBSYS_NFTABLES
        batch = _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0, res, b"")
        rules = [rule_message(2 + n, table, proto, link, queue) for n, link in enumerate(links)]
        batch += b"".join(rules)
        batch += _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 2 + len(rules), 0, res, b"")
        sock.sendall(batch)
        for _ in rules:  # one ack (or error) per rule
            reply = sock.recv(65536)
            _, kind, _, _, _ = NLMSG.unpack_from(reply)
            (error,) = struct.unpack_from("=i", reply, NLMSG.size)
            if kind == NLMSG_ERROR and error != 0:
                raise OSError(-error, f"nf_tables rule with NFQUEUE: {os.strerror(-error)}")


def nft(script: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True)
    if done.returncode != 0:
        raise OSError(f"nft: {done.stderr.strip()}")


def create_table(queue: int) -> None:
    table = f"ip {DELAY_TABLE}{queue}"
    nft(
        f"add table {table}\n"
        f"add chain {table} forward "
        f"{{ type filter hook forward priority {CHAIN_PRIORITY}; policy accept; }}\n"
    )


def delete_table(queue: int) -> None:
    subprocess.run(["nft", "delete", "table", "ip", f"{DELAY_TABLE}{queue}"], capture_output=True)


# -- the handle the lab returns (Topology.delay) ------------------------------------------


class DelayFault:
    """A running delay reader in the router namespace: figures, live changes, stop."""

    def __init__(self, peer: Peer, router: Host, queue: int) -> None:
        self.peer = peer
        self.router = router
        self.queue = queue
        self.table = f"{DELAY_TABLE}{queue}"
        self.final: dict[str, Any] | None = None

    def wait_ready(self, timeout: float = 10.0) -> None:
        self.peer.expect("ready", timeout=timeout)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """Packets queued, released, dropped on overflow; hold error p50/p95/max (ms: the
        verdict's time minus the planned release); the reader's CPU seconds and per packet."""
        self.peer.send({"cmd": "stats"})
        return self.peer.expect("stats", timeout=timeout)

    def set(self, delay_ms: float, jitter_ms: float = 0.0) -> dict[str, Any]:
        """Change the delay (packets queued from now on); returns the figures so far."""
        check(delay_ms, jitter_ms)
        self.peer.send({"cmd": "set", "delay_ms": delay_ms, "jitter_ms": jitter_ms})
        return self.peer.expect("stats", timeout=5.0)

    def close(self) -> dict[str, Any]:
        """Stop the reader (it deletes its table, then releases what it holds); its last
        figures. The table is deleted here too, in case the reader was killed."""
        if self.final is None:
            self.final = {}
            self.peer.ask_to_quit()
            try:
                self.final = self.peer.expect("done", timeout=3.0)
            finally:
                self.peer.close()
                self.router.run(["nft", "delete", "table", "ip", self.table], check=False)
        return self.final


def check(delay_ms: float, jitter_ms: float) -> None:
    if not 0 <= delay_ms <= 10_000:
        raise ValueError(f"delay {delay_ms} ms not in 0..10000")
    if not 0 <= jitter_ms <= delay_ms:
        raise ValueError(f"jitter {jitter_ms} ms not in 0..delay ({delay_ms} ms)")


def reader_args(
    queue: int,
    delay_ms: float,
    jitter_ms: float,
    proto: str,
    links: Sequence[tuple[str, str]],
    max_seconds: float,
) -> list[str]:
    """The command line of `python -m bench.delay` (links: (iifname|oifname, veth))."""
    check(delay_ms, jitter_ms)
    if proto not in PROTOCOL_NUMBERS:
        raise ValueError(f"protocol {proto!r}: one of {', '.join(sorted(PROTOCOL_NUMBERS))}")
    args = ["--queue", str(queue), "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms)]
    args += ["--proto", proto, "--max-seconds", str(max_seconds)]
    for key, name in links:
        args += ["--link", f"{key}:{name}"]
    return args


# -- the queue reader ----------------------------------------------------------------------


def flow_of(packet: bytes) -> tuple[bytes, bytes]:
    """(addresses + protocol, ports) of an IPv4 packet's first bytes: its flow."""
    if len(packet) < 20:
        return packet, b""
    header = (packet[0] & 0x0F) * 4
    return packet[9:10] + packet[12:20], packet[header : header + 4]


def kernel_dropped(queue: int) -> int:
    """Packets the kernel dropped on this queue: queue full, or not deliverable to us
    (/proc/net/netfilter/nfnetlink_queue: queue_dropped + user_dropped)."""
    with open("/proc/net/netfilter/nfnetlink_queue", encoding="ascii") as table:
        for line in table:
            fields = line.split()
            if fields and int(fields[0]) == queue:
                return int(fields[5]) + int(fields[6])
    return 0


@dataclass
class Figures:
    queued: int = 0
    released: int = 0
    overflow_dropped: int = 0
    errors_ms: list[float] = field(default_factory=list)  # actual hold - planned hold

    def summary(self, cpu_s: float, queue: int) -> dict[str, Any]:
        ordered = sorted(self.errors_ms)

        def pct(q: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)], 3)

        return {
            "queued": self.queued,
            "released": self.released,
            "overflow_dropped": self.overflow_dropped,
            "kernel_dropped": kernel_dropped(queue),
            "hold_error_p50_ms": pct(50),
            "hold_error_p95_ms": pct(95),
            "hold_error_max_ms": round(max(ordered), 3) if ordered else None,
            "cpu_s": round(cpu_s, 4),
            "cpu_us_per_packet": round(cpu_s / self.queued * 1e6, 1) if self.queued else None,
        }


class DelayQueue:
    """Binds one nfnetlink queue and releases its packets after the delay."""

    def __init__(self, queue: int, delay_ms: float, jitter_ms: float, max_in_flight: int) -> None:
        self.queue = queue
        self.delay_ns = int(delay_ms * 1e6)
        self.jitter_ns = int(jitter_ms * 1e6)
        self.max_in_flight = max_in_flight
        self.held: list[tuple[int, int, int]] = []  # (release time, arrival order, packet id)
        self.flow_last: dict[tuple[bytes, bytes], int] = {}
        self.order = 0
        self.figures = Figures()
        self.rng = random.Random()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
        flags = NLM_F_REQUEST | NLM_F_ACK
        bind = _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET))
        params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET))
        maxlen = _attr(NFQA_CFG_QUEUE_MAXLEN, _be32(max_in_flight))
        for seq, attrs in enumerate((bind, params, maxlen), start=1):
            self.sock.send(_message(kind, flags, seq, socket.AF_UNSPEC, queue, attrs))
            reply = self.sock.recv(65536)
            (error,) = struct.unpack_from("=i", reply, NLMSG.size)
            if error != 0:
                raise OSError(-error, f"nfnetlink_queue {queue}: {os.strerror(-error)}")
        self.sock.setblocking(False)

    def set_delay(self, delay_ms: float, jitter_ms: float) -> None:
        self.delay_ns, self.jitter_ns = int(delay_ms * 1e6), int(jitter_ms * 1e6)

    def verdict(self, packet_id: int, verdict: int) -> None:
        kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
        self.sock.send(_message(kind, NLM_F_REQUEST, 0, socket.AF_UNSPEC, self.queue, attrs))

    def receive(self) -> None:
        """Take every queued packet the socket has now and schedule its release."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            arrived = time.monotonic_ns()
            offset = 0
            while offset + NLMSG.size <= len(data):
                length, kind, _, _, _ = NLMSG.unpack_from(data, offset)
                if length < NLMSG.size:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    self._hold(data[offset + NLMSG.size + 4 : offset + length], arrived)
                offset += (length + 3) & ~3

    def _hold(self, body: bytes, arrived: int) -> None:
        attrs = _attrs(body)
        (packet_id,) = struct.unpack_from("!I", attrs[NFQA_PACKET_HDR])
        self.figures.queued += 1
        if len(self.held) >= self.max_in_flight:
            self.figures.overflow_dropped += 1
            self.verdict(packet_id, NF_DROP)
            return
        hold = self.delay_ns
        if self.jitter_ns:
            hold = max(hold + self.rng.randint(-self.jitter_ns, self.jitter_ns), 0)
        release = arrived + hold
        flow = flow_of(attrs.get(NFQA_PAYLOAD, b""))
        release = max(release, self.flow_last.get(flow, 0))  # in order within a flow
        self.flow_last[flow] = release
        self.order += 1
        heapq.heappush(self.held, (release, self.order, packet_id))

    def release_due(self, now: int) -> None:
        while self.held and self.held[0][0] <= now:
            release, _, packet_id = heapq.heappop(self.held)
            self.verdict(packet_id, NF_ACCEPT)
            self.figures.released += 1
            self.figures.errors_ms.append((time.monotonic_ns() - release) / 1e6)
        if not self.held and len(self.flow_last) > 4096:
            self.flow_last.clear()

    def release_all(self) -> None:
        while self.held:
            _, _, packet_id = heapq.heappop(self.held)
            self.verdict(packet_id, NF_ACCEPT)

    def next_wait(self, now: int) -> float:
        """How long to sleep: a long sleep wakes late here (~0.3 ms after 40 ms, an idle
        CPU in a VM), so one longer than WAKE_LEAD_NS ends WAKE_LEAD_NS early and a short
        second one finishes it."""
        if not self.held:
            return 0.2
        left = self.held[0][0] - now
        if left > 2 * WAKE_LEAD_NS:
            left -= WAKE_LEAD_NS
        return max(left / 1e9, 0.0)


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> None:
    links: list[tuple[str, str] | None] = [_parse_link(text) for text in args.link]
    links = links or [None]
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    delayer = DelayQueue(args.queue, args.delay_ms, args.jitter_ms, args.max_in_flight)
    _timer_slack(1)
    cpu_start = time.process_time()
    create_table(args.queue)
    try:
        add_rules(args.proto, links, args.queue)
        emit({"ev": "ready", "queue": args.queue, "rules": len(links)})
        deadline = time.monotonic() + args.max_seconds
        while not stopping and time.monotonic() < deadline:
            now = time.monotonic_ns()
            delayer.release_due(now)
            ready, _, _ = select.select([delayer.sock, sys.stdin], [], [], delayer.next_wait(now))
            if delayer.sock in ready:
                delayer.receive()
            if sys.stdin in ready:
                line = sys.stdin.readline()
                command = json.loads(line) if line.strip() else {"cmd": "quit"}
                if command.get("cmd") == "quit":
                    break
                if command.get("cmd") == "set":
                    delayer.set_delay(
                        float(command["delay_ms"]), float(command.get("jitter_ms", 0))
                    )
                if command.get("cmd") in ("stats", "set"):
                    figures = delayer.figures.summary(time.process_time() - cpu_start, args.queue)
                    emit({"ev": "stats", **figures})
    finally:
        delete_table(args.queue)  # nothing new is queued from here
        delayer.release_all()
        emit({"ev": "done", **delayer.figures.summary(time.process_time() - cpu_start, args.queue)})
        delayer.sock.close()


def _timer_slack(ns: int) -> None:
    """prctl(PR_SET_TIMERSLACK): the kernel may end a sleep this much late (default 50 us);
    1 ns took the hold error p50 from 0.19 to 0.13 ms at 5 ms of delay."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)


def _parse_link(text: str) -> tuple[str, str]:
    key, _, name = text.partition(":")
    if key not in LINK_KEYS or not name or len(name) > 15:
        raise argparse.ArgumentTypeError(f"--link {text!r}: iifname:IFACE or oifname:IFACE")
    return key, name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delay")
    parser.add_argument("--queue", type=int, required=True, help="nfnetlink queue number")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--proto", choices=sorted(PROTOCOL_NUMBERS), default="udp")
    parser.add_argument("--link", action="append", default=[], help="iifname:IF or oifname:IF")
    parser.add_argument("--max-in-flight", type=int, default=4096)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
