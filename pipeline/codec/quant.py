"""Quantization of the pose codec: its configuration, the quantization a keyframe
carries, the compiled kernels' parameter vector, and the reference-frame record the
encoder and the decoder keep alike.

The compiled kernels (:mod:`pipeline.codec.kernels`) are imported by
:func:`load_kernels` when the first :class:`~pipeline.codec.encoder.Encoder` or
:class:`~pipeline.codec.decoder.Decoder` is made, never at import time: header-only
users such as the room server do not load numba.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pipeline.codec.header import get_varint, put_varint
from pipeline.codec.ranges import (
    HISTORY,
    IMAGE_HI,
    IMAGE_LO,
    MAX_STEPS_OTHER,
    MAX_STEPS_XY,
    MAX_VISIBILITY_LEVELS,
    MIN_VISIBILITY_LEVELS,
    QUANT_GUARD,
    WORLD_RANGE_M,
)
from pipeline.errors import ConfigError, ProtocolError
from pipeline.model.pose import MAX_POSES, NUM_LANDMARKS

FloatArray = npt.NDArray[np.float64]

# --------------------------------------------------------------------------- config

REFERENCE_MODES = ("previous", "keyframe", "anchor")
"""The values of :attr:`CodecConfig.references`."""
MAX_KEYFRAME_REF_INTERVAL = HISTORY - 1
"""Largest keyframe interval in keyframe-reference mode. A decoder keeps the last
:data:`HISTORY` decoded frames of a stream in insertion order: a keyframe followed by
its ``HISTORY - 2`` delta packets is still held when the last of them arrives, even
when two late packets of the previous interval were decoded in between."""


@dataclass
class CodecConfig:
    """Parameters of the pose codec.

    The quantization parameters travel in every keyframe, so a decoder needs no
    configuration to decode any stream; a :class:`~pipeline.codec.decoder.Decoder`
    only uses ``max_poses``.
    """

    precision_px: float = 0.5
    """Maximum absolute error of x and y, in pixels of an image ``reference_width_px``
    wide (normalised error ``precision_px / reference_width_px``; y uses the same
    normalised step). Default 0.5 px at 1920 px, i.e. normalised error <= 2.6e-4."""
    reference_width_px: int = 1920
    """Image width at which ``precision_px`` is measured."""
    keyframe_interval: int = 30
    """A keyframe at least every this many frames (1: every frame; 0: only the first
    frame and on request). Keyframes let late joiners start and bound the damage of a
    loss when no feedback comes back."""
    z_precision: float = 0.01
    """Maximum absolute error of z (normalised, in the scale of x). MediaPipe's z is far
    noisier than x and y; docs/codec.md gives the measurements behind the default."""
    visibility_levels: int = 16
    """Number of visibility levels over [0, 1] (2..256). 16 levels: error <= 1/30.
    Viewers threshold visibility (typically at 0.5) or fade with it, and MediaPipe's
    own score jitters by more than that from frame to frame."""
    world: bool = False
    """Send world landmarks (metres) when the frame has them."""
    world_precision_m: float = 0.005
    """Maximum absolute error of world landmarks in metres (MediaPipe's world
    landmarks are accurate to a few centimetres at best)."""
    max_poses: int = MAX_POSES
    """Most poses accepted in one frame (1..8)."""
    references: Literal["previous", "keyframe", "anchor"] = "previous"
    """What a delta packet predicts from. ``"previous"``: the previous packet (the
    smallest packets; one loss makes the following packets undecodable until a
    refresh or keyframe). ``"keyframe"``: the stream's latest keyframe, so every
    delta packet decodes on its own once its keyframe arrived (for lossy, unordered
    channels; larger packets). In keyframe mode the keyframe interval is at most
    :data:`MAX_KEYFRAME_REF_INTERVAL` (see :meth:`effective_keyframe_interval`).
    ``"anchor"``: every :data:`~pipeline.codec.header.ANCHOR_INTERVAL`-th frame is an
    anchor, and every delta packet predicts from the latest anchor (or keyframe); the
    anchors travel reliably, the others may be lost without harm (docs/codec.md)."""

    def effective_keyframe_interval(self) -> int:
        """The keyframe interval the encoder applies: ``keyframe_interval``, except in
        keyframe mode, where it is clamped to :data:`MAX_KEYFRAME_REF_INTERVAL` (0,
        "only on request", becomes that bound too), so that the keyframe stays within
        the :data:`HISTORY` frames a decoder keeps."""
        if self.references != "keyframe":
            return self.keyframe_interval
        if self.keyframe_interval == 0:
            return MAX_KEYFRAME_REF_INTERVAL
        return min(self.keyframe_interval, MAX_KEYFRAME_REF_INTERVAL)

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.precision_px) and self.precision_px > 0):
            problems.append(f"precision_px must be > 0, got {self.precision_px}")
        if not 1 <= self.reference_width_px <= 100_000:
            problems.append(f"reference_width_px must be 1..100000, got {self.reference_width_px}")
        if self.keyframe_interval < 0:
            problems.append(f"keyframe_interval must be >= 0, got {self.keyframe_interval}")
        if not (math.isfinite(self.z_precision) and self.z_precision > 0):
            problems.append(f"z_precision must be > 0, got {self.z_precision}")
        if not MIN_VISIBILITY_LEVELS <= self.visibility_levels <= MAX_VISIBILITY_LEVELS:
            problems.append(
                f"visibility_levels must be {MIN_VISIBILITY_LEVELS}..{MAX_VISIBILITY_LEVELS},"
                f" got {self.visibility_levels}"
            )
        if not (math.isfinite(self.world_precision_m) and self.world_precision_m > 0):
            problems.append(f"world_precision_m must be > 0, got {self.world_precision_m}")
        if not 1 <= self.max_poses <= MAX_POSES:
            problems.append(f"max_poses must be 1..{MAX_POSES}, got {self.max_poses}")
        if self.references not in REFERENCE_MODES:
            problems.append(
                f"references must be one of {', '.join(REFERENCE_MODES)}, got {self.references!r}"
            )
        if not problems:
            try:
                Quant.from_config(self)
            except ProtocolError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True, slots=True)
class Quant:
    """Quantization as carried in keyframes: steps per unit, visibility levels."""

    n_xy: int
    n_z: int
    n_world: int
    vis_levels: int

    @classmethod
    def from_config(cls, c: CodecConfig) -> Quant:
        q = cls(
            n_xy=math.ceil(c.reference_width_px / (2.0 * c.precision_px) * QUANT_GUARD),
            n_z=math.ceil(1.0 / (2.0 * c.z_precision) * QUANT_GUARD),
            n_world=math.ceil(1.0 / (2.0 * c.world_precision_m) * QUANT_GUARD),
            vis_levels=c.visibility_levels,
        )
        q.check()
        return q

    def check(self) -> None:
        if not 1 <= self.n_xy <= MAX_STEPS_XY:
            raise ProtocolError(
                f"x/y quantization of {self.n_xy} steps per unit not in 1..{MAX_STEPS_XY} "
                "(precision_px too fine or too coarse for reference_width_px)"
            )
        for name, v in (("z", self.n_z), ("world", self.n_world)):
            if not 1 <= v <= MAX_STEPS_OTHER:
                raise ProtocolError(
                    f"{name} quantization of {v} steps per unit not in 1..{MAX_STEPS_OTHER}"
                )
        if not MIN_VISIBILITY_LEVELS <= self.vis_levels <= MAX_VISIBILITY_LEVELS:
            raise ProtocolError(
                f"{self.vis_levels} visibility levels, must be "
                f"{MIN_VISIBILITY_LEVELS}..{MAX_VISIBILITY_LEVELS}"
            )

    def to_bytes(self) -> bytes:
        out = bytearray()
        put_varint(out, self.n_xy)
        put_varint(out, self.n_z)
        put_varint(out, self.n_world)
        out.append(self.vis_levels - 1)
        return bytes(out)

    @classmethod
    def parse(cls, buf: bytes, pos: int, end: int) -> tuple[Quant, int]:
        n_xy, pos = get_varint(buf, pos, end, "x/y step")
        n_z, pos = get_varint(buf, pos, end, "z step")
        n_w, pos = get_varint(buf, pos, end, "world step")
        if pos >= end:
            raise ProtocolError("packet truncated inside the visibility levels field")
        q = cls(n_xy, n_z, n_w, buf[pos] + 1)
        q.check()
        return q, pos + 1


# --------------------------------------------------------------------------- kernels

_kernels: Any = None
"""``pipeline.codec.kernels``, once :func:`load_kernels` ran."""


def load_kernels() -> Any:
    """Import the compiled kernels (numba) on first use and return the module."""
    global _kernels
    if _kernels is None:
        from pipeline.codec import kernels as codec_kernels

        _kernels = codec_kernels
    return _kernels


_KPARAMS: dict[Quant, FloatArray] = {}


def kernel_params(q: Quant) -> FloatArray:
    """The kernels' parameter vector for a quantization (``kernels.KP_*``)."""
    kp = _KPARAMS.get(q)
    if kp is None:
        k = load_kernels()
        per = np.array([q.n_xy, q.n_xy, q.n_z, q.vis_levels - 1], np.float64)
        kp = np.zeros(k.KP_SIZE, np.float64)
        kp[k.KP_SCALE : k.KP_SCALE + 4] = per
        kp[k.KP_INV : k.KP_INV + 4] = 1.0 / per
        kp[k.KP_LO : k.KP_LO + 4] = np.floor(IMAGE_LO * per)
        kp[k.KP_HI : k.KP_HI + 4] = np.ceil(IMAGE_HI * per)
        kp[k.KP_ROOT : k.KP_ROOT + 4] = (q.n_xy // 2, q.n_xy // 2, 0, q.vis_levels - 1)
        kp[k.KP_NW] = q.n_world
        kp[k.KP_INVW] = 1.0 / q.n_world
        kp[k.KP_WLO] = math.floor(WORLD_RANGE_M[0] * q.n_world)
        kp[k.KP_WHI] = math.ceil(WORLD_RANGE_M[1] * q.n_world)
        kp.flags.writeable = False
        if len(_KPARAMS) > 64:
            _KPARAMS.clear()
        _KPARAMS[q] = kp
    return kp


# --------------------------------------------------------------------------- reference frames


@dataclass(slots=True)
class Entry:
    """A decoded (or, in the encoder, reconstructed) frame kept as a possible reference."""

    seq: int
    ts: int
    """Capture time in ns as the decoder knows it."""
    step_us: int
    """Expected capture interval per sequence step, in us (0 when unknown)."""
    epoch: int
    quant: Quant
    n: int
    hist: npt.NDArray[np.int32]
    """[n, 7, 101]: this frame's quantized values, its references' and its group codes
    (layout in pipeline/codec/kernels.py); encoder and decoder compute the same."""
    world: bool
    """The frame had world landmarks."""
    key_seq: int
    """Sequence number of the keyframe this frame descends from."""
    kp: FloatArray
    """``kernel_params(quant)``."""


NO_REF = np.zeros((0, 7, 101), np.int32)
"""The ``ref`` argument of the kernels for a keyframe."""
NO_WORLD = np.zeros((0, NUM_LANDMARKS, 3), np.float64)
"""The ``world`` argument of the encoder kernel for a frame sent without world landmarks."""
NO_WORLD_SCALE = np.ones(1, np.float64)
