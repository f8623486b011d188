"""coturn (`/usr/bin/turnserver`) in the router namespace of the lab (bench/netns.py).

`Topology.turn(user, password)` calls :func:`turnserver` with the router and its
address on every host link. coturn listens and relays on those addresses, with
long-term credentials in one realm, UDP and TCP only (no TLS, no DTLS, no CLI), peers
allowed in 10.77.0.0/16 only. Its traffic is the router's own (input/output), not
forwarded, so the lab's fault rules (e.g. `blackout_udp`) never touch the TURN path.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import stop_process

if TYPE_CHECKING:
    from bench.netns import Host

#: coturn (Debian package `coturn`) and how it is run
TURNSERVER = "/usr/bin/turnserver"
TURN_PORT = 3478
TURN_REALM = "posewire.test"
TURN_MIN_PORT, TURN_MAX_PORT = 49152, 49407
TURN_PEERS = "10.77.0.0-10.77.255.255"
TURN_START_S = 10.0


class TurnError(RuntimeError):
    """coturn is missing, exited, or did not listen in time."""


@dataclass(frozen=True)
class TurnServer:
    """A running coturn: where it listens and the credentials to use."""

    addresses: tuple[str, ...]  # the router's address on each host link
    port: int
    username: str
    credential: str
    realm: str
    log: Path
    pid: int

    def url(self, address: str) -> str:
        """The `turn:` URL on one of its addresses (UDP)."""
        return f"turn:{address}:{self.port}?transport=udp"

    def ice_server(self, host: Host) -> dict[str, Any]:
        """An RTCIceServer-shaped dict for a host: the TURN address on the host's own link."""
        return {
            "urls": [self.url(host.gateway)],
            "username": self.username,
            "credential": self.credential,
        }

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def turnserver(
    router: Host,
    addresses: Sequence[str],
    user: str,
    password: str,
    *,
    realm: str = TURN_REALM,
    port: int = TURN_PORT,
    log_dir: Path | None = None,
) -> Iterator[TurnServer]:
    """coturn in `router`'s namespace for the `with` block, on `addresses`; returns once
    it listens on every one of them (about 70 ms); SIGTERM (then SIGKILL) at the end."""
    if not Path(TURNSERVER).exists():
        raise TurnError(f"{TURNSERVER} is missing: apt-get install -y coturn")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pw-turn-")))
        log = (log_dir or work) / f"{router.name}-turnserver.log"
        config = work / "turnserver.conf"
        config.write_text("# empty: every option is on the command line\n")
        argv = [
            TURNSERVER,
            "-c", str(config),  # never /etc/turnserver.conf
            "--listening-port", str(port),
            *(arg for a in addresses for arg in ("--listening-ip", a)),
            *(arg for a in addresses for arg in ("--relay-ip", a)),
            "--min-port", str(TURN_MIN_PORT),
            "--max-port", str(TURN_MAX_PORT),
            "--lt-cred-mech",
            "--realm", realm,
            "--user", f"{user}:{password}",
            "--fingerprint",
            f"--allowed-peer-ip={TURN_PEERS}",
            "--no-multicast-peers",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--no-rfc5780",
            "--no-software-attribute",
            "--userdb", str(work / "turndb"),
            "--pidfile", str(work / "turnserver.pid"),
            "--log-file", str(log),
            "--simple-log",
            "--no-stdout-log",
        ]  # fmt: skip
        proc = subprocess.Popen(
            router.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(stop_process, proc, 5.0)
        server = TurnServer(
            addresses=tuple(addresses),
            port=port,
            username=user,
            credential=password,
            realm=realm,
            log=log,
            pid=proc.pid,
        )
        _wait_listening(router, proc, server)
        yield server


def _wait_listening(router: Host, proc: subprocess.Popen[bytes], server: TurnServer) -> None:
    wanted = {f"{a}:{server.port}" for a in server.addresses}
    deadline = time.monotonic() + TURN_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TurnError(f"turnserver exited with {proc.returncode}; log: {server.log_tail()}")
        listening = router.run(["ss", "-H", "-u", "-l", "-n"]).stdout
        local = {line.split()[3] for line in listening.splitlines() if len(line.split()) > 3}
        if wanted <= local:
            return
        time.sleep(0.05)
    raise TurnError(
        f"turnserver not listening on {sorted(wanted)} within {TURN_START_S} s; "
        f"log: {server.log_tail()}"
    )
