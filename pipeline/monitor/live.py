"""The live status table (rich), redrawn at every sample when stdout is a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any


class LiveStatus:
    """A rich table redrawn at every sample; the supervisor's log lines print above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=sys.stdout)
        self.live = Live(
            console=self.console,
            auto_refresh=False,
            redirect_stdout=True,
            redirect_stderr=True,
            transient=False,
        )
        self.live.start()
        # The supervisor's log handler holds the real stderr: route it through the live
        # console's proxy so log lines appear above the table instead of tearing it.
        self._rerouted: list[tuple[logging.StreamHandler[Any], Any]] = []
        if sys.stderr is not sys.__stderr__:
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__:
                    self._rerouted.append((h, h.setStream(sys.stderr)))

    def update(self, current: Mapping[str, Any], hop: str | None) -> None:
        self.live.update(render_status(current, hop), refresh=True)

    def stop(self, current: Mapping[str, Any], hop: str | None) -> None:
        if current:
            self.live.update(render_status(current, hop), refresh=True)
        for h, old in self._rerouted:
            h.setStream(old)
        self.live.stop()


def render_status(current: Mapping[str, Any], hop: str | None = None) -> Any:
    """The live status table of one sample (a rich renderable); ``hop`` is the end-to-end
    latency hop shown under the table (``capture_to_send`` reads "capture->send")."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"posewire  t={current.get('t_s', 0):.0f}s", expand=False)
    for col, justify in (
        ("stage", "left"),
        ("state", "left"),
        ("pid", "right"),
        ("fps", "right"),
        ("cpu %", "right"),
        ("rss MB", "right"),
        ("restarts", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, s in current.get("stages", {}).items():
        table.add_row(
            name,
            str(s.get("state")),
            _cell(s.get("pid"), "{}"),
            _cell(s.get("fps"), "{:.1f}"),
            _cell(s.get("cpu_percent"), "{:.0f}"),
            _cell(s.get("rss_mb"), "{:.0f}"),
            str(s.get("restarts", 0)),
        )
    f = current.get("frames", {})
    lat = current.get("latency_ms", {}).get(hop, {}) if hop else {}
    label = hop.replace("_to_", "->") if hop else "end to end"
    tr = current.get("transport", {})
    active = [n for n, a in current.get("alerts", {}).items() if a.get("active")]
    summary = (
        f"frames captured {f.get('captured', 0)}  sent {f.get('sent', 0)}  "
        f"skipped {f.get('skipped', 0)}  dropped {f.get('dropped', 0)} "
        f"(rate {_cell(current.get('drop_rate'), '{:.1%}')})\n"
        f"latency {label} p50 {_cell(lat.get('p50'), '{:.1f}')} "
        f"p95 {_cell(lat.get('p95'), '{:.1f}')} p99 {_cell(lat.get('p99'), '{:.1f}')} ms   "
        f"transport {tr.get('active', '-')} ({tr.get('switches', 0)} switches)   "
        f"{_cell(current.get('bytes_per_frame'), '{:.1f}')} B/frame   "
        f"{_cell(current.get('bandwidth_kbps'), '{:.1f}')} kbit/s\n"
        + ("[bold red]ALERTS: " + ", ".join(active) + "[/]" if active else "[green]no alerts[/]")
    )
    return Group(table, Text.from_markup(summary))


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value)
