"""The degradation ladder: fewer frames, then coarser precision, while the link cannot keep up.

When even the best transport is too slow or the bandwidth cap is below the stream's rate,
switching transports does not help: the stream itself must shrink. The ladder's levels
(:func:`ladder_steps`, from ``transmit.degrade``) are: level 0 the full stream; one level
per entry of ``degrade.fps`` (the encode stage sends at most that many frames per second,
skipping the others before encoding them, so no reference chain breaks); then one level
per entry of ``degrade.precision_px`` (at the lowest rate, a coarser quantization step:
the quantization travels in every keyframe, so the standard decoder decodes it with no
configuration; the encoder starts the coarser stream with a keyframe).

The decision lives in the supervisor, beside the transport policy
(:mod:`pipeline.runtime.policy`), for the same reason: the figures come from one stage
(the transmit stage's ``latency_ms_p95``, ``bandwidth_limit_kbps``, the bytes offered to
its send queue ``sendqueue_queued_bytes_total``, the paths'
``path_<kind>_rtt_ms``) and the action is taken by another (the encode stage, the
only place where a frame can be left out before it costs a reference, and where the
quantization is chosen). :class:`DegradationLadder` judges them at every heartbeat:

* **down** one level when the capture-to-send p95 exceeds ``transmit.max_latency_ms``
  while packets wait in the send queue (``latency``: the link's fault, not a slow
  detector's, and not the tail of a backlog already drained), the best connected
  path's ack RTT (``path_<kind>_rtt_ms``) exceeds it (``rtt``: with a hot standby the
  transport policy switches first; the ladder acts when both are slow), or
  the cap is below the rate offered over the time since the last step (``bandwidth``);
  at most one step per ``transmit.window_s``;
* **up** one level after all of that stayed good for ``transmit.hold_s`` (and one
  ``window_s`` after the last step), and only when the cap (if any) leaves room for the
  rate measured at the level above (with 10 % headroom), so that it does not flap.

Audio (``audio.enabled``: a stage exporting ``audio_bitrate_kbps``) is part of the
ladder: at every level below 0 the audio stage is sent ``set {"bitrate_kbps":
AUDIO_FLOOR_KBPS}`` (16 kbit/s, Opus' speech floor: PESQ 3.2 clean, docs/audio.md), and
its configured bitrate again back at level 0. Audio is the last thing to thin out frame
by frame (a 20 ms gap is audible): it shrinks in bits instead.

Every step is sent as a ``degrade`` command (``{"level": n, "reason": ...}``) to the stage
that exports ``degradation_level`` (the encode stage), logged once with its reason and
figures, and kept in :attr:`DegradationLadder.steps` (the run report's ``degradation``).
The encode stage counts the steps it applied (``degradation_steps_{down,up}_total``,
/metrics ``posewire_degradation_level`` and ``posewire_degradation_steps_total{direction}``).

:class:`Degrader` is the encode stage's side: it applies a level.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import TransmitConfig
from pipeline.errors import CommandError

log = logging.getLogger("posewire.ladder")

#: a command sent is taken as under way this long (the stage's metrics then show it)
PENDING_S = 1.0
#: the level above needs the cap to exceed its measured rate by this factor
HEADROOM = 1.1
#: at least this share of ``window_s`` of samples before the offered rate is judged
MIN_SPAN_SHARE = 0.5
#: the audio bitrate at every degraded level (kbit/s; Opus' floor in audio.bitrate_kbps)
AUDIO_FLOOR_KBPS = 16

Command = Callable[[str, str, dict[str, Any]], int]


@dataclass(frozen=True)
class LadderStep:
    """One level: at most ``max_fps`` frames per second (None: all), quantization step
    ``precision_px`` (None: ``encode.precision_px``)."""

    max_fps: float | None
    precision_px: float | None

    def describe(self) -> str:
        fps = "all frames" if self.max_fps is None else f"<= {self.max_fps:g} fps"
        px = "" if self.precision_px is None else f", precision {self.precision_px:g} px"
        return fps + px


def ladder_steps(cfg: TransmitConfig) -> list[LadderStep]:
    """Level 0 (the full stream), one level per ``degrade.fps``, then per
    ``degrade.precision_px`` at the lowest rate."""
    steps = [LadderStep(None, None)]
    steps += [LadderStep(f, None) for f in cfg.degrade.fps]
    lowest = cfg.degrade.fps[-1] if cfg.degrade.fps else None
    steps += [LadderStep(lowest, px) for px in cfg.degrade.precision_px]
    return steps


class DegradationLadder:
    """Decides the degradation level of the stream (see the module docstring)."""

    def __init__(self, cfg: TransmitConfig, command: Command) -> None:
        self.cfg = cfg
        self.command = command
        self.levels = ladder_steps(cfg)
        self.level = 0
        self.steps: list[dict[str, Any]] = []
        self._last_step = -1e9
        self._pending_until = 0.0
        self._good_since: float | None = None
        self._offered: deque[tuple[float, float]] = deque()
        self._rate_at: dict[int, float] = {}
        """Offered kbit/s measured at a level before stepping down from it."""
        self._audio: str | None = None
        self._audio_full: float | None = None
        """The audio stage and its configured bitrate (seen at level 0)."""

    def _offered_kbps(self, now: float) -> float | None:
        if len(self._offered) < 2:
            return None
        (t0, b0), (t1, b1) = self._offered[0], self._offered[-1]
        if t1 - t0 < MIN_SPAN_SHARE * self.cfg.window_s:
            return None
        return (b1 - b0) * 8 / 1000 / (t1 - t0)

    @staticmethod
    def _best_rtt(m: Mapping[str, float]) -> float | None:
        rtts = [
            v
            for k, v in m.items()
            if k.startswith("path_")
            and k.endswith("_rtt_ms")
            and m.get(k.removesuffix("rtt_ms") + "connected")
        ]
        # only the paths' robust figure (the median of per-0.5 s minima): the raw ack RTT
        # of a single transport rides the reliable channel, where random loss holds acks
        # behind retransmissions; stepping down on it cost a lossy WebRTC stream a third
        # of its frames (tests/test_webrtc.py loss test: 20 % two-leg loss decoded
        # 0.25-0.49 with it, 0.71-0.80 without); a slow single link still shows as
        # latency with packets waiting in the send queue
        return min(rtts) if rtts else None

    def step(self, metrics: Mapping[str, Mapping[str, float]], now: float | None = None) -> None:
        """Judge the stages' last metrics; send a ``degrade`` command when a step is due."""
        now = time.monotonic() if now is None else now
        target = next((n for n, m in metrics.items() if "degradation_level" in m), None)
        tx = next((m for m in metrics.values() if "sendqueue_queued_bytes_total" in m), None)
        if target is None or tx is None or len(self.levels) < 2:
            return
        for name, m in metrics.items():
            if "audio_bitrate_kbps" in m and self._audio_full is None and self.level == 0:
                self._audio, self._audio_full = name, m["audio_bitrate_kbps"]
        self._offered.append((now, tx["sendqueue_queued_bytes_total"]))
        while len(self._offered) > 2 and now - self._offered[1][0] >= self.cfg.window_s:
            self._offered.popleft()
        if now < self._pending_until:
            return
        cap = tx.get("bandwidth_limit_kbps") or None
        offered = self._offered_kbps(now)
        latency = tx.get("latency_ms_p95")
        rtt = self._best_rtt(tx)
        figures = {"latency_ms_p95": latency, "best_rtt_ms": rtt, "offered_kbps": offered,
                   "cap_kbps": cap, "level": float(self.level)}  # fmt: skip
        limit = self.cfg.max_latency_ms
        if latency is not None and latency > limit and tx.get("sendqueue_depth", 0) >= 2:
            reason: str | None = "latency"  # and it is the link's: packets wait to go
        elif rtt is not None and rtt > limit:
            reason = "rtt"
        elif cap is not None and offered is not None and offered > cap:
            reason = "bandwidth"
        else:
            reason = None
        since_step = now - self._last_step
        if reason is not None:
            self._good_since = None
            if self.level < len(self.levels) - 1 and since_step >= self.cfg.window_s:
                if offered is not None:
                    self._rate_at[self.level] = offered
                self._go(target, now, self.level + 1, reason, figures)
            return
        if self.level == 0:
            return
        if self._good_since is None:
            self._good_since = now
        if now - self._good_since < self.cfg.hold_s or since_step < self.cfg.window_s:
            return
        above = self._rate_at.get(self.level - 1)
        if cap is not None and above is not None and above * HEADROOM > cap:
            return  # the level above would not fit under the cap: stay
        self._go(target, now, self.level - 1, "recovered", figures)
        self._good_since = now  # the next step up needs another hold

    def _go(self, stage: str, now: float, level: int, reason: str, figures: dict[str, Any]) -> None:
        was, self.level = self.level, level
        self._last_step = now
        self._pending_until = now + PENDING_S
        self._offered.clear()  # the next rate is the new level's
        shown = {k: v for k, v in figures.items() if v is not None}
        entry = {"t_wall": time.time(), "from": was, "to": level, "reason": reason,
                 "setting": self.levels[level].describe(), "figures": shown}  # fmt: skip
        self.steps.append(entry)
        log.warning(
            "degradation %s %d -> %d (%s; %s): %s",
            "down" if level > was else "up",
            was,
            level,
            reason,
            entry["setting"],
            ", ".join(f"{k}={v:.4g}" for k, v in shown.items()),
        )
        self.command(stage, "degrade", {"level": level, "reason": reason})
        if self._audio is not None and self._audio_full is not None:
            full = int(self._audio_full)
            kbps = full if level == 0 else min(full, AUDIO_FLOOR_KBPS)
            self.command(self._audio, "set", {"bitrate_kbps": kbps})

    def report(self) -> dict[str, Any]:
        return {
            "levels": [s.describe() for s in self.levels],
            "level_at_exit": self.level,
            "steps": self.steps,
        }


class Degrader:
    """The encode stage's side of the ladder: which frames go, at what precision."""

    def __init__(self, cfg: TransmitConfig) -> None:
        self.levels = ladder_steps(cfg)
        self.level = 0
        self.down = self.up = self.skipped = 0
        self._last_ns: int | None = None

    @property
    def setting(self) -> LadderStep:
        return self.levels[self.level]

    def on_degrade(self, args: dict[str, Any]) -> dict[str, Any]:
        """``degrade`` handler: ``{"level": n}``, 0 .. the top level."""
        level = args.get("level")
        top = len(self.levels) - 1
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= top:
            raise CommandError(f"degrade: 'level' must be an integer in 0..{top}, got {level!r}")
        if level > self.level:
            self.down += 1
        elif level < self.level:
            self.up += 1
        self.level = level
        return {"level": level, "setting": self.setting.describe()}

    def keep(self, capture_ts_ns: int) -> bool:
        """Whether the frame goes at the current level (frames closer than 3/4 of the
        level's interval to the last kept one are skipped: 30 -> 15 fps keeps every
        second frame, 30 -> 10 every third)."""
        fps = self.setting.max_fps
        last = self._last_ns
        if fps is not None and last is not None and 0 <= capture_ts_ns - last < 0.75e9 / fps:
            self.skipped += 1
            return False
        self._last_ns = capture_ts_ns
        return True

    def metrics(self) -> dict[str, float]:
        s = self.setting
        return {
            "degradation_level": float(self.level),
            "degradation_steps_down_total": float(self.down),
            "degradation_steps_up_total": float(self.up),
            "degradation_skipped_total": float(self.skipped),
            "degradation_max_fps": float(s.max_fps or 0.0),
        }
