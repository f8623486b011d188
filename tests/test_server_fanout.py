"""Endurance, short version of ``python -m bench fanout --clients 200``: a real server
process, 200 real clients in worker processes; zero errors, nothing lost, and no leaked
file descriptors or asyncio tasks afterwards (server and clients). No timing assertions."""

from __future__ import annotations

import pytest

from bench.fanout import TRACES, Scenario, run_scenario

TRACE = TRACES / "cmu02_05_punch_strike.npz"


@pytest.mark.slow
def test_200_clients_no_errors_no_leaks() -> None:
    row = run_scenario(Scenario("200 clients", 20, 1, 9, 3.0, 30.0), workers=2, trace=TRACE)
    assert row["_errors"] == [] and row["errors"] == 0, row
    assert row["lost"] == 0 and row["drops"] == 0, row
    assert row["received"] > 0
    for key in ("leaked_server_fds", "leaked_server_tasks", "leaked_client_fds",
                "leaked_client_tasks"):  # fmt: skip
        assert row[key] <= 0, (key, row)
