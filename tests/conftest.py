"""Shared test configuration.

On CI (``CI=true``) a skipped test is a failure: tests may skip on a laptop
that lacks Chromium, root, the pose traces or network namespaces, but CI
installs everything they need, so a skip there hides a test that did not run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bench.netns import Topology

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding a ``slow`` test go first: under ``--dist loadfile`` (make unit) a
    worker starts their minute-long tests at once instead of ending the pass alone."""
    slow = {i.nodeid.split("::")[0] for i in items if i.get_closest_marker("slow")}
    items.sort(key=lambda i: i.nodeid.split("::")[0] not in slow)  # stable: order kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if ON_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped on CI (CI=true), which counts as a failure: {reason}"
    return None


@pytest.fixture(autouse=True)
def _no_leftover_pipelines() -> object:
    """A test that fails half-way must not leave its pipeline running."""
    yield
    from tests.procutil import kill_leftovers

    kill_leftovers()


@pytest.fixture(autouse=True)
def _private_server_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own default server data dir ($XDG_STATE_HOME/posewire): the
    room server persists kicks, closed rooms and stream/member-id bindings there, and
    one test's records must not refuse another test's members (or a later run's)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def net() -> Iterator[Topology]:
    """Two namespace hosts, a and b, joined by a router (bench/netns.py); skipped (a
    failure on CI) where namespaces cannot be made."""
    from bench.netns import topology, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with topology(("a", "b")) as made:
        yield made
