"""Supervision with real processes, real shared memory and real ZeroMQ sockets.

Every test runs ``python -m pipeline`` as a separate process group, hurts it
the way the real world does (kill -9, SIGSTOP, a stage crashing at start,
SIGINT, kill -9 of the whole group) and checks what the supervisor promises:
restarts, increasing sequence numbers, the report, exit codes, and that no
``posewire`` segment is left in /dev/shm.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.procutil import (
    TRACE,
    packet_seqs,
    shm_segments,
    stage_pids,
    start,
    stop,
    trace_config,
    wait_for,
    wait_stages,
)

pytestmark = pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")

TRACE_STAGES = {"capture", "encode", "transmit"}


def _strictly_increasing(seqs: list[int]) -> bool:
    return all(b > a for a, b in itertools.pairwise(seqs))


@pytest.mark.timing  # a restart, a hang or a stop within a bound: runs alone
@pytest.mark.parametrize("victim", ["capture", "encode", "transmit"])
def test_kill9_stage_is_restarted_and_sequence_keeps_increasing(
    tmp_path: Path, victim: str
) -> None:
    run_id = f"k9{victim}{os.getpid()}"
    report = tmp_path / "report.json"
    proc = start(trace_config(tmp_path), "--run-id", run_id, "--report", str(report))
    pids = wait_stages(proc.pid, TRACE_STAGES)
    packets = tmp_path / "packets.bin"
    assert wait_for(lambda: len(packet_seqs(packets)) > 20, 20), "no packets flowing"
    before = len(packet_seqs(packets))
    old = pids[victim]
    os.kill(old, signal.SIGKILL)
    t_kill = time.monotonic()
    assert wait_for(lambda: stage_pids(proc.pid).get(victim, old) != old, 1.0, 0.005), (
        f"{victim} not restarted within 1 s"
    )
    restart_s = time.monotonic() - t_kill
    assert wait_for(lambda: len(packet_seqs(packets)) > before + 30, 20), "stream did not resume"
    code, _, err = stop(proc)
    assert code == 0, err[-3000:]
    seqs = packet_seqs(packets)
    assert _strictly_increasing(seqs), "sequence numbers went backwards"
    data = json.loads(report.read_text())
    assert data["stages"][victim]["restarts"] == 1
    assert data["exit_reason"] == "signal:SIGINT"
    if victim == "transmit":
        # kill -9 loses the victim's counts since its last heartbeat (100 ms here)
        assert 0 <= len(seqs) - data["frames"]["sent"] <= 10
    else:
        assert data["frames"]["sent"] == len(seqs)
    assert shm_segments(run_id) == []
    print(f"{victim}: restarted {restart_s * 1000:.0f} ms after kill -9")


@pytest.mark.timing  # a restart, a hang or a stop within a bound: runs alone
def test_stopped_stage_is_declared_hung_and_restarted(tmp_path: Path) -> None:
    run_id = f"hung{os.getpid()}"
    report = tmp_path / "report.json"
    proc = start(trace_config(tmp_path), "--run-id", run_id, "--report", str(report))
    pids = wait_stages(proc.pid, TRACE_STAGES)
    assert wait_for(lambda: len(packet_seqs(tmp_path / "packets.bin")) > 10, 20)
    os.kill(pids["encode"], signal.SIGSTOP)
    # heartbeat_timeout_ms is 1500 and kill_grace_s 1: restarted within a few seconds
    assert wait_for(lambda: stage_pids(proc.pid).get("encode", pids["encode"]) != pids["encode"], 8)
    code, _, err = stop(proc)
    assert code == 0
    data = json.loads(report.read_text())
    assert data["stages"]["encode"]["hung"] == 1
    assert data["stages"]["encode"]["restarts"] == 1
    assert "hung" in err and "encode" in err
    assert shm_segments(run_id) == []


def test_stage_crashing_at_start_exceeds_intensity_exit_3(tmp_path: Path) -> None:
    run_id = f"crash{os.getpid()}"
    report = tmp_path / "report.json"
    cfg = trace_config(tmp_path).read_text().replace("max_restarts: 10", "max_restarts: 3")
    path = tmp_path / "crash.yaml"
    path.write_text(cfg)
    t0 = time.monotonic()
    proc = start(
        path, "--run-id", run_id, "--report", str(report), env={"POSEWIRE_FAULT": "encode:crash"}
    )
    _out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 3, err[-3000:]
    assert elapsed < 30  # inside the intensity window (period_s)
    last = err.strip().splitlines()[-1]
    assert "giving up: stage encode" in last and "injected fault" in last, last
    data = json.loads(report.read_text())
    assert data["exit_reason"] == "restart_intensity"
    assert data["stages"]["encode"]["restarts"] == 3
    assert shm_segments(run_id) == []


@pytest.mark.timing  # a restart, a hang or a stop within a bound: runs alone
def test_head_of_the_data_path_waits_for_a_slow_consumer(tmp_path: Path) -> None:
    """The encode stage takes 2 s to send its first heartbeat: the trace replay (the
    head of the data path) starts only then, so no pose waits in the ring for it.
    (Started at once, 2 s of poses at 30 fps would pile up in the 64-slot ring.)"""
    report = tmp_path / "report.json"
    proc = start(
        trace_config(tmp_path),
        "--duration",
        "10",  # 2 s held + start-up leaves several seconds of flow even on a loaded machine
        "--report",
        str(report),
        env={"POSEWIRE_FAULT": "encode:slow_start"},
    )
    _out, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err[-3000:]
    assert "although" not in err  # released by the heartbeat, not by the timeout
    data = json.loads(report.read_text())
    poses = data["rings"]["poses"]
    assert poses["written"] > 60, poses  # frames flowed
    assert poses["dropped"] == 0 and poses["peak_occupancy"] <= 4, poses
    assert data["stages"]["encode"]["restarts"] == 0


@pytest.mark.timing  # a restart, a hang or a stop within a bound: runs alone
def test_sigint_stops_within_5s_and_leaves_no_segment(tmp_path: Path) -> None:
    run_id = f"int{os.getpid()}"
    proc = start(trace_config(tmp_path), "--run-id", run_id)
    wait_stages(proc.pid, TRACE_STAGES)
    assert wait_for(lambda: len(shm_segments(run_id)) >= 3, 10)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    code, _, err = stop(proc, timeout=10)
    assert time.monotonic() - t0 < 5.0
    assert code == 0, err[-2000:]
    assert "Traceback" not in err
    assert shm_segments(run_id) == []
    assert not (tmp_path / "run" / run_id).exists()


def test_finished_source_drains_and_exits_0(tmp_path: Path) -> None:
    run_id = f"fin{os.getpid()}"
    report = tmp_path / "report.json"
    proc = start(trace_config(tmp_path, loop=False), "--run-id", run_id, "--report", str(report))
    _out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    data = json.loads(report.read_text())
    assert data["exit_reason"] == "finished"
    n = len(packet_seqs(tmp_path / "packets.bin"))
    assert n == data["frames"]["sent"] == data["frames"]["encoded"] == data["frames"]["detected"]
    assert all(s["restarts"] == 0 for s in data["stages"].values())
    assert shm_segments(run_id) == []


@pytest.mark.serial  # any supervisor start sweeps stale segments: none may run beside it
def test_kill9_of_group_leaves_segments_that_the_next_start_sweeps(tmp_path: Path) -> None:
    run_id = f"grp{os.getpid()}"
    proc = start(trace_config(tmp_path), "--run-id", run_id)
    wait_stages(proc.pid, TRACE_STAGES)
    assert wait_for(lambda: len(shm_segments(run_id)) >= 3, 10)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    time.sleep(0.3)
    stale = shm_segments(run_id)
    assert stale, "kill -9 of the group should leave segments behind"
    again = start(trace_config(tmp_path), "--run-id", f"new{os.getpid()}", "--duration", "2")
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err[-2000:]
    assert shm_segments(run_id) == []
    assert "swept" in err


def test_second_supervisor_on_same_run_id_is_refused(tmp_path: Path) -> None:
    run_id = f"dup{os.getpid()}"
    first = start(trace_config(tmp_path), "--run-id", run_id)
    wait_stages(first.pid, TRACE_STAGES)
    second = start(trace_config(tmp_path), "--run-id", run_id, "--duration", "3")
    _, err = second.communicate(timeout=30)
    assert second.returncode != 0
    assert f"run id {run_id!r} is in use" in err
    assert "Traceback" not in err
    code, _, err1 = stop(first)
    assert code == 0, err1[-2000:]
    assert shm_segments(run_id) == []


def test_unwritable_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    cfg = (
        trace_config(tmp_path)
        .read_text()
        .replace(f"run_dir: {tmp_path / 'run'}", "run_dir: /proc/posewire-run")
    )
    path = tmp_path / "bad.yaml"
    path.write_text(cfg)
    proc = start(path, "--duration", "2")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "run_dir" in err or "run directory" in err
    assert "Traceback" not in err


def test_stages_exit_by_themselves_when_the_supervisor_dies(tmp_path: Path) -> None:
    run_id = f"orph{os.getpid()}"
    proc = start(trace_config(tmp_path), "--run-id", run_id)
    pids = wait_stages(proc.pid, TRACE_STAGES)
    os.kill(proc.pid, signal.SIGKILL)  # the supervisor alone, not its group
    proc.communicate(timeout=10)

    def all_gone() -> bool:
        import psutil

        return not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            for p in pids.values()
        )

    assert wait_for(all_gone, 5), "orphaned stages kept running"
    # what a crashed supervisor leaves behind, the next start sweeps
    again = start(trace_config(tmp_path), "--run-id", f"after{os.getpid()}", "--duration", "1")
    again.communicate(timeout=60)
    assert again.returncode == 0
    assert shm_segments(run_id) == []


@pytest.mark.timing  # a restart, a hang or a stop within a bound: runs alone
def test_sigterm_is_an_orderly_stop(tmp_path: Path) -> None:
    run_id = f"term{os.getpid()}"
    report = tmp_path / "report.json"
    proc = start(trace_config(tmp_path), "--run-id", run_id, "--report", str(report))
    wait_stages(proc.pid, TRACE_STAGES)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(report.read_text())["exit_reason"] == "signal:SIGTERM"
    assert shm_segments(run_id) == []


def test_stage_context_applies_only_generic_commands_itself(tmp_path: Path) -> None:
    """stop/pause/resume/set are the context's; any other command needs a stage handler, and
    a handler refuses a bad argument with CommandError (a failed reply, not a crash)."""
    import logging

    from pipeline.config import Config
    from pipeline.errors import CommandError
    from pipeline.runtime import control
    from pipeline.runtime.stage import StageContext, StageSpec

    spec = StageSpec("toy", "tests.toy_stages.sink", Config(), "r1", tmp_path, "ipc://x", 1)
    ctx = StageContext(spec, logging.getLogger("toy"))
    reply = ctx._apply(control.Command(1, "keyframe", {}))
    assert not reply.ok and reply.error == "stage toy does not handle command 'keyframe'"
    assert ctx._apply(control.Command(2, "set", {"x": 1})).ok and ctx.params == {"x": 1}
    assert ctx._apply(control.Command(3, "pause", {})).ok and ctx.paused
    assert ctx._apply(control.Command(4, "resume", {})).ok and not ctx.paused

    def switch(args: dict[str, object]) -> dict[str, object]:
        if args.get("to") not in ("file", "websocket"):
            raise CommandError(f"switch_transport: bad 'to': {args.get('to')!r}")
        return {"to": args["to"]}

    ctx.on("switch_transport", switch)
    ok = ctx._apply(control.Command(5, "switch_transport", {"to": "file"}))
    assert ok.ok and ok.result == {"to": "file"}
    bad = ctx._apply(control.Command(6, "switch_transport", {"to": "pigeon"}))
    assert not bad.ok and bad.error is not None and "pigeon" in bad.error
    assert ctx._apply(control.Command(7, "stop", {})).ok and ctx.stopping
