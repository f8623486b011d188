"""A small WebRTC room member written from docs/webrtc.md, for tests/test_server_rtc.py.

    python -m tests.rtc_client --url http://10.77.2.2:PORT --max-seconds S

It runs inside a namespace host (bench/netns.py) and talks JSON lines like
tests/netns_peer.py: commands on stdin ({"cmd": ...}), events on stdout
({"ev": ...}). It is independent of the client transport (pipeline.transports):
an aiohttp WebSocket for join and signaling, plus one pipeline.rtc.PeerLink.

Commands:

* ``join`` {token, room, publish, subscribe} -> ``welcome``; with ``raw_first`` that
  text is sent instead of the join
* ``offer`` {session, sdp?} -> ``answer`` then ``open`` (channels open and
  ``rtc_state open`` received); ``sdp`` replaces the real offer (malformed SDP)
* ``ws_text`` {text}: raw text on the WebSocket; ``rtc_close`` {session}
* ``publish`` {stream_id, count, interval_ms, path: "rtc"|"ws", keyframe_interval?}:
  real codec packets from a pose trace (keyframes on control, deltas on pose over
  WebRTC), in the background -> ``published`` {seqs}
* ``pose_bytes`` {size, fill?} / ``pose_text`` / ``control_bytes`` {size}: raw
  messages on a channel; ``open_channel`` {label}: an in-band channel;
  ``flood`` {count}: valid packets on ``pose`` as fast as possible
* ``keyframe_request`` {stream_id, path}
* ``report`` -> ``report`` {packets: [[stream_id, seq, keyframe, path, t_ns]...], texts}
* ``metrics`` {url} -> ``metrics`` {text}
* ``quit``

Every server text message (but acks) is also emitted as ``ws`` / ``ctl`` (path)
at once; a close of the WebSocket as ``closed`` {code}. Times are
``time.monotonic_ns()``, one clock for every namespace. Every loop is bounded by
``--max-seconds`` (the process exits by itself then, and when stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import aiohttp

from pipeline.codec import peek_header
from pipeline.config import RtcConfig
from pipeline.errors import ProtocolError
from pipeline.rtc.link import PeerLink
from tests.test_server_support import PoseSource, load_trace

#: the client side's liveness settings (it never declares the path dead in these tests)
CLIENT_RTC = RtcConfig.model_validate({"heartbeat_ms": 100, "dead_after_ms": 60000})


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Client:
    def __init__(self, url: str, max_seconds: float) -> None:
        self.url = url
        self.deadline = time.monotonic() + max_seconds
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.link: PeerLink | None = None
        self.packets: list[list[Any]] = []
        self.texts: list[dict[str, Any]] = []
        self.acks = 0
        self.answer: asyncio.Future[dict[str, Any]] | None = None
        self.state_open = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self._trace: Any = None
        self.sources: dict[int, PoseSource] = {}

    # -- receiving -----------------------------------------------------------------

    def _packet(self, data: bytes, path: str) -> None:
        try:
            h = peek_header(data)
        except ProtocolError as exc:
            emit({"ev": "bad_packet", "path": path, "error": str(exc)})
            return
        self.packets.append([h.stream_id, h.seq, h.keyframe, path, time.monotonic_ns()])

    def _text(self, text: str, path: str) -> None:
        obj = json.loads(text)
        if obj.get("type") == "ack":
            self.acks += 1
            return
        obj["_path"] = path
        obj["_t_ns"] = time.monotonic_ns()
        self.texts.append(obj)
        kind = obj.get("type")
        if kind == "rtc_answer" and self.answer is not None and not self.answer.done():
            self.answer.set_result(obj)
        if kind == "rtc_state" and obj.get("state") == "open":
            self.state_open.set()
        emit({"ev": path, "msg": obj})

    async def _ws_reader(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self._text(msg.data, "ws")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self._packet(msg.data, "ws")
        emit({"ev": "closed", "code": self.ws.close_code})

    async def _ticker(self) -> None:
        while time.monotonic() < self.deadline:
            if self.link is not None and not self.link.closed:
                self.link.tick()
            await asyncio.sleep(0.025)

    def trace(self) -> Any:
        if self._trace is None:
            self._trace = load_trace()
        return self._trace

    # -- commands --------------------------------------------------------------------

    async def join(self, c: dict[str, Any]) -> None:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.url + "/ws", max_msg_size=1 << 20)
        self.tasks.append(asyncio.create_task(self._ticker()))
        if "raw_first" in c:  # a bad first message instead of the join
            await self.ws.send_str(c["raw_first"])
            self.tasks.append(asyncio.create_task(self._ws_reader()))
            return
        if c.get("publish"):
            # the codec's first use loads its kernels and the trace (~0.4 s of a blocked
            # loop): done now, not while a link is open (no heartbeat would go out)
            PoseSource(0, self.trace()).next()
        join = {"type": "join", "token": c["token"], "room": c["room"]}
        join |= {"publish": c.get("publish", False), "subscribe": c.get("subscribe", False)}
        await self.ws.send_str(json.dumps(join))
        first = await self.ws.receive(timeout=10)
        welcome = json.loads(first.data)
        emit({"ev": "welcome", "msg": welcome})
        self.tasks.append(asyncio.create_task(self._ws_reader()))

    async def offer(self, c: dict[str, Any]) -> None:
        assert self.ws is not None
        if self.link is not None:
            await self.link.close()
        self.state_open.clear()
        self.link = link = PeerLink(
            [],
            CLIENT_RTC,
            on_pose=lambda data: self._packet(data, "pose"),
            on_control=lambda m: (
                self._text(m, "ctl") if isinstance(m, str) else self._packet(m, "control")
            ),
            on_violation=lambda why: emit({"ev": "violation", "why": why}),
        )
        sdp = await link.create_offer()
        self.answer = asyncio.get_running_loop().create_future()
        session = int(c["session"])
        await self.ws.send_str(
            json.dumps({"type": "rtc_offer", "session": session, "sdp": c.get("sdp", sdp)})
        )
        if "sdp" in c:
            return  # a malformed offer: the server closes the member
        answer = await asyncio.wait_for(self.answer, 10)
        emit({"ev": "answer", "sdp": answer["sdp"]})
        await link.accept_answer(answer["sdp"])
        t0 = time.monotonic()
        await asyncio.wait_for(link.opened.wait(), 10)
        await asyncio.wait_for(self.state_open.wait(), 10)
        emit({"ev": "open", "connect_ms": (time.monotonic() - t0) * 1000})

    async def _publish(self, c: dict[str, Any]) -> None:
        kf = int(c.get("keyframe_interval", 30))
        sid = int(c["stream_id"])
        via_rtc = c.get("path", "rtc") == "rtc"
        source = self.sources.get(sid)
        if source is None:  # one encoder per stream: a second publish goes on from it
            # over WebRTC every delta predicts from the keyframe (docs/webrtc.md)
            refs = "keyframe" if via_rtc else "previous"
            source = self.sources[sid] = PoseSource(
                sid, self.trace(), keyframe_interval=kf, references=refs
            )
        interval = float(c.get("interval_ms", 20)) / 1000
        seqs = []
        for _ in range(int(c["count"])):
            if time.monotonic() > self.deadline:
                break
            data = source.next()
            h = peek_header(data)
            if via_rtc:
                assert self.link is not None
                if h.keyframe:
                    self.link.send_control(data)
                else:
                    self.link.send_pose(data)
            else:
                assert self.ws is not None
                await self.ws.send_bytes(data)
            seqs.append(h.seq)
            await asyncio.sleep(interval)
        emit({"ev": "published", "seqs": seqs})

    async def flood(self, c: dict[str, Any]) -> None:
        assert self.link is not None
        source = PoseSource(int(c.get("stream_id", 99)), self.trace(), keyframe_interval=0)
        for _ in range(int(c["count"])):
            self.link.pose.send(source.next())
        emit({"ev": "flooded"})

    async def command(self, c: dict[str, Any]) -> bool:
        cmd = c["cmd"]
        link = self.link
        if cmd == "join":
            await self.join(c)
        elif cmd == "offer":
            await self.offer(c)
        elif cmd == "ws_text":
            assert self.ws is not None
            await self.ws.send_str(c["text"])
        elif cmd == "rtc_close":
            assert self.ws is not None
            await self.ws.send_str(json.dumps({"type": "rtc_close", "session": c["session"]}))
        elif cmd == "publish":
            self.tasks.append(asyncio.create_task(self._publish(c)))
        elif cmd == "pose_bytes" and link is not None:
            link.pose.send(bytes([int(c.get("fill", 0))]) * int(c["size"]))
        elif cmd == "pose_text" and link is not None:
            link.pose.send("not a packet")
        elif cmd == "control_bytes" and link is not None:
            link.control.send(b"\x01" * int(c["size"]))
        elif cmd == "open_channel" and link is not None:
            link.pc.createDataChannel(str(c["label"]))
        elif cmd == "flood":
            await self.flood(c)
        elif cmd == "keyframe_request":
            text = json.dumps({"type": "keyframe_request", "stream_id": c["stream_id"]})
            if c.get("path") == "rtc" and link is not None:
                link.send_control(text)
            elif self.ws is not None:
                await self.ws.send_str(text)
        elif cmd == "report":
            emit({"ev": "report", "packets": self.packets, "texts": self.texts, "acks": self.acks})
        elif cmd == "metrics":
            if self.http is None:
                self.http = aiohttp.ClientSession()
            async with self.http.get(c["url"]) as resp:
                emit({"ev": "metrics", "text": await resp.text()})
        elif cmd == "quit":
            return False
        else:
            emit({"ev": "error", "message": f"unknown or impossible command {cmd!r}"})
        emit({"ev": "done", "cmd": cmd})
        return True

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.link is not None:
            await self.link.close()
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()


async def main(args: argparse.Namespace) -> None:
    client = Client(args.url, args.max_seconds)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            left = client.deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = await asyncio.wait_for(reader.readline(), left)
            except TimeoutError:
                break
            if not line:
                break
            try:
                if not await client.command(json.loads(line)):
                    break
            except (TimeoutError, aiohttp.ClientError, ProtocolError, ConnectionError) as exc:
                emit({"ev": "error", "message": f"{type(exc).__name__}: {exc}"})
    finally:
        with contextlib.suppress(Exception):  # best-effort cleanup of aiortc/aiohttp objects
            await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--max-seconds", type=float, default=40.0)
    asyncio.run(main(parser.parse_args()))
