"""Recordings: receive --record, replay, export (csv, npz, bvh), damaged files, bad args.

Real components: a room server process, ``python -m pipeline receive|replay|export``
as subprocesses, an in-process publisher encoding a CMU pose trace (with world
landmarks) and an in-process :class:`Receiver` listening to the replay. Loopback only.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.common import stop_process
from pipeline.cli.replay import codec_config
from pipeline.client import bvh, recording
from pipeline.client import skeleton as sk
from pipeline.client.receiver import Receiver
from pipeline.client.skeleton import BONES, F64, PARENT
from pipeline.codec import CodecConfig, Encoder, warm_kernels
from pipeline.codec.quant import Quant
from pipeline.model.pose import NUM_LANDMARKS, PoseFrame
from pipeline.transports.base import Control
from pipeline.transports.websocket import WebSocketTransport
from tests.poses import right_arm_raised, to_mediapipe, tpose_unity
from tests.test_server_support import ROOT, TRACE, ServeProcess, token

#: frames of the recorded session (3 s; POSEWIRE_RECORD_FRAMES=1800 for the issue's 60 s)
N_FRAMES = int(os.environ.get("POSEWIRE_RECORD_FRAMES", "90"))
FPS = 30.0


def cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def trace_frames(n: int) -> list[PoseFrame]:
    with np.load(TRACE) as d:
        image, world = np.asarray(d["image"], np.float32), np.asarray(d["world"], np.float32)
    t0 = time.time_ns()
    return [
        PoseFrame(i + 1, t0 + int(i * 1e9 / FPS), image[k][None].copy(), world[k][None].copy())
        for i, k in enumerate(np.arange(n) % len(image))
    ]


def write_recording(
    path: Path, frames: list[PoseFrame], stream_ids: tuple[int, ...] = (3,)
) -> list[bytes]:
    """A recording made without a server: the frames encoded per stream (members bob,
    carol...), arriving at 30 fps, the streams interleaved."""
    encs = [Encoder(CodecConfig(world=True), sid) for sid in stream_ids]
    names = ("bob", "carol", "dave")
    members = [{"id": f"m{i}", "name": names[i], "streams": [sid]} for i, sid in
               enumerate(stream_ids)]  # fmt: skip
    packets = []
    with recording.RecordingWriter(path, {"room": "x"}) as w:
        w.event({"type": "members", "members": members}, frames[0].capture_ts_ns)
        for f in frames:
            for k, enc in enumerate(encs):
                packets.append(enc.encode(f))
                w.packet(packets[-1], f.capture_ts_ns + 2_000_000 + k * 1_000_000)
    return packets


# --------------------------------------------------------------------------- record, replay


async def _publish(url: str, frames: list[PoseFrame]) -> list[bytes]:
    """Publish ``frames`` at 30 fps once the recording receiver has joined."""
    pub = WebSocketTransport(
        url, "live", token("live", "publisher", subject="alice"), publish=True, name="alice"
    )
    await pub.connect()
    try:
        deadline = time.monotonic() + 30
        while not any(m != pub.member_id for m in pub.members):
            assert time.monotonic() < deadline, "the recording receiver did not join"
            while pub.recv_nowait() is not None:
                pass
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        warm_kernels()  # the first encode must not delay the first frames
        enc = Encoder(CodecConfig(world=True), 7)
        sent = []
        t0 = time.monotonic()
        for i, f in enumerate(frames):
            await asyncio.sleep(max(0.0, t0 + i / FPS - time.monotonic()))
            f = PoseFrame(f.seq, time.time_ns(), f.image, f.world)
            sent.append(enc.encode(f))
            await pub.send(sent[-1])
            while pub.recv_nowait() is not None:
                pass
        await asyncio.sleep(0.5)
        return sent
    finally:
        await pub.close()


async def _listen_to_replay(
    url: str, room: str, rec: Path, n: int, *args: str
) -> tuple[Receiver, subprocess.CompletedProcess[str]]:
    gc.freeze()  # a full collection of this process's heap takes ~100 ms: not in the timing
    rx = Receiver(url, room, token(room, "subscriber"), keep_poses=True)
    await rx.connect()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", "replay", str(rec), "--server", url,
            "--room", room, "--token", token(room, "publisher", subject="replayer"), *args,
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        limit = 30 + N_FRAMES / FPS
        await rx.run(limit, until=lambda: rx.decoded >= n or proc.returncode is not None)
        out, err = await asyncio.wait_for(proc.communicate(), limit)
        m = re.search(rb"replayed (\d+) frames", out)
        sent = int(m.group(1)) if m else 0
        await rx.run(5.0, until=lambda: rx.decoded >= sent)  # the last ones may be in flight
        await rx.run(0.2)
    finally:
        await rx.close()
        gc.unfreeze()
    assert proc.returncode is not None
    return rx, subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    server = ServeProcess()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timing
def test_record_replay_export(srv: ServeProcess, tmp_path: Path) -> None:
    frames = trace_frames(N_FRAMES)
    rec_path, orig = tmp_path / "live.pwr", tmp_path / "orig.jsonl"
    receiver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "receive", "--server", srv.url, "--room", "live",
         "--token", token("live", "subscriber"), "--duration", str(N_FRAMES / FPS + 60), "--record",
         str(rec_path), "--out", str(orig)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        sent = asyncio.run(_publish(srv.url, frames))
        deadline = time.monotonic() + 20  # the receiver may lag on loaded cores
        while len(recording.read(rec_path).packets) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_process(receiver)
    out, err = receiver.communicate()
    assert receiver.returncode == 0, err[-2000:]
    assert f"recorded {N_FRAMES}" not in out  # events are records too
    assert "recorded" in out, out

    # the file: every packet, byte for byte, with arrival times
    rec = recording.read(rec_path)
    assert rec.problem is None
    if [r.data for r in rec.packets] != sent:
        got_set = {r.data for r in rec.packets}
        missing = [i for i, p in enumerate(sent) if p not in got_set]
        raise AssertionError(f"missing packets {missing[:80]} of {len(sent)}; receive said {out}")
    arrivals = np.array([r.arrival_ns for r in rec.packets])
    assert np.all(np.diff(arrivals) >= 0)
    assert all(r.stream_id == 7 for r in rec.packets)
    dec = recording.decode(rec)
    assert len(dec.poses) == N_FRAMES and dec.streams[7].name == "alice"
    assert dec.clock_offset_ns is not None
    # ... decoded as the recording receiver decoded it (its --out, rounded to 1e-6)
    lines = [eval_json(line) for line in orig.read_text().splitlines()]
    assert [x["seq"] for x in lines] == [p.frame.seq for p in dec.poses]
    got = np.array([p.frame.image for p in dec.poses])
    assert np.abs(np.array([x["image"] for x in lines]) - got).max() < 1e-6

    # replay into another room: the same poses, the same timing
    rx, proc = asyncio.run(_listen_to_replay(srv.url, "copy", rec_path, N_FRAMES))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"replayed {N_FRAMES} frames" in proc.stdout
    poses = [p for p in rx.poses if p.stream_id == 7]
    assert [p.frame.seq for p in poses] == [p.frame.seq for p in dec.poses]
    for a, b in zip(poses, dec.poses, strict=True):
        assert np.array_equal(a.frame.image, b.frame.image)
        assert a.frame.world is not None and b.frame.world is not None
        assert np.array_equal(a.frame.world, b.frame.world)
    names = {
        e.body["member"].get("name")
        for e in rx.events
        if isinstance(e, Control) and e.type == "presence" and 7 in e.body["member"]["streams"]
    }
    assert names == {"replay alice"}, names
    got_t = np.array([p.received_ns for p in poses], np.int64)
    # arrival times against the recorded ones, on a common origin (the median offset)
    off = got_t - arrivals
    err_ms = np.abs(off - np.median(off)) / 1e6
    cap = np.array([p.frame.capture_ts_ns for p in poses], np.int64)
    cap0 = np.array([p.frame.capture_ts_ns for p in dec.poses], np.int64)
    cap_err_us = np.abs((cap - cap[0]) - (cap0 - cap0[0])) / 1e3
    print(
        f"replay timing error: median {np.median(err_ms):.3f} ms, "
        f"p95 {np.percentile(err_ms, 95):.3f} ms, p99 {np.percentile(err_ms, 99):.3f} ms, "
        f"max {err_ms.max():.3f} ms (frame {int(err_ms.argmax())} of {len(err_ms)}: "
        f"recorded gap {np.diff(arrivals)[max(int(err_ms.argmax()) - 1, 0)] / 1e6:.1f} ms, "
        f"replayed {np.diff(got_t)[max(int(err_ms.argmax()) - 1, 0)] / 1e6:.1f} ms); "
        f"capture times max {cap_err_us.max():.2f} us"
    )
    assert cap_err_us.max() < 2.0
    # the 5 ms on the median, twice that on p95 (2 cores shared with other jobs);
    # a 60 s run (POSEWIRE_RECORD_FRAMES=1800) measured max 3.9 ms, docs/recordings.md
    assert np.median(err_ms) < 5.0 and np.percentile(err_ms, 95) < 10.0, err_ms

    # --loop at 4x (120 packets/s: under the server's default 200 messages/s per
    # connection): sequence numbers keep going forward, every frame decodes
    loop_s = max(1.5, 2.5 * N_FRAMES / FPS / 4)
    rx, proc = asyncio.run(
        _listen_to_replay(
            srv.url, "loop", rec_path, 10**9, "--loop", "--speed", "4", "--duration", str(loop_s)
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning" not in proc.stdout, proc.stdout
    seqs = [p.frame.seq for p in rx.poses]
    n_sent = int(re.search(r"replayed (\d+) frames", proc.stdout).group(1))  # type: ignore[union-attr]
    assert n_sent > 2 * N_FRAMES and len(seqs) == n_sent, (n_sent, len(seqs))
    assert all(b > a for a, b in itertools.pairwise(seqs))
    st = rx.streams[7]
    assert st.need_keyframe == 0 and st.lost == 0

    # export: values equal the decoder's
    npz, csv_path, bvh_path = tmp_path / "o.npz", tmp_path / "o.csv", tmp_path / "o.bvh"
    for fmt, path in (("npz", npz), ("csv", csv_path), ("bvh", bvh_path)):
        r = cli("export", rec_path, "--format", fmt, "-o", path)
        assert r.returncode == 0, r.stderr
    with np.load(npz) as d:
        assert list(d["streams"]) == [7]
        assert np.array_equal(d["s7_image"], got[:, 0])
        assert np.array_equal(d["world"], np.array([p.frame.world[0] for p in dec.poses]))  # type: ignore[index]
        assert np.array_equal(d["seq"], [p.frame.seq for p in dec.poses])
        assert np.allclose(d["t"], (arrivals - rec.start_ns) / 1e9)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_FRAMES * NUM_LANDMARKS
    vals = np.array([[float(r[k]) for k in ("x", "y", "z", "visibility")] for r in rows])
    assert np.array_equal(vals.reshape(N_FRAMES, NUM_LANDMARKS, 4), got[:, 0].astype(np.float64))
    wx = np.array([float(r["world_x"]) for r in rows]).reshape(N_FRAMES, NUM_LANDMARKS)
    assert np.array_equal(wx, np.array([p.frame.world[0, :, 0] for p in dec.poses]))  # type: ignore[index]
    b = parse_bvh(bvh_path.read_text())
    assert b["frames"] == N_FRAMES and len(b["motion"]) == N_FRAMES
    assert np.isfinite(b["motion"]).all()


def test_replay_of_two_streams_makes_two_members(srv: ServeProcess, tmp_path: Path) -> None:
    path = tmp_path / "two.pwr"
    write_recording(path, trace_frames(20), (3, 4))
    dec = recording.decode(recording.read(path))
    rx, proc = asyncio.run(_listen_to_replay(srv.url, "two", path, 40, "--speed", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "replayed 40 frames" in proc.stdout and "stream 3: 20, stream 4: 20" in proc.stdout
    for sid in (3, 4):
        got = [p.frame for p in rx.poses if p.stream_id == sid]
        want = [p.frame for p in dec.poses if p.stream_id == sid]
        assert [f.seq for f in got] == [f.seq for f in want]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(got, want, strict=True))
    owners = {
        sid: e.body["member"]["name"]
        for e in rx.events
        if isinstance(e, Control) and e.type == "presence"
        for sid in e.body["member"]["streams"]
    }
    assert owners == {3: "replay bob", 4: "replay carol"}


def eval_json(line: str) -> dict[str, Any]:
    import json

    obj = json.loads(line)
    assert isinstance(obj, dict)
    return obj


# --------------------------------------------------------------------------- BVH


def parse_bvh(text: str) -> dict[str, Any]:
    """A small BVH reader: joints (name, parent, offset, channels), End Sites, motion."""
    tok = text.split()
    i = 0
    joints: list[dict[str, Any]] = []
    ends: dict[str, list[float]] = {}

    def expect(word: str) -> None:
        nonlocal i
        assert tok[i] == word, (i, tok[i], word)
        i += 1

    def node(parent: str | None) -> None:
        nonlocal i
        name = tok[i]
        i += 1
        expect("{")
        expect("OFFSET")
        offset = [float(v) for v in tok[i : i + 3]]
        i += 3
        expect("CHANNELS")
        n = int(tok[i])
        chans = tok[i + 1 : i + 1 + n]
        i += 1 + n
        joints.append({"name": name, "parent": parent, "offset": offset, "channels": chans})
        while tok[i] != "}":
            if tok[i] == "JOINT":
                i += 1
                node(name)
            else:
                expect("End")
                expect("Site")
                expect("{")
                expect("OFFSET")
                ends[name] = [float(v) for v in tok[i : i + 3]]
                i += 3
                expect("}")
        expect("}")

    expect("HIERARCHY")
    expect("ROOT")
    node(None)
    expect("MOTION")
    expect("Frames:")
    frames = int(tok[i])
    i += 1
    expect("Frame")
    expect("Time:")
    frame_time = float(tok[i])
    i += 1
    n_chan = sum(len(j["channels"]) for j in joints)
    values = [float(v) for v in tok[i:]]
    assert len(values) == frames * n_chan, (len(values), frames, n_chan)
    lines = text.strip().splitlines()[-frames:]
    assert all(len(line.split()) == n_chan for line in lines)
    motion = np.array(values).reshape(frames, n_chan)
    return {"joints": joints, "ends": ends, "frames": frames, "frame_time": frame_time,
            "motion": motion}  # fmt: skip


def _rot(axis: str, deg: float) -> F64:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return {
        "X": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "Y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "Z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def test_bvh_of_known_poses(tmp_path: Path) -> None:
    """A T-pose and a right arm raised 90 degrees: the expected joint angles, and forward
    kinematics of the file (as a BVH reader does it) raises the arm."""
    t0 = time.time_ns()
    poses = [tpose_unity(), right_arm_raised()]
    frames = []
    for i, p in enumerate(poses):
        w = to_mediapipe(p).astype(np.float32)[None]
        img = np.full((1, NUM_LANDMARKS, 4), 0.5, np.float32)
        img[..., 3] = 1.0
        frames.append(PoseFrame(i + 1, t0 + i * 33_333_333, img, w))
    path = tmp_path / "poses.pwr"
    write_recording(path, frames)
    r = cli("export", path, "--format", "bvh", "-o", tmp_path / "poses.bvh")
    assert r.returncode == 0, r.stderr
    b = parse_bvh((tmp_path / "poses.bvh").read_text())
    names = [j["name"] for j in b["joints"]]
    assert names[0] == "Hips" and sorted(names) == sorted(BONES)
    assert {j["name"]: j["parent"] for j in b["joints"]} == PARENT
    assert set(b["ends"]) == set(bvh.END_SITES)
    assert b["frames"] == 2 and abs(b["frame_time"] - 1 / 30) < 1e-3
    assert b["joints"][0]["channels"] == list(bvh.ROOT_CHANNELS)
    angles: list[dict[str, F64]] = []
    for row in b["motion"]:
        k, per = 3, {}
        for j in b["joints"]:
            per[j["name"]] = row[k : k + 3]
            k += 3
        angles.append(per)
    # T-pose: every rotation zero; arm raised: RightUpperArm -90 about z (BVH frame:
    # x is the performer's left, the right arm rests along -x and turns to +y)
    assert max(np.abs(a).max() for a in angles[0].values()) < 5.0
    assert np.abs(angles[1]["RightUpperArm"] - [-90.0, 0.0, 0.0]).max() < 5.0
    assert max(np.abs(a).max() for n, a in angles[1].items() if n != "RightUpperArm") < 5.0
    # forward kinematics: the elbow (RightLowerArm's offset) ends up above the shoulder
    offs = {j["name"]: np.array(j["offset"]) for j in b["joints"]}
    glob: dict[str, F64] = {}
    for j in b["joints"]:
        z, x, y = angles[1][j["name"]]
        local = _rot("Z", z) @ _rot("X", x) @ _rot("Y", y)
        glob[j["name"]] = local if j["parent"] is None else glob[j["parent"]] @ local
    d = glob["RightUpperArm"] @ offs["RightLowerArm"]
    assert d[1] > 0.99 * np.linalg.norm(d)
    # the bone lengths are the first frame's: shoulder -> elbow 0.28 m (world step 5 mm)
    assert abs(np.linalg.norm(offs["RightLowerArm"]) - 0.28) < 0.01
    assert offs["RightLowerArm"][0] < 0 < offs["LeftLowerArm"][0]


def test_codec_config_reproduces_quantization() -> None:
    other = CodecConfig(
        precision_px=0.3,
        z_precision=0.02,
        world_precision_m=0.01,
        visibility_levels=7,
        reference_width_px=1280,
    )
    for cfg in (CodecConfig(), other):
        q = Quant.from_config(cfg)
        assert Quant.from_config(codec_config(q)) == q


# --------------------------------------------------------------------------- damage, limits


def test_truncated_and_corrupt_files_keep_what_came_before(tmp_path: Path) -> None:
    path = tmp_path / "r.pwr"
    packets = write_recording(path, trace_frames(10))
    full = path.read_bytes()
    path.write_bytes(full[:-5])  # a crash in the middle of the last record
    rec = recording.read(path)
    assert rec.problem is not None and "truncated" in rec.problem
    assert [r.data for r in rec.packets] == packets[:-1]
    r = cli("export", path, "--format", "npz", "-o", tmp_path / "t.npz")
    assert r.returncode == 0, r.stderr
    assert "truncated last record" in r.stdout
    with np.load(tmp_path / "t.npz") as d:
        assert len(d["t"]) == 9
    # a flipped byte inside the 5th packet: the first 4 are kept
    bad = bytearray(full)
    pos = full.index(packets[4]) + 10
    bad[pos] ^= 0xFF
    path.write_bytes(bytes(bad))
    rec = recording.read(path)
    assert rec.problem is not None and "corrupt record" in rec.problem
    assert [r.data for r in rec.packets] == packets[:4]


def test_records_are_readable_while_the_writer_is_open(tmp_path: Path) -> None:
    """Each record reaches the OS when written: a process killed now loses nothing."""
    path = tmp_path / "open.pwr"
    enc = Encoder(CodecConfig(), 1)
    w = recording.RecordingWriter(path, {})
    try:
        for f in trace_frames(5):
            w.packet(enc.encode(f), f.capture_ts_ns)
        w.event({"type": "presence", "event": "join", "member": {"id": "x"}}, 1)
        rec = recording.read(path)
        assert rec.problem is None and len(rec.packets) == 5 and len(rec.records) == 6
        assert rec.records[-1].event()["type"] == "presence"
    finally:
        w.close()


def test_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "r.pwr"
    frames = trace_frames(50)
    enc = Encoder(CodecConfig(world=True), 1)
    limit = 2000
    with recording.RecordingWriter(path, {}, max_bytes=limit) as w:
        ok = [w.packet(enc.encode(f), f.capture_ts_ns) for f in frames]
    assert w.full and not all(ok) and ok[0]
    assert path.stat().st_size <= limit
    rec = recording.read(path)
    assert rec.problem is None and len(rec.records) == sum(ok) == w.records


def test_bad_input_is_refused_with_exit_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pwr"
    recording.RecordingWriter(empty, {}).close()
    text = tmp_path / "text.pwr"
    text.write_text("hello\n")
    good = tmp_path / "good.pwr"
    write_recording(good, trace_frames(3))
    cases = [
        (("export", tmp_path / "missing.pwr", "--format", "csv"), "no such recording"),
        (("export", text, "--format", "csv"), "not a posewire recording"),
        (("export", empty, "--format", "npz"), "no decodable pose"),
        (("export", good, "--format", "fbx"), "unknown --format 'fbx'"),
        (("export", good, "--format", "csv", "--stream", "9"), "no stream 9"),
        (
            (
                "replay",
                good,
                "--server",
                "http://127.0.0.1:9",
                "--room",
                "r",
                "--token",
                "t",
                "--speed",
                "0",
            ),
            "--speed must be a positive number",
        ),
        (
            ("replay", empty, "--server", "http://127.0.0.1:9", "--room", "r", "--token", "t"),
            "no decodable pose",
        ),
        (
            (
                "receive",
                "--server",
                "http://127.0.0.1:9",
                "--room",
                "r",
                "--token",
                "t",
                "--record",
                tmp_path,
            ),
            "cannot write the recording",
        ),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr


def test_skeleton_builders_match_the_solver() -> None:
    """The BVH rest offsets follow the solver's rest directions (x mirrored)."""
    offsets, ends, height = bvh.rest_offsets(to_mediapipe(tpose_unity()))
    for bone, (rest, _, _) in sk.SWING.items():
        child = [c for c in BONES if PARENT[c] == bone]
        vec = offsets[child[0]] if child else ends[bone]
        assert np.allclose(vec / np.linalg.norm(vec), rest * [-1, 1, 1]), bone
    assert abs(height - 0.9) < 1e-9


def test_euler_zxy_rebuilds_the_rotation() -> None:
    """R = Rz * Rx * Ry from the exported angles equals the quaternion's matrix, also at
    gimbal lock (x = +-90 degrees)."""
    rng = np.random.default_rng(7)
    q = rng.normal(size=(500, 4))
    lock = [sk.qmul(_axis_q((0, 0, 1), 30), _axis_q((1, 0, 0), 90)),
            sk.qmul(_axis_q((0, 1, 0), 20), _axis_q((1, 0, 0), -90))]  # fmt: skip
    q = np.concatenate((q / np.linalg.norm(q, axis=1, keepdims=True), lock))
    for (z, x, y), m in zip(bvh.euler_zxy(q), bvh.quat_matrix(q), strict=True):
        assert np.abs(_rot("Z", z) @ _rot("X", x) @ _rot("Y", y) - m).max() < 1e-6


def _axis_q(axis: tuple[float, float, float], deg: float) -> F64:
    h = np.radians(deg) / 2
    return np.array([*(np.asarray(axis, float) * np.sin(h)), np.cos(h)])
