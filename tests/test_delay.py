"""The lab's delay fault (bench/delay.py through `Topology.delay`): real packets held in
the router namespace by an NFQUEUE reader, measured end to end by real peers.

The figures (added RTT error, the reader's hold error and CPU per packet) are printed
(`pytest -s`) and recorded as junit properties; docs/testing.md quotes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.delay import DELAY_TABLE, check
from bench.netns import Topology
from tests.test_netns import PEER, Record, connect, percentile, report

pytestmark = pytest.mark.timing  # asserts times or rates: runs alone (Makefile)

PORT = 4100
BURST = 200

#: run with `python -c` in the hosts: a burst of datagrams 1 ms apart, one flow, and a
#: receiver that reports the order they arrived in (both bounded in count and time)
SEND_BURST = f"""
import socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range({BURST}):
    s.sendto(struct.pack("!I", n), ("10.77.2.2", {PORT}))
    time.sleep(0.001)
"""
RECEIVE_BURST = f"""
import json, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {PORT}))
s.settimeout(3.0)
print("ready", flush=True)
order = []
try:
    while len(order) < {BURST}:
        order.append(struct.unpack("!I", s.recv(64))[0])
except TimeoutError:
    pass
print(json.dumps(order), flush=True)
"""


def ping(net: Topology, count: int, log_dir: Path) -> list[float]:
    """`count` UDP round trips a -> b (echo) -> a, one at a time: their RTTs in ms."""
    echo = net.start_python(
        "b", PEER, ["udp-echo", "--port", str(PORT), "--count", str(count)], log_dir
    )
    echo.expect("ready", timeout=10)
    b = net.host("b")
    pinged = net.host("a").run_python(
        PEER, "udp-ping", "--to", b.address, "--port", str(PORT), "--count", str(count)
    )
    echo.close()
    net.peers.remove(echo)
    rtts: list[float] = pinged["rtt_ms"]
    assert len(rtts) == count, pinged
    return rtts


def router_state(net: Topology) -> tuple[str, str, str]:
    """(nft ruleset, bound nfnetlink queues, processes) of the router namespace."""
    assert net.router is not None
    ruleset = net.router.run(["nft", "list", "ruleset"]).stdout
    queues = net.router.run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    pids = subprocess.run(
        ["ip", "netns", "pids", net.router.name], capture_output=True, text=True, check=False
    ).stdout
    return ruleset, queues, pids


def test_bad_delays_are_refused() -> None:
    with pytest.raises(ValueError, match="delay -1 ms"):
        check(-1, 0)
    with pytest.raises(ValueError, match="jitter 30 ms"):
        check(20, 30)


def test_udp_delay_adds_the_rtt_and_removal_restores_it(
    net: Topology, record_property: Record, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="no host 'z'"):
        net.delay(40, host="z").__enter__()
    baseline = ping(net, 10, tmp_path)
    with net.delay(40, log_dir=tmp_path) as delay:
        ruleset, queues, _ = router_state(net)
        assert f"table ip {DELAY_TABLE}" in ruleset and queues.split()[0] == "1", (ruleset, queues)
        delayed = ping(net, 30, tmp_path)  # each packet crosses the router twice: +80 ms
        figures: dict[str, Any] = delay.stats()
    after = ping(net, 10, tmp_path)
    added = [rtt - percentile(baseline, 50) - 80 for rtt in delayed]
    report(record_property, "baseline_rtt_p50_ms", percentile(baseline, 50))
    report(record_property, "delay40_rtt_min_ms", min(delayed))
    report(record_property, "delay40_added_error_p50_ms", percentile(added, 50))
    report(record_property, "delay40_added_error_p95_ms", percentile(added, 95))
    report(record_property, "hold_error_p50_ms", figures["hold_error_p50_ms"])
    report(record_property, "hold_error_p95_ms", figures["hold_error_p95_ms"])
    report(record_property, "reader_cpu_us_per_packet_with_startup", figures["cpu_us_per_packet"])
    # never released early; nearly always within 20 ms of the delay (one ping of thirty
    # past 100 ms once on CI, beside a browser test of another session)
    assert all(rtt >= 80 for rtt in delayed) and percentile(delayed, 90) < 100, delayed
    assert figures["queued"] == figures["released"] == 60, figures
    assert max(after) < 20 and percentile(after, 50) < 5, after  # removal restores it
    ruleset, queues, pids = router_state(net)
    assert DELAY_TABLE not in ruleset and queues == "" and pids == "", (ruleset, queues, pids)


def test_one_link_one_direction_and_jitter(net: Topology, tmp_path: Path) -> None:
    with net.delay(30, host="b", direction="to", jitter_ms=10, log_dir=tmp_path) as delay:
        rtts = ping(net, 20, tmp_path)  # only a -> b is held: 30 +- 10 ms
        figures = delay.stats()
        delay.set(5)
        quicker = ping(net, 5, tmp_path)
    assert all(20 <= rtt < 50 for rtt in rtts), rtts
    assert max(rtts) - min(rtts) > 2, rtts  # the jitter shows
    assert figures["queued"] == 20, figures  # the echoes (b -> a) were not queued
    assert all(5 <= rtt < 25 for rtt in quicker), quicker


def test_aiortc_peers_connect_and_stream_under_50ms_delay(
    net: Topology, tmp_path: Path, record_property: Record
) -> None:
    with net.delay(50, log_dir=tmp_path) as delay:
        a, b, connect_ms = connect(net, tmp_path, max_seconds=20)
        a.send({"cmd": "stream", "count": 30, "hz": 30.0, "grace_s": 0.3})
        streamed = a.expect("streamed", timeout=10)
        a.send({"cmd": "ping", "count": 5, "interval_s": 0.02})
        pinged = a.expect("pinged", timeout=5)
        b.send({"cmd": "report"})
        received = b.expect("received", timeout=5)
        figures = delay.stats()
    report(record_property, "delay50_offer_to_open_ms", connect_ms)
    report(record_property, "delay50_pose_rtt_p50_ms", percentile(streamed["rtt_ms"], 50))
    report(record_property, "delay50_pose_oneway_p50_ms", percentile(received["latency_ms"], 50))
    report(record_property, "delay50_control_rtt_p50_ms", percentile(pinged["rtt_ms"], 50))
    report(
        record_property,
        "delay50_reader_cpu_us_per_packet_with_startup",
        figures["cpu_us_per_packet"],
    )
    assert len(received["latency_ms"]) == 30 and len(streamed["rtt_ms"]) == 30
    # never shorter than the delay; the upper bound on the p95 only: a Python peer on a
    # shared 2-core machine can stall an event loop for a few ms now and then
    assert min(received["latency_ms"]) >= 50, received["latency_ms"]
    assert percentile(received["latency_ms"], 95) < 70, received["latency_ms"]
    assert min(streamed["rtt_ms"]) >= 100, streamed["rtt_ms"]
    assert percentile(streamed["rtt_ms"], 95) < 130, streamed["rtt_ms"]
    assert len(pinged["rtt_ms"]) == 5 and min(pinged["rtt_ms"]) >= 100, pinged
    assert figures["overflow_dropped"] == 0, figures


def test_jitter_keeps_a_flow_in_order(net: Topology, tmp_path: Path) -> None:
    """+-40 ms of jitter on datagrams 1 ms apart would reorder most of them; the reader
    releases a flow's packets in order (a later one waits for the earlier ones)."""
    receiver = subprocess.Popen(
        net.host("b").exec_argv([sys.executable, "-c", RECEIVE_BURST]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        with net.delay(40, jitter_ms=40, log_dir=tmp_path) as delay:
            net.host("a").run([sys.executable, "-c", SEND_BURST])
            out, _ = receiver.communicate(timeout=10)
            figures = delay.stats()
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    order = json.loads(out)
    assert order == list(range(BURST)), order
    assert figures["queued"] == BURST and figures["overflow_dropped"] == 0, figures


def test_a_killed_reader_fails_open_and_is_cleaned_up(net: Topology, tmp_path: Path) -> None:
    """SIGKILL of the reader: the rule's queue-bypass lets packets through undelayed (not
    a blackout); leaving the block says the reader died and still removes its table."""
    with (
        pytest.raises(EOFError, match="peer exited before 'done'"),
        net.delay(40, log_dir=tmp_path) as delay,
    ):
        delay.peer.proc.kill()
        delay.peer.proc.wait()
        assert max(ping(net, 5, tmp_path)) < 20
    ruleset, queues, pids = router_state(net)
    assert DELAY_TABLE not in ruleset and queues == "" and pids == "", (ruleset, queues, pids)


def test_reader_cost_per_packet_at_load(
    net: Topology, tmp_path: Path, record_property: Record
) -> None:
    """1000 pings back to back through a 0 ms delay (2000 packets queued): the reader's CPU
    per packet when busy (its idle wake-ups do not count), and the hold error then."""
    with net.delay(0, log_dir=tmp_path) as delay:
        before = delay.stats()
        rtts = ping(net, 1000, tmp_path)
        after = delay.stats()
    packets = after["queued"] - before["queued"]
    cpu_us = (after["cpu_s"] - before["cpu_s"]) / packets * 1e6
    report(record_property, "load_reader_cpu_us_per_packet", cpu_us)
    report(record_property, "load_rtt_p50_ms", percentile(rtts, 50))
    report(record_property, "load_hold_error_p95_ms", after["hold_error_p95_ms"])
    assert packets == 2000 and after["overflow_dropped"] == after["kernel_dropped"] == 0, after
