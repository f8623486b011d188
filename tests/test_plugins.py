"""Plugins: a source kind or a detector backend added from outside the library.

The toys of :mod:`tests.toy_plugin` are registered by this test module (no
library file names them); configurations then name them like built-in ones,
and real pipelines (``python -m pipeline``, spawned stage processes) run them
once ``POSEWIRE_PLUGINS`` names the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.codec import Decoded, Decoder
from pipeline.config import parse_config
from pipeline.detectors import create_detector
from pipeline.errors import ConfigError, RegistryError
from pipeline.registry import PLUGINS_ENV
from pipeline.settings import DETECTORS, SOURCES
from pipeline.sources import make_source
from pipeline.transports.file import read_packets
from tests import toy_plugin
from tests.procutil import ROOT, shm_segments, start, write_config

PLUGIN_ENV = {PLUGINS_ENV: "tests.toy_plugin"}


@pytest.fixture
def toys() -> Iterator[None]:
    toy_plugin.register()
    yield
    toy_plugin.unregister()


def test_builtin_plugins_are_discovered() -> None:
    assert {"auto", "camera", "demo", "file", "images", "trace", "url"} <= set(SOURCES.keys())
    assert {"mediapipe", "tasks"} <= set(DETECTORS.keys())
    assert SOURCES.get("trace").settings.produces == "poses"
    assert SOURCES.get("file").settings.produces == "frames"
    with pytest.raises(RegistryError, match="unknown source kind 'nope'; known: auto, camera"):
        SOURCES.get("nope")


def test_a_registration_under_a_taken_key_is_refused(toys: None) -> None:
    def other(*args: object) -> None:
        return None

    other.__module__ = "somewhere.else"
    with pytest.raises(
        RegistryError, match=r"registered twice: by tests\.toy_plugin and by somewhere\.else"
    ):
        SOURCES.add("toy_poses", toy_plugin.ToyPoseSettings, other)


def test_toy_plugins_validate_and_build(toys: None, tmp_path: Path) -> None:
    before = SOURCES.generation
    toy_plugin.unregister()
    with pytest.raises(ConfigError, match="unknown source kind 'toy_poses'"):
        parse_config("source: {kind: toy_poses}\n")
    toy_plugin.register()
    assert SOURCES.generation > before
    cfg = parse_config(
        "source: {kind: toy_poses, count: 5}\ndetect: {backend: toy, scale: 0.5, workers: 2}\n"
    )
    assert isinstance(cfg.source, toy_plugin.ToyPoseSettings) and cfg.source.count == 5
    assert cfg.source.produces == "poses"
    assert isinstance(cfg.detect, toy_plugin.ToyDetectorSettings) and cfg.detect.workers == 2
    source = make_source(cfg)
    assert isinstance(source, toy_plugin.ToyPoseSource)
    poses = [source.pose(n, n + 1, 0) for n in range(6)]
    assert poses[-1] is None and all(p is not None for p in poses[:5])
    detector = create_detector(cfg)
    pose = detector.detect(np.full((4, 4, 3), 255, np.uint8), 1, 0)
    assert pose.image[0, 0, 0] == pytest.approx(0.5)
    # the toy's own fields are checked with their YAML path, no tag segment
    with pytest.raises(ConfigError) as info:
        parse_config(
            "source:\n  kind: toy_frames\n  count: 0\ndetect:\n  backend: toy\n  scale: 9\n"
        )
    assert info.value.problems == [
        "source.count (line 3): Input should be greater than or equal to 1",
        "detect.scale (line 6): Input should be less than or equal to 2",
    ]


def test_plugins_env_makes_a_plugin_known_to_a_fresh_process(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "source: {kind: toy_poses}\n")
    env = {k: v for k, v in os.environ.items() if k != PLUGINS_ENV}
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env=env,
    )
    assert run.returncode == 2
    assert "source.kind (line 1): unknown source kind 'toy_poses'; known: 'auto'" in run.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**env, **PLUGIN_ENV},
    )
    assert ok.returncode == 0, ok.stderr


def _pipeline(tmp_path: Path, source: str, detect: str = "") -> Path:
    return write_config(
        tmp_path,
        f"""
source: {source}
{detect}
transmit: {{primary: file, file: {tmp_path / "packets.bin"}}}
supervisor:
  run_dir: {tmp_path / "run"}
  heartbeat_interval_ms: 100
  heartbeat_timeout_ms: 3000
monitor: {{enabled: false, status: "off"}}
rings: {{max_frame_width: 64, max_frame_height: 64}}
""",
    )


def _decode(path: Path) -> list[Decoded]:
    decoder = Decoder()
    out = []
    for packet in read_packets(path):
        got = decoder.decode(packet)
        assert isinstance(got, Decoded), got
        out.append(got)
    return out


def _run(tmp_path: Path, config: Path, run_id: str) -> dict[str, object]:
    report = tmp_path / "report.json"
    proc = start(config, "--run-id", run_id, "--report", str(report), env=PLUGIN_ENV)
    _out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    assert shm_segments(run_id) == []
    data: dict[str, object] = json.loads(report.read_text())
    assert data["exit_reason"] == "finished", data["message"]
    return data


def test_toy_pose_source_runs_through_a_real_pipeline(tmp_path: Path) -> None:
    """capture (the toy pose source, in a spawned process) -> encode -> transmit -> file."""
    config = _pipeline(tmp_path, "{kind: toy_poses, count: 45, fps: 90}")
    data = _run(tmp_path, config, f"toyp{os.getpid()}")
    stages = data["stages"]
    assert isinstance(stages, dict) and set(stages) == {"capture", "encode", "transmit"}
    frames = data["frames"]
    assert isinstance(frames, dict)
    assert frames["captured"] == frames["encoded"] == frames["sent"] == 45
    decoded = _decode(tmp_path / "packets.bin")
    assert len(decoded) == 45
    noses = [float(d.frame.image[0, 0, 0]) for d in decoded]
    assert noses == pytest.approx([0.1 + 0.01 * n for n in range(45)], abs=1e-3)
    assert [d.frame.seq for d in decoded] == list(range(1, 46))


def test_toy_frame_source_and_toy_detector_run_through_a_real_pipeline(tmp_path: Path) -> None:
    """capture (toy frames) -> frames ring -> detect (toy detector) -> encode -> transmit."""
    config = _pipeline(
        tmp_path,
        "{kind: toy_frames, count: 8, as_fast_as_possible: true}",
        "detect: {backend: toy}",
    )
    data = _run(tmp_path, config, f"toyf{os.getpid()}")
    stages = data["stages"]
    assert isinstance(stages, dict)
    assert set(stages) == {"capture", "detect", "encode", "transmit"}
    decoded = _decode(tmp_path / "packets.bin")
    assert len(decoded) == 8  # on demand: every frame detected, none skipped
    noses = [float(d.frame.image[0, 0, 0]) for d in decoded]
    assert noses == pytest.approx([(20 + 10 * n) / 255 for n in range(8)], abs=2e-3)
