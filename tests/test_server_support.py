"""Helpers for the room-server tests: a real server on a random loopback port, real
WebSocket clients, real encoded pose packets from the pose traces. No tests here."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from bench.common import free_port as free_port  # re-exported: the tests import it from here
from bench.common import stop_process
from pipeline.codec import CodecConfig, Encoder, peek_header
from pipeline.config import ServerConfig, traces_dir
from pipeline.model.pose import PoseFrame
from pipeline.server.app import STATE, ServerState, create_app, serve
from pipeline.transports.base import Control, Packet, Received
from pipeline.transports.websocket import WebSocketTransport
from pipeline.wire.tokens import mint_token

ROOT = Path(__file__).resolve().parents[1]
TRACES = traces_dir()
TRACE = TRACES / "cmu02_05_punch_strike.npz"
SECRET = "test-secret-" + "x" * 32


def token(room: str, role: str = "publisher", **kw: Any) -> str:
    return mint_token(SECRET, room=room, role=role, **kw)


def load_trace(path: Path = TRACE) -> np.ndarray:
    with np.load(path) as d:
        return np.asarray(d["image"], dtype=np.float32)


class PoseSource:
    """Encodes trace frames of one stream: ``next()`` returns the next packet."""

    def __init__(self, stream_id: int, trace: np.ndarray | None = None, **codec: Any) -> None:
        self.trace = load_trace() if trace is None else trace
        self.encoder = Encoder(CodecConfig(**codec), stream_id)
        self.seq = 0
        self.stream_id = stream_id

    def frame(self, seq: int) -> PoseFrame:
        img = self.trace[seq % len(self.trace)][None]
        return PoseFrame(seq=seq, capture_ts_ns=time.time_ns(), image=img.copy())

    def next(self, *, keyframe: bool = False) -> bytes:
        self.seq += 1
        return self.encoder.encode(self.frame(self.seq), keyframe=keyframe)


@dataclass
class Server:
    url: str
    port: int
    app: web.Application

    @property
    def state(self) -> ServerState:
        return self.app[STATE]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@contextlib.asynccontextmanager
async def running_server(
    *, dev: bool = False, port: int = 0, **overrides: Any
) -> AsyncIterator[Server]:
    """A real server in this event loop on 127.0.0.1 (a random free port by default)."""
    os.environ.pop("POSEWIRE_SECRET", None)
    cfg = ServerConfig(**{"secret": SECRET, **overrides})
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()
    stop = asyncio.Event()
    app = create_app(cfg, host="127.0.0.1", dev=dev)
    task = loop.create_task(
        serve(
            cfg,
            host="127.0.0.1",
            port=port,
            ready_cb=lambda h, p: ready.set_result(p),
            stop=stop,
            app=app,
        )
    )
    done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    bound = ready.result()
    try:
        yield Server(f"http://127.0.0.1:{bound}", bound, app)
    finally:
        stop.set()
        await task


def member(
    srv: Server, room: str, role: str = "publisher", *, publish: bool = False, **kw: Any
) -> WebSocketTransport:
    subscribe = kw.pop("subscribe", True)
    subject = kw.pop("subject", None)
    return WebSocketTransport(
        srv.url,
        room,
        token(room, role, subject=subject),
        publish=publish,
        subscribe=subscribe,
        connect_timeout_s=kw.pop("connect_timeout_s", 3.0),
        **kw,
    )


async def drain(
    t: WebSocketTransport, quiet_s: float = 0.3, limit_s: float = 10.0
) -> list[Received]:
    """Everything received until nothing arrives for ``quiet_s``."""
    out: list[Received] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(quiet_s):
                out.append(await t.recv())
        except TimeoutError:
            break
    return out


async def until(t: WebSocketTransport, pred: Any, limit_s: float = 5.0) -> list[Received]:
    """Receive until ``pred(items)`` is true; fails the test after ``limit_s``."""
    out: list[Received] = []
    async with asyncio.timeout(limit_s):
        while not pred(out):
            out.append(await t.recv())
    return out


def packets(items: list[Received]) -> list[bytes]:
    return [i.data for i in items if isinstance(i, Packet)]


def seqs(items: list[Received], stream_id: int | None = None) -> list[int]:
    out = []
    for data in packets(items):
        h = peek_header(data)
        if stream_id is None or h.stream_id == stream_id:
            out.append(h.seq)
    return out


def controls(items: list[Received], kind: str) -> list[dict[str, Any]]:
    return [dict(i.body) for i in items if isinstance(i, Control) and i.type == kind]


# --------------------------------------------------------------------------- raw client


class RawWS:
    """A minimal WebSocket client on a plain socket (tiny receive buffer, no reading
    unless asked): to play misbehaving or stalled members."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None, path: str = "/ws") -> RawWS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0], head
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        )
        assert accept in head
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send_text(json.dumps(obj))

    def send_bytes(self, data: bytes) -> None:
        self.send_frame(0x2, data)

    async def read_frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def read_until_close(self, limit_s: float = 5.0) -> tuple[int | None, list[Any]]:
        """Frames until the close frame: (close code, [text objects and binary payloads])."""
        got: list[Any] = []
        async with asyncio.timeout(limit_s):
            while True:
                try:
                    op, payload = await self.read_frame()
                except asyncio.IncompleteReadError:
                    return None, got
                if op == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    return code, got
                if op == 0x1:
                    got.append(json.loads(payload))
                elif op == 0x2:
                    got.append(payload)

    async def read_text(self, limit_s: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(limit_s):
            while True:
                op, payload = await self.read_frame()
                if op == 0x1:
                    obj: dict[str, Any] = json.loads(payload)
                    return obj

    def close(self) -> None:
        self.writer.close()


async def raw_join(srv: Server, room: str, role: str = "publisher", **join: Any) -> RawWS:
    ws = await RawWS.connect(srv.port, rcvbuf=join.pop("rcvbuf", None))
    ws.send_json({"type": "join", "token": token(room, role), "room": room, **join})
    welcome = await ws.read_text()
    assert welcome["type"] == "welcome", welcome
    return ws


# --------------------------------------------------------------------------- processes


class ServeProcess:
    """``python -m pipeline serve`` as a real process on 127.0.0.1 (or on ``host``, started
    through ``prefix``, e.g. ``ip netns exec NS`` for a namespace host of bench/netns.py);
    :attr:`url` is ``https://...`` when ``args`` give it a certificate (``--certfile``)."""

    def __init__(
        self, port: int = 0, *args: str, host: str = "127.0.0.1", prefix: Sequence[str] = ()
    ) -> None:
        env = {**os.environ, "POSEWIRE_SECRET": SECRET}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pipeline", "serve", "--host", host,
             "--port", str(port), "--log-level", "WARNING", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(rf"(https?)://{re.escape(host)}:(\d+)", line)
        if m is None:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"server did not start: {line!r} {err}")
        self.port = int(m.group(2))
        self.url = f"{m.group(1)}://{host}:{self.port}"

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._close_pipes()

    def stop(self) -> int:
        stop_process(self.proc)
        self._close_pipes()
        return int(self.proc.returncode)

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
