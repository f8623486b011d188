"""The README's client API example: two members of one room, one publishing, one watching.

    python examples/client_example.py --server http://127.0.0.1:8765 --room demo \\
        --publisher-token "$PUB" --viewer-token "$SUB" [--transport auto] [--frames 90]

``camera`` publishes poses from a pose trace (your app would publish its detector's
``PoseFrame`` or MediaPipe result instead) at the trace's frame rate; ``viewer``
prints who joins and every 30th pose it receives; both print their metrics at the
end. ``--out F.npz`` also saves what the viewer decoded (tests/test_client_api.py
compares it with the trace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.client import Client, PoseEvent, PoseFrame, PresenceEvent

TRACE = Path(__file__).resolve().parents[1] / "data/pose-traces/cmu02_05_punch_strike.npz"


async def watch(
    viewer: Client, stream: int, frames: int, got: list[PoseEvent], presence: list[str]
) -> None:
    async for event in viewer.events():
        if isinstance(event, PresenceEvent):
            presence.append(event.kind)
            print(f"viewer: {event.member.get('name')} {event.kind}s the room")
        elif isinstance(event, PoseEvent) and event.stream_id == stream:  # the camera's
            got.append(event)
            if event.frame.seq % 30 == 0:
                nose = event.frame.image[0, 0, :2]
                print(f"viewer: pose {event.frame.seq} from {event.member_id}: nose at {nose}, "
                      f"{event.latency_ms:.1f} ms after capture")  # fmt: skip
            if len(got) == frames:
                return


async def main(args: argparse.Namespace) -> dict[str, object]:
    trace = np.load(args.trace)
    image, world, fps = trace["image"], trace["world"], float(trace["fps"])
    got: list[PoseEvent] = []
    presence: list[str] = []
    common = {"transport": args.transport, "connect_timeout_s": 10.0}
    camera = Client(args.server, args.room, args.publisher_token,
                    name="camera", publish=True, subscribe=False, **common)  # fmt: skip
    async with Client(args.server, args.room, args.viewer_token, name="viewer", **common) as viewer:
        watching = asyncio.create_task(watch(viewer, camera.stream_id, args.frames, got, presence))
        async with camera:  # joins after the viewer: the viewer sees it join
            await asyncio.sleep(0.3)  # the viewer sees the camera join before its first pose
            for i in range(args.frames):
                pose = PoseFrame(i, 0, image[i][None], world[i][None])  # capture time: now
                await camera.publish(pose, priority="high" if i == 0 else "normal")
                await asyncio.sleep(1 / fps)
            await asyncio.wait({watching}, timeout=3.0)  # the last poses are on their way
            sent = camera.metrics()
        watching.cancel()
        received = viewer.metrics()
    print(f"viewer: {len(got)} of {args.frames} poses, latency p95 "
          f"{received['latency_ms']['p95']} ms over {viewer.transport}")  # fmt: skip
    if args.out is not None:
        worlds = [e.frame.world[0] for e in got if e.frame.world is not None]
        seqs = np.array([e.frame.seq for e in got])
        np.savez(args.out, seq=seqs, image=np.stack([e.frame.image[0] for e in got]),
                 world=np.stack(worlds))  # fmt: skip
    return {"presence": presence, "camera": sent, "viewer": received}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", required=True)
    p.add_argument("--room", required=True)
    p.add_argument("--publisher-token", required=True)
    p.add_argument("--viewer-token", required=True)
    p.add_argument("--transport", default="auto", choices=("auto", "webrtc", "websocket"))
    p.add_argument("--frames", type=int, default=90)
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--out", type=Path, help="save the viewer's decoded poses (.npz)")
    p.add_argument("--metrics", type=Path, help="write both clients' metrics (.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    result = asyncio.run(main(args))
    if args.metrics is not None:
        args.metrics.write_text(json.dumps(result, indent=2))
