"""VMC output: the skeleton solver on known poses and the OSC bundles on loopback."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_server import ThreadingOSCUDPServer

from pipeline.client import skeleton as sk
from pipeline.client.skeleton import BONE_INDEX, BONES, F64, SkeletonSolver, qangle_deg, solve_local
from pipeline.client.vmc import VmcSender, landmark_address, parse_target
from pipeline.config import traces_dir
from pipeline.errors import TransportError
from pipeline.model.pose import NUM_LANDMARKS, PoseFrame
from tests.poses import angle_between, axis_angle, right_arm_raised, to_mediapipe, tpose_unity

TRACES = traces_dir()


def test_tpose_gives_identity() -> None:
    q = solve_local(to_mediapipe(tpose_unity()))[0]
    angles = qangle_deg(q)
    assert q.shape == (len(BONES), 4)
    assert angles.max() < 1.0, dict(zip(BONES, angles.round(3), strict=True))


def test_right_arm_raised_90_degrees() -> None:
    q = solve_local(to_mediapipe(right_arm_raised()))[0]
    upper = q[BONE_INDEX["RightUpperArm"]]
    # +x (the rest direction) onto +y: 90 degrees about +z (Unity frame, numerically)
    assert angle_between(upper, axis_angle((0, 0, 1), 90)) < 5.0
    assert abs(qangle_deg(upper) - 90.0) < 5.0
    assert qangle_deg(q[BONE_INDEX["RightLowerArm"]]) < 1.0
    others = [b for b in BONES if not b.startswith("Right") or "Leg" in b or "Foot" in b]
    assert qangle_deg(q[[BONE_INDEX[b] for b in others]]).max() < 1.0


def test_left_elbow_bent_90_degrees() -> None:
    p = tpose_unity()
    p[sk.L_WR] = (-0.48, 0.5, 0.26)  # forearm points forward
    p[sk.L_INDEX] = (-0.46, 0.5, 0.36)
    p[sk.L_PINKY] = (-0.50, 0.5, 0.36)
    q = solve_local(to_mediapipe(p))[0]
    lower = q[BONE_INDEX["LeftLowerArm"]]
    assert abs(qangle_deg(lower) - 90.0) < 5.0
    # -x onto +z: about +y
    assert angle_between(lower, axis_angle((0, 1, 0), 90)) < 5.0
    assert qangle_deg(q[BONE_INDEX["LeftUpperArm"]]) < 1.0
    assert qangle_deg(q[BONE_INDEX["LeftHand"]]) < 1.0


def test_turned_body_moves_only_the_hips() -> None:
    """The whole T-pose turned 90 degrees about the vertical: Hips turn, the rest stays."""
    p = tpose_unity()
    turn = axis_angle((0, 1, 0), 90)
    q = solve_local(to_mediapipe(sk.qrotate(np.broadcast_to(turn, (NUM_LANDMARKS, 4)), p)))[0]
    assert angle_between(q[BONE_INDEX["Hips"]], turn) < 1.0
    assert qangle_deg(q[1:]).max() < 1.0


@pytest.mark.skipif(not TRACES.is_dir(), reason="data/pose-traces missing")
def test_cmu_traces_give_finite_unit_quaternions() -> None:
    files = sorted(TRACES.glob("*.npz"))
    assert files
    for f in files:
        world = np.load(f)["world"]
        q = solve_local(world)
        assert q.shape == (len(world), len(BONES), 4)
        assert np.isfinite(q).all(), f.name
        assert np.abs(np.linalg.norm(q, axis=-1) - 1.0).max() < 1e-6, f.name
        # forward kinematics with the solved rotations points every limb bone where the
        # landmarks do (within 1 degree)
        p = sk.to_unity(world)
        glob: dict[str, F64] = {}
        for bone in BONES:
            parent = sk.PARENT[bone]
            loc = q[:, BONE_INDEX[bone]]
            glob[bone] = loc if parent is None else sk.qmul(glob[parent], loc)
            if bone in sk.SWING:
                rest, a, b = sk.SWING[bone]
                seen = p[:, list(b)].mean(axis=1) - p[:, list(a)].mean(axis=1)
                got = sk.qrotate(glob[bone], np.broadcast_to(rest, seen.shape))
                cos = np.sum(got * seen, axis=1) / np.linalg.norm(seen, axis=1)
                err = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
                assert err.max() < 1.0, (f.name, bone, err.max())


def test_invisible_landmarks_keep_the_previous_rotation() -> None:
    solver = SkeletonSolver()
    p = tpose_unity()
    vis = np.ones(NUM_LANDMARKS)
    first = solver.solve(to_mediapipe(p), vis)
    p2 = p.copy()
    p2[sk.L_WR] = (-0.48, 0.5, 0.26)
    vis[sk.L_WR] = 0.1
    second = solver.solve(to_mediapipe(p2), vis)
    i = BONE_INDEX["LeftLowerArm"]
    assert np.allclose(second[i], first[i])
    vis[sk.L_WR] = 1.0
    third = solver.solve(to_mediapipe(p2), vis)
    assert abs(qangle_deg(third[i]) - 90.0) < 1.0
    nan = np.full((NUM_LANDMARKS, 3), np.nan)
    assert np.allclose(solver.solve(nan), third)


def test_parse_target_and_bad_hosts() -> None:
    assert parse_target("127.0.0.1") == ("127.0.0.1", 39539)
    assert parse_target("localhost:9000") == ("localhost", 9000)
    assert parse_target("[::1]:9000") == ("::1", 9000)
    for bad in ("host:0", "host:70000", "host:x", ":9000"):
        with pytest.raises(TransportError):
            parse_target(bad)
    with pytest.raises(TransportError, match="cannot be resolved"):
        VmcSender("no-such-host.invalid", 39539)
    with pytest.raises(TransportError):
        VmcSender("127.0.0.1", 0)
    assert landmark_address("a b/c") == "/posewire/a_b_c/landmarks"


def _frame(seq: int, world: F64) -> PoseFrame:
    image = np.ones((1, NUM_LANDMARKS, 4), np.float32)
    image[0, :, :3] = 0.5
    return PoseFrame(seq, time.time_ns(), image, world[None].astype(np.float32))


def test_unreachable_port_does_not_fail() -> None:
    with VmcSender("127.0.0.1", 9, landmarks=True) as sender:  # nobody listens on discard
        for i in range(5):
            assert sender.send(_frame(i, to_mediapipe(tpose_unity())), "m")


def test_osc_bundles_30_per_second_without_loss() -> None:
    received: list[tuple[str, tuple[Any, ...]]] = []
    lock = threading.Lock()

    def handler(address: str, *args: Any) -> None:
        with lock:
            received.append((address, args))

    dispatcher = Dispatcher()
    dispatcher.set_default_handler(handler)
    server = ThreadingOSCUDPServer(("127.0.0.1", 0), dispatcher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    if TRACES.is_dir():
        world = np.load(TRACES / "cmu02_05_punch_strike.npz")["world"][:60]
    else:
        world = np.broadcast_to(to_mediapipe(tpose_unity()), (60, NUM_LANDMARKS, 3))
    n = 60
    try:
        with VmcSender("127.0.0.1", port, landmarks=True) as sender:
            t0 = time.monotonic()
            for i in range(n):
                assert sender.send(_frame(i, world[i]), "alice")
                other = sender.send(_frame(i, world[i]), "bob")  # not the driving member
                assert not other
                time.sleep(max(0.0, t0 + (i + 1) / 30 - time.monotonic()))
        deadline = time.monotonic() + 2.0
        expect = n * (3 + len(BONES)) + 2 * n
        while time.monotonic() < deadline and len(received) < expect:
            time.sleep(0.02)
    finally:
        server.shutdown()
        server.server_close()
    by_addr: dict[str, list[tuple[Any, ...]]] = {}
    for addr, args in received:
        by_addr.setdefault(addr, []).append(args)
    assert len(by_addr["/VMC/Ext/T"]) == n
    assert len(by_addr["/VMC/Ext/OK"]) == n
    assert len(by_addr["/VMC/Ext/Root/Pos"]) == n
    assert len(by_addr["/VMC/Ext/Bone/Pos"]) == n * len(BONES)
    assert len(by_addr["/posewire/alice/landmarks"]) == n
    assert len(by_addr["/posewire/bob/landmarks"]) == n
    for args in by_addr["/VMC/Ext/Bone/Pos"] + by_addr["/VMC/Ext/Root/Pos"]:
        assert len(args) == 8 and isinstance(args[0], str)
        assert all(type(a) is float for a in args[1:])
        q = np.array(args[4:])
        assert abs(np.linalg.norm(q) - 1.0) < 1e-5
    assert {a[0] for a in by_addr["/VMC/Ext/Bone/Pos"]} == set(BONES)
    assert {a[0] for a in by_addr["/VMC/Ext/Root/Pos"]} == {"root"}
    assert all(a == (1,) and type(a[0]) is int for a in by_addr["/VMC/Ext/OK"])
    ts = [a[0] for a in by_addr["/VMC/Ext/T"]]
    assert all(type(t) is float for t in ts) and ts == sorted(ts)
    assert all(len(a) == 4 * NUM_LANDMARKS for a in by_addr["/posewire/alice/landmarks"])


def test_receive_vmc_drives_an_avatar_from_a_real_pipeline(tmp_path: Path) -> None:
    """A sender pipeline (trace source with world landmarks, embedded server) and a real
    ``pipeline receive --vmc``: a python-osc server on loopback gets VMC bundles."""
    from tests import procutil
    from tests.test_server_support import SECRET, free_port, token

    got: list[tuple[str, tuple[Any, ...]]] = []
    dispatcher = Dispatcher()
    dispatcher.set_default_handler(lambda address, *args: got.append((address, args)))
    osc = ThreadingOSCUDPServer(("127.0.0.1", 0), dispatcher)
    threading.Thread(target=osc.serve_forever, daemon=True).start()
    port = free_port()
    cfg = procutil.write_config(
        tmp_path,
        f"""
source: {{kind: trace, path: {procutil.TRACE}, loop: true}}
encode: {{world_landmarks: true}}
transmit: {{primary: websocket, server_url: "http://127.0.0.1:{port}", room: vmc}}
server: {{embedded: true, host: 127.0.0.1, port: {port}, secret: {SECRET},
          data_dir: {tmp_path / "state"}}}
supervisor: {{run_dir: {tmp_path / "run"}}}
monitor: {{enabled: false}}
""",
    )
    sup = procutil.start(cfg, env={"POSEWIRE_SECRET": ""})
    try:
        assert procutil.wait_for(lambda: _port_open(port), 30), "embedded server not up"
        rx = subprocess.run(
            [sys.executable, "-m", "pipeline", "receive", "--server",
             f"http://127.0.0.1:{port}", "--room", "vmc", "--token",
             token("vmc", "subscriber"), "--duration", "3", "--vmc",
             f"127.0.0.1:{osc.server_address[1]}"],
            cwd=procutil.ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        procutil.stop(sup)
        osc.shutdown()
        osc.server_close()
    assert rx.returncode == 0, rx.stderr[-2000:]
    bones = [args for address, args in got if address == "/VMC/Ext/Bone/Pos"]
    oks = [args for address, args in got if address == "/VMC/Ext/OK"]
    assert len(oks) >= 30, (len(oks), rx.stdout[-500:])  # about 90 frames in 3 s
    assert {b[0] for b in bones} >= {"Hips", "RightUpperArm", "LeftLowerLeg"}
    q = np.array([b[4:8] for b in bones], dtype=np.float64)
    assert np.all(np.isfinite(q)) and np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-3)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
