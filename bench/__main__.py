"""``python -m bench [NAME ...] [--json] [--quick] [OPTIONS]``: the benchmark harness.

Runs the named benchmarks (all of them without a name: ``ring``, ``codec``,
``pipeline_fps``, ``fanout``, ``transport``, ``viewer``, ``switch``, ``soak``, then any other
``bench/<name>.py`` with ``main(argv) -> int``), one after the other, each in its own process
with ``--json``, with progress bars on stderr. Every result object is written
to ``bench/results/<bench>.json`` (the house JSON shape plus a ``harness``
key: command, exit code, elapsed time, date), and ``bench/results/latest.md``
is rebuilt from every stored result: the machine, one table of every
benchmark's targets (bench, name, value, target, met) and each benchmark's
own tables. The same tables are printed on stdout, the targets last.

Options:

``--json``
    print JSON on stdout instead of tables: the benchmark's own object when
    one benchmark was named, else one combined object
    (``{"bench": "all", "machine", "rows", "targets", "results"}``).
``--quick``
    passed to every benchmark that has a ``--quick`` option (the others run
    as they are).
``--results DIR``
    where results go (default ``bench/results``); ``--no-save`` writes none.
``--list``
    the benchmarks found, and which of them take ``--quick``.

Every other option after the names is passed to each benchmark named, e.g.
``python -m bench soak --minutes 10`` or ``python -m bench ring --doorbells``.
A benchmark's own CLI still works on its own: ``python -m bench.ring --quick``.
Exit status: the highest of the benchmarks' exit statuses (2 for a usage
error, 1 when a benchmark produced no result).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from bench.common import (
    PROGRESS_ENV,
    RESULT_ENV,
    machine_info,
    markdown_table,
    result,
    target,
)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
ORDER = ("ring", "codec", "pipeline_fps", "fanout", "transport", "viewer", "switch", "soak")
"""The benchmarks in the order they run; any other ``bench/<name>.py`` follows."""
NOT_BENCHMARKS = frozenset({"__init__", "__main__", "common"})
HARNESS_FLAGS = frozenset({"--json", "--quick", "--no-save", "--list"})
RUNNER = (
    "import importlib, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "mod = importlib.import_module(sys.argv[1])\n"
    "sys.exit(mod.main(sys.argv[2:]))\n"
)
STOP_GRACE_S = 30.0
"""After Ctrl-C: how long a benchmark may take to clean up before its group is killed."""
SAME_SHAPE = 0.6

ProgressFn = Callable[[float, float | None, str], None]


class UsageError(Exception):
    """A bad command line (exit 2)."""


# --------------------------------------------------------------------------- discovery


def discover(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Benchmark names: :data:`ORDER` first, then other modules with ``def main(``."""
    found: list[str] = []
    for path in sorted(bench_dir.glob("*.py")):
        name = path.stem
        if name in NOT_BENCHMARKS or name.startswith("_"):
            continue
        with contextlib.suppress(OSError):
            if re.search(r"^def main\(", path.read_text(encoding="utf-8"), re.MULTILINE):
                found.append(name)
    known = [n for n in ORDER if n in found]
    return known + [n for n in found if n not in ORDER]


def takes_quick(name: str, bench_dir: Path = BENCH_DIR) -> bool:
    """Whether ``bench/<name>.py`` defines a ``--quick`` option."""
    try:
        text = (bench_dir / f"{name}.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r"add_argument\(\s*[\"']--quick[\"']", text) is not None


@dataclass
class Args:
    """The harness's command line."""

    names: list[str]
    passthrough: list[str]
    json: bool = False
    quick: bool = False
    save: bool = True
    results: Path = RESULTS_DIR
    list_only: bool = False
    help: bool = False


def parse_args(argv: Sequence[str], known: Sequence[str]) -> Args:
    """Names first, then options; the harness's own options are taken out, the rest passed on."""
    args = list(argv)
    out = Args(names=[], passthrough=[])
    while args and not args[0].startswith("-"):
        name = args.pop(0)
        if name not in known:
            raise UsageError(f"unknown benchmark {name!r}; known: {', '.join(known)}")
        if name not in out.names:
            out.names.append(name)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            out.help = True
        elif arg == "--json":
            out.json = True
        elif arg == "--quick":
            out.quick = True
        elif arg == "--no-save":
            out.save = False
        elif arg == "--list":
            out.list_only = True
        elif arg == "--results" or arg.startswith("--results="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif args:
                value = args.pop(0)
            else:
                raise UsageError("--results needs a directory")
            out.results = Path(value)
        else:
            out.passthrough.append(arg)
    return out


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """What running one benchmark produced."""

    name: str
    argv: list[str]
    exit_code: int
    elapsed_s: float
    results: list[dict[str, Any]] = field(default_factory=list)
    stderr_tail: str = ""
    interrupted: bool = False
    failed: bool = False
    """It produced no result (``results`` then holds :func:`failure_result`)."""


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` that is a JSON object with a ``bench`` key."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("bench"), str):
            out.append(obj)
    return out


def _read_progress(path: Path) -> tuple[float, float, str] | None:
    try:
        parts = path.read_text(encoding="utf-8").split(" ", 2)
        return float(parts[0]), float(parts[1]), parts[2].strip() if len(parts) > 2 else ""
    except (OSError, ValueError, IndexError):
        return None


def run_benchmark(
    name: str,
    argv: Sequence[str],
    *,
    module: str | None = None,
    on_progress: ProgressFn | None = None,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.2,
) -> Outcome:
    """Run ``module`` (default ``bench.<name>``) ``main(argv + ["--json"])`` in a subprocess.

    The result objects come from the ``$POSEWIRE_BENCH_RESULT`` file the
    benchmark's :func:`bench.common.report` appends to, else from the JSON
    lines of its stdout. ``on_progress(done, total, note)`` is called while it
    runs (``total`` None: the benchmark reports no progress; ``done`` is then
    the elapsed seconds). Ctrl-C stops the benchmark's process group.
    """
    full_argv = [*argv, "--json"] if "--json" not in argv else list(argv)
    with tempfile.TemporaryDirectory(prefix=f"posewire-bench-{name}-") as tmp:
        tmpdir = Path(tmp)
        result_file = tmpdir / "result.jsonl"
        progress_file = tmpdir / "progress"
        child_env = dict(os.environ if env is None else env)
        child_env[RESULT_ENV] = str(result_file)
        child_env[PROGRESS_ENV] = str(progress_file)
        child_env.setdefault("GLOG_minloglevel", "2")
        started = time.monotonic()
        interrupted = False
        with (
            open(tmpdir / "stdout", "w+b") as out,
            open(tmpdir / "stderr", "w+b") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-c", RUNNER, module or f"bench.{name}", *full_argv],
                cwd=ROOT,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                while proc.poll() is None:
                    if on_progress is not None:
                        got = _read_progress(progress_file)
                        if got is None:
                            on_progress(time.monotonic() - started, None, "")
                        else:
                            on_progress(*got)
                    time.sleep(poll_s)
            except KeyboardInterrupt:
                interrupted = True
                _stop_group(proc)
            finally:
                if proc.poll() is None:
                    _stop_group(proc)
            elapsed = time.monotonic() - started
            out.seek(0)
            stdout = out.read().decode("utf-8", "replace")
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
        try:
            objs = _json_objects(result_file.read_text(encoding="utf-8"))
        except OSError:
            objs = []
        if not objs:
            objs = _json_objects(stdout)
    return Outcome(
        name=name,
        argv=full_argv,
        exit_code=int(proc.returncode),
        elapsed_s=elapsed,
        results=objs,
        stderr_tail="\n".join(stderr.splitlines()[-20:]),
        interrupted=interrupted,
    )


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the benchmark's process group, SIGKILL it after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --------------------------------------------------------------------------- results


def harness_info(outcome: Outcome, quick: bool) -> dict[str, Any]:
    return {
        "command": shlex.join(
            ["python", "-m", "bench", outcome.name, *(a for a in outcome.argv if a != "--json")]
        ),
        "exit_code": outcome.exit_code,
        "elapsed_s": round(outcome.elapsed_s, 1),
        "quick": quick,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def failure_result(outcome: Outcome, quick: bool) -> dict[str, Any]:
    """The object stored for a benchmark that produced none."""
    why = "interrupted" if outcome.interrupted else f"exit {outcome.exit_code}, no result"
    obj = result(
        outcome.name,
        [],
        [target(f"{outcome.name} produced a result", why, "a result", False)],
        error=outcome.stderr_tail,
    )
    obj["harness"] = harness_info(outcome, quick)
    return obj


def _safe_name(bench: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", bench) or "unnamed"


def save(objs: Sequence[Mapping[str, Any]], results_dir: Path) -> list[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for obj in objs:
        path = results_dir / f"{_safe_name(str(obj['bench']))}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every stored result, in run order (see :data:`ORDER`), then by name."""
    objs: list[dict[str, Any]] = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("bench"), str):
            objs.append(obj)

    def key(obj: dict[str, Any]) -> tuple[int, str]:
        base = str(obj["bench"]).split("-", 1)[0]
        return (ORDER.index(base) if base in ORDER else len(ORDER), str(obj["bench"]))

    return sorted(objs, key=key)


# --------------------------------------------------------------------------- rendering


def machine_line(machine: Mapping[str, Any] | None = None) -> str:
    """One line describing the machine, from :func:`bench.common.machine_info`."""
    m = dict(machine) if machine is not None else machine_info()
    cpus = f"{m.get('cpu_count')} CPUs"
    if m.get("cpu_affinity") not in (None, m.get("cpu_count")):
        cpus += f" ({m['cpu_affinity']} usable)"
    parts = [
        str(m.get("cpu_model", "unknown CPU")),
        cpus,
        f"{m.get('system', '')} {m.get('release', '')} {m.get('machine', '')}".strip(),
        f"{m.get('implementation', 'Python')} {m.get('python', '')}".strip(),
    ]
    if m.get("numpy"):
        parts.append(f"numpy {m['numpy']}")
    if m.get("loadavg_1m") is not None:
        parts.append(f"load {m['loadavg_1m']}")
    return ", ".join(parts)


def group_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Consecutive rows of about the same shape form one table.

    A row joins the current table when its keys are a subset of the table's
    columns so far, or share at least :data:`SAME_SHAPE` of them (Jaccard);
    otherwise it starts a new table.
    """
    groups: list[list[Mapping[str, Any]]] = []
    columns: set[str] = set()
    for row in rows:
        keys = set(row)
        union = keys | columns
        if groups and (keys <= columns or len(keys & columns) / len(union) >= SAME_SHAPE):
            groups[-1].append(row)
            columns = union
        else:
            groups.append([row])
            columns = keys
    return groups


def rows_tables(rows: Sequence[Mapping[str, Any]]) -> str:
    """A benchmark's rows as markdown tables, one per row shape; empty columns dropped."""
    out = []
    for group in group_rows(rows):
        seen: dict[str, None] = {}
        for row in group:
            for key in row:
                seen.setdefault(key, None)
        columns = [c for c in seen if any(r.get(c) is not None for r in group)]
        out.append(markdown_table(group, columns or None))
    return "\n\n".join(out)


def combined_targets(objs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every benchmark's targets as rows ``bench, name, value, target, met``."""
    rows = []
    for obj in objs:
        for t in obj.get("targets") or []:
            rows.append(
                {
                    "bench": obj["bench"],
                    "name": t.get("name"),
                    "value": t.get("value"),
                    "target": t.get("target"),
                    "met": bool(t.get("met")),
                }
            )
    return rows


def summary_table(objs: Sequence[Mapping[str, Any]]) -> str:
    rows = combined_targets(objs)
    if not rows:
        return "(no targets)"
    return markdown_table(rows, ["bench", "name", "value", "target", "met"])


def bench_section(obj: Mapping[str, Any], machine: str | None = None) -> str:
    """``## bench``: how it ran and its rows' tables (its targets are in the summary)."""
    h = obj.get("harness") or {}
    lines = [f"## {obj['bench']}", ""]
    how = []
    if h.get("command"):
        how.append(f"`{h['command']}`")
    if h.get("elapsed_s") is not None:
        how.append(f"{h['elapsed_s']:g} s")
    if h.get("exit_code") not in (None, 0):
        how.append(f"exit {h['exit_code']}")
    if h.get("finished_at"):
        how.append(str(h["finished_at"]))
    if how:
        lines += [", ".join(how), ""]
    this_machine = machine_line(obj.get("machine") or {})
    if machine is not None and obj.get("machine") and this_machine != machine:
        lines += [f"machine: {this_machine}", ""]
    if obj.get("rows"):
        lines += [rows_tables(obj["rows"]), ""]
    if obj.get("error"):
        lines += ["```", str(obj["error"]), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _load_free(machine: Mapping[str, Any]) -> str:
    return machine_line({k: v for k, v in machine.items() if k != "loadavg_1m"})


def header_lines(objs: Sequence[Mapping[str, Any]], machine: str) -> list[str]:
    """The machine line and the load each benchmark reported (the machine may be shared)."""
    out = [f"machine: {machine}", ""]
    loads = [
        f"{o['bench']} {(o.get('machine') or {})['loadavg_1m']:g}"
        for o in objs
        if isinstance((o.get("machine") or {}).get("loadavg_1m"), int | float)
    ]
    if loads:
        out += [f"load (1-minute average, when each benchmark reported): {', '.join(loads)}", ""]
    return out


def render_markdown(objs: Sequence[Mapping[str, Any]], *, title: str) -> str:
    """The combined document: machine, targets of every benchmark, then each benchmark."""
    machines = [o.get("machine") or {} for o in objs]
    common = _load_free(machines[-1]) if machines else machine_line()
    out = [f"# {title}", "", *header_lines(objs, common)]
    out += ["## targets", "", summary_table(objs), ""]
    for obj in objs:
        m = obj.get("machine") or {}
        out.append(bench_section(obj, common if _load_free(m) == common else None))
    return "\n".join(out).rstrip() + "\n"


def write_latest(results_dir: Path) -> Path:
    path = results_dir / "latest.md"
    objs = load_results(results_dir)
    text = render_markdown(objs, title="posewire benchmarks: latest results")
    text += (
        "\nRebuilt by `python -m bench` from every `bench/results/<bench>.json` "
        "(each benchmark's newest run; its command and date are under its heading).\n"
    )
    path.write_text(text, encoding="utf-8")
    return path


def combined_object(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """One house-shaped object for a run of several benchmarks."""
    objs = [obj for o in outcomes for obj in o.results]
    rows = []
    for o in outcomes:
        targets = [t for r in o.results for t in r.get("targets") or []]
        rows.append(
            {
                "name": o.name,
                "exit_code": o.exit_code,
                "elapsed_s": round(o.elapsed_s, 1),
                "targets_met": sum(1 for t in targets if t.get("met")),
                "targets": len(targets),
            }
        )
    targets = [
        target(f"{t['bench']}: {t['name']}", t["value"], str(t["target"]), t["met"])
        for t in combined_targets(objs)
    ]
    return result("all", rows, targets, results=objs)


# --------------------------------------------------------------------------- main


def _progress_ui() -> Progress:
    """Progress bars on stderr (a final snapshot only when stderr is not a terminal)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=Console(stderr=True),
    )


def _previous_elapsed(results_dir: Path, name: str, quick: bool) -> float | None:
    try:
        obj = json.loads((results_dir / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    h = obj.get("harness") if isinstance(obj, dict) else None
    if not isinstance(h, dict) or h.get("quick") != quick:
        return None
    value = h.get("elapsed_s")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def exit_status(outcome: Outcome) -> int:
    """The benchmark's exit status (128 + N for signal N); at least 1 without a result."""
    code = outcome.exit_code if outcome.exit_code >= 0 else 128 - outcome.exit_code
    return max(code, 1) if outcome.failed else code


def run_all(names: Sequence[str], args: Args) -> list[Outcome]:
    """Run ``names`` one after the other with progress bars; stop at Ctrl-C."""
    outcomes: list[Outcome] = []
    ui = _progress_ui()
    with ui:
        overall = ui.add_task("benchmarks", total=len(names), note="")
        for name in names:
            bench_argv = list(args.passthrough)
            quick = args.quick and takes_quick(name)
            if quick:
                bench_argv.insert(0, "--quick")
            estimate = _previous_elapsed(args.results, name, quick)
            task = ui.add_task(name, total=estimate, note="")

            def on_progress(
                done: float,
                total: float | None,
                note: str,
                task: TaskID = task,
                estimate: float | None = estimate,
            ) -> None:
                if total is not None and total > 0:
                    ui.update(task, total=total, completed=min(done, total), note=note)
                elif estimate is not None:
                    ui.update(task, completed=min(done, estimate * 0.99), note="(estimate)")

            try:
                outcome = run_benchmark(name, bench_argv, on_progress=on_progress)
            except KeyboardInterrupt:
                outcome = Outcome(name, bench_argv, 130, 0.0, interrupted=True)
            outcomes.append(outcome)
            for obj in outcome.results:
                obj["harness"] = harness_info(outcome, quick)
            if not outcome.results:
                outcome.failed = True
                outcome.results = [failure_result(outcome, quick)]
                if not outcome.interrupted:
                    ui.console.print(
                        f"{name}: no result (exit {outcome.exit_code})\n{outcome.stderr_tail}",
                        markup=False,
                    )
            total = next(t.total for t in ui.tasks if t.id == task) or 1.0
            ui.update(task, total=total, completed=total, note=f"exit {outcome.exit_code}")
            ui.advance(overall)
            if outcome.interrupted:
                ui.console.print("interrupted: the results of this run are not stored")
                break
    return outcomes


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C and SIGTERM stop the running benchmark (its group gets SIGINT), also when
    # this process was started with SIGINT ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    known = discover()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, known)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.help:
        print(__doc__)
        print("benchmarks:", ", ".join(known))
        return 0
    if args.list_only:
        for name in known:
            print(f"{name}{'  (--quick)' if takes_quick(name) else ''}")
        return 0
    outcomes = run_all(args.names or known, args)
    interrupted = any(o.interrupted for o in outcomes)
    worst = 130 if interrupted else max((exit_status(o) for o in outcomes), default=0)
    # an interrupted benchmark stores nothing: its previous result stays
    outcomes = [o for o in outcomes if not o.interrupted]
    objs = [obj for o in outcomes for obj in o.results]
    if args.save and objs:
        save(objs, args.results)
        write_latest(args.results)
    if not objs:
        return worst
    if args.json:
        single = len(args.names) == 1 and len(objs) == 1
        print(json.dumps(objs[0] if single else combined_object(outcomes), allow_nan=False))
        return worst
    print("# posewire benchmarks\n")
    print("\n".join(header_lines(objs, _load_free(machine_info()))))
    for obj in objs:
        print(bench_section(obj))
    print("## targets\n")
    print(summary_table(objs))
    if args.save:
        print(f"\nresults: {args.results}/ (latest.md)")
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
