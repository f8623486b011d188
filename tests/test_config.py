"""Configuration: every bad field named with its YAML path and line; exit 2; nothing starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, load_config, parse_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# (yaml text, expected fragments: YAML path with line, and a word of the reason)
BROKEN: list[tuple[str, str, list[str]]] = [
    ("wrong type", "source:\n  fps: fast\n", ["source.fps (line 2)", "number"]),
    (
        "unknown key",
        "detect:\n  modle_complexity: 1\n",
        ["detect.modle_complexity (line 2)", "Extra"],
    ),
    ("unknown section", "sauce:\n  kind: demo\n", ["sauce (line 1)", "Extra"]),
    ("out of range", "server:\n  port: 70000\n", ["server.port (line 2)", "less than or equal"]),
    ("negative", "supervisor:\n  max_restarts: -1\n", ["supervisor.max_restarts (line 2)"]),
    ("bad enum", "source:\n  kind: webcam\n", ["source.kind (line 2)", "'camera'"]),
    ("bad enum transport", "transmit:\n  primary: carrier_pigeon\n", ["transmit.primary (line 2)"]),
    (
        "turn without credentials",
        "transmit:\n  ice_servers:\n    - urls: [turn:10.0.0.1:3478]\n",
        ["transmit.ice_servers.0 (line 3)", "username and credential"],
    ),
    (
        "bad ice url",
        "server:\n  ice_servers:\n    - urls: [http://x]\n",
        ["server.ice_servers.0.urls (line 3)", "not a stun:"],
    ),
    (
        "audio bitrate",
        "audio:\n  enabled: true\n  bitrate_kbps: 128\n",
        ["audio.bitrate_kbps (line 3)", "less than or equal to 64"],
    ),
    (
        "missing file",
        "source:\n  kind: file\n  path: /nonexistent/video.mp4\n",
        ["source.path (line 3)", "not found"],
    ),
    (
        "missing trace",
        "source:\n  kind: trace\n  path: nope.npz\n",
        ["source.path (line 3)", "not found"],
    ),
    ("ring too small", "rings:\n  frames:\n    slots: 1\n", ["rings.frames.slots (line 3)"]),
    (
        "impossible ring size",
        "rings:\n  frames: {slots: 4000}\n  max_frame_width: 7680\n  max_frame_height: 4320\n",
        ["rings", "GiB"],
    ),
    ("bad resize", "source:\n  resize: [10, 720]\n", ["source.resize.0 (line 2)"]),
    ("not a mapping", "- a\n- b\n", ["top level must be a mapping"]),
    ("bad yaml", "source: [unclosed\n", ["not valid YAML", "line"]),
    (
        "heartbeat timeout",
        "supervisor:\n  heartbeat_interval_ms: 500\n  heartbeat_timeout_ms: 600\n",
        ["supervisor", "heartbeat_timeout_ms must exceed"],
    ),
    ("bad run id", "supervisor:\n  run_id: 'a/b'\n", ["supervisor.run_id (line 2)", "pattern"]),
    ("file without path", "source:\n  kind: file\n", ["source.path (line 1)", "Field required"]),
    ("url without url", "source:\n  kind: url\n", ["source.url (line 1)", "Field required"]),
    (
        "tasks without model",
        "detect:\n  backend: tasks\n",
        ["detect.task_model (line 1)", "Field required"],
    ),
    (
        "missing task model",
        "detect:\n  backend: tasks\n  task_model: none.task\n",
        ["detect.task_model (line 3)", "task model not found"],
    ),
    ("bad backend", "detect:\n  backend: openpose\n", ["detect.backend (line 2)", "'mediapipe'"]),
    (
        "field of another kind",
        "source:\n  kind: demo\n  path: x.mp4\n",
        ["source.path (line 3)", "Extra"],
    ),
    (
        "old trace form",
        "detect:\n  backend: trace\n  trace: t.npz\n  trace_loop: false\n",
        ["detect.backend (line 2)", "source: {kind: trace, path: t.npz, loop: false}"],
    ),
    (
        "run dir not writable",
        "supervisor:\n  run_dir: /etc/hostname/run\n",
        ["supervisor.run_dir (line 2)", "not writable"],
    ),
]


@pytest.mark.parametrize(("label", "text", "expect"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_names_the_field(label: str, text: str, expect: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=ROOT)
    message = "\n".join(info.value.problems)
    for fragment in expect:
        assert fragment in message, f"{label}: {fragment!r} not in {message!r}"


def test_every_problem_is_reported_at_once() -> None:
    text = "source:\n  fps: -1\n  kind: nope\ndetect:\n  bogus: 1\nserver:\n  port: 0\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    paths = {p.split(" ")[0] for p in info.value.problems}
    assert paths == {"source.fps", "source.kind", "detect.bogus", "server.port"}


def test_default_pipeline_yaml_is_valid() -> None:
    cfg = load_config(ROOT / "pipeline.yaml")
    assert isinstance(cfg, Config)
    assert cfg.source.kind == "auto" and cfg.source.produces == "frames"


def test_empty_file_gives_defaults() -> None:
    cfg = parse_config("")
    assert cfg.supervisor.max_restarts == 5
    assert cfg.rings.frames.slots >= 2


def test_validate_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("source:\n  kind: webcam\n  fps: 0\n")
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 2
    assert "source.kind (line 2)" in run.stderr and "source.fps (line 3)" in run.stderr
    assert "Traceback" not in run.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(ROOT / "pipeline.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr


def test_run_refuses_invalid_config_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rings:\n  poses: {slots: 0}\n")
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 2
    assert "rings.poses.slots (line 2)" in run.stderr
    assert "Traceback" not in run.stderr


def test_sections_are_validated_by_the_model_their_key_selects() -> None:
    from pipeline.settings import DetectorSettings, SourceSettings

    cfg = parse_config(
        "source: {kind: trace, path: data/pose-traces/cmu02_05_punch_strike.npz, loop: false}\n"
        "detect: {backend: mediapipe, model_complexity: 1, workers: 2}\n",
        base_dir=ROOT,
    )
    assert isinstance(cfg.source, SourceSettings) and type(cfg.source).__name__ == "TraceSettings"
    assert cfg.source.produces == "poses" and cfg.source.model_dump()["loop"] is False
    assert isinstance(cfg.detect, DetectorSettings) and cfg.detect.workers == 2
    assert cfg.model_dump()["detect"]["model_complexity"] == 1  # subclass fields serialised
    with pytest.raises(ConfigError) as info:
        parse_config("source: {kind: trace}\n")
    assert info.value.problems == ["source.path (line 1): Field required"]  # no tag segment
