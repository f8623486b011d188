"""Real aiortc peers in separate processes, across network namespaces (bench/netns.py).

Host a and host b are joined through a router namespace where nftables makes the
faults. Signaling goes through this test over the peers' stdin/stdout. The figures
(RTT, delivered fraction, latency percentiles, blackout detection time) are printed
(`pytest -s`) and recorded as junit properties; docs/testing.md quotes them.
"""

from __future__ import annotations

import ipaddress
import math
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.netns import (
    FAULT_TABLE,
    OUTSIDE,
    PREFIX,
    Peer,
    Topology,
    leftovers,
    namespaces,
    signal_peers,
    sweep_stale,
    topology,
    unavailable_reason,
)

PEER = "tests.netns_peer"
COUNT, HZ = 300, 30.0
TEST_NET = ipaddress.ip_network("10.77.0.0/16")

Record = Callable[[str, object], None]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def report(record: Record, name: str, value: float) -> None:
    record(name, round(value, 3))
    print(f"netns figure: {name} = {value:.3f}")


def connect(net: Topology, log_dir: Path, max_seconds: float = 40.0) -> tuple[Peer, Peer, float]:
    """An aiortc peer in host a (offerer) and one in host b, signaled through this test."""
    limit = ["--max-seconds", str(max_seconds)]
    a = net.start_python("a", PEER, ["rtc", "--role", "offer", *limit], log_dir)
    b = net.start_python("b", PEER, ["rtc", "--role", "answer", *limit], log_dir)
    for sdp in signal_peers(a, b):
        # only the hosts' own addresses are offered: no loopback, nothing outside
        candidates = re.findall(r"a=candidate:\S+ \d+ udp \d+ (\S+) \d+ typ (\w+)", sdp)
        assert candidates, sdp
        for address, kind in candidates:
            assert kind == "host" and ipaddress.ip_address(address) in TEST_NET, candidates
    opened = a.expect("open", timeout=15)
    b.expect("open", timeout=15)
    return a, b, float(opened["connect_ms"])


def stream(a: Peer, b: Peer) -> tuple[int, list[float], list[float]]:
    """COUNT datagrams at HZ from a to b on the unordered channel: (sent, one-way ms, rtt ms)."""
    a.send({"cmd": "stream", "count": COUNT, "hz": HZ, "grace_s": 0.5})
    streamed = a.expect("streamed", timeout=COUNT / HZ + 10)
    b.send({"cmd": "report"})
    received = b.expect("received", timeout=5)
    return int(streamed["sent"]), list(received["latency_ms"]), list(streamed["rtt_ms"])


# -- the hosts ------------------------------------------------------------------------


def test_hosts_reach_each_other_and_nothing_else(net: Topology, tmp_path: Path) -> None:
    a, b = net.host("a"), net.host("b")
    echo = net.start_python("b", PEER, ["udp-echo", "--port", "4000", "--count", "5"], tmp_path)
    echo.expect("ready", timeout=10)
    pinged = a.run_python(PEER, "udp-ping", "--to", b.address, "--port", "4000", "--count", "5")
    assert len(pinged["rtt_ms"]) == 5, pinged
    assert echo.expect("echoed", timeout=5)["count"] == 5
    assert net.router is not None
    for host in (a, b, net.router):
        routes = host.run(["ip", "route", "show"]).stdout
        assert "default" not in routes, routes
    for host in (a, b):
        # connect() on a UDP socket only looks the route up: nothing is sent
        away = host.run_python(PEER, "outside", "--to", OUTSIDE)
        assert away == {"ev": "outside", "reachable": False, "errno": "ENETUNREACH"}


# -- aiortc peers across the router -------------------------------------------------------
# The peer-level clean-path, 20 % loss and blackout checks of the groundwork were replaced
# by the same checks on the real transports: tests/test_webrtc.py (every frame on a clean
# path, 0/5/20 % loss, a blackout noticed within 300 ms) and tests/test_server_rtc.py;
# tests/test_turn.py still drives these peers (tests/netns_peer.py) through TURN.


# -- cleanup ----------------------------------------------------------------------------


def test_everything_is_gone_afterwards(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    # a stale namespace of a run that is gone (its pid is dead) is swept away
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{PREFIX}{gone.pid}-1-a"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with topology(("a", "b", "c")) as net:
        assert stale not in namespaces()
        made = net.namespace_names
        assert len(made) == 4 and set(made) <= set(namespaces())
        net.drop_tcp(10)
        assert FAULT_TABLE in net.fault_rules()
        net.start_python("c", PEER, ["udp-echo", "--port", "4000", "--max-seconds", "30"], tmp_path)
        prefix = net.prefix
    assert leftovers(prefix) == []
    assert not set(made) & set(namespaces())
    assert sweep_stale() == []


def test_cleanup_on_failure(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"), topology() as net:
        prefix = net.prefix
        net.start_python("a", PEER, ["udp-echo", "--port", "4000", "--max-seconds", "30"], tmp_path)
        raise RuntimeError("boom")
    assert leftovers(prefix) == []


# -- faults on one link, one direction ----------------------------------------------------


def test_a_fault_on_one_link_and_direction_is_counted_by_name(
    net: Topology, tmp_path: Path
) -> None:
    a, b = net.host("a"), net.host("b")
    # replies from b are dropped on b's link; requests to b pass; nothing else is touched
    name = net.blackout_udp(host="b", direction="from")
    spare = net.add_drop("tcp", 100, host="a", direction="to", name="tcp-to-a")
    echo = net.start_python("b", PEER, ["udp-echo", "--port", "4000", "--count", "3"], tmp_path)
    echo.expect("ready", timeout=10)
    pinged = a.run_python(PEER, "udp-ping", "--to", b.address, "--port", "4000", "--count", "3")
    assert pinged["rtt_ms"] == []  # no echo came back
    assert echo.expect("echoed", timeout=5)["count"] == 3  # but every request arrived
    assert net.drop_counters() == {name: 3, spare: 0}
    assert 'iifname "hb"' in net.fault_rules()
    with pytest.raises(ValueError, match="no host 'z'"):
        net.add_drop("udp", 5, host="z")
    with pytest.raises(ValueError, match="needs a host"):
        net.add_drop("udp", 5, direction="to")
