"""The detectors and the detect stage with the real MediaPipe model on real images.

Reference values (recorded once on ``skimage.data.astronaut()``, 512x512,
MediaPipe 0.10.21 full model, static image mode) are in :data:`ASTRONAUT`;
the tolerance is 0.02 in normalised units (about 10 px).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pytest

from pipeline.cli import main as cli_main
from pipeline.config import parse_config
from pipeline.detectors import create_detector
from pipeline.detectors.media import draw_pose, iter_video
from pipeline.detectors.mediapipe import (
    MediaPipeDetector,
    MediaPipeSettings,
    check_model_complexity,
)
from pipeline.detectors.tasks import TasksDetector, TasksSettings
from pipeline.errors import ConfigError, WouldBlock
from pipeline.model.frame import FrameBuffer, end_of_stream_payload
from pipeline.model.pose import LANDMARK_NAMES, NUM_LANDMARKS, PoseFrame
from pipeline.sources.demo import DemoSource
from stages import detect
from tests.test_capture import RGB, StageRings, config, write_video

ROOT = Path(__file__).resolve().parents[1]

#: landmark -> (x, y) recorded on the astronaut photo (static image mode)
ASTRONAUT = {
    0: (0.435, 0.250),  # nose
    11: (0.598, 0.501),  # left shoulder
    12: (0.220, 0.469),  # right shoulder
    23: (0.472, 0.980),  # left hip (at the photo's bottom edge: low visibility)
    24: (0.251, 1.038),  # right hip (below the edge)
}
TOL = 0.02
MP_MODULES = Path(cv2.__file__).parents[1] / "mediapipe" / "modules"


@pytest.fixture(scope="module")
def astronaut() -> RGB:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut(), np.uint8)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def still() -> Iterator[MediaPipeDetector]:
    det = MediaPipeDetector(MediaPipeSettings(), static_image_mode=True)  # type: ignore[call-arg]
    yield det
    det.close()


# --------------------------------------------------------------------------- mediapipe


def test_astronaut_landmarks_where_recorded(astronaut: RGB, still: MediaPipeDetector) -> None:
    t0 = time.time_ns()
    pose = still.detect(astronaut, 7, t0)
    assert pose.seq == 7 and pose.capture_ts_ns == t0
    assert t0 <= pose.detect_start_ns <= pose.detect_end_ns <= time.time_ns()
    assert pose.num_poses == 1 and pose.image.shape == (1, NUM_LANDMARKS, 4)
    assert pose.world is not None and pose.world.shape == (1, NUM_LANDMARKS, 3)
    for i, (x, y) in ASTRONAUT.items():
        got = pose.image[0, i, :2]
        assert abs(got[0] - x) < TOL and abs(got[1] - y) < TOL, (LANDMARK_NAMES[i], got)
    vis = pose.image[0, :, 3]
    assert vis[[0, 11, 12]].min() > 0.9  # face and shoulders clearly seen
    assert vis[[23, 24]].max() < 0.5  # hips at/below the edge: low visibility
    # world landmarks are metres around the hips: a shoulder span of a few decimetres
    span = float(np.linalg.norm(pose.world[0, 11] - pose.world[0, 12]))
    assert 0.2 < span < 0.6
    again = PoseFrame.from_bytes(pose.to_bytes())
    assert np.array_equal(again.image, pose.image) and again.seq == 7


def test_nobody_is_zero_poses_not_dropped(still: MediaPipeDetector) -> None:
    pose = still.detect(np.full((240, 320, 3), 90, np.uint8), 3, 123)
    assert pose.num_poses == 0 and not pose.present and pose.seq == 3
    assert pose.detect_end_ns >= pose.detect_start_ns > 0
    assert PoseFrame.from_bytes(pose.to_bytes()).num_poses == 0


def test_video_of_a_known_translation_is_tracked(tmp_path: Path, astronaut: RGB) -> None:
    # 480x360 canvas, the photo at 256 px; still, then 15 steps of (+8, +4) px, still again
    photo = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    w, h = 480, 360

    def frame(x: int, y: int) -> RGB:
        c = np.full((h, w, 3), 60, np.uint8)
        c[y : y + 256, x : x + 256] = photo
        return c

    path_xy = [(30, 20)] * 8 + [(30 + 8 * i, 20 + 4 * i) for i in range(1, 16)] + [(150, 80)] * 10
    video = write_video(tmp_path / "moving.avi", [frame(x, y) for x, y in path_xy], fps=15)
    det = create_detector(parse_config(""), video=True)
    fps, frames = iter_video(video)
    t0 = time.time_ns()
    poses = [det.detect(mf.rgb, mf.index, t0 + round(mf.t_s * 1e9)) for mf in frames]
    det.close()
    assert fps == 15 and len(poses) == len(path_xy)
    assert all(p.present for p in poses)
    face_and_shoulders = list(range(13))
    before = np.mean([p.image[0, face_and_shoulders, :2] for p in poses[4:8]], axis=0)
    after = np.mean([p.image[0, face_and_shoulders, :2] for p in poses[-4:]], axis=0)
    moved_px = (after - before) * [w, h]
    expected = np.array([120.0, 60.0])
    # tolerance: 5 px for the median landmark, 10 px for nose and left shoulder,
    # 25 px for every face/shoulder landmark (the right shoulder wanders most)
    assert np.all(np.abs(np.median(moved_px, axis=0) - expected) < 5), moved_px
    for i in (0, 11):
        assert np.all(np.abs(moved_px[i] - expected) < 10), (LANDMARK_NAMES[i], moved_px[i])
    assert np.all(np.abs(moved_px - expected) < 25), moved_px


def test_blank_video_yields_no_person_frames(tmp_path: Path) -> None:
    video = write_video(tmp_path / "blank.avi", [np.full((120, 160, 3), 30, np.uint8)] * 12)
    det = create_detector(parse_config(""), video=True)
    _, frames = iter_video(video)
    poses = [det.detect(mf.rgb, mf.index, 0) for mf in frames]
    det.close()
    assert len(poses) == 12
    assert [p.num_poses for p in poses] == [0] * 12
    assert [p.seq for p in poses] == list(range(12))


def test_demo_source_is_detected_in_most_frames() -> None:
    demo = DemoSource(640, 360)
    demo.open()
    det = create_detector(parse_config(""), video=True)
    noses = []
    for n in range(0, 60, 3):  # 2 s of animation, every third frame
        pose = det.detect(demo.render(n), n, 0)
        if pose.present:
            noses.append(pose.image[0, 0, :2].copy())
    det.close()
    assert len(noses) >= 16, f"person found in only {len(noses)} of 20 demo frames"
    xs = [float(n[0]) for n in noses]
    assert max(xs) - min(xs) > 0.1  # the body moves across the canvas


def test_unbundled_model_complexity_is_refused_clearly() -> None:
    assert check_model_complexity(1).is_file()
    cases: tuple[tuple[Literal[0, 1, 2], str], ...] = ((0, "lite"), (2, "heavy"))
    for complexity, name in cases:
        if (MP_MODULES / f"pose_landmark/pose_landmark_{name}.tflite").exists():
            continue  # bundled in this wheel after all: accepted
        with pytest.raises(ConfigError, match=rf"{complexity} \({name}\) is not bundled"):
            MediaPipeDetector(MediaPipeSettings(model_complexity=complexity))  # type: ignore[call-arg]


# --------------------------------------------------------------------------- tasks


def test_tasks_backend_refuses_bad_model_files(tmp_path: Path) -> None:
    cfg = TasksSettings(task_model=tmp_path / "x.task", num_poses=2)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="task model not found"):
        TasksDetector(tmp_path / "missing.task", cfg)
    junk = tmp_path / "junk.task"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ConfigError, match=r"not a MediaPipe \.task bundle"):
        TasksDetector(junk, cfg)
    other = tmp_path / "other.task"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ConfigError, match=r"lacks pose_detector\.tflite"):
        TasksDetector(other, cfg)
    # The members a PoseLandmarker bundle needs, from the models in the wheel: they lack
    # the Tasks metadata, so MediaPipe itself refuses them; the error says so.
    fake = tmp_path / "fake.task"
    with zipfile.ZipFile(fake, "w") as z:
        z.write(MP_MODULES / "pose_detection/pose_detection.tflite", "pose_detector.tflite")
        z.write(
            MP_MODULES / "pose_landmark/pose_landmark_full.tflite",
            "pose_landmarks_detector.tflite",
        )
    with pytest.raises(ConfigError, match=r"MediaPipe cannot load .*fake\.task"):
        TasksDetector(fake, cfg)


# --------------------------------------------------------------------------- the stage


def test_detect_stage_latest_wins_no_person_and_end_of_stream(
    tmp_path: Path, astronaut: RGB
) -> None:
    cfg = config(tmp_path, "rings: {max_frame_width: 640, max_frame_height: 512}")
    rings = StageRings(tmp_path, cfg)
    frames, poses = rings.rings["frames"], rings.rings["poses"]
    buf = FrameBuffer(640, 512)
    blank = np.full((240, 320, 3), 80, np.uint8)
    out: list[int] = []
    try:
        # five frames before detection starts: only the newest (an astronaut) is detected
        stamps = []
        for i in range(5):
            stamps.append(time.time_ns())
            frames.send(buf.pack(blank if i < 4 else astronaut), ts_ns=stamps[-1])
        ctx = rings.context("detect")
        th = threading.Thread(target=lambda: out.append(detect.run(ctx)))
        th.start()
        first = poses.recv(timeout=30)
        pose = PoseFrame.from_bytes(first.data)
        assert (first.meta, pose.seq, first.ts_ns, pose.capture_ts_ns) == (5, 5, *stamps[-1:] * 2)
        assert pose.present and abs(pose.image[0, 0, 0] - ASTRONAUT[0][0]) < 0.05
        assert frames.statistics().skipped == 4
        # nobody in the frame: still a record, with 0 poses
        ts = time.time_ns()
        frames.send(buf.pack(blank), ts_ns=ts)
        second = poses.recv(timeout=30)
        assert second.meta == 6 and PoseFrame.from_bytes(second.data).num_poses == 0
        frames.send(end_of_stream_payload(), ts_ns=time.time_ns())
        th.join(10)
        assert out == [0]
        m = ctx.metrics
        assert m["frames_detected_total"] == 2 and m["frames_no_person_total"] == 1
        assert m["frames_skipped"] == 4 and m["last_seq"] == 6
        assert 0 < m["detect_ms_p50"] <= m["detect_ms_p95"]
        with pytest.raises(WouldBlock):
            poses.recv(timeout=0)
    finally:
        rings.close()


# --------------------------------------------------------------------------- detect command


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory: pytest.TempPathFactory, astronaut: RGB) -> Path:
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    return path


def test_detect_command_json_and_png_overlay(
    tmp_path: Path, astronaut_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overlay = tmp_path / "out.png"
    assert cli_main(["detect", str(astronaut_png), "--json", "--overlay", str(overlay)]) == 0
    doc = json.loads(capsys.readouterr().out)
    (inp,) = doc["inputs"]
    assert inp["kind"] == "image" and (inp["width"], inp["height"]) == (512, 512)
    (person,) = inp["frames"][0]["poses"]
    marks = person["landmarks"]
    assert len(marks) == 33 and marks[0]["name"] == "nose"
    assert abs(marks[0]["x"] - ASTRONAUT[0][0]) < TOL and abs(marks[0]["y"] - ASTRONAUT[0][1]) < TOL
    assert len(person["world"]) == 33
    assert overlay.stat().st_size > 0
    drawn = cv2.imread(str(overlay))
    assert drawn is not None and drawn.shape == (512, 512, 3)
    original = cv2.imread(str(astronaut_png))
    assert not np.array_equal(drawn, original)  # the skeleton is drawn


def test_detect_command_video_overlay_and_text(
    tmp_path: Path, astronaut: RGB, capsys: pytest.CaptureFixture[str]
) -> None:
    small: RGB = np.asarray(cv2.resize(astronaut, (192, 192), interpolation=cv2.INTER_AREA))
    video = write_video(
        tmp_path / "v.avi", [small] * 6 + [np.zeros((192, 192, 3), np.uint8)] * 2, fps=10
    )
    overlay = tmp_path / "out.mp4"
    assert cli_main(["detect", str(video), "--overlay", str(overlay)]) == 0
    text = capsys.readouterr().out
    assert "8 frames, person in 6" in text
    assert overlay.stat().st_size > 0
    fps, frames = iter_video(overlay)
    assert fps == 10 and len(list(frames)) == 8


def test_detect_command_bad_inputs(tmp_path: Path, astronaut_png: Path) -> None:
    # a missing file: one precise line, exit 1, no traceback (a real process)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "detect", str(tmp_path / "missing.png")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"error: no such file: {tmp_path / 'missing.png'}" in proc.stderr
    assert "Traceback" not in proc.stderr
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(10_000))
    assert cli_main(["detect", str(junk)]) == 1
    assert cli_main(["detect", str(astronaut_png), "--overlay", str(tmp_path / "o.gif")]) == 2
    both = [str(astronaut_png), str(astronaut_png)]
    assert cli_main(["detect", *both, "--overlay", str(tmp_path / "o.png")]) == 1
    # the old trace "backend" is refused with the new form named (exit 2, config error)
    bad_cfg = tmp_path / "trace.yaml"
    bad_cfg.write_text(f"detect: {{backend: trace, trace: '{junk}'}}\n")
    assert cli_main(["detect", str(astronaut_png), "--config", str(bad_cfg)]) == 2


def test_draw_pose_draws_only_visible_landmarks(astronaut: RGB, still: MediaPipeDetector) -> None:
    pose = still.detect(astronaut, 0, 0)
    drawn = draw_pose(astronaut, pose)
    assert drawn.shape == astronaut.shape and not np.array_equal(drawn, astronaut)
    changed = np.any(drawn != astronaut, axis=2)
    x, y = (pose.image[0, 0, :2] * 512).astype(int)  # the nose is visible: drawn on
    assert changed[y - 2 : y + 3, x - 2 : x + 3].any()
    assert np.array_equal(draw_pose(astronaut, PoseFrame(0, 0)), astronaut)


# --------------------------------------------------------------------------- real processes


def portrait_video(path: Path, astronaut: RGB, n: int = 30) -> Path:
    """The astronaut in the top of a 300x400 frame, sliding sideways and back.

    Portrait, so that the legs MediaPipe extrapolates below the photo stay
    inside the range the pose codec accepts.
    """
    photo: RGB = np.asarray(cv2.resize(astronaut, (240, 240), interpolation=cv2.INTER_AREA))
    frames = []
    for i in range(n):
        x = round(30 + 30 * np.sin(2 * np.pi * i / n))
        canvas = np.full((400, 300, 3), 60, np.uint8)
        canvas[:240, x : x + 240] = photo
        frames.append(canvas)
    return write_video(path, frames, fps=30)


@pytest.mark.parametrize("workers", [1, 2])
def test_latest_wins_with_real_processes(tmp_path: Path, astronaut: RGB, workers: int) -> None:
    """A source far faster than detection: detection takes the newest frame, the rest is
    counted as skipped, and every frame taken gives exactly one pose record, in frame
    order also when two detectors work in parallel."""
    portrait_video(tmp_path / "v.avi", astronaut)
    cfg = config(
        tmp_path,
        "source: {kind: file, path: v.avi, loop: true, fps: 240}\n"  # paced, 5x detection
        f"detect: {{workers: {workers}}}\n"
        "rings: {max_frame_width: 320, max_frame_height: 400, poses: {slots: 1024}}",
    )
    rings = StageRings(tmp_path, cfg)
    try:
        detect_proc = rings.spawn("detect")
        capture_proc = rings.spawn("capture")
        poses = rings.rings["poses"]
        got: list[PoseFrame] = []
        deadline = time.monotonic() + 90
        while len(got) < 40 and time.monotonic() < deadline:
            try:
                got.append(PoseFrame.from_bytes(poses.recv(timeout=1).data))
            except WouldBlock:
                assert capture_proc.exitcode is None and detect_proc.exitcode is None
        assert len(got) == 40, "detection did not produce poses"
        for proc in (capture_proc, detect_proc):  # orderly stop, upstream first
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(15)
            assert proc.exitcode == 0
        while True:
            try:
                got.append(PoseFrame.from_bytes(poses.recv(timeout=0).data))
            except WouldBlock:
                break
        fs = rings.rings["frames"].statistics()
    finally:
        rings.close()
    seqs = [p.seq for p in got]
    assert all(b > a for a, b in itertools.pairwise(seqs)), "sequence went backwards"
    assert len(got) == fs.read, "one pose record per frame taken, none lost"
    assert fs.skipped > len(got), f"the source should outrun detection: {fs}"
    # skipped equals the difference: the frames between the ones detected
    gaps = seqs[0] - 1 + sum(b - a - 1 for a, b in itertools.pairwise(seqs))
    trailing = fs.written - seqs[-1]
    assert gaps + trailing == fs.skipped + fs.occupancy
    assert sum(p.present for p in got) >= 0.9 * len(got)
    # the frame taken is always the newest one: younger than one detection time
    age_ms = [(p.detect_start_ns - p.capture_ts_ns) / 1e6 for p in got[5:]]
    detect_ms = [(p.detect_end_ns - p.detect_start_ns) / 1e6 for p in got[5:]]
    print(
        f"captured {fs.written}, detected {len(got)}, skipped {fs.skipped}; "
        f"frame age at detection p50 {np.median(age_ms):.1f} ms, "
        f"detection p50 {np.median(detect_ms):.1f} ms"
    )
    assert np.median(age_ms) < np.median(detect_ms)


def test_file_as_fast_as_possible_detects_every_frame(tmp_path: Path, astronaut: RGB) -> None:
    """On demand: capture sends the next frame when detection took the last one, so a
    file read as fast as possible is detected frame by frame, none skipped, then both
    stages end with 0 at the end of the file."""
    portrait_video(tmp_path / "v.avi", astronaut, n=24)
    cfg = config(
        tmp_path,
        "source: {kind: file, path: v.avi, as_fast_as_possible: true}\n"
        "rings: {max_frame_width: 320, max_frame_height: 400, poses: {slots: 64}}",
    )
    rings = StageRings(tmp_path, cfg)
    try:
        procs = [rings.spawn("detect"), rings.spawn("capture")]
        for proc in procs:
            proc.join(90)
            assert proc.exitcode == 0
        got = []
        while True:
            try:
                got.append(PoseFrame.from_bytes(rings.rings["poses"].recv(timeout=0).data))
            except WouldBlock:
                break
        fs = rings.rings["frames"].statistics()
    finally:
        rings.close()
    assert [p.seq for p in got] == list(range(1, 25))  # every frame, in order
    assert fs.written == 25 and fs.skipped == 0  # 24 frames and the end-of-stream marker
    assert all(p.present for p in got)


def _pipeline_config(tmp_path: Path, astronaut: RGB) -> Path:
    video = portrait_video(tmp_path / "v.avi", astronaut)
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"""
source: {{kind: file, path: {video}, loop: true}}
transmit: {{primary: file, file: {tmp_path / "packets.bin"}}}
supervisor:
  run_dir: {tmp_path / "run"}
  heartbeat_interval_ms: 100
  heartbeat_timeout_ms: 3000
  max_restarts: 10
  period_s: 30
monitor: {{enabled: false}}
rings: {{max_frame_width: 320, max_frame_height: 400}}
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.timing  # one restart, not two: a loaded machine can miss the hang timeout
@pytest.mark.parametrize("victim", ["capture", "detect"])
def test_kill9_capture_or_detect_resumes_on_the_ring(
    tmp_path: Path, astronaut: RGB, victim: str
) -> None:
    from tests.procutil import packet_seqs, shm_segments, stage_pids, start, stop, wait_for

    run_id = f"k9{victim[:3]}{os.getpid()}"
    report = tmp_path / "report.json"
    proc = start(_pipeline_config(tmp_path, astronaut), "--run-id", run_id, "--report", str(report))
    try:
        assert wait_for(lambda: {"capture", "detect"} <= set(stage_pids(proc.pid)), 30)
        packets = tmp_path / "packets.bin"
        assert wait_for(lambda: len(packet_seqs(packets)) > 20, 60), "no packets flowing"
        before = packet_seqs(packets)
        old = stage_pids(proc.pid)[victim]
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: stage_pids(proc.pid).get(victim, old) != old, 5), "no restart"
        assert wait_for(lambda: len(packet_seqs(packets)) > len(before) + 30, 60), "no resume"
    finally:
        code, _, err = stop(proc)
    assert code == 0, err[-3000:]
    seqs = packet_seqs(packets)
    assert all(b > a for a, b in itertools.pairwise(seqs)), "sequence numbers went backwards"
    data = json.loads(report.read_text())
    assert data["stages"][victim]["restarts"] == 1
    assert data["frames"]["captured"] > seqs[-1] - 5  # the ring's counter went on
    assert shm_segments(run_id) == []


def test_pipeline_with_a_source_that_cannot_exist_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"source: {{kind: camera, device: 9}}\nsupervisor: {{run_dir: {tmp_path / 'run'}}}\n"
        "monitor: {enabled: false}\n",
        encoding="utf-8",
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "capture: no such camera: camera 9 (/dev/video9): /dev/video9 does not exist" in (
        proc.stderr
    )
    assert "stages/capture.py" not in proc.stderr  # a message, not a traceback
    assert "Traceback" not in proc.stderr
    print(f"bad source: exit 2 after {elapsed:.2f} s")


def test_native_log_filter_drops_absl_chatter_and_keeps_the_rest() -> None:
    """In a fresh process (fd 2 is process-wide; other tests' detectors may hold it)."""
    script = """
import os
from pipeline.detectors.mediapipe import NativeLogFilter
NativeLogFilter.hold()
NativeLogFilter.hold()  # two detectors (detect.workers: 2) share fd 2
os.write(2, b"W0000 00:00:1795388650.054808    4184 feedback.cc:114] chatter\\n")
os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
os.write(2, b"E0000 00:00:1795388650.1 4184 graph.cc:1] a real error\\n")
NativeLogFilter.release()
os.write(1, b"still held\\n")
os.write(2, b"12:00:00.000 detect    INFO    our own line\\n")
NativeLogFilter.release()
os.write(2, b"after\\n")
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [
        "E0000 00:00:1795388650.1 4184 graph.cc:1] a real error",
        "12:00:00.000 detect    INFO    our own line",
        "after",
    ]
