"""Helpers shared by every benchmark in ``bench/``.

Every benchmark prints a markdown table for people and, with ``--json``, one
JSON object in the house shape (see DESIGN.md)::

    {"bench": NAME,
     "machine": {...},
     "rows": [{"name": ..., "<figure>_<unit>": ...}, ...],
     "targets": [{"name": ..., "value": ..., "target": ..., "met": true}, ...]}

Typical use::

    parser = argparse.ArgumentParser(prog="python -m bench mything")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    rows = [{"name": "fast", "p50_us": 1.2}, {"name": "baseline", "p50_us": 9.9}]
    targets = [target("p50 under 5 us", 1.2, "<= 5", 1.2 <= 5)]
    report("mything", rows, targets, as_json=args.json)

Nothing here knows about any particular benchmark.

Harness hooks (``python -m bench`` sets them; a benchmark run on its own is
unaffected): when ``$POSEWIRE_BENCH_RESULT`` names a file, :func:`report`
also appends its JSON object there, one line per call, whatever ``--json``
says; when ``$POSEWIRE_BENCH_PROGRESS`` names a file, :func:`progress` writes
how far a long benchmark has got, for the harness's progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

from pipeline.model.stats import percentiles

Row = dict[str, Any]
Target = dict[str, Any]

RESULT_ENV = "POSEWIRE_BENCH_RESULT"
"""Environment variable: a file :func:`report` appends each result object to (JSON lines)."""
PROGRESS_ENV = "POSEWIRE_BENCH_PROGRESS"
"""Environment variable: a file :func:`progress` writes ``done total note`` to."""


def machine_info() -> dict[str, Any]:
    """A small description of the machine and interpreter, for the ``machine`` key."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
    }
    with contextlib.suppress(AttributeError, OSError):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    with contextlib.suppress(AttributeError, OSError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation; NaN for an empty sequence.

    A thin wrapper of :func:`pipeline.model.stats.percentiles`, the one implementation.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    got = percentiles(values, (q,))
    return got[0] if got else math.nan


def summarize(values: Sequence[float], unit: str, prefix: str = "") -> dict[str, float]:
    """``{prefix}mean_{unit}``, ``p50``, ``p90``, ``p99``, ``max`` of ``values``.

    >>> summarize([1.0, 2.0, 3.0], "us")["p50_us"]
    2.0
    """
    n = len(values)
    mean = math.fsum(values) / n if n else math.nan
    return {
        f"{prefix}mean_{unit}": mean,
        f"{prefix}p50_{unit}": percentile(values, 50),
        f"{prefix}p90_{unit}": percentile(values, 90),
        f"{prefix}p99_{unit}": percentile(values, 99),
        f"{prefix}max_{unit}": max(values) if n else math.nan,
    }


def time_calls(fn: Callable[[], object], repeat: int, warmup: int = 10) -> list[float]:
    """Call ``fn`` ``warmup`` times, then ``repeat`` times; return each call's µs."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(repeat):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000.0)
    return out


# --------------------------------------------------------------------------- targets


def target(name: str, value: Any, goal: str, met: bool) -> Target:
    """One entry of ``targets``: what was measured, the goal as text, and whether it was met."""
    return {"name": name, "value": _jsonable(value), "target": goal, "met": bool(met)}


def at_most(name: str, value: float, limit: float) -> Target:
    """Target ``value <= limit``."""
    return target(name, value, f"<= {limit:g}", value <= limit)


def at_least(name: str, value: float, limit: float) -> Target:
    """Target ``value >= limit``."""
    return target(name, value, f">= {limit:g}", value >= limit)


# --------------------------------------------------------------------------- output


def format_value(value: Any) -> str:
    """A compact human form of one table cell."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 1000:
            return f"{value:,.0f}"
        if mag >= 100:
            return f"{value:.0f}"
        if mag >= 10:
            return f"{value:.1f}"
        if mag >= 0.01:
            return f"{value:.2f}"
        return f"{value:.2e}"
    if value is None:
        return "-"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as a markdown table; ``columns`` defaults to every key seen, in first-seen order."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key in row:
                seen.setdefault(key, None)
        columns = list(seen)
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]

    def line(parts: Iterable[str]) -> str:
        return "| " + " | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)) + " |"

    out = [line(columns), "| " + " | ".join("-" * w for w in widths) + " |"]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def targets_table(targets: Sequence[Target]) -> str:
    """The targets as a markdown table (name, value, target, met)."""
    return markdown_table(targets, ["name", "value", "target", "met"])


def result(
    bench: str,
    rows: Sequence[Row],
    targets: Sequence[Target] = (),
    machine: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The house JSON object; ``extra`` keys (e.g. ``params``) are added after the four."""
    out: dict[str, Any] = {
        "bench": bench,
        "machine": dict(machine) if machine is not None else machine_info(),
        "rows": [{k: _jsonable(v) for k, v in r.items()} for r in rows],
        "targets": [dict(t) for t in targets],
    }
    for k, v in extra.items():
        out[k] = _jsonable(v)
    return out


def emit_json(obj: Mapping[str, Any], file: IO[str] | None = None) -> None:
    """Write one JSON object on one line (NaN/inf become null)."""
    print(json.dumps(_jsonable(obj), allow_nan=False), file=file or sys.stdout)


def report(
    bench: str,
    rows: Sequence[Row],
    targets: Sequence[Target] = (),
    *,
    as_json: bool = False,
    columns: Sequence[str] | None = None,
    title: str | None = None,
    file: IO[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Print the result (markdown or ``--json``) and return the JSON object either way."""
    obj = result(bench, rows, targets, **extra)
    save_result(obj)
    out = file or sys.stdout
    if as_json:
        emit_json(obj, out)
        return obj
    if title:
        print(f"## {title}\n", file=out)
    print(markdown_table(rows, columns), file=out)
    if targets:
        print("\ntargets:\n", file=out)
        print(targets_table(targets), file=out)
    return obj


def save_result(obj: Mapping[str, Any]) -> None:
    """Append ``obj`` as one JSON line to ``$POSEWIRE_BENCH_RESULT`` when it is set."""
    path = os.environ.get(RESULT_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        emit_json(obj, fh)


def progress(done: float, total: float, note: str = "") -> None:
    """Tell the harness how far this benchmark has got (no-op unless it asked).

    ``done`` and ``total`` in any one unit (seconds, cases...); ``note`` is a
    short text shown beside the bar.
    """
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    text = f"{float(done):g} {float(total):g} {' '.join(note.split())}\n"
    tmp = f"{path}.tmp"
    with contextlib.suppress(OSError):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)


def all_met(targets: Sequence[Target]) -> bool:
    """True when every target is met (useful for an exit status)."""
    return all(bool(t.get("met")) for t in targets)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Add the standard ``--json`` flag."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats to plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _jsonable(tolist())
    item = getattr(value, "item", None)
    if callable(item):
        return _jsonable(item())
    return str(value)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port nothing listens on right now (bound to 127.0.0.1 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(
    proc: subprocess.Popen[Any],
    timeout: float = 10.0,
    *,
    sig: int = signal.SIGTERM,
    kill_group: bool = False,
) -> int:
    """Ask a child to stop (``sig``), wait ``timeout``, then SIGKILL it (its process group
    with ``kill_group``) and reap it. Returns its exit code; a process already gone is
    just reaped. Benchmarks and tests stop their servers and pipelines with this."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if kill_group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait()
    return proc.returncode
