"""The public client API (issue 17): the README example on both transports, the sync
wrapper with the original design's names, MediaPipe result objects, the errors.

Real servers (``python -m pipeline serve`` processes), real clients; the WebRTC case
runs the example in namespace host a against a server in host b (aioice offers no
loopback candidates), like tests/test_webrtc.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from bench.netns import Topology, python_env
from pipeline.client import Client, ConnectionEvent, PoseEvent, PresenceEvent, SyncClient
from pipeline.codec import CodecConfig
from pipeline.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ConfigError,
    ProtocolError,
    TokenError,
    TransportError,
    TransportUnavailable,
)
from pipeline.model.pose import PoseFrame
from pipeline.wire.tokens import mint_token
from tests.procutil import ROOT, TRACE
from tests.test_server_support import SECRET, ServeProcess

pytestmark = pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")

EXAMPLE = ROOT / "examples" / "client_example.py"
FRAMES = 60
CODEC = CodecConfig(world=True)  # the client's default codec: the bounds below are its own
XY_BOUND = CODEC.precision_px / CODEC.reference_width_px
VIS_BOUND = 1 / (2 * (CODEC.visibility_levels - 1)) + 1e-6


def tok(room: str, role: str, subject: str) -> str:
    return mint_token(SECRET, room=room, role=role, subject=subject)


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    srv = ServeProcess(0)
    try:
        yield srv
    finally:
        srv.stop()


def assert_within_codec_bound(image: Any, world: Any, want_image: Any, want_world: Any) -> None:
    """Decoded values against the published ones: the codec's own error bounds."""
    err = np.abs(np.asarray(image, np.float64) - want_image)
    assert err[..., :2].max() <= XY_BOUND, err[..., :2].max()
    assert err[..., 2].max() <= CODEC.z_precision, err[..., 2].max()
    assert err[..., 3].max() <= VIS_BOUND, err[..., 3].max()
    werr = np.abs(np.asarray(world, np.float64) - want_world)
    assert werr.max() <= CODEC.world_precision_m, werr.max()


def check_example_output(out: Path, metrics: Path, transport: str) -> dict[str, Any]:
    with np.load(TRACE) as trace:
        image, world = trace["image"], trace["world"]
    with np.load(out) as got:
        seq, got_image, got_world = got["seq"], got["image"], got["world"]
    assert sorted(seq.tolist()) == list(range(FRAMES)), seq  # every pose, once
    assert_within_codec_bound(got_image, got_world, image[seq], world[seq])
    result: dict[str, Any] = json.loads(metrics.read_text())
    assert "join" in result["presence"], result["presence"]
    cam, view = result["camera"], result["viewer"]
    for m in (cam, view):
        assert m["transport"] == transport, m
        assert m["cpu_percent"] is not None and m["memory_rss_mb"] > 10, m
    assert cam["sent"]["published"] == cam["sent"]["packets"] == FRAMES, cam
    assert cam["success_rate"]["send"] == 1.0 and cam["error_rate"]["send"] == 0.0, cam
    assert view["received"]["decoded"] == FRAMES and view["received"]["lost"] == 0, view
    assert view["received"]["undecodable"] == 0, view
    for key in ("avg", "p95", "p99"):
        assert view["latency_ms"][key] is not None, view
    return result


def run_example(prefix: list[str], url: str, room: str, transport: str, tmp: Path) -> None:
    out, metrics = tmp / f"{room}.npz", tmp / f"{room}.json"
    argv = [*prefix, sys.executable, str(EXAMPLE), "--server", url, "--room", room,
            "--publisher-token", tok(room, "publisher", "camera"),
            "--viewer-token", tok(room, "subscriber", "viewer"),
            "--transport", transport, "--frames", str(FRAMES), "--out", str(out),
            "--metrics", str(metrics)]  # fmt: skip
    proc = subprocess.run(
        argv, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"{FRAMES} of {FRAMES} poses" in proc.stdout, proc.stdout
    result = check_example_output(out, metrics, transport)
    lat = result["viewer"]["latency_ms"]
    print(f"client example over {transport}: latency p50 {lat['p50']:.2f} p95 {lat['p95']:.2f} "
          f"p99 {lat['p99']:.2f} ms")  # fmt: skip


def test_readme_example_over_websocket(server: ServeProcess, tmp_path: Path) -> None:
    run_example([], server.url, "ex-ws", "websocket", tmp_path)


def test_readme_example_over_webrtc(net: Topology, tmp_path: Path) -> None:
    b = net.host("b")
    srv = ServeProcess(0, host=b.address, prefix=b.exec_argv([]))
    try:
        run_example(net.host("a").exec_argv([]), srv.url, "ex-rtc", "webrtc", tmp_path)
    finally:
        srv.stop()


# --------------------------------------------------------------------------- sync wrapper


def test_sync_client_with_the_original_names(server: ServeProcess) -> None:
    with np.load(TRACE) as trace:
        image, world = trace["image"][:20], trace["world"][:20]
    viewer = SyncClient(server.url, tok("sync", "subscriber", "v"), transport="websocket")
    camera = SyncClient(server.url, tok("sync", "publisher", "c"), transport="websocket")
    try:
        assert viewer.join_room("sync", "viewer", "subscriber")
        assert camera.join_room("sync", "camera", "publisher")
        joined = [e for e in viewer.poll(timeout=5.0) if isinstance(e, PresenceEvent)]
        assert joined and joined[0].kind == "join" and joined[0].member["name"] == "camera"
        for i in range(len(image)):
            pose = PoseFrame(i, time.time_ns(), image[i][None], world[i][None])
            assert camera.send_pose_data(pose, "sync", "high" if i == 0 else "normal")
        got: list[PoseEvent] = []
        for ev in viewer.poses(timeout=3.0):
            got.append(ev)
            if len(got) == len(image):
                break
        assert [e.frame.seq for e in got] == list(range(len(image)))
        assert_within_codec_bound(
            np.stack([e.frame.image[0] for e in got]),
            np.stack([e.frame.world[0] for e in got if e.frame.world is not None]),
            image,
            world,
        )
        sent = camera.get_performance_metrics()
        assert sent["sent"]["packets"] == len(image), sent
        received = viewer.get_performance_metrics()
        assert received["received"]["decoded"] == len(image), received
        assert received["latency_ms"]["p95"] is not None, received
        with pytest.raises(TransportError, match="not joined to room 'other'"):
            camera.send_pose_data(pose, "other")
        with pytest.raises(ClosedResourceError, match="does not publish"):
            viewer.send_pose_data(pose, "sync")
        camera.leave()
        with pytest.raises(ClosedResourceError, match="join_room first"):
            camera.send_pose_data(pose, "sync")
        left = [e for e in viewer.poll(timeout=3.0) if isinstance(e, PresenceEvent)]
        assert "leave" in [e.kind for e in left], left
        # a refused token: False, the precise error kept
        refused = SyncClient(server.url, tok("other-room", "publisher", "x"))
        try:
            assert not refused.join_room("sync", "intruder", "publisher")
            assert isinstance(refused.last_error, TokenError), refused.last_error
        finally:
            refused.close()
    finally:
        viewer.close()
        camera.close()


# --------------------------------------------------------------------------- MediaPipe


def _legacy_result(image: Any, world: Any) -> Any:
    """The legacy ``mp.solutions.pose`` result, from mediapipe's own protobuf classes."""
    from mediapipe.framework.formats import landmark_pb2

    img = landmark_pb2.NormalizedLandmarkList()
    for x, y, z, v in image.tolist():
        img.landmark.add(x=x, y=y, z=z, visibility=v)
    wld = landmark_pb2.LandmarkList()
    for x, y, z in world.tolist():
        wld.landmark.add(x=x, y=y, z=z, visibility=1.0)
    # the solution returns a namedtuple of its output streams (SolutionOutputs)
    outputs = namedtuple("SolutionOutputs", ["pose_landmarks", "pose_world_landmarks"])
    return outputs(img, wld)


def _tasks_result(image: Any, world: Any) -> Any:
    """The Tasks ``PoseLandmarkerResult``, from mediapipe's own dataclasses."""
    from mediapipe.tasks.python.components.containers.landmark import Landmark, NormalizedLandmark
    from mediapipe.tasks.python.vision import PoseLandmarkerResult

    img = [NormalizedLandmark(x=x, y=y, z=z, visibility=v) for x, y, z, v in image.tolist()]
    wld = [Landmark(x=x, y=y, z=z) for x, y, z in world.tolist()]
    return PoseLandmarkerResult(pose_landmarks=[img], pose_world_landmarks=[wld])


def test_mediapipe_results_convert_and_publish(server: ServeProcess) -> None:
    with np.load(TRACE) as trace:
        image, world = trace["image"][:4], trace["world"][:4]
    results = [_legacy_result(image[0], world[0]), _tasks_result(image[1], world[1]),
               _legacy_result(image[2], world[2]), _tasks_result(image[3], world[3])]  # fmt: skip
    none = namedtuple("SolutionOutputs", ["pose_landmarks", "pose_world_landmarks"])(None, None)

    async def main() -> list[PoseEvent]:
        opts: dict[str, Any] = {"transport": "websocket"}
        viewer = Client(server.url, "mp", tok("mp", "subscriber", "v"), **opts)
        camera = Client(server.url, "mp", tok("mp", "publisher", "c"), publish=True, **opts)
        async with viewer, camera:
            for r in results:
                assert await camera.publish(r)
            assert await camera.publish(none)  # nobody in the picture: an empty frame
            with pytest.raises(ProtocolError, match="not a MediaPipe pose result"):
                await camera.publish(object())
            got: list[PoseEvent] = []
            async with asyncio.timeout(5):
                async for ev in viewer.events():
                    if isinstance(ev, PoseEvent):
                        got.append(ev)
                        if len(got) == len(results) + 1:
                            return got
        raise AssertionError("unreachable")

    got = asyncio.run(main())
    assert [e.frame.seq for e in got] == list(range(len(results) + 1))
    assert not got[-1].frame.present
    assert_within_codec_bound(
        np.stack([e.frame.image[0] for e in got[:-1]]),
        np.stack([e.frame.world[0] for e in got[:-1] if e.frame.world is not None]),
        image,
        world,
    )


# --------------------------------------------------------------------------- errors


def test_errors_are_precise(server: ServeProcess) -> None:
    good = tok("err", "publisher", "p")
    with pytest.raises(TransportError, match="server URL must be"):
        Client("localhost:8765", "err", good)
    with pytest.raises(ConfigError, match="transport must be one of"):
        Client(server.url, "err", good, transport="carrier-pigeon")

    async def main() -> None:
        with pytest.raises(TokenError):  # a token for another room
            await Client.connect(server.url, "err", tok("elsewhere", "publisher", "p"))
        with pytest.raises(TokenError):
            await Client.connect(server.url, "err", "not-a-token")
        with pytest.raises(TransportUnavailable, match="loopback"):
            await Client.connect(server.url, "err", good, transport="webrtc")
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="cannot connect"):
            await Client.connect("http://127.0.0.1:9", "err", good, connect_timeout_s=0.5)
        assert time.monotonic() - t0 < 5
        # a room closed while we are in it, then joining it: room_closed
        mod = {"Authorization": f"Bearer {tok('*', 'moderator', 'mod')}"}
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"{server.url}/api/rooms", json={"name": "err"}, headers=mod)
            assert r.status in (201, 409), await r.text()
            client = await Client.connect(server.url, "err", good, publish=True)
            try:
                r = await http.delete(f"{server.url}/api/rooms/err", headers=mod)
                assert r.status == 200, await r.text()
                async with asyncio.timeout(5):
                    async for ev in client.events():
                        if isinstance(ev, ConnectionEvent) and ev.refused:
                            assert ev.reason == "room_closed" and not ev.final, ev
                            break
                pose = PoseFrame(0, time.time_ns(), np.full((1, 33, 4), 0.5, np.float32))
                assert not await client.publish(pose)  # refused meanwhile: not sent
                assert client.metrics()["refused"] == "room_closed"
            finally:
                await client.close()
            with pytest.raises(BrokenResourceError) as closed:
                await Client.connect(server.url, "err", good)
            assert closed.value.reason == "room_closed"
            with pytest.raises(ClosedResourceError):
                await client.publish(pose)

    asyncio.run(main())


# --------------------------------------------------------------------------- switching


@pytest.mark.timing  # asserts a failover time: runs alone (Makefile)
def test_auto_client_fails_over_and_returns_under_the_policy(net: Topology, tmp_path: Path) -> None:
    """A publishing client with transport="auto" (hot standby, the supervisor's policy in
    its own loop): a UDP blackout moves its stream onto the WebSocket at once (reason
    dead), the end of it brings it back to WebRTC (reason recovered), and a viewer
    decodes the stream throughout, the frames sent into the dead path included."""
    b = net.host("b")
    srv = ServeProcess(0, host=b.address, prefix=b.exec_argv([]))
    room = "switching"
    args = ["--server", srv.url, "--room", room,
            "--publisher-token", tok(room, "publisher", "camera"),
            "--viewer-token", tok(room, "subscriber", "viewer"), "--max-seconds", "40"]  # fmt: skip
    peer = net.start_python("a", "tests.client_switch_peer", args, tmp_path)
    try:
        assert peer.expect("joined", 30)["transport"] == "webrtc", peer.tail()
        peer.expect("standby", 15)
        time.sleep(1.0)
        t0, t_blackout = time.monotonic(), time.time()
        net.blackout_udp()
        away = peer.expect("switch", 5)
        failover_s = time.monotonic() - t0
        assert (away["to"], away["reason"]) == ("websocket", "dead"), away
        time.sleep(1.0)  # poses flow over the WebSocket meanwhile
        net.clear_faults()
        back = peer.expect("switch", 20)
        assert (back["to"], back["reason"]) == ("webrtc", "recovered"), back
        time.sleep(1.0)
        peer.send({"cmd": "stop"})
        done = peer.expect("done", 20)
    finally:
        net.clear_faults()
        net.stop_peers([peer])
        srv.stop()
    sent, received = done["sent"], set(done["received"])
    missing = sorted(set(range(sent)) - received)
    reasons = [d["reason"] for d in done["decisions"]]
    assert reasons == ["dead", "recovered"], done["decisions"]
    # when the client switched (its own clock: the namespaces share it)
    switched_ms = (done["decisions"][0]["t_wall"] - t_blackout) * 1000
    print(f"auto client: on the WebSocket {switched_ms:.0f} ms after the blackout (event seen "
          f"by the test after {failover_s * 1000:.0f} ms); "
          f"{len(received)} of {sent} frames decoded; missing {missing}")  # fmt: skip
    assert 0 < switched_ms < 500, switched_ms  # dead after 250 ms of silence, then at once
    assert failover_s < 1.0, failover_s
    # the frames sent into the dead path are sent again on the standby (Sender.recent)
    assert len(missing) <= 3, missing


def test_bad_policy_settings_are_named() -> None:
    with pytest.raises(ConfigError) as bad:
        Client("http://127.0.0.1:9", "r", "t", publish=True, policy={"hold_s": -1, "bogus": 1})
    text = str(bad.value)
    assert "policy.bogus" in text and "policy.hold_s" not in text, text  # unknown keys first
    with pytest.raises(ConfigError) as bad:
        Client("http://127.0.0.1:9", "r", "t", publish=True, policy={"hold_s": -1})
    assert "policy.hold_s" in str(bad.value), bad.value
