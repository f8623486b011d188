"""The short soak (45 s): the whole system (sender pipeline, room server, two receivers)
through the benchmark harness, and its leak targets.

``python -m bench soak --minutes 0.75 --json`` runs real processes for 45 s:
a trace-replaying sender publishing over the WebSocket transport into a room
on ``python -m pipeline serve``, two ``python -m pipeline receive``. The
targets are leak checks (RSS growth after warm-up, fd, /dev/shm and server
task counts flat, no restarts, every receiver got the packets), not timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procutil import ROOT, TRACE

pytestmark = pytest.mark.slow

PROCESSES = {"supervisor", "capture", "encode", "transmit", "server", "receiver0", "receiver1"}


@pytest.mark.timeout(240)
def test_one_minute_soak_meets_its_leak_targets(tmp_path: Path) -> None:
    if not TRACE.exists():
        pytest.fail(f"pose trace missing: {TRACE}")
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "soak", "--minutes", "0.75", "--json",
         "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout must be one JSON object:\n{proc.stdout[-2000:]}"
    obj = json.loads(lines[0])
    assert obj["bench"] == "soak"
    assert set(obj) >= {"bench", "machine", "rows", "targets", "params", "harness"}

    unmet = [t for t in obj["targets"] if not t["met"]]
    assert not unmet, f"unmet soak targets: {json.dumps(unmet, indent=1)}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = {r["name"]: r for r in obj["rows"]}
    assert set(rows) >= PROCESSES, sorted(rows)
    for name in PROCESSES:
        assert rows[name]["rss_warm_mb"] > 0 and rows[name]["fds_warm"] > 0, rows[name]
    frames = rows["frames"]
    assert frames["sent"] > 0
    assert frames["rx0_received"] > 0 and frames["rx1_received"] > 0
    assert obj["params"]["server"] == "process"
    assert obj["params"]["transport"] == "websocket"
    assert obj["params"]["steady_samples"] >= 6

    # the same object was saved, and the harness rebuilt latest.md
    assert json.loads((results / "soak.json").read_text(encoding="utf-8")) == obj
    assert "| soak " in (results / "latest.md").read_text(encoding="utf-8")

    # nothing left behind (the soak's own targets check its processes too)
    run_id = obj["params"]["run_id"]
    assert not [p for p in Path("/dev/shm").iterdir() if run_id in p.name]
