"""Audio playback in the browser viewer (issue 15, with issue 14's audio packets), in real
Chromium against a real ``serve --dev`` process and a real WebSocket publisher sending
pose packets of a trace and Opus audio packets (a 440 Hz tone, libopus through PyAV) of the
same stream, both stamped with their capture time and paced like a camera and a sound
card. The page must decode and schedule the audio, draw the poses in sync with it, and
stay free of console errors.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from bench.viewer import Publisher, chromium_unavailable, load_trace
from pipeline.audio.opus import FRAME_SAMPLES, OpusEncoder
from pipeline.codec.audio import SAMPLE_RATE, pack_audio
from tests.test_server_support import ServeProcess, token
from tests.test_viewer import browser_pages, drawn, stats

pytestmark = pytest.mark.skipif(
    chromium_unavailable() is not None, reason=str(chromium_unavailable())
)

AUTOPLAY = ("--autoplay-policy=no-user-gesture-required",)
FRAME_NS = FRAME_SAMPLES * 1_000_000_000 // SAMPLE_RATE
POSES = 120  # 4 s at 30 fps
AUDIO_FRAMES = 200  # 4 s of 20-ms frames


async def send_tone(pub: Publisher, frames: int) -> int:
    """Send ``frames`` 20-ms Opus frames of a tone as ``pub``'s stream, each when its last
    sample has been "captured" (paced on the clock; bounded in count): how many sent."""
    enc = OpusEncoder(32)
    t = np.arange(FRAME_SAMPLES) / SAMPLE_RATE
    loop = asyncio.get_running_loop()
    start_ns = time.time_ns()
    start = loop.time()
    sent = 0
    for k in range(frames):
        delay = start + (k + 1) * FRAME_NS / 1e9 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the sound card's pace, not synchronisation
        pcm = (8000 * np.sin(2 * np.pi * 440 * (t + k * FRAME_SAMPLES / SAMPLE_RATE))).astype(
            np.int16
        )
        for pts, payload in enc.encode(pcm):
            # the capture time of the packet's first decoded sample (pts counts input samples)
            capture = start_ns + pts * 1_000_000_000 // SAMPLE_RATE
            seq = round(capture / FRAME_NS)
            await pub.send(pack_audio(pub.stream_id, seq, capture, FRAME_SAMPLES, payload))
            sent += 1
    return sent


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("viewer-audio-state")))
        srv = ServeProcess(0, "--dev")
    yield srv
    srv.stop()


@pytest.mark.timing
def test_page_plays_audio_in_sync_with_the_skeleton(dev_server: ServeProcess) -> None:
    async def main() -> None:
        room = "concert"
        async with browser_pages(extra=AUTOPLAY) as open_page:
            page = await open_page(f"{dev_server.url}/room/{room}")
            pub = Publisher(
                dev_server.url,
                room,
                token(room, "publisher", subject="singer"),
                1,
                load_trace(),
                "singer",
            )
            await pub.start()
            _, audio_sent = await asyncio.gather(pub.run(POSES), send_tone(pub, AUDIO_FRAMES))
            await drawn(page, POSES - 5)
            await page.wait_for_function(
                "(() => { const s = window.posewire.stats().streams;"
                f" return s.length === 1 && s[0].audio && s[0].audio.decoded >= {audio_sent}"
                " - 5; })()",
                timeout=20000,
            )
            (st,) = (await stats(page))["streams"]
            a = st["audio"]
            print(f"audio sent {audio_sent}: {a}; poses drawn {st['rendered_live']}/{POSES}")
            assert a["decode_errors"] == 0
            assert a["played"] > 0.9 * audio_sent, a
            assert a["skew_count"] >= POSES // 2, a
            assert a["skew_p95_ms"] <= 20.0, a
            assert "played" in await page.inner_text("#members")
            await pub.close()

    asyncio.run(main())
