"""``python -m bench viewer [--json] [--seconds S] [--screenshot PNG]``: the browser viewer
in real Chromium against the Python receiver, on loopback.

For 1, 5 and 20 publishers in one room (each a trace at 30 fps, WebSocket), one viewer
page (Chromium, ``/room/<name>``, its own dev token) and one Python receiver (a
WebSocket subscriber decoding with :class:`pipeline.codec.Decoder`) receive the same
packets from a ``python -m pipeline serve --dev`` process:

* render latency: capture -> pixels on the page's canvas (the page draws each frame on
  its member's canvas layer as soon as it is decoded and takes the time after the draw
  calls), on the server's clock (the page's ping offset, the publisher's reported one);
* the baseline, in the same run: the Python receiver's capture -> decoded latency;
* frames rendered / frames sent (live frames, per stream), and each stream's frame rate
  (rendered frames over its send window, the slowest stream counts).

Targets (issue 15): rendered/sent >= 0.98 for 1 and 5 publishers; every one of 20
publishers drawn at >= 25 fps; render p95 <= decode p95 + 20 ms.

The Chromium helpers (:func:`launch`, :data:`CHROMIUM_ARGS`) and :class:`Publisher`
are shared with tests/test_viewer.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil

from bench.common import add_json_flag, at_least, at_most, percentile, report, stop_process
from pipeline.codec import CodecConfig, Decoded, Decoder, Encoder, NeedKeyframe, peek_header
from pipeline.config import traces_dir
from pipeline.errors import ProtocolError
from pipeline.model.pose import PoseFrame
from pipeline.transports.base import Control, Packet, StateChange
from pipeline.transports.websocket import WebSocketTransport

ROOT = Path(__file__).resolve().parents[1]

#: the system Chromium (Debian's package); Playwright's own download is not reachable
CHROMIUM = "/usr/bin/chromium"
#: launch flags: headless, no sandbox (root in CI), nothing that talks to the internet
CHROMIUM_ARGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
FPS = 30.0
COUNTS = (1, 5, 20)


def chromium_unavailable() -> str | None:
    """Why the browser tests and this benchmark cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright==1.65.2)"
    return None


def launch(pw: Any, *, executable: str = CHROMIUM, extra: Sequence[str] = ()) -> Any:
    """A headless system Chromium (``pw``: a started sync or async Playwright)."""
    return pw.chromium.launch(executable_path=executable, args=[*CHROMIUM_ARGS, *extra])


def watch_page(page: Any, problems: list[str]) -> None:
    """Collect every console error or warning and every uncaught exception of ``page``."""
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning")
            else None
        ),
    )


# --------------------------------------------------------------------------- publishers


def load_trace(name: str = "cmu02_05_punch_strike") -> npt.NDArray[np.float32]:
    with np.load(traces_dir() / f"{name}.npz") as d:
        return np.asarray(d["image"], dtype=np.float32)


def all_traces() -> list[npt.NDArray[np.float32]]:
    """Every pose trace (one per publisher, round robin: different dancers)."""
    return [load_trace(p.stem) for p in sorted(traces_dir().glob("*.npz"))]


class Publisher:
    """A room member publishing one pose trace as stream ``stream_id`` (WebSocket).

    It answers the server's keyframe requests and acks like the transmit stage, sends a
    keyframe after a reconnect, and logs ``(seq, capture_ns, sent_ns)`` of every packet it sent.
    """

    def __init__(
        self,
        url: str,
        room: str,
        token: str,
        stream_id: int,
        trace: npt.NDArray[np.float32],
        name: str,
    ) -> None:
        self.transport = WebSocketTransport(
            url, room, token, publish=True, subscribe=False, name=name, connect_timeout_s=10.0
        )
        self.encoder = Encoder(CodecConfig(), stream_id)
        self.trace = trace
        self.stream_id = stream_id
        self.seq = 0
        self.sent: list[tuple[int, int, int]] = []
        self._feedback: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.transport.connect()
        self._feedback = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            item = await self.transport.recv()
            if isinstance(item, Control) and item.type == "keyframe_request":
                self.encoder.request_keyframe()
            elif isinstance(item, StateChange) and item.connected:
                self.encoder.request_keyframe()  # a new server may hold none of our frames
            elif isinstance(item, Control) and item.type == "ack":
                seq = item.body.get("seq")
                if isinstance(seq, int):
                    self.encoder.on_ack(seq)

    def packet(self, *, keyframe: bool = False) -> tuple[bytes, int]:
        """Encode the next trace frame, captured now: (packet, capture time ns)."""
        self.seq += 1
        img = self.trace[self.seq % len(self.trace)][None]
        capture = time.time_ns()
        frame = PoseFrame(seq=self.seq, capture_ts_ns=capture, image=img.copy())
        return self.encoder.encode(frame, keyframe=keyframe), capture

    async def send(self, data: bytes) -> None:
        await self.transport.send(data)

    async def run(self, frames: int, fps: float = FPS, offset_s: float = 0.0) -> None:
        """Send ``frames`` frames at ``fps`` (bounded in count, and so in time)."""
        loop = asyncio.get_running_loop()
        start = loop.time() + offset_s
        for i in range(frames):
            delay = start + i / fps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing of the camera, not synchronisation
            data, capture = self.packet()
            await self.send(data)
            self.sent.append((self.seq, capture, time.time_ns()))

    async def close(self) -> None:
        if self._feedback is not None:
            self._feedback.cancel()
        await self.transport.close()


# --------------------------------------------------------------------------- the server


class DevServer:
    """``python -m pipeline serve --dev`` on a free loopback port (tokens from its dev
    endpoint: no secret to share)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--host", "127.0.0.1", "--port", "0",
             "--dev", "--log-level", "WARNING"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the server prints its URL once listening
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m is None:
            stop_process(self.proc)
            raise RuntimeError(f"the server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{m.group(1)}"

    def token(self, room: str, role: str, subject: str) -> str:
        req = urllib.request.Request(
            f"{self.url}/api/dev/token",
            data=json.dumps({"room": room, "role": role, "subject": subject}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            token: str = json.load(r)["token"]
        return token

    def drops(self) -> int:
        """Packets the server dropped for full subscriber queues (``/metrics``), so far."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("posewire_server_drops_total "):
                    return int(float(line.split()[1]))
        return 0

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --------------------------------------------------------------------------- the benchmark


class PyReceiver:
    """The baseline: a WebSocket subscriber decoding every packet (capture -> decoded,
    on the server's clock); with ``keep_frames`` every decoded image by (stream, seq)."""

    def __init__(self, url: str, room: str, token: str, *, keep_frames: bool = False) -> None:
        self.transport = WebSocketTransport(
            url, room, token, publish=False, subscribe=True, name="baseline",
            connect_timeout_s=10.0,
        )  # fmt: skip
        self.decoders: dict[int, Decoder] = {}
        self.latencies_ms: list[float] = []
        self.frames: dict[tuple[int, int], npt.NDArray[np.float32]] | None = (
            {} if keep_frames else None
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.transport.connect()
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            item = await self.transport.recv()
            if not isinstance(item, Packet):
                continue
            try:
                res = self._decode(item.data)
            except ProtocolError:
                continue
            if isinstance(res, Decoded):
                done = time.time_ns()
                owner = self.transport.stream_owner(res.header.stream_id) or {}
                theirs = owner.get("clock_offset_ns")
                theirs = theirs if isinstance(theirs, int) else 0
                mine = self.transport.clock_offset_ns or 0
                capture = res.frame.capture_ts_ns
                self.latencies_ms.append(((done + mine) - (capture + theirs)) / 1e6)
                if self.frames is not None:
                    self.frames[(res.header.stream_id, res.frame.seq)] = res.frame.image

    def _decode(self, data: bytes) -> Decoded | NeedKeyframe:
        sid = peek_header(data).stream_id
        dec = self.decoders.get(sid)
        if dec is None:
            dec = self.decoders[sid] = Decoder()
        return dec.decode(data)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.transport.close()


def chromium_cpu_s() -> float:
    """CPU seconds (user + system) used so far by the Chromium processes this process
    started (through Playwright's driver)."""
    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "chrom" in proc.name():
                t = proc.cpu_times()
                total += t.user + t.system
    return total


async def wait_until(predicate: Any, limit_s: float, what: str) -> None:
    """Poll ``predicate()`` (an awaitable factory) every 50 ms until true."""
    deadline = time.monotonic() + limit_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def run_scenario(
    server: DevServer, browser: Any, count: int, seconds: float, screenshot: Path | None
) -> dict[str, Any]:
    room = f"bench{count}"
    traces = all_traces()
    page = await browser.new_page(viewport={"width": 1000, "height": 760}, bypass_csp=True)
    problems: list[str] = []
    watch_page(page, problems)
    await page.goto(f"{server.url}/room/{room}")
    await page.wait_for_function(
        "window.posewire && window.posewire.member.snap.phase === 'joined'"
        " && window.posewire.member.snap.clockOffsetNs !== null",
        timeout=20000,
    )
    baseline = PyReceiver(server.url, room, server.token(room, "subscriber", "baseline"))
    await baseline.start()
    pubs = [
        Publisher(
            server.url,
            room,
            server.token(room, "publisher", f"pub{i}"),
            i + 1,
            traces[i % len(traces)],
            f"dancer {i + 1}",
        )
        for i in range(count)
    ]
    await asyncio.gather(*(p.start() for p in pubs))
    frames = int(seconds * FPS)
    drops0 = server.drops()
    cpu0, t0 = chromium_cpu_s(), time.monotonic()
    await asyncio.gather(*(p.run(frames, offset_s=i / (FPS * count)) for i, p in enumerate(pubs)))
    total = frames * count

    async def drawn_all() -> bool:
        got = await page.evaluate(
            "window.posewire.stats().streams.reduce((a, s) => a + s.rendered_live, 0)"
        )
        return bool(got >= total)

    with contextlib.suppress(TimeoutError):  # frames not drawn are counted below
        await wait_until(drawn_all, 10.0, "the page to draw every frame")
    chromium_cpu = (chromium_cpu_s() - cpu0) / (time.monotonic() - t0)
    if screenshot is not None:
        await page.screenshot(path=str(screenshot))
    stats = await page.evaluate("window.posewire.stats()")
    drops = server.drops() - drops0
    log = await page.evaluate("window.posewire.latencyLog")
    await page.close()
    await baseline.close()
    for p in pubs:
        await p.close()
    if problems:
        raise RuntimeError(f"the page reported errors: {problems[:5]}")
    send_ms = [(s - c) / 1e6 for p in pubs for _, c, s in p.sent]
    render = [row[2] for row in log]
    rendered = sum(s["rendered_live"] for s in stats["streams"])
    fps = [s["fps_mean"] or 0.0 for s in stats["streams"]]
    fps += [0.0] * (count - len(fps))
    return {
        "publishers": count,
        "frames_sent": total,
        "frames_rendered": rendered,
        "rendered_ratio": rendered / total,
        "fps_min": min(fps),
        "render_p50_ms": percentile(render, 50),
        "render_p95_ms": percentile(render, 95),
        "render_p99_ms": percentile(render, 99),
        "decode_p50_ms": percentile(baseline.latencies_ms, 50),
        "decode_p95_ms": percentile(baseline.latencies_ms, 95),
        "send_p95_ms": percentile(send_ms, 95),
        "server_drops": drops,
        "chromium_cpu_pct": 100 * chromium_cpu,
        "page_decode_us": 1000 * stats["work"]["decode_ms"] / max(stats["work"]["packets"], 1),
        "page_draw_us": 1000 * stats["work"]["draw_ms"] / max(stats["work"]["packets"], 1),
    }


async def run(
    counts: Sequence[int], seconds: float, screenshot: Path | None
) -> list[dict[str, Any]]:
    from playwright.async_api import async_playwright

    server = DevServer()
    try:
        async with async_playwright() as pw:
            browser = await launch(pw)
            try:
                return [
                    await run_scenario(server, browser, n, seconds, screenshot if n == 5 else None)
                    for n in counts
                ]
            finally:
                await browser.close()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench viewer", description=__doc__)
    add_json_flag(parser)
    parser.add_argument("--seconds", type=float, default=6.0, help="stream length (default 6)")
    parser.add_argument("--screenshot", type=Path, help="save the 5-publisher page as PNG")
    parser.add_argument("--quick", action="store_true", help="3-second streams")
    parser.add_argument(
        "--publishers", type=int, nargs="+", default=list(COUNTS), help="counts (1 5 20)"
    )
    args = parser.parse_args(argv)
    reason = chromium_unavailable()
    if reason is not None:
        print(f"bench viewer: {reason}", file=sys.stderr)
        return 2
    seconds = 3.0 if args.quick else args.seconds
    results = asyncio.run(run(args.publishers, seconds, args.screenshot))
    rows: list[dict[str, Any]] = []
    targets = []
    for r in results:
        n = r["publishers"]
        # one row per count: Chromium's figures beside the Python receiver's (the baseline)
        rows.append(
            {"name": f"{n} publishers", **{k: v for k, v in r.items() if k != "publishers"}}
        )
        if n <= 5:
            targets.append(at_least(f"rendered / sent, {n} publishers", r["rendered_ratio"], 0.98))
        else:
            targets.append(at_least(f"slowest of {n} publishers drawn, fps", r["fps_min"], 25.0))
        targets.append(at_most(f"render p95 - decode p95, {n} publishers, ms",
                               r["render_p95_ms"] - r["decode_p95_ms"], 20.0))  # fmt: skip
    report("viewer", rows, targets, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
