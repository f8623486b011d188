"""Two clients of the public API in one process, for tests/test_client_api.py's switching
test (run in a namespace host: WebRTC needs a non-loopback path).

    python -m tests.client_switch_peer --server URL --room R --publisher-token T
        --viewer-token V [--max-seconds 40]

``camera`` publishes a pose trace at 30 fps with ``transport="auto"`` (a hot standby and
the switching policy, fast settings below); ``viewer`` subscribes over the WebSocket.
JSON lines on stdout: ``{"ev": "joined", "transport": K}``, ``{"ev": "standby"}`` once
both of the camera's paths are connected, ``{"ev": "switch", "to", "reason", "seq"}``
per switch event of the camera, and at the end (any line on stdin, e.g.
``{"cmd": "stop"}``, or ``--max-seconds``) ``{"ev": "done", "sent", "received", "decisions"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import numpy as np

from pipeline.client import Client, ConnectionEvent, PoseEvent, PoseFrame
from tests.procutil import TRACE

#: fast enough for a test: back to WebRTC 2 s after leaving it, once healthy for 0.5 s
POLICY = {"recovery_interval_s": 2.0, "hold_s": 0.5, "max_switches_per_min": 10}


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def main(args: argparse.Namespace) -> None:
    with np.load(TRACE) as trace:
        image, world = trace["image"], trace["world"]
    common: dict[str, Any] = {"connect_timeout_s": 10.0}
    viewer = await Client.connect(
        args.server, args.room, args.viewer_token, name="viewer", transport="websocket", **common
    )
    camera = await Client.connect(
        args.server, args.room, args.publisher_token, name="camera", publish=True,
        subscribe=False, transport="auto", policy=POLICY, **common,
    )  # fmt: skip
    emit(ev="joined", transport=camera.transport)
    received: set[int] = set()
    stop = asyncio.Event()

    async def watch() -> None:
        async for event in viewer.events():
            if isinstance(event, PoseEvent) and event.stream_id == camera.stream_id:
                received.add(event.frame.seq)

    async def switches() -> None:
        async for event in camera.events():
            if isinstance(event, ConnectionEvent) and event.switched:
                emit(ev="switch", to=event.transport, reason=event.reason, seq=sent)

    async def commands() -> None:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        stop.set()  # any command line ({"cmd": "stop"}, bench.netns.Peer's quit) or EOF

    tasks = [asyncio.create_task(t()) for t in (watch, switches, commands)]
    sent, standby, t_end = 0, False, time.monotonic() + args.max_seconds
    while not stop.is_set() and time.monotonic() < t_end:
        i = sent % len(image)
        await camera.publish(PoseFrame(sent, 0, image[i][None], world[i][None]))
        sent += 1
        if not standby and camera.metrics()["standby"] is not None:
            standby = True
            emit(ev="standby")
        await asyncio.sleep(1 / 30)
    await asyncio.sleep(1.0)  # the last poses are on their way
    decisions = camera.metrics()["switch_decisions"]
    for task in tasks:
        task.cancel()
    await camera.close()
    await viewer.close()
    emit(ev="done", sent=sent, received=sorted(received), decisions=decisions)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for flag in ("--server", "--room", "--publisher-token", "--viewer-token"):
        p.add_argument(flag, required=True)
    p.add_argument("--max-seconds", type=float, default=40.0)
    asyncio.run(main(p.parse_args()))
