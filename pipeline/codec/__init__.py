"""The wire codec: packet framing and header, the pose codec, its compiled kernels.

Callers import the public API from here (``from pipeline.codec import Encoder``).
The modules, bottom up (none imports one above it, so there is no cycle):

* :mod:`~pipeline.codec.ranges`: value ranges, quantization limits, history depth;
* :mod:`~pipeline.codec.header`: packet framing: header, varints, checksum,
  :func:`peek_header`;
* :mod:`~pipeline.codec.kernels`: the compiled (numba) per-value loops; imports
  only ``ranges`` and the pose model, and is loaded on the first encoder or decoder;
* :mod:`~pipeline.codec.feedback`: receiver feedback and its ring messages;
* :mod:`~pipeline.codec.quant`: :class:`CodecConfig`, quantization, kernel parameters;
* :mod:`~pipeline.codec.encoder` and :mod:`~pipeline.codec.decoder`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.codec.decoder import Decoded, Decoder, DecoderStats, NeedKeyframe
from pipeline.codec.encoder import Encoder, EncoderStats
from pipeline.codec.feedback import Feedback
from pipeline.codec.header import (
    ANCHOR_INTERVAL,
    MAX_PACKET_BYTES,
    PROTOCOL_VERSION,
    PacketHeader,
    peek_header,
)
from pipeline.codec.quant import CodecConfig
from pipeline.codec.ranges import (
    HISTORY,
    PREDICTOR_DEPTH,
    VISIBILITY_RANGE,
    WORLD_RANGE_M,
    XY_RANGE,
    Z_RANGE,
)
from pipeline.errors import PacketTooLargeError
from pipeline.model.pose import NUM_LANDMARKS, PoseFrame

__all__ = [
    "ANCHOR_INTERVAL",
    "HISTORY",
    "MAX_PACKET_BYTES",
    "PREDICTOR_DEPTH",
    "PROTOCOL_VERSION",
    "VISIBILITY_RANGE",
    "WORLD_RANGE_M",
    "XY_RANGE",
    "Z_RANGE",
    "CodecConfig",
    "Decoded",
    "Decoder",
    "DecoderStats",
    "Encoder",
    "EncoderStats",
    "Feedback",
    "NeedKeyframe",
    "PacketHeader",
    "PacketTooLargeError",
    "peek_header",
    "warm_kernels",
]


def warm_kernels() -> None:
    """Compile the codec kernels for every argument type the codec uses (float32 and
    float64 landmarks, with and without world landmarks) and cache the machine code
    beside :mod:`pipeline.codec.kernels`, so that no later process compiles them
    (``make install`` runs it; docs/codec.md gives the costs)."""
    for dtype in (np.float32, np.float64):
        enc = Encoder(CodecConfig(world=True), 0, epoch=0)
        dec = Decoder()
        image: Any = np.full((1, NUM_LANDMARKS, 4), 0.5, dtype)  # float64 too: the encoder takes it
        world: Any = np.zeros((1, NUM_LANDMARKS, 3), dtype)
        for seq in range(3):
            dec.decode(enc.encode(PoseFrame(seq, seq * 33_000_000, image, world)))
            dec.decode(enc.encode(PoseFrame(seq + 10, seq * 33_000_000, image)))
