"""The declared topology: its rules, the pose pipeline's declaration, and a toy two-branch
topology of real processes (two heads feeding one sink) under the real supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.runtime.topology import Count, Latency, RingDecl, StageDecl, Topology
from stages.topology import FRAME_KINDS, pose_topology
from tests.procutil import ROOT, STARTED, TRACE, shm_segments, stop, wait_for, wait_stages
from tests.toy_stages.run import toy_topology

ITEMS = 60

# --------------------------------------------------------------------------- rules


def _line(*extra: StageDecl, rings: tuple[RingDecl, ...] = ()) -> Topology:
    return Topology(
        (
            StageDecl("a", "m.a", outputs=("ab",), head=True),
            StageDecl("b", "m.b", inputs=("ab",)),
            *extra,
        ),
        (RingDecl("ab", "queue", 4, 8), *rings),
    )


def test_helpers_of_a_line_with_feedback() -> None:
    topo = Topology(
        (
            StageDecl("a", "m.a", outputs=("ab",), head=True),
            StageDecl("b", "m.b", inputs=("ab", "fb"), outputs=("bc",)),
            StageDecl("c", "m.c", inputs=("bc",), outputs=("fb",), feedback=("fb",)),
            StageDecl("srv", "m.srv", on_data_path=False),
        ),
        (
            RingDecl("ab", "latest", 3, 8),
            RingDecl("bc", "queue", 4, 8),
            RingDecl("fb", "queue", 4, 8),
        ),
    )
    assert topo.heads() == ("a",)
    assert topo.order() == ("a", "b", "c")
    assert topo.off_path() == ("srv",)
    assert topo.data_inputs("b") == ("ab",)  # the feedback ring is not drained
    assert topo.producers("b") == ("a",) and topo.producers("a") == ()
    assert topo.successors("a") == ("b",) and topo.successors("c") == ()
    assert topo.writer("fb") == "c"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _line(StageDecl("a", "m.x", inputs=("ab",))), "declared twice"),
        (lambda: _line(StageDecl("c", "m.c", outputs=("ab",), head=True)), "exactly one writer"),
        (lambda: _line(StageDecl("c", "m.c", inputs=("nope",))), "not declared"),
        (lambda: _line(rings=(RingDecl("lonely", "queue", 4, 8),)), "exactly one writer"),
        (
            lambda: _line(
                StageDecl("c", "m.c", outputs=("cd",)), rings=(RingDecl("cd", "queue", 4, 8),)
            ),
            "nobody reads it",
        ),
        (
            lambda: _line(
                StageDecl("c", "m.c", outputs=("x",), on_data_path=False),
                rings=(RingDecl("x", "queue", 4, 8),),
            ),
            "off the data path",
        ),
        (
            lambda: Topology(
                (StageDecl("a", "m.a", inputs=("x",), outputs=("x",)),),
                (RingDecl("x", "queue", 4, 8),),
            ),
            "no head",
        ),
    ],
)
def test_invalid_declarations_are_refused(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_a_ring_leading_upstream_must_be_declared_feedback() -> None:
    stages = (
        StageDecl("a", "m.a", outputs=("ab",), head=True),
        StageDecl("b", "m.b", inputs=("ab", "cb"), outputs=("bc",)),
        StageDecl("c", "m.c", inputs=("bc",), outputs=("cb",)),
    )
    rings = tuple(RingDecl(n, "queue", 4, 8) for n in ("ab", "bc", "cb"))
    with pytest.raises(ValueError, match="cycle"):
        Topology(stages, rings)
    fixed = (*stages[:2], StageDecl("c", "m.c", inputs=("bc",), outputs=("cb",), feedback=("cb",)))
    assert Topology(fixed, rings).order() == ("a", "b", "c")


def test_frames_are_counted_as_declared() -> None:
    topo = Topology(
        (
            StageDecl("a", "m.a", outputs=("ab",), head=True, counts=(Count("in", ring="ab"),)),
            StageDecl(
                "b",
                "m.b",
                inputs=("ab",),
                counts=(
                    Count("out", metric="out_total"),
                    Count("lost", ring="ab", field="dropped"),
                ),
            ),
        ),
        (RingDecl("ab", "queue", 4, 8),),
        frame_kinds=("in", "out", "lost", "never"),
    )
    rings = {"ab": {"written": 10, "dropped": 2}}
    assert topo.frames(rings, {"b": {"out_total": 7.0}}) == {
        "in": 10,
        "out": 7,
        "lost": 2,
        "never": 0,
    }
    assert topo.frames({}, {}) == {"in": 0, "out": 0, "lost": 0, "never": 0}
    with pytest.raises(ValueError, match="exactly one"):
        Count("x")


# --------------------------------------------------------------------------- the pose pipeline


def _cfg(**sections: object) -> Config:
    return Config.model_validate(sections)


def test_pose_topology_of_a_camera_pipeline() -> None:
    topo = pose_topology(_cfg())
    assert topo.order() == ("capture", "detect", "encode", "transmit")
    assert topo.heads() == ("capture",)
    assert [r.name for r in topo.rings] == ["frames", "poses", "packets", "feedback"]
    assert topo.ring("frames").mode == "latest" and topo.ring("poses").mode == "queue"
    assert (topo.ring("feedback").slots, topo.ring("feedback").item_size) == (64, 256)
    assert topo.data_inputs("encode") == ("poses",) and topo.feedback_rings() == {"feedback"}
    assert topo.frame_kinds == FRAME_KINDS
    assert topo.egress() == ("transmit",)
    assert topo.off_path() == ()


def test_pose_topology_of_a_trace_source_has_no_detect_stage() -> None:
    topo = pose_topology(
        _cfg(source={"kind": "trace", "path": str(TRACE)}, server={"embedded": True})
    )
    assert topo.order() == ("capture", "encode", "transmit")
    assert topo.heads() == ("capture",)
    assert topo.stage("capture").outputs == ("poses",)
    assert [r.name for r in topo.rings] == ["poses", "packets", "feedback"]
    assert topo.off_path() == ("server",)
    frames = topo.frames({"poses": {"written": 9}}, {"transmit": {"packets_sent_total": 9.0}})
    assert frames["captured"] == 9 and frames["detected"] == 9 and frames["sent"] == 9


def test_latency_hops_are_declared_by_the_stages() -> None:
    topo = pose_topology(_cfg())
    hops = {lat.hop: (stage, lat) for stage, lat in topo.latency_hops()}
    assert set(hops) == {"capture_to_detect", "detect", "encode", "capture_to_send"}
    assert hops["capture_to_send"][1] == Latency("capture_to_send", "latency_ms", end_to_end=True)


# --------------------------------------------------------------- two branches, real processes


def test_the_toy_topology_has_two_heads_and_one_sink() -> None:
    topo = toy_topology()
    assert topo.heads() == ("video", "mic")
    assert topo.producers("sink") == ("video", "mic")
    assert topo.order() == ("video", "mic", "sink")
    assert topo.frame_kinds == ("video", "dropped", "audio", "sunk")


def _start_toy(
    tmp_path: Path, items: int, period_ms: float
) -> tuple[subprocess.Popen[str], Path, Path]:
    out = tmp_path / "sink.txt"
    report = tmp_path / "report.json"
    env = dict(os.environ, TOY_OUT=str(out), TOY_ITEMS=str(items), TOY_PERIOD_MS=str(period_ms))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.toy_stages.run", str(tmp_path / "run"), str(report)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    STARTED.append(proc)
    return proc, out, report


def _received(out: Path) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {"video": [], "audio": []}
    for line in out.read_text(encoding="utf-8").splitlines():
        ring, _, n = line.partition(" ")
        got[ring].append(int(n))
    return got


def test_two_branches_deliver_and_drain_on_finish(tmp_path: Path) -> None:
    proc, out, report = _start_toy(tmp_path, ITEMS, 10)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    got = _received(out)
    assert got["video"] == list(range(1, ITEMS + 1))
    assert got["audio"] == list(range(1, ITEMS + 1))
    data = json.loads(report.read_text())
    assert data["exit_reason"] == "finished"
    assert data["frames"] == {"video": ITEMS, "dropped": 0, "audio": ITEMS, "sunk": 2 * ITEMS}
    assert set(data["stages"]) == {"video", "mic", "sink"}
    assert all(s["done"] and s["restarts"] == 0 for s in data["stages"].values())
    for ring in ("video", "audio"):
        assert data["rings"][ring]["written"] == data["rings"][ring]["read"] == ITEMS
    assert "pipeline finished" in err


@pytest.mark.parametrize("victim", ["sink", "mic"])
def test_a_killed_toy_stage_resumes_from_its_ring(tmp_path: Path, victim: str) -> None:
    items = 300
    proc, out, report = _start_toy(tmp_path, items, 10)
    pids = wait_stages(proc.pid, {"video", "mic", "sink"})
    assert wait_for(lambda: out.exists() and len(out.read_text().splitlines()) > 40, 20)
    os.kill(pids[victim], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 0, err[-3000:]
    data = json.loads(report.read_text())
    assert data["exit_reason"] == "finished"
    assert data["stages"][victim]["restarts"] == 1
    got = _received(out)
    for ring in ("video", "audio"):
        seqs = got[ring]
        assert seqs == sorted(set(seqs)), f"{ring}: went backwards or repeated"
        # the restarted sink lost at most the item it was writing; a head loses nothing
        assert len(seqs) >= items - (1 if victim == "sink" else 0), (ring, len(seqs))
        assert seqs[-1] == items
    assert data["frames"]["video"] == data["frames"]["audio"] == items
    assert shm_segments(data["run_id"]) == []
