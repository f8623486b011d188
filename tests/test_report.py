"""``python -m pipeline report``: a real run's report rendered to non-empty PNGs and an HTML
page that references them; reports without series and bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.report import PLOTS
from tests.procutil import ROOT, TRACE, start, trace_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "report", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check_rendered(out: Path) -> str:
    page = (out / "index.html").read_text(encoding="utf-8")
    for name, _ in PLOTS:
        png = out / name
        assert png.is_file(), name
        data = png.read_bytes()
        assert len(data) > 1000, f"{name}: {len(data)} bytes"
        assert data.startswith(PNG_MAGIC), name
        assert f'src="{name}"' in page, name
    return page


@pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")
def test_rendered_report_of_a_real_run(tmp_path: Path) -> None:
    cfg = trace_config(tmp_path, monitor='  enabled: false\n  status: "off"')
    report = tmp_path / "run.json"
    proc = start(cfg, "--duration", "3", "--report", str(report))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert len(json.loads(report.read_text())["series"]["t_s"]) >= 2

    out = tmp_path / "rendered"
    res = _report_cmd(str(report), "--out", str(out))
    assert res.returncode == 0, res.stderr
    page = _check_rendered(out)
    data = json.loads(report.read_text())
    assert data["run_id"] in page
    for stage in ("capture", "encode", "transmit"):
        assert f"<td>{stage}</td>" in page
    assert "capture_to_send" in page


def test_report_without_series_still_renders(tmp_path: Path) -> None:
    """A run that failed at start has no series: every plot says so, nothing raises."""
    report = tmp_path / "failed.json"
    report.write_text(
        json.dumps(
            {
                "run_id": "abc",
                "exit_reason": "config_error",
                "exit_code": 2,
                "message": "source <missing> & co",
                "frames": {"captured": 0},
                "stages": {"capture": {"restarts": 0, "last_error": "<no camera>"}},
                "alerts": [],
            }
        )
    )
    res = _report_cmd(str(report))  # default output: next to the report
    assert res.returncode == 0, res.stderr
    page = _check_rendered(tmp_path / "failed-report")
    assert "&lt;no camera&gt;" in page and "<no camera>" not in page


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such report"), ("{broken", "not JSON"), ("[1, 2]", "not a run report")],
)
def test_bad_report_file_is_one_clear_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    report = tmp_path / "r.json"
    if content is not None:
        report.write_text(content)
    res = _report_cmd(str(report), "--out", str(tmp_path / "out"))
    assert res.returncode == 1
    assert message in res.stderr and "Traceback" not in res.stderr
