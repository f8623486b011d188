"""Audio playback in the browser viewer (issue 15, with issue 14's audio packets), in real
Chromium against a real ``serve --dev`` process and a real WebSocket publisher sending
pose packets of a trace and Opus audio packets (a 440 Hz tone, libopus through PyAV) of the
same stream, both stamped with their capture time and paced like a camera and a sound
card. The page must decode and schedule the audio, draw the poses in sync with it, and
stay free of console errors.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from typing import Any

import google_crc32c
import numpy as np
import pytest

from bench.viewer import Publisher, chromium_unavailable, load_trace
from pipeline.audio.opus import FRAME_SAMPLES, OpusEncoder
from pipeline.codec.audio import SAMPLE_RATE, pack_audio, parse_audio
from pipeline.errors import ProtocolError
from tests import test_viewer
from tests.test_server_support import ServeProcess, token
from tests.test_viewer import browser_pages, drawn, stats

pytestmark = pytest.mark.skipif(
    chromium_unavailable() is not None, reason=str(chromium_unavailable())
)

AUTOPLAY = ("--autoplay-policy=no-user-gesture-required",)
dev_server = test_viewer.dev_server  # the same module fixture: one dev server here
FRAME_NS = FRAME_SAMPLES * 1_000_000_000 // SAMPLE_RATE
POSES = 120  # 4 s at 30 fps
AUDIO_FRAMES = 200  # 4 s of 20-ms frames

# the page's parser on each packet: [stream, seq, capture ns, duration, payload] or "E"
PARSE_JS = """
async (packets) => {
  const m = await import('/static/audio.js');
  const d = await import('/static/decoder.js');
  return packets.map((p) => {
    try {
      const a = m.parseAudio(new Uint8Array(p));
      return [a.streamId, String(a.seq), String(a.captureTsNs), a.duration, Array.from(a.payload)];
    } catch (e) { return e instanceof d.ProtocolError ? 'E' : 'X ' + e; }
  });
}
"""


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


def _fixed(body: bytes) -> bytes:
    """``body`` with its CRC32C appended (a mutation the checksum does not catch)."""
    return body + struct.pack("<I", google_crc32c.value(body))


def audio_cases() -> list[bytes]:
    """Good audio packets, and bad ones: truncated, every byte changed (checksum fixed up
    and not), wrong version, flags, durations and lengths out of range, junk."""
    rng = random.Random(15)
    good = [
        pack_audio(1, 0, 0, 120, b"\xfc"),
        pack_audio(9, 2**40, 1_790_000_000_123_456_789, 960, bytes(range(90))),
        pack_audio(2**32 - 1, 2**63 - 1, -(2**63), 5760, bytes(1050)),
        pack_audio(300, 89_500_000_000, 1_790_000_000_000_000_000, 960, bytes(200)),
    ]
    out = list(good)
    for pkt in good[:2]:
        body = pkt[:-4]
        out += [pkt[:n] for n in range(len(pkt))]
        for i in range(len(body)):
            mut = bytearray(body)
            mut[i] ^= 1 << rng.randrange(8)
            out += [_fixed(bytes(mut)), bytes(mut) + pkt[-4:]]
        out += [_fixed(b"\xa2" + body[1:]), _fixed(body + b"\x00"), _fixed(body[:-1])]
        out += [_fixed(bytes([0xA1, 0, 1, 1]) + bytes(8) + bytes([d, 1, 0])) for d in (0, 119)]
    out += [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(50)]
    out += [_fixed(bytes([0xA1]) + bytes(rng.randrange(256) for _ in range(30))) for _ in range(50)]
    return out


def python_parse(pkt: bytes) -> Any:
    try:
        a = parse_audio(pkt)
    except ProtocolError:
        return "E"
    return [a.stream_id, str(a.seq), str(a.capture_ts_ns), a.duration, list(a.payload)]


def test_page_parses_audio_packets_as_python_does(dev_server: ServeProcess) -> None:
    """The same values and the same refusals as parse_audio; a bad audio packet reaching the
    viewer is counted and shown, not thrown."""

    async def main() -> None:
        cases = audio_cases()
        async with browser_pages(extra=AUTOPLAY) as open_page:
            page = await open_page(f"{dev_server.url}/room/parsing")
            got = await page.evaluate(PARSE_JS, [list(p) for p in cases])
            want = [python_parse(p) for p in cases]
            assert sum(w != "E" for w in want) >= 4 and sum(w == "E" for w in want) > 300
            bad = [(c.hex(), g, w) for c, g, w in zip(cases, got, want, strict=True) if g != w]
            assert not bad, bad[:5]
            shown = await page.evaluate(
                "(() => { window.posewire.onPacket(new Uint8Array([0xa1, 0, 1, 2, 3]), 'test');"
                " return [window.posewire.audio.errors, document.getElementById('error')"
                ".textContent]; })()"
            )
            assert shown[0] == 1 and "bad audio packet (5 bytes)" in shown[1], shown

    asyncio.run(main())


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
            # every decoded frame is played, or late, or skipped while the target delay
            # comes down after a transit spike (at most 5 a second)
            assert a["played"] > 0 and a["decoded"] == audio_sent, a
            assert a["played"] + a["late"] + a["dropped"] == a["decoded"], a
            assert a["skew_count"] >= POSES // 2, a
            assert a["skew_p95_ms"] <= 20.0, a
            assert "played" in await page.inner_text("#members")
            await pub.close()

    asyncio.run(main())
