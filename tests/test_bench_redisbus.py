"""``python -m bench redisbus --quick --json``: pub/sub against streams on a real
``redis-server`` (loopback, its own data directory), through the harness; and the
generic RESP reply parser the streams reader uses (:func:`pipeline.server.resp.reply`).

Skipped without ``/usr/bin/redis-server`` (CI=true turns that into a failure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.redisproc import REDIS_SERVER
from pipeline.server.resp import encode, reply

ROOT = Path(__file__).resolve().parents[1]


def test_reply_parses_nested_arrays_nulls_and_partial_input() -> None:
    xread = (
        b"*1\r\n*2\r\n$3\r\nkey\r\n*2\r\n"
        b"*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n$2\r\nab\r\n"
        b"*2\r\n$3\r\n2-0\r\n*2\r\n$1\r\nd\r\n$0\r\n\r\n"
    )
    got = reply(xread + b":7\r\n")
    assert got == ([[b"key", [[b"1-0", [b"d", b"ab"]], [b"2-0", [b"d", b""]]]]], len(xread))
    assert reply(xread, len(xread)) is None
    for cut in range(len(xread)):
        assert reply(xread[:cut]) is None
    assert reply(b"*-1\r\n$-1\r\n") == (None, 5)
    assert reply(b"+OK\r\n:-3\r\n") == ("OK", 5)
    assert reply(b":-3\r\n") == (-3, 5)
    assert reply(encode("PING")) == ([b"PING"], 14)  # a command is an array of bulk strings
    with pytest.raises(ConnectionError, match="WRONGTYPE"):
        reply(b"-WRONGTYPE Operation against a key\r\n")


@pytest.mark.skipif(
    not os.path.exists(REDIS_SERVER) and not os.environ.get("CI"),
    reason="redis-server is not installed (CI installs it)",
)
def test_redisbus_quick_delivers_every_packet_in_every_case(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "redisbus", "--quick", "--json",
         "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    obj = json.loads(proc.stdout)
    assert obj["bench"] == "redisbus"
    assert set(obj) >= {"machine", "rows", "targets", "comparisons", "params", "harness"}
    names = [r["name"] for r in obj["rows"]]
    assert names == [
        "pub/sub, 1 reader",
        "pub/sub, 2 readers",
        "streams, 1 reader",
        "streams, 2 readers",
        "baseline (shipped): PUBLISH + history, 1 reader",
    ]
    readers = [1, 2, 1, 2, 1]
    for row, n in zip(obj["rows"], readers, strict=True):
        assert row["sent"] == obj["params"]["rate"] * obj["params"]["seconds"]
        assert row["delivered"] == row["sent"] * n, row
        assert row["delivered_fraction"] == 1.0
        for key in ("p50_ms", "p95_ms", "p99_ms", "redis_cpu_ms_per_1k",
                    "reader_cpu_ms_per_1k", "used_memory_kb"):  # fmt: skip
            assert isinstance(row[key], float) and row[key] >= 0, (key, row)
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert [t["met"] for t in obj["targets"]] == [True]
    assert len(obj["comparisons"]) == 8
    assert (tmp_path / "redisbus.json").exists()
