"""The receiver's audio: an adaptive bounded jitter buffer, a playout clock, WAV out, sync.

:class:`Playout` is fed audio packets and decoded poses with their times on the
server's clock (the receiver corrects both with the clock offsets, as for pose latency)
and plays one 20 ms frame per tick of a virtual sound card (:meth:`Playout.run`):

* **Jitter buffer.** Packets wait by sequence number (at most :data:`MAX_FRAMES`). A
  frame is played ``delay`` after its capture time; ``delay`` adapts: the largest
  transit time (arrival - capture) of the last two seconds plus a margin, and, with
  poses to keep in sync, the same figure of the poses (audio waits for the slower pose
  path: lip sync), bounded by ``min_delay_ms`` .. ``max_delay_ms``; it rises at once and
  falls by at most 100 ms per second. More than a frame
  ahead of the target the card stretches (a concealed frame, nothing consumed); more than
  two frames behind it drops a frame (at most one per 200 ms, counted), more than 200 ms
  behind (a burst after a stall) every frame in the way. A late wake of the
  event loop plays every frame that fell due (at most half a second's worth).
* **Loss.** A frame missing when it is due is lost (the delay target already covers
  the 95th percentile of the transit): decoded from the next packet's in-band FEC copy
  when that is buffered, else concealed (Opus PLC), and the card moves on (a gap in the
  sequence numbers is jumped over at once); with nothing newer buffered it counts as an
  underrun too, and if it comes after all it is counted late. The card never waits for
  a missing frame, so losses cannot pile up latency; it waits (stretches) only when the
  target delay rose.
* **What a listener hears** goes to the WAV (48 kHz mono 16-bit), concealment included.
* **Sync.** Poses are presented on the audio clock: a pose is due when the card plays
  the audio captured at the pose's capture time, or when it arrives if that is later.
  ``skew`` = pose capture time - capture time of the audio playing at the moment the
  pose is presented (positive: the pose is ahead of the audio).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio.opus import FRAME_SAMPLES, PCM, OpusDecoder
from pipeline.codec.audio import SAMPLE_RATE, AudioPacket
from pipeline.model.stats import percentiles

FRAME_NS = FRAME_SAMPLES * 1_000_000_000 // SAMPLE_RATE
MAX_FRAMES = 50
"""Buffered frames at most (one second); the oldest go first."""
WINDOW = 100
"""Transit samples the delay is computed from (two seconds of audio)."""
MARGIN_NS = 5_000_000
DECAY_NS = 2_000_000
"""How fast the target delay falls, per tick (100 ms per second)."""
DISCARD_EVERY = 10
"""Ticks between two frames dropped to catch up (at most 100 ms per second)."""
FLUSH_NS = 200_000_000
"""More than this behind the target: drop every frame in the way at once."""
MAX_CATCH_UP = 25
"""Ticks played at once when the event loop woke late (the card's buffer had them)."""
IDLE_STOP_S = 1.0
"""The stream is over when nothing arrived for this long (the card stops)."""


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    p50, p95 = percentiles(values, (50, 95))
    return {"p50": p50, "p95": p95, "max": max(values)}


@dataclass
class PlayoutStats:
    received: int = 0
    played: int = 0
    """Frames played from their own packet."""
    fec: int = 0
    """Lost frames recovered from the next packet's FEC copy."""
    concealed: int = 0
    """Frames concealed (PLC): lost without FEC, underruns, stretches."""
    underruns: int = 0
    stretched: int = 0
    discarded: int = 0
    """Frames dropped to catch up with the target delay."""
    late: int = 0
    """Packets that arrived after their frame was played (or concealed)."""
    duplicates: int = 0
    bytes: int = 0
    """Audio packet bytes received (as on the wire)."""
    bad: int = 0
    """Malformed audio packets, skipped."""
    longest_gap_ms: float = 0.0
    """The longest run of concealed (PLC) audio in the output."""
    mouth_to_ear_ms: list[float] = field(default_factory=list)
    skew_ms: list[float] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    delay_ms: list[float] = field(default_factory=list)


class Playout:
    """One publisher stream's audio, played on a virtual sound card (module docstring)."""

    def __init__(
        self,
        wav: Path | None,
        now_server_ns: Callable[[], int],
        *,
        min_delay_ms: float = 20.0,
        max_delay_ms: float = 400.0,
        sync: bool = True,
        settle_s: float = 2.0,
    ) -> None:
        self.now = now_server_ns
        self.min_delay = int(min_delay_ms * 1e6)
        self.max_delay = int(max_delay_ms * 1e6)
        self.sync = sync
        self.settle_ticks = round(settle_s * 1e9 / FRAME_NS)
        """Playout ticks before the figures count (the jitter buffer settling; counts of
        frames cover the whole run)."""
        self.stats = PlayoutStats()
        self.buffer: dict[int, AudioPacket] = {}
        self._capture: dict[int, int] = {}  # seq -> capture on the server clock
        self._transit: deque[int] = deque(maxlen=WINDOW)
        self._pose_transit: deque[int] = deque(maxlen=WINDOW)
        self._poses: deque[int] = deque()  # pose capture times waiting to be presented
        self.expected: int | None = None
        self.delay = self.min_delay
        self._decoder = OpusDecoder()
        self._wav: wave.Wave_write | None = None
        if wav is not None:
            self._wav = wave.open(str(wav), "wb")  # noqa: SIM115 (closed by close())
            self._wav.setnchannels(1)
            self._wav.setsampwidth(2)
            self._wav.setframerate(SAMPLE_RATE)
        self.frame_capture: list[int] = []
        """Per played frame (WAV order), the server-clock capture time of its first sample."""
        self.frame_raw_capture: list[int] = []
        """The same on the publisher's clock, as the packet carried it (-1: concealed)."""
        self._last_arrival = time.monotonic()
        self._tick_wall = 0  # server-clock time the current frame started playing
        self._tick_capture: int | None = None  # capture time of the frame playing
        self._gap = 0
        self._last_capture: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticks = 0
        self._played_ticks = 0
        self._discarded_at = -DISCARD_EVERY

    # ---------------------------------------------------------------- input

    def on_packet(self, pkt: AudioPacket, capture_ns: int, arrival_ns: int) -> None:
        """One audio packet; times on the server clock."""
        st = self.stats
        st.received += 1
        self._last_arrival = time.monotonic()
        self._transit.append(arrival_ns - capture_ns)
        if self.expected is not None and pkt.seq < self.expected:
            st.late += 1
            return
        if pkt.seq in self.buffer:
            st.duplicates += 1
            return
        self.buffer[pkt.seq] = pkt
        self._capture[pkt.seq] = capture_ns
        while len(self.buffer) > MAX_FRAMES:
            oldest = min(self.buffer)
            del self.buffer[oldest], self._capture[oldest]
            st.discarded += 1

    def on_pose(self, capture_ns: int, arrival_ns: int) -> None:
        """A decoded pose; presented now if the audio is already past it (``sync`` off:
        the audio delay does not wait for the poses, the skew is still measured)."""
        self._pose_transit.append(arrival_ns - capture_ns)
        position = self.position(arrival_ns)
        if position is not None and capture_ns <= position:
            self._skew(capture_ns - position)
        else:
            self._poses.append(capture_ns)

    def position(self, at_ns: int) -> int | None:
        """Capture time of the audio the card plays at server time ``at_ns``."""
        if self._tick_capture is None:
            return None
        return self._tick_capture + min(max(at_ns - self._tick_wall, 0), FRAME_NS)

    # ---------------------------------------------------------------- playout

    def _target(self) -> int:
        """The delay to play at: the largest transit of the window (and of the poses, to
        keep them in sync) plus a margin; it rises at once and falls by at most
        :data:`DECAY_NS` per tick, as fast as the card drops frames to follow it."""
        want = max(self._transit, default=0) + MARGIN_NS
        if self.sync and self._pose_transit:  # wait for the poses (lip sync)
            want = max(want, max(self._pose_transit) + MARGIN_NS)
        want = min(max(want, self.min_delay), self.max_delay)
        return want if want >= self.delay else max(want, self.delay - DECAY_NS)

    def _emit(self, pcm: PCM, capture: int, concealed: bool, raw: int | None = None) -> None:
        if len(pcm) != FRAME_SAMPLES:
            pcm = np.resize(pcm, FRAME_SAMPLES) if len(pcm) else np.zeros(FRAME_SAMPLES, np.int16)
        if self._wav is not None:
            self._wav.writeframes(pcm.astype("<i2").tobytes())
        self.frame_capture.append(capture)
        self.frame_raw_capture.append(-1 if raw is None else raw)
        st = self.stats
        if concealed:
            self._gap += 1
            st.concealed += 1
            st.longest_gap_ms = max(st.longest_gap_ms, self._gap * FRAME_NS / 1e6)
        else:
            self._gap = 0

    def tick(self) -> bool:
        """Play one frame (call every 20 ms); False while nothing is playing."""
        self._ticks += 1
        now = self.now()
        st = self.stats
        self.delay = self._target()
        if self.expected is None:
            if not self.buffer:
                return False
            first = min(self.buffer)
            if now - self._capture[first] < self.delay:
                return False
            self.expected = first
        self._played_ticks += 1
        seq = self.expected
        capture = self._capture.get(seq)
        if capture is None and self._last_capture is not None:
            capture = self._last_capture + FRAME_NS
        capture = capture if capture is not None else now - self.delay
        newer = [s for s in self.buffer if s > seq]
        # the card is ahead of the target (it waits: a stretch), or too far behind (drop)
        lag = now - capture
        if seq in self.buffer and lag < self.delay - FRAME_NS:
            self._present(now, capture - FRAME_NS)
            self._emit(self._decoder.conceal(), capture - FRAME_NS, True)
            st.stretched += 1
            return True
        while seq in self.buffer and seq + 1 in self.buffer and lag > self.delay + FLUSH_NS:
            del self.buffer[seq], self._capture[seq]  # far behind (a burst after a stall)
            st.discarded += 1
            seq += 1
            capture = self._capture[seq]
            lag = now - capture
        if (
            seq in self.buffer
            and seq + 1 in self.buffer
            and lag > self.delay + 2 * FRAME_NS
            and self._ticks - self._discarded_at >= DISCARD_EVERY
        ):  # behind the target: drop one frame (at most one per DISCARD_EVERY ticks)
            del self.buffer[seq], self._capture[seq]
            st.discarded += 1
            self._discarded_at = self._ticks
            seq += 1
            capture = self._capture[seq]
            lag = now - capture
        self._present(now, capture)
        if seq in self.buffer:
            pkt = self.buffer.pop(seq)
            self._capture.pop(seq, None)
            self._emit(self._decoder.decode(pkt.payload), capture, False, pkt.capture_ts_ns)
            st.played += 1
            self._latency(lag)
            self.expected = seq + 1
        else:  # lost, or later than the target allows: FEC from the next packet, else PLC
            nxt = self.buffer.get(seq + 1)
            if nxt is not None and self._decoder.has_fec(nxt.payload):
                raw = nxt.capture_ts_ns - FRAME_NS
                self._emit(self._decoder.decode_fec(nxt.payload), capture, False, raw)
                st.fec += 1
                self._latency(lag)
            else:
                self._emit(self._decoder.conceal(), capture, True)
            if not newer:
                st.underruns += 1  # it may still come: then it is counted late
            self.expected = max(seq + 1, min(newer)) if newer else seq + 1
        self._last_capture = capture
        if self._settled:
            st.depth.append(len(self.buffer))
            st.delay_ms.append(self.delay / 1e6)
        return True

    @property
    def _settled(self) -> bool:
        return self._played_ticks > self.settle_ticks

    def _latency(self, lag: int) -> None:
        if self._settled:
            self.stats.mouth_to_ear_ms.append(lag / 1e6)

    def _skew(self, skew_ns: int) -> None:
        if self._settled:
            self.stats.skew_ms.append(skew_ns / 1e6)

    def _present(self, now: int, capture: int) -> None:
        """Schedule the poses due while this frame plays: each is presented (a timer of the
        event loop) when the card reaches its capture time, and its skew is measured then
        against the audio the card is playing at that moment (real clocks, not arithmetic)."""
        self._tick_wall, self._tick_capture = now, capture
        while self._poses and self._poses[0] < capture + FRAME_NS:
            pose = self._poses.popleft()
            wait = max(pose - capture, 0) / 1e9  # older than this frame: at once
            if self._loop is None:
                self._presented(pose)
            else:
                self._loop.call_later(wait, self._presented, pose)

    def _presented(self, pose: int) -> None:
        position = self.position(self.now())
        if position is not None:
            self._skew(pose - position)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every 20 ms of the monotonic clock (the virtual card) until ``stop`` is set,
        or the stream has been idle :data:`IDLE_STOP_S` after it started."""
        self._loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        k = 0
        while not stop.is_set():
            k += 1
            wait = t0 + k * FRAME_NS / 1e9 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the card's clock, not a synchronisation
            elif wait < -MAX_CATCH_UP * FRAME_NS / 1e9:  # stalled too long: start afresh
                t0, k = time.monotonic(), 0
            idle = time.monotonic() - self._last_arrival > IDLE_STOP_S
            if idle and self.expected is not None and not self.buffer:
                continue
            self.tick()  # a late wake plays every due frame in turn (k catches up)

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None
        self._decoder.close()

    def content_gap_ms(self) -> float:
        """The longest stretch of source audio missing between two frames heard from their
        own packet or FEC copy (concealed, dropped or jumped over): capture times apart
        minus one frame."""
        good = [c for c in self.frame_raw_capture if c >= 0]
        gaps = [b - a - FRAME_NS for a, b in itertools.pairwise(good) if b > a]
        return max(gaps, default=0) / 1e6

    def report(self) -> dict[str, Any]:
        st = self.stats
        return {
            "frames_received": st.received,
            "frames_played": st.played,
            "frames_fec": st.fec,
            "frames_concealed": st.concealed,
            "underruns": st.underruns,
            "stretched": st.stretched,
            "discarded": st.discarded,
            "late": st.late,
            "duplicates": st.duplicates,
            "bad_packets": st.bad,
            "bytes": st.bytes,
            "longest_gap_ms": st.longest_gap_ms,
            "longest_content_gap_ms": self.content_gap_ms(),
            "jitter_buffer_depth": _summary([float(d) for d in st.depth]),
            "delay_ms": _summary(st.delay_ms),
            "mouth_to_ear_ms": _summary(st.mouth_to_ear_ms),
            "skew_ms": _summary(st.skew_ms),
            "abs_skew_ms": _summary([abs(x) for x in st.skew_ms]),
            "figures_after_s": self.settle_ticks * FRAME_NS / 1e9,
        }
