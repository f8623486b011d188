"""The benchmark harness (``python -m bench``): arguments, running a benchmark in its own
process, results on disk, and the combined tables.

Fake benchmarks are real modules in a temporary directory, run as real
subprocesses; the end-to-end test runs the real codec benchmark (a few seconds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import (
    Outcome,
    UsageError,
    combined_object,
    discover,
    failure_result,
    group_rows,
    harness_info,
    load_results,
    machine_line,
    parse_args,
    render_markdown,
    run_benchmark,
    save,
    takes_quick,
    write_latest,
)
from bench.common import RESULT_ENV, report, result, target

ROOT = Path(__file__).resolve().parents[1]

FAKE_REPORT = """
import sys
from bench.common import progress, report, target

def main(argv):
    print("chatter before the result")           # stdout noise a harness must survive
    print("a warning", file=sys.stderr)
    progress(1, 2, "half way")
    quick = "--quick" in argv
    report("fake", [{"name": "case", "value_ms": 1.5, "quick": quick}],
           [target("value ms", 1.5, "<= 2", True)], as_json="--json" in argv)
    return 0
"""

FAKE_PRINT_ONLY = """
import json

def main(argv):
    print("not json")
    obj = {"bench": "printer", "machine": {}, "rows": [{"name": "r", "n": 1}], "targets": []}
    print(json.dumps(obj))
    return 0
"""

FAKE_CRASH = """
import sys

def main(argv):
    print("boom", file=sys.stderr)
    return 3
"""


def _squash(text: str) -> str:
    """Markdown tables with their column padding removed."""
    return re.sub(r" +", " ", text)


def _env_with(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _fake(tmp_path: Path, name: str, body: str) -> dict[str, str]:
    (tmp_path / f"{name}.py").write_text(body, encoding="utf-8")
    return _env_with(tmp_path)


# --------------------------------------------------------------------------- arguments


def test_parse_args_splits_names_harness_flags_and_passthrough() -> None:
    known = ["ring", "codec", "soak"]
    args = parse_args(
        ["soak", "ring", "--minutes", "2", "--json", "--quick", "--results", "out", "-x"], known
    )
    assert args.names == ["soak", "ring"]
    assert args.json and args.quick and args.save
    assert args.results == Path("out")
    assert args.passthrough == ["--minutes", "2", "-x"]
    assert parse_args(["--no-save", "--results=r"], known).save is False
    assert parse_args(["--results=r"], known).results == Path("r")
    assert parse_args([], known).names == []
    with pytest.raises(UsageError, match="unknown benchmark 'nope'"):
        parse_args(["nope"], known)
    with pytest.raises(UsageError, match="--results needs"):
        parse_args(["--results"], known)


def test_discover_lists_the_benchmarks_in_order_and_which_take_quick() -> None:
    names = discover()
    for name in ("ring", "codec", "fanout", "transport", "switch", "soak"):
        assert name in names
    assert "common" not in names and "__main__" not in names
    order = ("ring", "codec", "pipeline_fps", "fanout", "transport", "viewer", "switch", "soak")
    known = [n for n in order if n in names]
    assert names[: len(known)] == known
    assert "redisbus" in names  # not in ORDER: found by its main()
    assert takes_quick("ring") and takes_quick("soak") and takes_quick("switch")
    assert takes_quick("redisbus")
    assert not takes_quick("codec")
    assert not takes_quick("no_such_bench")


def test_discover_picks_up_any_module_with_main(tmp_path: Path) -> None:
    (tmp_path / "common.py").write_text("def main(argv): return 0\n", encoding="utf-8")
    (tmp_path / "zeta.py").write_text("def main(argv):\n    return 0\n", encoding="utf-8")
    (tmp_path / "helper.py").write_text("X = 1\n", encoding="utf-8")
    (tmp_path / "soak.py").write_text("def main(argv):\n    return 0\n", encoding="utf-8")
    assert discover(tmp_path) == ["soak", "zeta"]


def test_help_and_list_exit_0() -> None:
    for flag in ("--help", "--list"):
        proc = subprocess.run(
            [sys.executable, "-m", "bench", flag],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "soak" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown benchmark" in proc.stderr


# --------------------------------------------------------------------------- running


def test_run_benchmark_takes_the_result_from_the_report_hook(tmp_path: Path) -> None:
    env = _fake(tmp_path, "fake_report_bench", FAKE_REPORT)
    seen: list[tuple[float, float | None, str]] = []
    out = run_benchmark(
        "fake",
        ["--quick"],
        module="fake_report_bench",
        env=env,
        on_progress=lambda d, t, n: seen.append((d, t, n)),
        poll_s=0.01,
    )
    assert out.exit_code == 0, out.stderr_tail
    assert out.argv == ["--quick", "--json"]
    assert len(out.results) == 1
    obj = out.results[0]
    assert obj["bench"] == "fake"
    assert obj["rows"] == [{"name": "case", "value_ms": 1.5, "quick": True}]
    assert obj["targets"][0]["met"] is True
    assert set(obj) >= {"bench", "machine", "rows", "targets"}
    assert "a warning" in out.stderr_tail


def test_run_benchmark_falls_back_to_json_lines_on_stdout(tmp_path: Path) -> None:
    env = _fake(tmp_path, "fake_print_bench", FAKE_PRINT_ONLY)
    out = run_benchmark("printer", [], module="fake_print_bench", env=env, poll_s=0.01)
    assert out.exit_code == 0
    assert [o["bench"] for o in out.results] == ["printer"]


def test_a_benchmark_without_result_becomes_a_failed_target(tmp_path: Path) -> None:
    env = _fake(tmp_path, "fake_crash_bench", FAKE_CRASH)
    out = run_benchmark("crash", [], module="fake_crash_bench", env=env, poll_s=0.01)
    assert out.exit_code == 3
    assert out.results == []
    assert "boom" in out.stderr_tail
    obj = failure_result(out, quick=False)
    assert obj["bench"] == "crash"
    assert obj["targets"][0]["met"] is False
    assert obj["harness"]["exit_code"] == 3
    assert "boom" in obj["error"]


def test_report_appends_to_the_result_file_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.jsonl"
    monkeypatch.delenv(RESULT_ENV, raising=False)
    report("a", [{"name": "x", "v_ms": 1.0}])
    assert not path.exists()
    monkeypatch.setenv(RESULT_ENV, str(path))
    report("a", [{"name": "x", "v_ms": float("nan")}], [target("t", 1, "<= 2", True)])
    report("b", [{"name": "y"}], as_json=True)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["bench"] for line in lines] == ["a", "b"]
    assert json.loads(lines[0])["rows"][0]["v_ms"] is None
    out = capsys.readouterr().out
    assert "| name | v_ms |" in out  # the human table is still printed


# --------------------------------------------------------------------------- results


def _obj(bench: str, met: bool, command: str) -> dict[str, object]:
    obj = result(
        bench,
        [{"name": "a", "p50_ms": 1.0}, {"name": "b", "p50_ms": 2.0}],
        [target(f"{bench} p50", 1.0, "<= 5", met)],
    )
    obj["harness"] = {"command": command, "exit_code": 0, "elapsed_s": 1.0, "quick": False}
    return obj


def test_save_latest_and_combined_tables(tmp_path: Path) -> None:
    save(
        [_obj("soak", True, "python -m bench soak"), _obj("ring", False, "python -m bench ring")],
        tmp_path,
    )
    (tmp_path / "junk.json").write_text("[1, 2]", encoding="utf-8")
    assert [o["bench"] for o in load_results(tmp_path)] == ["ring", "soak"]  # run order
    latest = _squash(write_latest(tmp_path).read_text(encoding="utf-8"))
    assert "machine: " + machine_line().split(", load")[0] in latest
    assert "| bench | name | value | target | met |" in latest
    assert "| ring | ring p50 | 1.00 | <= 5 | no |" in latest
    assert "| soak | soak p50 | 1.00 | <= 5 | yes |" in latest
    assert "## ring" in latest and "`python -m bench ring`" in latest
    assert latest.index("## ring") < latest.index("## soak")


def test_combined_json_object_is_house_shaped() -> None:
    outcomes = [
        Outcome("ring", ["--json"], 0, 2.0, [_obj("ring", True, "c")]),
        Outcome("soak", ["--json"], 1, 60.0, [_obj("soak", False, "c")]),
    ]
    obj = combined_object(outcomes)
    assert obj["bench"] == "all"
    assert [r["name"] for r in obj["rows"]] == ["ring", "soak"]
    assert obj["rows"][1] | {"elapsed_s": 0} == {
        "name": "soak",
        "exit_code": 1,
        "elapsed_s": 0,
        "targets_met": 0,
        "targets": 1,
    }
    assert [t["name"] for t in obj["targets"]] == ["ring: ring p50", "soak: soak p50"]
    assert [t["met"] for t in obj["targets"]] == [True, False]
    json.dumps(obj, allow_nan=False)


def test_rows_of_different_shapes_get_their_own_tables() -> None:
    rows = [
        {"name": "a", "x_ms": 1, "y_ms": 2},
        {"name": "b", "x_ms": 1, "y_ms": 2, "z_ms": 3},  # one extra column: same table
        {"name": "c"},  # a subset: same table
        {"name": "frames", "sent": 1, "received": 1, "lost": 0, "late": 0},
    ]
    assert [len(g) for g in group_rows(rows)] == [3, 1]
    doc = _squash(render_markdown([result("t", rows)], title="t"))
    assert "| name | x_ms | y_ms | z_ms |" in doc
    assert "| name | sent | received | lost | late |" in doc


def test_harness_info_shows_the_command_without_json() -> None:
    info = harness_info(Outcome("ring", ["--quick", "--json"], 0, 12.34), quick=True)
    assert info["command"] == "python -m bench ring --quick"
    assert info["elapsed_s"] == 12.3 and info["quick"] is True


# --------------------------------------------------------------------------- end to end


def test_harness_runs_a_real_benchmark_and_writes_its_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "codec", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("# posewire benchmarks\n\nmachine: ")
    assert "## codec" in out
    summary = out[out.index("## targets") :]
    assert "| bench | name" in summary and "| codec |" in summary
    saved = json.loads((results / "codec.json").read_text(encoding="utf-8"))
    assert saved["bench"] == "codec"
    assert set(saved) >= {"bench", "machine", "rows", "targets", "harness"}
    assert saved["harness"]["command"] == "python -m bench codec"
    assert saved["targets"] and all(
        set(t) == {"name", "value", "target", "met"} for t in saved["targets"]
    )
    latest = (results / "latest.md").read_text(encoding="utf-8")
    assert "## targets" in latest and "| codec |" in latest
