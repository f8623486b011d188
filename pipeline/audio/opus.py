"""Opus: the encoder through PyAV's libopus, the decoder through libopus itself.

The encoder is FFmpeg's ``libopus`` wrapper inside the PyAV wheel (48 kHz mono, 20 ms
frames, in-band FEC, optional DTX). The decoder calls libopus directly (ctypes): PyAV's
decoder cannot conceal a lost packet (an empty packet means "drain" to FFmpeg) and
cannot decode the in-band FEC copy a later packet carries; libopus does both with
``opus_decode(data=NULL)`` (PLC) and ``decode_fec=1``. The library is the one the PyAV
wheel bundles (``av.libs/libopus-*.so``), else the system's ``libopus.so.0``; finding it
does not import PyAV (no FFmpeg loaded into a receiver).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec.audio import SAMPLE_RATE
from pipeline.errors import ConfigError

PCM = npt.NDArray[np.int16]
"""int16 samples, 48 kHz mono."""

FRAME_SAMPLES = 960
"""20 ms at 48 kHz: the one frame size."""
MAX_DECODE_SAMPLES = 5760


class OpusEncoder:
    """Opus at 48 kHz mono, 20 ms frames, through PyAV (imported here, in the audio stage)."""

    def __init__(
        self, bitrate_kbps: int, *, fec: bool = True, dtx: bool = False, loss_pct: int = 10
    ) -> None:
        import av  # the audio stage only: never beside cv2, never in transmit

        self._av = av
        ctx: Any = av.codec.CodecContext.create("libopus", "w")
        ctx.sample_rate = SAMPLE_RATE
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.bit_rate = bitrate_kbps * 1000
        ctx.options = {
            # "audio", not "voip": voip's speech emphasis and high-pass cost waveform
            # fidelity (tone correlation 0.88 against 0.95 at 32 kbit/s with FEC, measured
            # in docs/audio.md); in-band FEC works in both (SILK and hybrid frames)
            "application": "audio",
            "frame_duration": "20",
            "fec": "1" if fec else "0",
            "packet_loss": str(loss_pct if fec else 0),
            "dtx": "1" if dtx else "0",
        }
        ctx.open()
        self._ctx = ctx
        self._index = 0

    def encode(self, pcm: PCM) -> list[tuple[int, bytes]]:
        """Encode 960 int16 samples; return ``(pts, packet)`` pairs, ``pts`` the first
        input sample the packet's decoded output covers (negative for the first: the
        encoder's look-ahead, 312 samples)."""
        frame = self._av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._index * FRAME_SAMPLES
        self._index += 1
        return [(int(p.pts or 0), bytes(p)) for p in self._ctx.encode(frame)]


def _library_path() -> str:
    spec = importlib.util.find_spec("av")
    if spec is not None and spec.origin:
        libs = os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "av.libs")
        found = sorted(glob.glob(os.path.join(libs, "libopus*.so*")))
        if found:
            return found[0]
    name = ctypes.util.find_library("opus")
    if name is None:
        raise ConfigError(["audio: no libopus found (neither in the PyAV wheel nor the system)"])
    return name


_lib: ctypes.CDLL | None = None


def _opus() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(_library_path())
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_void_p]
        lib.opus_decode.restype = ctypes.c_int
        lib.opus_decode.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_int16),
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
        _lib = lib
    return _lib


class OpusDecoder:
    """One libopus decoder (48 kHz mono): decode, decode the FEC copy, conceal."""

    def __init__(self) -> None:
        lib = _opus()
        err = ctypes.c_int()
        self._lib = lib
        self._dec = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(err))
        if err.value != 0 or not self._dec:
            raise ConfigError([f"audio: opus_decoder_create failed ({err.value})"])
        self._buf = (ctypes.c_int16 * MAX_DECODE_SAMPLES)()

    def _run(self, data: bytes | None, samples: int, fec: int) -> PCM:
        n = self._lib.opus_decode(
            self._dec, data, len(data) if data else 0, self._buf, samples, fec
        )
        if n < 0:
            return np.zeros(samples, np.int16)  # a corrupt payload: silence, counted by the caller
        return np.ctypeslib.as_array(self._buf)[:n].copy()

    def decode(self, payload: bytes) -> PCM:
        return self._run(payload, MAX_DECODE_SAMPLES, 0)

    def decode_fec(self, next_payload: bytes, samples: int = FRAME_SAMPLES) -> PCM:
        """The lost frame before ``next_payload`` from its in-band FEC copy (PLC without one)."""
        return self._run(next_payload, samples, 1)

    def conceal(self, samples: int = FRAME_SAMPLES) -> PCM:
        """Packet-loss concealment for one lost frame."""
        return self._run(None, samples, 0)

    def has_fec(self, payload: bytes) -> bool:
        return bool(self._lib.opus_packet_has_lbrr(payload, len(payload)) == 1)

    def close(self) -> None:
        if self._dec:
            self._lib.opus_decoder_destroy(self._dec)
            self._dec = None

    def __del__(self) -> None:
        self.close()
