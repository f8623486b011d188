"""The audio stage's sources: 20 ms of 48 kHz mono int16 PCM at a time, paced.

Every source yields :class:`Chunk` s on the real-time clock: chunk ``k`` is handed out
when its last sample has been "captured" (``start + (k + 1) * 20 ms`` on the monotonic
clock) and carries the wall-clock time of its first sample, ``t0 + k * 20 ms``, the same
clock as the capture timestamps of pose packets (``time.time_ns()``).

* ``tone``: a sine with a click (2 ms, full scale) wherever the capture time crosses a
  multiple of ``click_interval_ms``: the clicks are tied to capture timestamps, so a
  receiver can check where its playout put them (sync measurement, docs/audio.md);
* ``file``: anything PyAV reads, resampled to 48 kHz mono, looped with ``loop``;
* ``speech``: espeak-ng renders ``text`` once to a WAV in a temporary directory, then
  like ``file``;
* ``microphone`` (``mic``): the ALSA default capture device through PyAV.

Problems are :class:`~pipeline.errors.ConfigError` s naming the config field.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio.opus import FRAME_SAMPLES, PCM
from pipeline.codec.audio import SAMPLE_RATE
from pipeline.config import AudioConfig
from pipeline.errors import ConfigError

FRAME_NS = FRAME_SAMPLES * 1_000_000_000 // SAMPLE_RATE
CLICK_MS = 2.0
ESPEAK = "espeak-ng"


@dataclass(slots=True)
class Chunk:
    pcm: PCM
    """960 int16 samples."""
    capture_ts_ns: int
    """Wall-clock ns of the first sample."""


def tone_samples(t_ns: PCM, hz: float, click_interval_ns: int, amplitude: float = 0.3) -> PCM:
    """The tone at wall-clock times ``t_ns`` (int64): a sine, full-scale clicks of
    :data:`CLICK_MS` from every multiple of ``click_interval_ns``."""
    phase = (t_ns % 1_000_000_000) * (2 * np.pi * hz / 1e9)
    x = amplitude * np.sin(phase)
    click = (t_ns % click_interval_ns) < int(CLICK_MS * 1e6)
    burst = np.sign(np.sin(2 * np.pi * 3000 * (t_ns % click_interval_ns) / 1e9) + 1e-9)
    x = np.where(click, 0.9 * burst, x)
    out: PCM = np.round(x * 32767).astype(np.int16)
    return out


def paced(
    produce: Callable[[int, int], PCM | None], stopping: Callable[[], bool]
) -> Iterator[Chunk]:
    """Chunks ``produce(k, capture_ts_ns)`` on the real-time clock until it returns None."""
    t0 = time.time_ns()
    m0 = time.monotonic_ns()
    k = 0
    while not stopping():
        due = m0 + (k + 1) * FRAME_NS
        wait = (due - time.monotonic_ns()) / 1e9
        if wait > 0:
            time.sleep(min(wait, 0.05))  # pacing to the sound card's clock, not a sync
            continue
        ts = t0 + k * FRAME_NS
        pcm = produce(k, ts)
        if pcm is None:
            return
        yield Chunk(pcm, ts)
        k += 1


def tone_source(cfg: AudioConfig, stopping: Callable[[], bool]) -> Iterator[Chunk]:
    step = np.arange(FRAME_SAMPLES, dtype=np.int64) * 1_000_000_000 // SAMPLE_RATE
    interval = cfg.click_interval_ms * 1_000_000
    return paced(lambda k, ts: tone_samples(ts + step, cfg.tone_hz, interval), stopping)


def read_pcm(path: Path, field: str = "audio.path") -> PCM:
    """A whole audio file as 48 kHz mono int16 (PyAV); ConfigError naming ``field``."""
    import av  # the audio stage (and the benchmark) only

    try:
        container: Any = av.open(str(path))
    except (OSError, av.FFmpegError) as exc:
        raise ConfigError([f"{field}: cannot read {path}: {exc}"]) from exc
    with container:
        if not container.streams.audio:
            raise ConfigError([f"{field}: {path} has no audio stream"])
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        parts: list[PCM] = []
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1).astype(np.int16))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1).astype(np.int16))
        except av.FFmpegError as exc:
            raise ConfigError([f"{field}: {path}: unsupported or corrupt audio: {exc}"]) from exc
    pcm = np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
    if len(pcm) < FRAME_SAMPLES:
        raise ConfigError([f"{field}: {path} holds less than 20 ms of audio"])
    return pcm


def pcm_source(pcm: PCM, loop: bool, stopping: Callable[[], bool]) -> Iterator[Chunk]:
    n = len(pcm) // FRAME_SAMPLES
    frames = pcm[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)

    def produce(k: int, ts: int) -> PCM | None:
        if k >= n and not loop:
            return None
        frame: PCM = frames[k % n]
        return frame

    return paced(produce, stopping)


def render_speech(text: str, directory: Path) -> Path:
    """espeak-ng renders ``text`` to a WAV in ``directory``."""
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise ConfigError(
            ["audio.source: speech needs espeak-ng (Debian package espeak-ng), not found"]
        )
    out = directory / "speech.wav"
    try:
        subprocess.run([exe, "-w", str(out), text], check=True, capture_output=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as exc:
        raise ConfigError([f"audio.text: espeak-ng failed: {exc}"]) from exc
    return out


def microphone_source(stopping: Callable[[], bool]) -> Iterator[Chunk]:
    """The ALSA default capture device; ConfigError (naming ``audio.source``) without one."""
    import av

    try:
        container: Any = av.open(
            "default", format="alsa", options={"sample_rate": "48000", "channels": "1"}
        )
    except (OSError, av.FFmpegError, ValueError) as exc:
        raise ConfigError(
            [
                f"audio.source: microphone: no ALSA capture device ({exc}); the run goes on "
                "without audio"
            ]
        ) from exc
    return _capture(container, stopping)


def _capture(container: Any, stopping: Callable[[], bool]) -> Iterator[Chunk]:
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    pending = np.zeros(0, np.int16)
    with container:
        for frame in container.decode(audio=0):
            if stopping():
                return
            for out in resampler.resample(frame):
                pending = np.concatenate([pending, out.to_ndarray().reshape(-1)])
            while len(pending) >= FRAME_SAMPLES:
                chunk, pending = pending[:FRAME_SAMPLES], pending[FRAME_SAMPLES:]
                now = time.time_ns()
                yield Chunk(
                    chunk.astype(np.int16),
                    now - FRAME_NS - len(pending) * FRAME_NS // FRAME_SAMPLES,
                )


def open_source(
    cfg: AudioConfig, base_dir: Path, stopping: Callable[[], bool], tmp: Path | None = None
) -> Iterator[Chunk]:
    """The configured source (files read and speech rendered before the first chunk)."""
    if cfg.source == "tone":
        return tone_source(cfg, stopping)
    if cfg.source == "file":
        assert cfg.path is not None  # the config refuses source=file without a path
        path = cfg.path if cfg.path.is_absolute() else base_dir / cfg.path
        return pcm_source(read_pcm(path), cfg.loop, stopping)
    if cfg.source == "speech":
        directory = tmp or Path(tempfile.mkdtemp(prefix="posewire-speech-"))
        return pcm_source(
            read_pcm(render_speech(cfg.text, directory), "audio.text"), cfg.loop, stopping
        )
    return microphone_source(stopping)
