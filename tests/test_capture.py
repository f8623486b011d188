"""The sources, the capture stage and the frame slot, with real OpenCV, files and rings.

Videos are written by the tests with ``cv2.VideoWriter`` into ``tmp_path``;
a stalling network stream is a real HTTP server serving MJPEG that stops
sending. No timing assertion beyond generous pacing bounds.
"""

from __future__ import annotations

import http.server
import itertools
import logging
import multiprocessing
import os
import socketserver
import threading
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from pipeline.config import Config, parse_config, traces_dir
from pipeline.errors import ProtocolError, SourceError, WouldBlock
from pipeline.model.frame import (
    FLAG_END_OF_STREAM,
    FLAG_RGB,
    FRAME_HEADER_SIZE,
    FrameBuffer,
    end_of_stream_payload,
    frame_from_slot,
    frame_header,
    frame_slot_size,
    pack_frame_header,
)
from pipeline.model.pose import PoseFrame
from pipeline.runtime.ring import Ring, RingMode, segment_name
from pipeline.runtime.stage import ExitStatus, StageContext, StageSpec, stage_main
from pipeline.sources import Source, create_source
from pipeline.sources.camera import CameraSource
from pipeline.sources.demo import DemoSource
from pipeline.sources.feed import END, Captured, FrameFeed
from pipeline.sources.file import FileSource
from pipeline.sources.images import ImagesSource
from pipeline.sources.trace import PoseTrace, TraceSource
from pipeline.sources.url import UrlSource
from stages import capture
from stages.capture import FramePacker

RGB = npt.NDArray[np.uint8]
LOG = logging.getLogger("test.capture")
TRACE = traces_dir() / "cmu02_05_punch_strike.npz"
needs_trace = pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")


# --------------------------------------------------------------------------- helpers


def write_video(path: Path, frames: list[RGB], fps: float = 20.0, fourcc: str = "MJPG") -> Path:
    """Write RGB frames with ``cv2.VideoWriter`` (MJPG in .avi: lossless enough, fast)."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"cannot write {path}"
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def gray_frames(n: int, w: int = 160, h: int = 120) -> list[RGB]:
    """Frames whose brightness encodes their index (10 * i)."""
    return [np.full((h, w, 3), 10 * i, np.uint8) for i in range(n)]


def drain(feed: FrameFeed, limit_s: float = 20.0) -> list[Captured]:
    """Every frame until END (fails after ``limit_s``)."""
    out: list[Captured] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        got = feed.poll(0.2)
        if got is END:
            return out
        if isinstance(got, Captured):
            out.append(got)
    raise AssertionError(f"no END after {limit_s} s ({len(out)} frames)")


def config(tmp_path: Path, yaml: str) -> Config:
    return parse_config(yaml, base_dir=tmp_path)


class StageRings:
    """Rings created the way the supervisor creates them, and contexts attached to them."""

    def __init__(self, tmp_path: Path, cfg: Config, *, frames: bool = True) -> None:
        self.cfg = cfg
        self.run_id = f"t{os.getpid()}{time.monotonic_ns() % 10**6}"
        self.run_dir = tmp_path / "run"
        self.run_dir.mkdir(exist_ok=True)
        r = cfg.rings
        plan: dict[str, tuple[int, int, RingMode]] = {
            "poses": (4096 * 8, r.poses.slots, RingMode.QUEUE),
        }
        if frames:
            plan["frames"] = (
                frame_slot_size(r.max_frame_width, r.max_frame_height),
                r.frames.slots,
                RingMode.LATEST,
            )
        self.rings = {
            name: Ring.create(
                segment_name(self.run_id, name),
                slot_size=size,
                slots=slots,
                mode=mode,
                run_dir=self.run_dir,
            )
            for name, (size, slots, mode) in plan.items()
        }
        self.contexts: list[StageContext] = []
        self.procs: list[BaseProcess] = []

    def spec(self, name: str, supervisor_pid: int) -> StageSpec:
        """What the supervisor would give stage ``name`` (no control socket listens)."""
        return StageSpec(
            name=name,
            module=f"stages.{name}",
            config=self.cfg,
            run_id=self.run_id,
            run_dir=self.run_dir,
            control_endpoint=f"ipc://{self.run_dir / 'control.sock'}",
            supervisor_pid=supervisor_pid,
            rings={n: segment_name(self.run_id, n) for n in self.rings},
        )

    def context(self, name: str) -> StageContext:
        """A context for running stage ``name`` in a thread of this process."""
        # the heartbeat thread's orphan check compares with our parent: it passes
        ctx = StageContext(self.spec(name, os.getppid()), logging.getLogger(f"test.{name}"))
        ctx.start()
        self.contexts.append(ctx)
        return ctx

    def spawn(self, name: str) -> BaseProcess:
        """Stage ``name`` in its own process, started the way the supervisor starts it."""
        mp = multiprocessing.get_context("spawn")
        proc = mp.Process(
            target=stage_main, args=(self.spec(name, os.getpid()),), name=f"posewire:{name}"
        )
        proc.start()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join(5)
        for ctx in self.contexts:
            ctx.close()
        for ring in self.rings.values():
            ring.close()
            ring.unlink()


@pytest.fixture
def astronaut() -> RGB:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut(), np.uint8)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- frame slot


def test_frame_slot_round_trip_is_a_view() -> None:
    frame = np.random.default_rng(1).integers(0, 255, (48, 64, 3), np.uint8)
    buf = FrameBuffer(64, 48)
    payload = buf.pack(frame)
    assert len(payload) == FRAME_HEADER_SIZE + 48 * 64 * 3 == frame_slot_size(64, 48)
    header, pixels = frame_from_slot(payload)
    assert (header.height, header.width, header.channels) == (48, 64, 3)
    assert header.rgb and not header.end_of_stream
    assert np.array_equal(pixels, frame)
    assert np.shares_memory(pixels, np.frombuffer(payload, np.uint8))  # no copy
    small = buf.pack(frame[:10, :20])  # a smaller frame in the same buffer
    assert frame_header(small).nbytes == 10 * 20 * 3


def test_frame_slot_end_of_stream_and_bad_bytes() -> None:
    header, pixels = frame_from_slot(end_of_stream_payload())
    assert header.end_of_stream and pixels.size == 0
    with pytest.raises(ProtocolError, match="too short"):
        frame_header(b"PWFR")
    with pytest.raises(ProtocolError, match="not a frame slot"):
        frame_header(b"XXXX" + bytes(12))
    raw = bytearray(FRAME_HEADER_SIZE + 10)
    pack_frame_header(raw, 4, 4, 3, FLAG_RGB)
    with pytest.raises(ProtocolError, match="truncated"):
        frame_header(raw)
    pack_frame_header(raw, 0, 0, 3, 0x80)
    with pytest.raises(ProtocolError, match="corrupt"):
        frame_header(raw)
    with pytest.raises(ValueError, match="does not fit"):
        FrameBuffer(16, 16).pixels(17, 16)
    assert FLAG_END_OF_STREAM != FLAG_RGB


def test_packer_resizes_into_the_buffer_and_fits_the_slot() -> None:
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[:, 80:] = 200
    packer = FramePacker(1920, 1080, (80, 60), LOG)
    header, px = frame_from_slot(packer.pack(frame))
    assert (header.width, header.height) == (80, 60)
    assert px[:, :38].max() == 0 and px[:, 42:].min() == 200
    tiny = FramePacker(64, 64, None, LOG)  # 160x120 exceeds the slot: fit, keep aspect
    header, _ = frame_from_slot(tiny.pack(frame))
    assert (header.width, header.height) == (64, 48)


# --------------------------------------------------------------------------- bad sources


def _first_poll(make: object) -> None:
    feed = FrameFeed(make)  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if feed.poll(0.2) is not None:
                return
    finally:
        feed.close()


BAD_SOURCES: list[tuple[str, str, str]] = [
    # (id, how the source is made, the message expected)
    ("no-file", "file:nope.mp4", r"no such file: .*nope\.mp4$"),
    ("no-camera-index", "camera:9", r"no such camera: camera 9 \(/dev/video9\)"),
    ("no-camera-path", "camera:/dev/video42", r"no such camera: .*/dev/video42 does not exist"),
    ("ftp-scheme", "url:ftp://example.com/a.mp4", r"unsupported URL scheme .*ftp://"),
    ("no-host", "url:rtsp://", r"no host in URL"),
    ("random-bytes", "file:random.mp4", r"cannot decode .*random\.mp4"),
    ("empty-file", "file:empty.avi", r"cannot decode .*empty\.avi"),
    ("dir-as-file", "file:emptydir", r"emptydir is a directory"),
    ("empty-dir", "images:emptydir", r"no images in .*emptydir"),
    ("no-dir", "images:nodir", r"no such directory: .*nodir"),
    ("empty-glob", "images:emptydir/*.png", r"no images match .*emptydir/\*\.png"),
]


def _make_bad(tmp_path: Path, spec: str) -> Source:
    kind, _, arg = spec.partition(":")
    if kind == "file":
        return FileSource(tmp_path / arg)
    if kind == "camera":
        return CameraSource(int(arg) if arg.isdigit() else arg)
    if kind == "url":
        return UrlSource(arg)
    return ImagesSource(tmp_path / arg)


@pytest.mark.parametrize(
    ("spec", "message"), [b[1:] for b in BAD_SOURCES], ids=[b[0] for b in BAD_SOURCES]
)
def test_bad_source_is_a_precise_source_error_fast(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (tmp_path / "empty.avi").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    t0 = time.monotonic()
    # the constructor checks what it can (paths, schemes); the first open decodes
    with pytest.raises(SourceError, match=message):
        _first_poll(lambda: _make_bad(tmp_path, spec))
    assert time.monotonic() - t0 < 5.0


def test_bad_source_from_config(tmp_path: Path) -> None:
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    cfg = config(tmp_path, "source: {kind: file, path: random.mp4}")
    with pytest.raises(SourceError, match=r"cannot decode .*random\.mp4"):
        _first_poll(lambda: create_source(cfg, LOG))
    cfg = config(tmp_path, "source: {kind: url, url: 'ftp://example.com/x'}")
    with pytest.raises(SourceError, match="unsupported URL scheme"):
        FrameFeed.from_config(cfg, LOG)


def test_images_source_that_cannot_decode_anything(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(b"not a png")
    src = ImagesSource(d, fps=100, loop=True)
    src.open()
    with pytest.raises(SourceError, match="none of the 1 images"):
        src.read()


# --------------------------------------------------------------------------- sources


def test_file_source_reads_every_frame_paced_then_ends(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.avi", gray_frames(10), fps=20)
    feed = FrameFeed(lambda: FileSource(path), stall_timeout_s=5)
    t0 = time.time_ns()
    got = drain(feed)
    feed.close()
    assert len(got) == 10
    levels = [int(np.median(c.frame)) for c in got]
    assert all(abs(lv - 10 * i) <= 3 for i, lv in enumerate(levels)), levels
    ts = [c.ts_ns for c in got]
    assert ts[0] >= t0 and all(b > a for a, b in itertools.pairwise(ts))
    span = (ts[-1] - ts[0]) / 1e9
    assert span >= 9 / 20 * 0.9, f"paced at 20 fps: 10 frames need ~0.45 s, took {span:.3f}"
    assert got[0].frame.shape == (120, 160, 3) and got[0].frame.dtype == np.uint8


def test_file_source_fast_and_fps_override(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.avi", gray_frames(12), fps=2)
    fast = FrameFeed(lambda: FileSource(path), realtime=False)
    got = drain(fast)
    fast.close()
    assert len(got) == 12
    assert (got[-1].ts_ns - got[0].ts_ns) / 1e9 < 3.0  # real time would be 5.5 s
    override = FrameFeed(lambda: FileSource(path), pace_fps=40)
    got = drain(override)
    override.close()
    assert len(got) == 12
    assert (got[-1].ts_ns - got[0].ts_ns) / 1e9 >= 11 / 40 * 0.9


def test_file_source_loops(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.avi", gray_frames(5), fps=20)
    feed = FrameFeed(lambda: FileSource(path, loop=True), realtime=False)
    levels: list[int] = []
    while len(levels) < 13:
        got = feed.poll(1.0)
        assert got is not END
        if isinstance(got, Captured):
            levels.append(round(float(np.median(got.frame)) / 10))
    feed.close()
    assert levels == [0, 1, 2, 3, 4] * 2 + [0, 1, 2]


def test_images_dir_at_fps_in_name_order(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in (3, 1, 2, 0):
        img = np.zeros((30, 40, 3), np.uint8)
        img[..., 0] = 50 * i  # red channel: checks the RGB order too
        cv2.imwrite(str(d / f"img{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (d / "notes.txt").write_text("ignored")
    cfg = config(tmp_path, "source: {kind: images, path: imgs, fps: 8}")
    feed = FrameFeed.from_config(cfg, LOG)
    got = drain(feed)
    feed.close()
    assert [int(c.frame[0, 0, 0]) for c in got] == [0, 50, 100, 150]
    assert all(int(c.frame[0, 0, 2]) == 0 for c in got)
    span = (got[-1].ts_ns - got[0].ts_ns) / 1e9
    assert span >= 3 / 8 * 0.9, f"8 fps: 4 images need ~0.375 s, took {span:.3f}"
    glob_cfg = config(tmp_path, "source: {kind: images, path: 'imgs/img[12].png', loop: true}")
    src = create_source(glob_cfg, LOG)
    assert isinstance(src, ImagesSource) and [p.name for p in src.files] == [
        "img1.png",
        "img2.png",
    ]


def test_demo_source_moves_smoothly() -> None:
    demo = DemoSource(320, 180)
    demo.open()
    f0, f1, f30 = demo.render(0), demo.render(1), demo.render(30)
    assert f0.shape == (180, 320, 3) and f0.dtype == np.uint8
    assert not np.array_equal(f0, f30)
    # smooth: consecutive frames differ much less than frames a second apart
    d1 = np.abs(f0.astype(int) - f1).mean()
    d30 = np.abs(f0.astype(int) - f30).mean()
    assert 0 < d1 < d30 / 3
    # the photo's centre follows the transform: translation, scale and rotation change
    m0, m30 = demo.transform(0), demo.transform(30)
    assert abs(m30[0, 2] - m0[0, 2]) > 10
    assert not np.allclose(m0[:, :2], m30[:, :2])
    assert np.array_equal(demo.render(30), f30)  # a pure function of the index


def test_auto_uses_demo_without_a_camera(caplog: pytest.LogCaptureFixture) -> None:
    if any(Path("/dev").glob("video*")):
        pytest.skip("this machine has a camera")
    cfg = parse_config("source: {kind: auto}")
    with caplog.at_level(logging.INFO):
        src = create_source(cfg, LOG)
    assert isinstance(src, DemoSource) and (src.width, src.height) == (1280, 720)
    assert "using the demo" in caplog.text and "/dev/video0 does not exist" in caplog.text


def test_demo_feed_is_paced_to_30_fps() -> None:
    feed = FrameFeed(lambda: DemoSource(160, 90))
    got: list[Captured] = []
    while len(got) < 10:
        item = feed.poll(1.0)
        if isinstance(item, Captured):
            got.append(item)
    feed.close()
    span = (got[-1].ts_ns - got[0].ts_ns) / 1e9
    assert span >= 9 / 30 * 0.9


# --------------------------------------------------------------------------- watchdog


class _HangingSource(Source):
    """A source whose ``read`` blocks (like ``VideoCapture.read`` on a dead stream)."""

    kind = "hanging"
    live = True
    opened = 0

    def __init__(self, hang_after: int) -> None:
        super().__init__()
        self.hang_after = hang_after
        self.n = 0
        self.release = threading.Event()

    @property
    def fps(self) -> float:
        return 50.0

    def open(self) -> None:
        type(self).opened += 1
        self.up = True

    def read(self) -> tuple[RGB, int] | None:
        if self.n >= self.hang_after:
            self.release.wait(30)
            return None
        self.n += 1
        time.sleep(0.01)
        return np.zeros((8, 8, 3), np.uint8), time.time_ns()

    def close(self) -> None:
        self.up = False


def test_stalled_read_is_abandoned_and_reopened_with_backoff() -> None:
    made: list[_HangingSource] = []

    def make() -> _HangingSource:
        made.append(_HangingSource(hang_after=5))
        return made[-1]

    feed = FrameFeed(make, stall_timeout_s=0.4, reopen_backoff_max_s=0.3, log=LOG)
    frames, down_seen = 0, False
    deadline = time.monotonic() + 10
    while feed.reopens < 3 and time.monotonic() < deadline:
        if isinstance(feed.poll(0.1), Captured):
            frames += 1
        down_seen |= not feed.up
    for src in made:
        src.release.set()
    feed.close()
    assert feed.reopens >= 3 and down_seen
    assert frames >= 15  # 5 per incarnation: every reopen delivered again
    assert feed.backoff_min_s <= feed._backoff <= 0.3  # capped


class _MJPEGServer:
    """A real HTTP MJPEG stream; the first connection stalls after ``stall_after`` frames."""

    def __init__(self, stall_after: int = 10) -> None:
        self.connections = 0
        self.stop = threading.Event()
        jpg = cv2.imencode(".jpg", np.full((60, 80, 3), 128, np.uint8))[1].tobytes()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.connections += 1
                first = outer.connections == 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                try:
                    for i in range(10_000):
                        if outer.stop.is_set():
                            return
                        self.wfile.write(part % len(jpg) + jpg + b"\r\n")
                        self.wfile.flush()
                        if first and i + 1 == stall_after:
                            outer.stop.wait(30)  # a dead stream: connected, silent
                            return
                        time.sleep(0.03)
                except (BrokenPipeError, ConnectionResetError):
                    return

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mjpeg_server() -> Iterator[_MJPEGServer]:
    srv = _MJPEGServer()
    yield srv
    srv.close()


def test_url_stream_that_stalls_is_reopened(mjpeg_server: _MJPEGServer) -> None:
    url = mjpeg_server.url
    feed = FrameFeed(
        lambda: UrlSource(url, timeout_s=1.0), stall_timeout_s=1.0, reopen_backoff_max_s=0.5
    )
    before = after = 0
    ups: list[bool] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and after < 10:
        got = feed.poll(0.1)
        ups.append(feed.up)
        if isinstance(got, Captured):
            assert got.frame.shape == (60, 80, 3)
            if feed.reopens == 0:
                before += 1
            else:
                after += 1
    feed.close()
    assert before >= 5 and after >= 10, (before, after)
    assert feed.reopens >= 1 and mjpeg_server.connections >= 2
    assert False in ups  # source_up went to 0 while stalled


def test_unreachable_url_is_retried_not_fatal() -> None:
    # a closed port: the stream may come up later, so the feed keeps trying
    feed = FrameFeed(
        lambda: UrlSource("http://127.0.0.1:9/none.mjpg", timeout_s=0.5),
        stall_timeout_s=1.0,
        reopen_backoff_max_s=0.2,
    )
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and feed.reopens < 2:
        assert feed.poll(0.1) is None
    feed.close()
    assert feed.reopens >= 2 and not feed.up


# --------------------------------------------------------------------------- the stage


def test_capture_stage_writes_the_frames_ring_and_ends_with_0(tmp_path: Path) -> None:
    write_video(tmp_path / "v.avi", gray_frames(8, 64, 48), fps=30)
    cfg = config(
        tmp_path,
        "source: {kind: file, path: v.avi, fps: 200, resize: [32, 24]}\n"  # paced: latest-wins
        "rings: {max_frame_width: 64, max_frame_height: 48}",
    )
    rings = StageRings(tmp_path, cfg)
    try:
        ctx = rings.context("capture")
        t0 = time.time_ns()
        assert capture.run(ctx) == 0
        assert ctx.metrics["frames_captured_total"] == 8
        assert ctx.metrics["source_up"] == 0
        stats = rings.rings["frames"].statistics()
        assert stats.written == 9  # 8 frames + the end-of-stream marker
        item = rings.rings["frames"].recv(timeout=0)
        assert item.seq == 9 and item.ts_ns >= t0
        header, _ = frame_from_slot(item.data)
        assert header.end_of_stream
        with pytest.raises(WouldBlock):
            rings.rings["frames"].recv(timeout=0)
        assert rings.rings["frames"].statistics().skipped == 8  # latest-wins counted them
    finally:
        rings.close()


def test_capture_stage_sends_rgb_frames_with_capture_timestamps(tmp_path: Path) -> None:
    cfg = config(tmp_path, "source: {kind: demo, width: 320, height: 180}")
    rings = StageRings(tmp_path, cfg)
    out: list[int] = []
    try:
        ctx = rings.context("capture")
        th = threading.Thread(target=lambda: out.append(capture.run(ctx)))
        th.start()
        frames = rings.rings["frames"]
        seen: list[int] = []
        deadline = time.monotonic() + 10
        while len(seen) < 5 and time.monotonic() < deadline:
            try:
                item = frames.recv(timeout=0.5)
            except WouldBlock:
                continue
            header, px = frame_from_slot(item.data)
            assert (header.width, header.height) == (320, 180) and header.rgb
            assert abs(item.ts_ns - time.time_ns()) < 5e9
            seen.append(item.seq)
            assert np.array_equal(px, DemoSource(320, 180).render(item.seq - 1))
        ctx.stopping = True
        th.join(5)
        assert out == [0]
        assert seen == sorted(seen) and len(seen) == 5
        assert ctx.metrics["frames_captured_total"] >= 5
    finally:
        rings.close()


# --------------------------------------------------------------------------- trace (poses)


@needs_trace
def test_trace_source_gives_the_trace_frames_in_order() -> None:
    trace = PoseTrace.load(TRACE)
    assert trace.fps == 30 and trace.image.shape[1:] == (33, 4) and trace.world is not None
    src = TraceSource(trace, loop=True)
    assert src.fps == trace.fps
    t0 = 1_000_000_000_000
    for i in range(5):
        pose = src.pose(i, i + 1, t0 + i)
        assert pose is not None and pose.seq == i + 1 and pose.capture_ts_ns == t0 + i
        assert np.array_equal(pose.image[0], trace.image[i])
        assert pose.world is not None and np.array_equal(pose.world[0], trace.world[i])
    # looping wraps around; a non-looping trace ends
    wrapped = src.pose(trace.frames, 0, t0)
    assert wrapped is not None and np.array_equal(wrapped.image[0], trace.image[0])
    once = TraceSource(trace, loop=False, world=False)
    last = once.pose(trace.frames - 1, 0, t0)
    assert last is not None and last.world is None
    assert once.pose(trace.frames, 0, t0) is None


def test_bad_trace_files_are_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="trace file not found"):
        PoseTrace.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(SourceError, match=r"cannot read .*junk\.npz"):
        PoseTrace.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "nofps.npz", image=np.zeros((3, 33, 4), np.float32))
    with pytest.raises(SourceError, match="no fps"):
        PoseTrace.load(tmp_path / "nofps.npz")
    np.savez(tmp_path / "shape.npz", image=np.zeros((3, 17, 4), np.float32), fps=30.0)
    with pytest.raises(SourceError, match=r"image must be \[T, 33, 4\]"):
        PoseTrace.load(tmp_path / "shape.npz")


@needs_trace
def test_trace_source_replays_into_the_poses_ring(tmp_path: Path) -> None:
    cfg = config(tmp_path, f"source: {{kind: trace, path: '{TRACE}', loop: false}}")
    assert cfg.source.produces == "poses"
    rings = StageRings(tmp_path, cfg, frames=False)  # no frames ring for a pose source
    out: list[int] = []
    try:
        ctx = rings.context("capture")
        th = threading.Thread(target=lambda: out.append(capture.run(ctx)))
        th.start()
        poses = rings.rings["poses"]
        got: list[PoseFrame] = []
        while len(got) < 12:
            try:
                item = poses.recv(timeout=2)
            except WouldBlock:
                raise AssertionError("no poses from the trace replay") from None
            pose = PoseFrame.from_bytes(item.data)
            assert item.meta == pose.seq == item.seq and item.ts_ns == pose.capture_ts_ns
            got.append(pose)
        ctx.stopping = True
        th.join(5)
        assert out == [0]
        trace = PoseTrace.load(TRACE)
        assert all(np.array_equal(p.image[0], trace.image[i]) for i, p in enumerate(got))
        assert [p.seq for p in got] == list(range(1, 13))
        span_s = (got[-1].capture_ts_ns - got[0].capture_ts_ns) / 1e9
        assert span_s >= 11 / trace.fps * 0.9, f"12 frames at 30 fps need 0.37 s: {span_s:.3f}"
        assert ctx.metrics["frames_captured_total"] >= 12
    finally:
        rings.close()


def test_short_trace_as_fast_as_possible_ends_the_stage_with_0(tmp_path: Path) -> None:
    image = np.random.default_rng(3).uniform(0.2, 0.8, (5, 33, 4)).astype(np.float32)
    np.savez(tmp_path / "short.npz", image=image, fps=2.0)  # 2 fps: paced would take 2 s
    cfg = config(
        tmp_path, "source: {kind: trace, path: short.npz, loop: false, as_fast_as_possible: true}"
    )
    rings = StageRings(tmp_path, cfg, frames=False)
    try:
        ctx = rings.context("capture")
        t0 = time.monotonic()
        assert capture.run(ctx) == 0
        assert time.monotonic() - t0 < 1.5
        got = [PoseFrame.from_bytes(rings.rings["poses"].recv(timeout=0).data) for _ in range(5)]
        assert all(np.array_equal(p.image[0], image[i]) for i, p in enumerate(got))
        assert got[0].world is None  # the file has no world landmarks
        assert ctx.metrics["frames_captured_total"] == 5
        with pytest.raises(WouldBlock):
            rings.rings["poses"].recv(timeout=0)
    finally:
        rings.close()


def test_trace_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"junk")
    cfg = config(tmp_path, "source: {kind: trace, path: junk.npz}")
    rings = StageRings(tmp_path, cfg, frames=False)
    try:
        ctx = rings.context("capture")
        assert capture.run(ctx) == ExitStatus.CONFIG
    finally:
        rings.close()
    assert "cannot read" in (rings.run_dir / "capture.error").read_text()
