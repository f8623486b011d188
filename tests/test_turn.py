"""TURN through a real coturn (`Topology.turn`, bench/turn.py), with real aiortc peers.

coturn runs in the router namespace and listens on the router's address on each host
link (10.77.1.1, 10.77.2.1). `blackout_udp()` drops every UDP packet *forwarded*
between host a and host b; packets to and from the router itself (the TURN
allocations) are not forwarded, so the relay path stays open. Issue 12: "with direct
UDP between the peers dropped by nftables, the connection is made through the TURN
relay"; and without TURN, under the same blackout, no connection (bounded wait).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.netns import Peer, Topology, signal_peers, topology, unavailable_reason
from bench.turn import TURNSERVER, TurnServer

PEER = "tests.netns_peer"
COUNT, HZ = 60, 30.0
USER, PASSWORD = "posewire", "turn-secret-1"
TEST_NET = ipaddress.ip_network("10.77.0.0/16")


@pytest.fixture
def net() -> Iterator[Topology]:
    reason = unavailable_reason()
    if reason is None and not Path(TURNSERVER).exists():
        reason = f"{TURNSERVER} is missing: apt-get install -y coturn"
    if reason is not None:
        pytest.skip(reason)
    with topology(("a", "b")) as made:
        yield made


def rtc_pair(
    net: Topology,
    log_dir: Path,
    turn: TurnServer | None,
    *,
    relay_only: bool = False,
    open_timeout: float = 15.0,
) -> tuple[Peer, Peer, str, str]:
    """An offerer in host a and an answerer in host b, each given the TURN address on its
    own link (or no ICE server at all); signaled through this test."""

    def args(short: str, role: str) -> list[str]:
        servers = [turn.ice_server(net.host(short))] if turn is not None else []
        extra = ["--relay-only"] if relay_only else []
        return [
            "rtc", "--role", role, "--max-seconds", "30", "--open-timeout", str(open_timeout),
            "--ice-servers", json.dumps(servers), *extra,
        ]  # fmt: skip

    a = net.start_python("a", PEER, args("a", "offer"), log_dir)
    b = net.start_python("b", PEER, args("b", "answer"), log_dir)
    offer, answer = signal_peers(a, b)
    return a, b, offer, answer


def candidate_types(sdp: str) -> dict[str, list[str]]:
    """Candidate type -> addresses offered in an SDP."""
    found: dict[str, list[str]] = {}
    for address, kind in re.findall(r"a=candidate:\S+ \d+ udp \d+ (\S+) \d+ typ (\w+)", sdp):
        assert ipaddress.ip_address(address) in TEST_NET, address  # nothing outside the lab
        found.setdefault(kind, []).append(address)
    return found


def stream(a: Peer, b: Peer) -> float:
    """COUNT pose datagrams a -> b at HZ; the delivered fraction."""
    a.send({"cmd": "stream", "count": COUNT, "hz": HZ, "grace_s": 0.3})
    streamed = a.expect("streamed", timeout=COUNT / HZ + 10)
    b.send({"cmd": "report"})
    received = b.expect("received", timeout=5)
    return len(received["latency_ms"]) / int(streamed["sent"])


def pair_types(opened: dict[str, Any]) -> tuple[str, str]:
    pair = opened["pair"]
    assert pair is not None, opened
    return str(pair["local"]["type"]), str(pair["remote"]["type"])


def test_blacked_out_hosts_connect_through_the_relay(net: Topology, tmp_path: Path) -> None:
    net.blackout_udp()
    with net.turn(USER, PASSWORD, log_dir=tmp_path) as turn:
        a, b, offer, answer = rtc_pair(net, tmp_path, turn)
        # both sides gathered a relay candidate on the router (and their host candidate)
        for sdp in (offer, answer):
            kinds = candidate_types(sdp)
            assert set(kinds) == {"host", "relay"}, kinds
            assert set(kinds["relay"]) <= set(turn.addresses), kinds
        opened = {side: peer.expect("open", timeout=20) for side, peer in (("a", a), ("b", b))}
        for side, event in opened.items():
            types = pair_types(event)
            print(f"turn: {side} selected pair {types}: {json.dumps(event['pair'])}")
            # a host-to-host pair cannot work: every path goes through an allocation
            assert "relay" in types, event
        delivered = stream(a, b)
        assert delivered >= 0.95, delivered  # the relay path itself is clean
        a.send({"cmd": "ping", "count": 5, "interval_s": 0.02})
        assert len(a.expect("pinged", timeout=5)["rtt_ms"]) == 5  # the reliable channel too
        # the direct connectivity checks were tried and dropped by the blackout
        assert net.dropped_packets() > 0
        net.stop_peers()  # while coturn runs: they delete their allocations


def test_relay_only_policy_uses_relay_candidates_on_both_sides(
    net: Topology, tmp_path: Path
) -> None:
    with net.turn(USER, PASSWORD, log_dir=tmp_path) as turn:
        a, b, offer, answer = rtc_pair(net, tmp_path, turn, relay_only=True)
        for sdp in (offer, answer):
            assert set(candidate_types(sdp)) == {"relay"}, sdp
        opened = a.expect("open", timeout=20)
        b.expect("open", timeout=20)
        assert pair_types(opened) == ("relay", "relay"), opened
        assert opened["pair"]["local"]["address"] in turn.addresses
        assert stream(a, b) >= 0.95
        net.stop_peers()


def test_without_turn_the_blackout_prevents_the_connection(net: Topology, tmp_path: Path) -> None:
    net.blackout_udp()
    a, b, offer, _ = rtc_pair(net, tmp_path, None, open_timeout=4.0)
    assert set(candidate_types(offer)) == {"host"}
    for peer in (a, b):
        failed = peer.expect("no-open", timeout=10)  # bounded: 4 s, then it gives up
        assert failed["ice"] != "completed", failed
    assert net.dropped_packets() > 0
