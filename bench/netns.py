"""Test hosts in Linux network namespaces, joined through a router namespace.

Layout (see docs/testing.md)::

    host a (pw-<pid>-<k>-a)            router (pw-<pid>-<k>-r)            host b (pw-<pid>-<k>-b)
    eth0 10.77.1.2/24  <-- veth -->  ha 10.77.1.1 | hb 10.77.2.1  <-- veth -->  eth0 10.77.2.2/24

Every host has one veth to the router and a route to 10.77.0.0/16 through it, and
nothing else: no default route anywhere, no interface in the parent namespace. The
veth pairs are created directly inside the namespaces, so nothing is ever added to
the machine's own namespace and deleting the namespaces removes everything (veths,
routes, the router's nftables table). Faults (random UDP/TCP loss, a UDP blackout),
on every forwarded packet or on one host's link in one direction, are nftables rules
on the router's forward hook, so they act on traffic between hosts and never on the
machine's own traffic. `Topology.turn` runs coturn in the router namespace,
`Topology.delay` an NFQUEUE reader that holds packets (bench/delay.py).

Used by the tests (tests/test_netns.py, tests/test_turn.py) and by the benchmarks
(bench/transport.py), hence its place in bench/ (mypy-checked).

Cleanup: `Topology.close` (a context manager and the test fixture's finalizer) kills
the processes still running in the namespaces and deletes them; `sweep_stale` (run
before every new topology) removes what a killed run left behind: every ``pw-<pid>-``
namespace whose pid is no longer alive.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bench.delay import DELAY_TABLE, DelayFault, reader_args
from bench.turn import TurnServer, turnserver

ROOT = Path(__file__).resolve().parents[1]

#: every namespace of every run starts with this; the pid after it says whose it is
PREFIX = "pw-"
#: the hosts' subnets: host i (1-based) is 10.77.i.2, its router side 10.77.i.1
SUBNET = "10.77.0.0/16"
#: the router's nftables table (inside the router namespace only)
FAULT_TABLE = "pw_fault"
#: an address that must stay unreachable from every host (TEST-NET-1, RFC 5737)
OUTSIDE = "192.0.2.1"

_NAME = re.compile(r"^pw-(\d+)-\d+-[a-z]$")
_serial = count(1)


class NetnsError(RuntimeError):
    """A namespace command failed."""


@functools.cache
def unavailable_reason() -> str | None:
    """Why namespace hosts cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed: apt-get install -y iproute2"
    if shutil.which("nft") is None:
        return "`nft` is not installed: apt-get install -y nftables"
    probe = f"{PREFIX}{os.getpid()}-0-p"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def namespaces() -> list[str]:
    """Every network namespace name `ip netns` knows."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(name: str) -> None:
    """Kill what runs in the namespace, then delete it (its veths and nft tables go with it)."""
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "del", name], check=False)


def sweep_stale() -> list[str]:
    """Delete the ``pw-<pid>-`` namespaces of runs that are gone; returns their names."""
    removed = []
    for name in namespaces():
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_namespace(name)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    """A named network namespace with one address on a veth pair to the router."""

    name: str  # the namespace
    address: str  # its IPv4 address
    gateway: str  # the router's address on the same veth

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 10.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it."""
        return _run(self.exec_argv(argv), check=check, timeout=timeout)

    def python_argv(self, module: str, *args: str) -> list[str]:
        """`python -m module args` inside the namespace, with this interpreter (the venv's)."""
        return self.exec_argv([sys.executable, "-m", module, *args])

    def run_python(self, module: str, *args: str, timeout: float = 20.0) -> dict[str, Any]:
        """Run `python -m module args` here to the end; its last JSON line on stdout."""
        done = subprocess.run(
            self.python_argv(module, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=python_env(),
            cwd=ROOT,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise NetnsError(f"{module} in {self.name}: no output; stderr: {done.stderr[-2000:]}")
        last: dict[str, Any] = json.loads(lines[-1])
        return last


def python_env() -> dict[str, str]:
    """The environment for Python children: the repository on PYTHONPATH, unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Peer:
    """A Python process in a host namespace, talking JSON lines on stdin/stdout.

    stdout is read by a thread into a queue so that `expect` can wait with a
    timeout; stderr goes to a file (the aiortc logs of a failed test).
    """

    def __init__(self, host: Host, module: str, args: Sequence[str], log: Path) -> None:
        self.host = host
        self.log = log
        self._log_file: IO[str] = log.open("w", encoding="utf-8")
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            host.python_argv(module, *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env=python_env(),
            cwd=ROOT,
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next message whose "ev" is `event` (others before it are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.host.name}: no {event!r} within {timeout} s; log: {self.tail()}"
                )
            try:
                message = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if message is None:
                self._lines.put(None)
                raise EOFError(
                    f"{self.host.name}: peer exited before {event!r}; log: {self.tail()}"
                )
            if message.get("ev") == event:
                return message

    def tail(self, chars: int = 2000) -> str:
        self._log_file.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def ask_to_quit(self) -> None:
        """Send {"cmd": "quit"} (no wait); `close` waits."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                self.send({"cmd": "quit"})

    def close(self, timeout: float = 2.0) -> None:
        if self.proc.poll() is None:
            self.ask_to_quit()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log_file.close()


def signal_peers(offerer: Peer, answerer: Peer, timeout: float = 20.0) -> tuple[str, str]:
    """Carry the offer to the answerer and the answer back (no trickle: aiortc puts every
    candidate in the SDP); returns (offer SDP, answer SDP).

    The peers speak the JSON-lines signaling of tests/netns_peer.py: they print
    ``{"ev": "sdp", "type", "sdp"}`` and read ``{"cmd": "sdp", "type", "sdp"}``.
    """
    offer = offerer.expect("sdp", timeout=timeout)
    answerer.send({"cmd": "sdp", "type": offer["type"], "sdp": offer["sdp"]})
    answer = answerer.expect("sdp", timeout=timeout)
    offerer.send({"cmd": "sdp", "type": answer["type"], "sdp": answer["sdp"]})
    return str(offer["sdp"]), str(answer["sdp"])


@dataclass
class Topology:
    """Hosts joined through one router namespace (where the faults live).

    Use as a context manager (or through the test fixture): the namespaces exist
    between `__enter__` and `close`, which also runs on failure and interrupt.
    """

    host_names: Sequence[str] = ("a", "b")
    prefix: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{next(_serial)}")
    hosts: dict[str, Host] = field(default_factory=dict, init=False)
    router: Host | None = field(default=None, init=False)
    peers: list[Peer] = field(default_factory=list, init=False)
    _made: list[str] = field(default_factory=list, init=False)
    _queues: Iterator[int] = field(default_factory=lambda: count(1), init=False)

    # -- life cycle -------------------------------------------------------------

    def __enter__(self) -> Topology:
        sweep_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def namespace_names(self) -> list[str]:
        return list(self._made)

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._made.append(name)
        ns = ["ip", "netns", "exec", name]
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        # IPv4 only: no link-local IPv6 chatter, no second candidate family for ICE
        _run([*ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        _run([*ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])

    def _build(self) -> None:
        if not 1 <= len(self.host_names) <= 9:
            raise ValueError("1 to 9 hosts")
        router = Host(f"{self.prefix}-r", "", "")
        self._add_namespace(router.name)
        _run(["ip", "netns", "exec", router.name, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.router = router
        for index, short in enumerate(self.host_names, start=1):
            name = f"{self.prefix}-{short}"
            address, gateway = f"10.77.{index}.2", f"10.77.{index}.1"
            self._add_namespace(name)
            # the pair is born inside the two namespaces: nothing in the parent namespace
            _run(
                [
                    "ip",
                    "-n",
                    router.name,
                    "link",
                    "add",
                    f"h{short}",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    name,
                ]
            )
            _run(["ip", "-n", router.name, "addr", "add", f"{gateway}/24", "dev", f"h{short}"])
            _run(["ip", "-n", router.name, "link", "set", f"h{short}", "up"])
            _run(["ip", "-n", name, "addr", "add", f"{address}/24", "dev", "eth0"])
            _run(["ip", "-n", name, "link", "set", "eth0", "up"])
            # only the test subnet goes through the router: no default route
            _run(["ip", "-n", name, "route", "add", SUBNET, "via", gateway])
            self.hosts[short] = Host(name, address, gateway)
        self._nft(
            f"add table inet {FAULT_TABLE}\n"
            f"add chain inet {FAULT_TABLE} forward "
            "{ type filter hook forward priority 0; policy accept; }\n"
        )

    def close(self) -> None:
        """Stop every peer, delete every namespace (veths and nft tables go with them)."""
        self.stop_peers()
        for name in reversed(self._made):
            _delete_namespace(name)
        self._made.clear()

    def stop_peers(self, only: Sequence[Peer] | None = None) -> None:
        """Ask every peer (or those of `only`) to quit (all at once), wait for each, kill
        it after 2 s.

        Call it inside a `turn()` block when the peers use the relay: an aiortc peer
        that closes deletes its TURN allocation, which waits while coturn is gone.
        """
        peers = list(self.peers if only is None else only)
        for peer in peers:
            peer.ask_to_quit()
        for peer in peers:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                peer.close()
        self.peers[:] = [p for p in self.peers if p not in peers]

    # -- processes ---------------------------------------------------------------

    def host(self, short: str) -> Host:
        return self.hosts[short]

    def start_python(self, short: str, module: str, args: Sequence[str], log_dir: Path) -> Peer:
        """Start `python -m module args` in host `short`; stopped by `close`."""
        host = self.hosts[short]
        peer = Peer(host, module, args, log_dir / f"{host.name}.log")
        self.peers.append(peer)
        return peer

    # -- faults (nftables in the router) ----------------------------------------------

    def _nft(self, script: str) -> None:
        assert self.router is not None
        done = subprocess.run(
            self.router.exec_argv(["nft", "-f", "-"]),
            input=script,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode != 0:
            raise NetnsError(f"nft: {done.stderr.strip()}\n{script}")

    def clear_faults(self) -> None:
        """Remove every fault rule (the counters go with them)."""
        self._nft(f"flush chain inet {FAULT_TABLE} forward\n")

    def drop_udp(self, percent: int, *, host: str | None = None, direction: str = "both") -> str:
        """Drop `percent` % of forwarded UDP packets at random; replaces every other fault.

        Without `host`: all traffic between hosts, both ways. With `host`: only on that
        host's link, `direction` "to" (router -> host), "from" (host -> router) or "both".
        Returns the rule's name (its key in `drop_counters`).
        """
        self.clear_faults()
        return self.add_drop("udp", percent, host=host, direction=direction)

    def drop_tcp(self, percent: int, *, host: str | None = None, direction: str = "both") -> str:
        """Drop `percent` % of forwarded TCP segments at random; replaces every other fault."""
        self.clear_faults()
        return self.add_drop("tcp", percent, host=host, direction=direction)

    def blackout_udp(self, *, host: str | None = None, direction: str = "both") -> str:
        """Drop every forwarded UDP packet (between hosts: the router's own traffic, e.g.
        a TURN server in the router namespace, is not forwarded and keeps working)."""
        self.clear_faults()
        return self.add_drop("udp", 100, host=host, direction=direction)

    def add_drop(
        self,
        proto: str,
        percent: int,
        *,
        host: str | None = None,
        direction: str = "both",
        name: str | None = None,
    ) -> str:
        """Add one drop rule beside the existing ones; returns its name.

        `proto` "udp" or "tcp"; `percent` 0..100 (100: every packet, no `numgen`);
        `host` a host's short name (its router-side veth `h<short>`), None for every
        forwarded packet; `direction` "to" the host (`oifname`), "from" it (`iifname`)
        or "both" (two rules under one name). `name` defaults to
        ``<proto>-<percent>-<host|all>-<direction>``; the rule carries it as its nft
        comment, and `drop_counters` adds its packets up under it.
        """
        rule_name = name or f"{proto}-{percent}-{host or 'all'}-{direction}"
        for match in self._link_matches(host, direction):
            self._nft(
                f"add rule inet {FAULT_TABLE} forward {match}"
                f"{_drop_rule(proto, percent)} comment {json.dumps(rule_name)}\n"
            )
        return rule_name

    def _link_matches(self, host: str | None, direction: str) -> list[str]:
        return [
            f"{key} {json.dumps(name)} " if key else ""
            for key, name in self._links(host, direction)
        ]

    def _links(self, host: str | None, direction: str) -> list[tuple[str, str]]:
        """(nft interface key, router-side veth) per rule; ("", "") for every packet."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: one of {', '.join(DIRECTIONS)}")
        if host is None:
            if direction != "both":
                raise ValueError(f"direction {direction!r} needs a host (whose link?)")
            return [("", "")]
        if host not in self.hosts:
            raise ValueError(f"no host {host!r} in this topology ({', '.join(self.hosts)})")
        link = f"h{host}"
        matches = {"to": [("oifname", link)], "from": [("iifname", link)]}
        return matches.get(direction, [("oifname", link), ("iifname", link)])

    def fault_rules(self) -> str:
        """The router's fault chain as `nft` lists it."""
        assert self.router is not None
        return self.router.run(["nft", "list", "chain", "inet", FAULT_TABLE, "forward"]).stdout

    def drop_counters(self) -> dict[str, int]:
        """Packets dropped so far per rule name (the counter of each rule, by its comment)."""
        assert self.router is not None
        listing = self.router.run(
            ["nft", "-j", "list", "chain", "inet", FAULT_TABLE, "forward"]
        ).stdout
        counts: dict[str, int] = {}
        for item in json.loads(listing).get("nftables", []):
            rule = item.get("rule")
            if rule is None:
                continue
            name = str(rule.get("comment", f"handle-{rule.get('handle')}"))
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    counts[name] = counts.get(name, 0) + int(expr["counter"]["packets"])
        return counts

    def dropped_packets(self) -> int:
        """Packets the router's fault rules dropped so far (all rules together)."""
        return sum(self.drop_counters().values())

    # -- delay (an NFQUEUE reader in the router namespace: bench/delay.py) ---------------

    @contextlib.contextmanager
    def delay(
        self,
        ms: float,
        proto: str = "udp",
        *,
        host: str | None = None,
        direction: str = "both",
        jitter_ms: float = 0.0,
        log_dir: Path | None = None,
        max_seconds: float = 300.0,
    ) -> Iterator[DelayFault]:
        """Hold forwarded `proto` packets `ms` in the router (jitter: uniform +-`jitter_ms`,
        in order per flow) for a `with` block; `host`/`direction` as in `add_drop`. Each
        packet crossing the router is held once: RTT a <-> b grows by 2 x `ms` without a
        host, and by `ms` with host="b", direction="to". Delays in force add up."""
        assert self.router is not None
        links = [(key, name) for key, name in self._links(host, direction) if key]
        queue = next(self._queues)
        args = reader_args(queue, ms, jitter_ms, proto, links, max_seconds)
        with contextlib.ExitStack() as stack:
            if log_dir is None:
                log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pw-delay-")))
            peer = Peer(
                self.router, "bench.delay", args, log_dir / f"{self.router.name}-delay{queue}.log"
            )
            self.peers.append(peer)  # close() stops it whatever happens
            fault = DelayFault(peer, self.router, queue)
            try:
                fault.wait_ready()
                yield fault
            finally:
                fault.close()
                self.peers.remove(peer)

    # -- TURN (coturn in the router namespace: bench/turn.py) -------------------------

    def turn(
        self, user: str, password: str, *, log_dir: Path | None = None, **options: Any
    ) -> contextlib.AbstractContextManager[TurnServer]:
        """coturn in the router namespace for a `with` block, listening and relaying on the
        router's address on every host link; see `bench.turn.turnserver`."""
        assert self.router is not None
        addresses = [h.gateway for h in self.hosts.values()]
        return turnserver(self.router, addresses, user, password, log_dir=log_dir, **options)


DIRECTIONS = ("both", "to", "from")
PROTOCOLS = ("udp", "tcp")


def _drop_rule(proto: str, percent: int) -> str:
    if proto not in PROTOCOLS:
        raise ValueError(f"protocol {proto!r}: one of {', '.join(PROTOCOLS)}")
    if not 0 <= percent <= 100:
        raise ValueError(f"percent {percent} not in 0..100")
    if percent == 100:
        return f"meta l4proto {proto} counter drop"
    return f"meta l4proto {proto} numgen random mod 100 < {percent} counter drop"


@contextlib.contextmanager
def topology(host_names: Sequence[str] = ("a", "b")) -> Iterator[Topology]:
    """Hosts joined through a router namespace, removed on exit (also on error)."""
    with Topology(host_names=tuple(host_names)) as made:
        yield made


def leftovers(prefix: str) -> list[str]:
    """What is still there of a topology with this prefix: namespaces, parent-namespace links."""
    found = [name for name in namespaces() if name.startswith(prefix + "-")]
    found += [f"/run/netns/{p.name}" for p in Path("/run/netns").glob(f"{prefix}-*")]
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    found += [line for line in links.splitlines() if prefix in line]
    tables = _run(["nft", "list", "tables"], check=False).stdout
    found += [line for line in tables.splitlines() if FAULT_TABLE in line or DELAY_TABLE in line]
    return found
