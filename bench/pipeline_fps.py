"""bench/pipeline_fps: the whole sender flat out vs the same work in one process.

Same run, same input: a 1280x720 MJPG file of the demo animation (written
once into a temporary directory, ``--frames`` frames, looped).

``sequential``
    One loop in this process: read and convert a frame (``FileSource``),
    detect (MediaPipe Pose, the configured model, video mode), encode
    (:class:`pipeline.codec.Encoder`, as the encode stage does), one after
    the other.
``pipeline``
    ``python -m pipeline`` with ``source.as_fast_as_possible: true`` and the
    file transport: capture, detect, encode and transmit in their own
    processes. Frames detected per second are read from the rings' own
    counters (this process attaches the ``frames`` and ``poses`` rings read
    only), after a warm-up, over ``--seconds``.

Both report fps, detection time p50/p95 and CPU per process (percent of one
core, from ``/proc`` via psutil). Targets: the pipeline at least 1.3x the
sequential fps, and at least 0.9x the detector's own ceiling (1 / median
detection time of the pipeline's detect stage), measured on a pipeline with
``detect.workers: 2`` (two MediaPipe graphs in threads: one detector cannot
exceed its ceiling, and detection is ~85 % of the sequential frame time, so
with one detector the pipeline can reach at most ~1.2x); a one-detector
pipeline is measured in the same run for comparison.

Run: ``python -m bench pipeline_fps [--seconds S] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import psutil

from bench.common import add_json_flag, at_least, percentile, report, stop_process
from pipeline.runtime.stage import stage_processes

NAME = "pipeline_fps"
ROOT = Path(__file__).resolve().parents[1]


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def sequential(video: Path, seconds: float, warmup: int = 10) -> dict[str, Any]:
    """Capture, detection and encoding one after the other in this process."""
    from pipeline.codec import CodecConfig, Encoder
    from pipeline.config import parse_config
    from pipeline.detectors import create_detector
    from pipeline.errors import ProtocolError
    from pipeline.sources.file import FileSource

    cfg = parse_config("", name="<defaults>")
    enc_cfg = cfg.encode
    encoder = Encoder(
        CodecConfig(
            precision_px=enc_cfg.precision_px,
            reference_width_px=enc_cfg.reference_width_px,
            keyframe_interval=enc_cfg.keyframe_interval,
            world=enc_cfg.world_landmarks,
        ),
        zlib.crc32(b"bench") & 0xFFFF,
    )
    source = FileSource(video, loop=True)
    source.open()
    detector = create_detector(cfg, video=True)
    me = psutil.Process()
    detect_ms: list[float] = []
    frames = rejected = 0
    seq = 0
    try:

        def step() -> float:
            nonlocal seq, rejected
            got = source.read()
            assert got is not None  # looping
            seq += 1
            pose = detector.detect(got[0], seq, got[1])
            try:
                encoder.encode(pose)
            except ProtocolError:
                rejected += 1  # as the encode stage does: counted, not fatal
            return (pose.detect_end_ns - pose.detect_start_ns) / 1e6

        for _ in range(warmup):
            step()
        cpu0, t0 = _cpu_s(me), time.monotonic()
        while time.monotonic() - t0 < seconds:
            detect_ms.append(step())
            frames += 1
        wall = time.monotonic() - t0
        cpu = _cpu_s(me) - cpu0
    finally:
        detector.close()
        source.close()
    return {
        "name": "sequential (1 process)",
        "fps": frames / wall,
        "detect_p50_ms": percentile(detect_ms, 50),
        "detect_p95_ms": percentile(detect_ms, 95),
        "frames": frames,
        "skipped": 0,
        "cpu_percent": 100.0 * cpu / wall,
    }


def pipeline(video: Path, seconds: float, workdir: Path, workers: int) -> list[dict[str, Any]]:
    """The sender under its supervisor; figures over ``seconds`` after a warm-up."""
    from pipeline.errors import RingError
    from pipeline.runtime.ring import Ring, segment_name

    run_id = f"bfps{os.getpid()}w{workers}"
    run_base = workdir / "run"
    cfg = workdir / f"pipeline-{workers}.yaml"
    cfg.write_text(
        f"""
source: {{kind: file, path: {video}, loop: true, as_fast_as_possible: true}}
detect: {{workers: {workers}}}
transmit: {{primary: file, file: {workdir / "packets.bin"}}}
supervisor: {{run_dir: {run_base}}}
monitor: {{enabled: false}}
rings: {{max_frame_width: 1280, max_frame_height: 720}}
""",
        encoding="utf-8",
    )
    report_path = workdir / f"report-{workers}.json"
    log_path = workdir / f"pipeline-{workers}.log"
    argv = [sys.executable, "-m", "pipeline", str(cfg), "--run-id", run_id]
    argv += ["--report", str(report_path)]
    with log_path.open("w", encoding="utf-8") as log:  # a file: a full pipe would stall it
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    rings: dict[str, Ring] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(rings) < 2:
            if proc.poll() is not None:
                tail = log_path.read_text(encoding="utf-8")[-2000:]
                raise RuntimeError(f"pipeline exited {proc.returncode}:\n{tail}")
            for name in ("frames", "poses"):
                if name not in rings:
                    with contextlib.suppress(RingError, OSError):  # not created yet
                        rings[name] = Ring.attach(
                            segment_name(run_id, name), run_dir=run_base / run_id
                        )
            time.sleep(0.1)
        if len(rings) < 2:
            raise RuntimeError("the pipeline's rings did not appear within 60 s")
        # warm-up: MediaPipe loaded and poses flowing for a second
        while time.monotonic() < deadline and rings["poses"].statistics().written < 10:
            time.sleep(0.1)
        time.sleep(1.0)
        procs = stage_processes(proc.pid)
        f0, p0 = rings["frames"].statistics(), rings["poses"].statistics()
        cpu0 = {n: _cpu_s(p) for n, p in procs.items()}
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        f1, p1 = rings["frames"].statistics(), rings["poses"].statistics()
        cpu = {n: 100.0 * (_cpu_s(p) - cpu0[n]) / wall for n, p in procs.items()}
    finally:
        for ring in rings.values():
            ring.close()
        stop_process(proc, 20, sig=signal.SIGINT, kill_group=True)
    data = json.loads(report_path.read_text(encoding="utf-8"))
    metrics = data["stages"]["detect"]["metrics"]
    detected = p1.written - p0.written
    rows = [
        {
            "name": f"pipeline (4 processes, {workers} detector{'s' if workers > 1 else ''})",
            "fps": detected / wall,
            "detect_p50_ms": float(metrics.get("detect_ms_p50", float("nan"))),
            "detect_p95_ms": float(metrics.get("detect_ms_p95", float("nan"))),
            "frames": detected,
            "skipped": (f1.skipped - f0.skipped),
            "cpu_percent": sum(cpu.values()),
            "captured_fps": (f1.written - f0.written) / wall,
        }
    ]
    for name in ("capture", "detect", "encode", "transmit"):
        if name in cpu:
            rows.append({"name": f"  {name} process ({workers}w)", "cpu_percent": cpu[name]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench pipeline_fps", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per case")
    parser.add_argument("--frames", type=int, default=120, help="frames in the looped input")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="detect.workers of the pipeline the targets are measured on (a 1-worker "
        "pipeline is measured too, for comparison)",
    )
    add_json_flag(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    from pipeline.sources.demo import write_demo_video

    with tempfile.TemporaryDirectory(prefix="posewire-bench-") as tmp:
        workdir = Path(tmp)
        video = write_demo_video(workdir / "input.avi", args.width, args.height, frames=args.frames)
        seq = sequential(video, args.seconds)
        rows = pipeline(video, args.seconds, workdir, args.workers)
        if args.workers != 1:
            rows += pipeline(video, args.seconds, workdir, 1)
    pipe = rows[0]
    ceiling = 1000.0 / pipe["detect_p50_ms"] if pipe["detect_p50_ms"] > 0 else float("nan")
    seq["vs_sequential"] = 1.0
    pipe["vs_sequential"] = pipe["fps"] / seq["fps"]
    pipe["vs_ceiling"] = pipe["fps"] / ceiling
    targets = [
        at_least("pipeline fps / sequential fps", pipe["vs_sequential"], 1.3),
        at_least("pipeline fps / detector ceiling (1/p50)", pipe["vs_ceiling"], 0.9),
    ]
    report(
        NAME,
        [seq, *rows],
        targets,
        as_json=args.json,
        title=f"pipeline fps, {args.width}x{args.height} file source flat out",
        params={"seconds": args.seconds, "width": args.width, "height": args.height},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
