"""Acceptance tests of the browser viewer (issue 15) in real Chromium (Debian's
``/usr/bin/chromium`` driven by Playwright), against a real ``serve`` process, real
publishers (pose traces, WebSocket) and a real Python subscriber.

Every page fails its test on any console error or warning and on any uncaught
exception. Tests wait for what they need (a join in the page, a count of drawn frames),
never for a guessed time; the publishers pace frames at 30 fps like a camera.
"""

from __future__ import annotations

import asyncio
import json
import math
import shlex
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
import pytest

from bench.viewer import (
    CHROMIUM,
    Publisher,
    PyReceiver,
    chromium_unavailable,
    launch,
    load_trace,
    watch_page,
)
from pipeline.codec import CodecConfig, Encoder, peek_header
from pipeline.model.pose import PoseFrame
from tests.test_server_support import ServeProcess, token

if TYPE_CHECKING:
    from bench.netns import Topology

pytestmark = pytest.mark.skipif(
    chromium_unavailable() is not None, reason=str(chromium_unavailable())
)

JOINED = (
    "window.posewire && window.posewire.member.snap.phase === 'joined'"
    " && window.posewire.member.snap.clockOffsetNs !== null"
)
WIDTH, HEIGHT = 960, 540


@asynccontextmanager
async def browser_pages(
    allow: str | None = None, extra: tuple[str, ...] = ()
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``open(url)`` -> a page of one headless Chromium; at the end, every page must have
    been free of console errors and uncaught exceptions (but console lines containing
    ``allow``, when given). ``extra``: more Chromium flags."""
    from playwright.async_api import async_playwright

    problems: list[str] = []
    async with async_playwright() as pw:
        browser = await launch(pw, extra=extra)
        try:

            async def open_page(url: str, wait: str | None = JOINED) -> Any:
                # bypass_csp: Playwright evaluates wait_for_function predicates with eval, which
                # the page's CSP (script-src 'self') forbids; the page itself needs no eval
                page = await browser.new_page(bypass_csp=True)
                watch_page(page, problems)
                await page.goto(url)
                if wait is not None:
                    await page.wait_for_function(wait, timeout=20000)
                return page

            yield open_page
        finally:
            await browser.close()
    problems = [p for p in problems if allow is None or allow not in p]
    assert not problems, problems


async def stats(page: Any) -> dict[str, Any]:
    got: dict[str, Any] = await page.evaluate("window.posewire.stats()")
    return got


async def drawn(page: Any, live: int, streams: int = 1) -> None:
    """Wait until the page drew ``live`` live frames of each of ``streams`` streams."""
    await page.wait_for_function(
        f"(() => {{ const s = window.posewire.stats().streams;"
        f" return s.length >= {streams} && s.every((x) => x.rendered_live >= {live}); }})()",
        timeout=20000,
    )


async def colours_at_landmarks(page: Any, stream: int, image: np.ndarray) -> list[list[int]]:
    """RGBA of the canvas layer of ``stream`` at every visible landmark of ``image``."""
    pts = [
        [math.floor(float(x) * WIDTH), math.floor(float(y) * HEIGHT)]
        for x, y, _z, v in image.reshape(-1, 4)
        if v >= 0.5 and 0 <= x * WIDTH < WIDTH and 0 <= y * HEIGHT < HEIGHT
    ]
    assert len(pts) >= 10
    got: list[list[int]] = await page.evaluate(
        "([sid, pts]) => window.posewire.pixels(sid, pts)",
        [stream, pts],
    )
    return got


def assert_colour(pixels: list[list[int]], colour: str) -> None:
    """Every pixel is ``colour`` (#rrggbb), opaque: the landmarks are squares on whole
    pixels drawn last, so nothing blends into them."""
    want = [int(colour[i : i + 2], 16) for i in (1, 3, 5)] + [255]
    assert all(p == want for p in pixels), (colour, [p for p in pixels if p != want])


async def page_records(page: Any, stream: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = await page.evaluate(
        f"window.posewire.record.filter((r) => r.stream === {stream})"
    )
    return got


async def publishers(url: str, room: str, count: int) -> list[Publisher]:
    trace = load_trace()
    pubs = [
        Publisher(
            url, room, token(room, "publisher", subject=f"pub{i}"), i + 1, trace, f"dancer {i + 1}"
        )
        for i in range(count)
    ]
    await asyncio.gather(*(p.start() for p in pubs))
    return pubs


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One dev server for the tests of this module (each uses its own rooms), with its own
    data dir (a module fixture starts before the per-test one of conftest.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("viewer-state")))
        srv = ServeProcess(0, "--dev")
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- tests


@pytest.mark.timing
def test_page_draws_every_frame_as_python_decodes_it(dev_server: ServeProcess) -> None:
    async def main() -> None:
        room = "studio"
        async with browser_pages() as open_page:
            page = await open_page(f"{dev_server.url}/room/{room}?record=1")
            sub = PyReceiver(
                dev_server.url, room, token(room, "subscriber", subject="py"), keep_frames=True
            )
            await sub.start()
            (pub,) = await publishers(dev_server.url, room, 1)
            await pub.run(90)
            await drawn(page, 90)
            s = await stats(page)
            (st,) = s["streams"]
            records = await page_records(page, 1)
            # the last frame is on the canvas in the member's colour, at every landmark
            last = np.array(records[-1]["image"], np.float32)
            assert_colour(await colours_at_landmarks(page, 1, last), st["colour"])
            assert st["name"] == "dancer 1"
            # the page decoded exactly what the Python receiver decoded
            for rec in records:
                assert sub.frames is not None
                ours = sub.frames[(1, int(rec["seq"]))].reshape(-1)
                assert np.array_equal(np.array(rec["image"], np.float32), ours), rec["seq"]
            assert len(records) == 90
            # frames rendered / sent, capture -> render latency against capture -> send
            assert st["rendered_live"] / len(pub.sent) >= 0.98
            log = await page.evaluate("window.posewire.latencyLog")
            render_p95 = float(np.percentile([r[2] for r in log], 95))
            send_p95 = float(np.percentile([(t - c) / 1e6 for _, c, t in pub.sent], 95))
            py_p95 = float(np.percentile(sub.latencies_ms, 95))
            print(f"capture->render p95 {render_p95:.1f} ms, capture->send p95 {send_p95:.1f} ms,"
                  f" python receiver capture->decode p95 {py_p95:.1f} ms")  # fmt: skip
            assert render_p95 <= send_p95 + 25.0, (render_p95, send_p95, py_p95)
            assert await page.inner_text("#transport") == "websocket"
            assert await page.inner_text("#state") == "joined"
            await pub.close()
            await sub.close()

    asyncio.run(main())


def test_two_publishers_three_viewers_and_a_late_joiner(dev_server: ServeProcess) -> None:
    async def main() -> None:
        room = "class"
        url = f"{dev_server.url}/room/{room}?record=1"
        async with browser_pages() as open_page:
            early = [await open_page(url), await open_page(url)]
            pubs = await publishers(dev_server.url, room, 2)
            await asyncio.gather(*(p.run(20, offset_s=i / 60) for i, p in enumerate(pubs)))
            late = await open_page(url)
            await asyncio.gather(*(p.run(20) for p in pubs))
            for page in [*early, late]:
                await drawn(page, 20 if page is late else 40, streams=2)
            s = await stats(late)
            assert len({st["colour"] for st in s["streams"]}) == 2
            for st in s["streams"]:
                # the late joiner decoded every packet it got, the history first
                assert st["need_keyframe"] == 0 and st["bad_packets"] == 0, st
                recs = await page_records(late, st["stream"])
                assert recs[0]["backfill"], recs[0]
                img = np.array(recs[-1]["image"], np.float32)
                assert_colour(await colours_at_landmarks(late, st["stream"], img), st["colour"])
            for p in pubs:
                await p.close()

    asyncio.run(main())


def test_bad_token_closed_room_and_garbage_packet_are_shown(dev_server: ServeProcess) -> None:
    async def main() -> None:
        async with browser_pages() as open_page:
            # a wrong token
            page = await open_page(f"{dev_server.url}/room/a?token=not-a-token", wait=None)
            await page.wait_for_function(
                "document.getElementById('state').textContent === 'failed'"
            )
            assert "token" in await page.inner_text("#error")
            assert await page.is_visible("#error")
            # a room closed by a moderator while the page is in it
            page = await open_page(f"{dev_server.url}/room/b")
            req = urllib.request.Request(
                f"{dev_server.url}/api/rooms/b",
                method="DELETE",
                headers={"Authorization": f"Bearer {token('b', 'moderator')}"},
            )
            await asyncio.to_thread(urllib.request.urlopen, req, None, 10)
            await page.wait_for_function(
                "document.getElementById('state').textContent === 'failed'"
            )
            assert "room_closed" in await page.inner_text("#error")
            # a packet the server relays (valid header and checksum) with a corrupt payload
            page = await open_page(f"{dev_server.url}/room/c")
            (pub,) = await publishers(dev_server.url, "c", 1)
            await pub.run(5)
            await drawn(page, 5)
            data, _ = pub.packet(keyframe=True)
            bad = bytearray(data)
            # the keyframe's quantization prelude (varints 1922, 51, 101, then the visibility
            # levels - 1): 0 means one level, which no decoder accepts; the server reads
            # only headers and relays it
            at = peek_header(data).header_len + 4
            assert bad[at] == 15
            bad[at] = 0
            bad[-4:] = google_crc32c.value(bytes(bad[:-4])).to_bytes(4, "little")
            await pub.send(bytes(bad))
            await page.wait_for_function("!document.getElementById('error').hidden")
            assert "bad packet" in await page.inner_text("#error")
            # the next deltas lack their reference (the refused keyframe): the page asks for a
            # keyframe (keyframe_request, through the server to the publisher) and draws on
            await pub.run(10)
            await drawn(page, 10)
            (st,) = (await stats(page))["streams"]
            assert st["bad_packets"] == 1, st
            assert st["need_keyframe"] + st["held"] >= 1, st  # waited in vain, or still waits
            await pub.close()

    asyncio.run(main())


def test_page_holds_a_packet_until_its_reference_arrives(dev_server: ServeProcess) -> None:
    """Packets handed to the page's viewer in the order delta 2, delta 1, keyframe (delta 2
    predicts from delta 1, delta 1 from the keyframe): both deltas wait (and the page asks
    for their references), the keyframe releases delta 1, which releases delta 2: all three
    decoded and drawn, in sequence order."""
    enc = Encoder(CodecConfig(), 77)
    trace = load_trace()
    pkts = [
        enc.encode(PoseFrame(seq=i + 1, capture_ts_ns=time.time_ns(), image=trace[i][None]))
        for i in range(3)
    ]

    async def main() -> None:
        async with browser_pages() as open_page:
            page = await open_page(f"{dev_server.url}/room/held?record=1")
            got = await page.evaluate(
                """(pkts) => {
                    const v = window.posewire;
                    const out = [];
                    for (const p of pkts) {
                        v.onPacket(Uint8Array.from(p), "test");
                        const s = v.stats().streams[0];
                        out.push([s.held, s.rendered, s.released]);
                    }
                    return [out, v.record.map((r) => r.seq)];
                }""",
                [list(pkts[2]), list(pkts[1]), list(pkts[0])],
            )
            assert got == [[[1, 0, 0], [2, 0, 0], [0, 3, 2]], ["1", "2", "3"]], got

    asyncio.run(main())


def test_page_reconnects_and_resumes_after_a_server_restart(tmp_path: Path) -> None:
    """kill -9 of the server, a new one on the same port: the page shows `reconnecting`,
    joins again with its member id (`resume`) and draws the stream the publisher resumes."""

    async def main() -> None:
        srv = ServeProcess(0, "--dev")
        room = "again"
        # Chromium itself logs each refused reconnect attempt as a console error
        # ("WebSocket connection to ... failed"): the only console line allowed here
        try:
            async with browser_pages(allow="WebSocket connection to") as open_page:
                page = await open_page(f"{srv.url}/room/{room}?record=1")
                member_id = (await stats(page))["connection"]["memberId"]
                (pub,) = await publishers(srv.url, room, 1)
                await pub.run(10)
                await drawn(page, 10)
                srv.kill9()
                await page.wait_for_function(
                    "document.getElementById('state').textContent === 'reconnecting'"
                )
                srv = ServeProcess(srv.port, "--dev")
                await page.wait_for_function(
                    JOINED + " && window.posewire.member.snap.reconnects >= 1"
                )
                assert (await stats(page))["connection"]["memberId"] == member_id
                await wait_for(lambda: pub.transport.connected, 20)
                await pub.run(10)
                # frames after the restart are drawn (seq 11..20; the stream's figures may
                # start afresh: a welcome without its publisher drops a stream)
                await page.wait_for_function(
                    "window.posewire.record.some((r) => Number(r.seq) >= 20 && !r.backfill)"
                )
                await pub.close()
        finally:
            srv.stop()

    asyncio.run(main())


async def wait_for(predicate: Callable[[], bool], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.timing
def test_webrtc_impossible_page_shows_websocket_and_draws(dev_server: ServeProcess) -> None:
    """WebRTC forced on, with a configuration under which ICE cannot find any path (relay
    candidates only, and no TURN server): no packet leaves loopback, and the page uses the
    WebSocket at once."""
    rtc = json.dumps({"iceServers": [], "iceTransportPolicy": "relay"})

    async def main() -> None:
        room = "norte"
        async with browser_pages() as open_page:
            (pub,) = await publishers(dev_server.url, room, 1)
            sending = asyncio.get_running_loop().create_task(pub.run(300))  # <= 10 s
            page = await open_page(
                f"{dev_server.url}/room/{room}?rtc=force&rtc_config={rtc}", wait=None
            )
            await page.wait_for_function(
                "window.posewire && window.posewire.stats().streams.some((s) => s.rendered >= 5)"
                " && document.getElementById('transport').textContent === 'websocket'",
                timeout=20000,
            )
            first = (await stats(page))["streams"][0]["rendered"]
            await page.wait_for_function(
                f"window.posewire.stats().streams[0].rendered >= {first + 15}",
                timeout=1000,
            )
            note = await page.inner_text("#note")
            assert "WebRTC" in note, note
            # it offered (the server counted it), with no candidate of its own: no
            # connectivity check went to any address
            conn = (await stats(page))["connection"]
            assert conn["rtcLocalCandidates"] == 0, conn
            with urllib.request.urlopen(f"{dev_server.url}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            assert "posewire_server_rtc_offers_total 1" in metrics, metrics[-2000:]
            sending.cancel()
            await pub.close()

    asyncio.run(main())


@pytest.mark.timing
def test_webrtc_dead_path_page_falls_back_to_websocket(net: Topology, tmp_path: Path) -> None:
    """The page in host a, the server and a publisher in host b: the page's data channels
    open (WebRTC between Chromium and aiortc), then every UDP packet between the hosts is
    dropped: within 1 s the page shows the WebSocket and draws frames that came over it."""
    a, b = net.host("a"), net.host("b")
    wrapper = tmp_path / "chromium-in-a"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(a.exec_argv([CHROMIUM]))} "$@"\n')
    wrapper.chmod(0o755)
    srv = ServeProcess(0, host=b.address, prefix=b.exec_argv([]))
    room = "remote"
    logs = tmp_path / "pub"
    logs.mkdir()
    pub = net.start_python("b", "tests.rtc_client", ["--url", srv.url, "--max-seconds", "40"], logs)
    try:
        pub.send({"cmd": "join", "token": token(room, "publisher"), "room": room, "publish": True})
        pub.expect("welcome", timeout=20)
        # a WebSocket publisher with a keyframe every 10 frames: a break heals within 0.33 s
        pub.send({"cmd": "publish", "stream_id": 1, "count": 600, "interval_ms": 33,
                  "path": "ws", "keyframe_interval": 10})  # fmt: skip

        async def main() -> None:
            from playwright.async_api import async_playwright

            problems: list[str] = []
            async with async_playwright() as pw:
                # Chromium's default: host candidates hidden behind mDNS names; the server
                # learns the page's address from its checks (peer-reflexive candidates)
                browser = await launch(pw, executable=str(wrapper))
                try:
                    page = await browser.new_page(bypass_csp=True)
                    watch_page(page, problems)
                    tok = token(room, "subscriber", subject="page")
                    await page.goto(f"{srv.url}/room/{room}?token={tok}")
                    await page.wait_for_function(
                        "window.posewire && window.posewire.stats().streams.some((s) =>"
                        " (s.by_transport['webrtc-pose'] || 0) + (s.by_transport['webrtc-control']"
                        " || 0) >= 10) && document.getElementById('transport').textContent"
                        " === 'webrtc'",
                        timeout=30000,
                    )
                    before = (await stats(page))["streams"][0]["by_transport"].get("websocket", 0)
                    t0 = time.monotonic()
                    net.blackout_udp()
                    await page.wait_for_function(
                        "document.getElementById('transport').textContent === 'websocket' &&"
                        " (window.posewire.stats().streams[0].by_transport.websocket || 0)"
                        f" >= {before + 5}",
                        timeout=3000,
                        polling=10,
                    )
                    elapsed = time.monotonic() - t0
                    conn = (await stats(page))["connection"]
                    assert conn["rtcDeaths"] == 1, conn
                    assert "dead" in await page.inner_text("#note")
                    print(f"blackout -> websocket drawing: {elapsed * 1000:.0f} ms; {conn}")
                    assert elapsed <= 1.0, elapsed
                finally:
                    await browser.close()
            assert not problems, problems

        asyncio.run(main())
    finally:
        pub.close()
        srv.stop()
