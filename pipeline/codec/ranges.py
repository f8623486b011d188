"""The value ranges and fixed depths of the pose codec: the one place that defines them.

The header, the encoder and decoder, the compiled kernels and the encode stage
(which clamps detector output into these ranges) all import them from here.
Every constant is part of protocol version 1: a change is a new version.

The compiled kernels (:mod:`pipeline.codec.kernels`) read these values as
constants when numba compiles them, and numba's cache is keyed on the source of
``kernels.py`` alone: after changing a value here, delete the kernels' cache
(``pipeline/codec/__pycache__/kernels.*.nbi``/``.nbc``) or touch ``kernels.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

XY_RANGE: tuple[float, float] = (-1.0, 2.0)
"""Accepted normalised x and y (MediaPipe reports points slightly outside the image)."""
Z_RANGE: tuple[float, float] = (-4.0, 4.0)
"""Accepted z (depth relative to the hips, in the scale of x)."""
VISIBILITY_RANGE: tuple[float, float] = (0.0, 1.0)
"""Accepted visibility."""
WORLD_RANGE_M: tuple[float, float] = (-8.0, 8.0)
"""Accepted world coordinates in metres (origin at the hips)."""

IMAGE_COMPONENTS: tuple[str, ...] = ("x", "y", "z", "visibility")
"""Names of the four components of an image landmark, in order."""
WORLD_COMPONENTS: tuple[str, ...] = ("x", "y", "z")
"""Names of the three components of a world landmark, in order."""

IMAGE_LO = np.array([XY_RANGE[0], XY_RANGE[0], Z_RANGE[0], VISIBILITY_RANGE[0]], np.float64)
"""Smallest accepted value per image component (x, y, z, visibility)."""
IMAGE_HI = np.array([XY_RANGE[1], XY_RANGE[1], Z_RANGE[1], VISIBILITY_RANGE[1]], np.float64)
"""Largest accepted value per image component."""
WORLD_LO = np.full(3, WORLD_RANGE_M[0], np.float64)
"""Smallest accepted value per world component."""
WORLD_HI = np.full(3, WORLD_RANGE_M[1], np.float64)
"""Largest accepted value per world component."""
for _bound in (IMAGE_LO, IMAGE_HI, WORLD_LO, WORLD_HI):
    _bound.flags.writeable = False

HISTORY = 32
"""Decoded frames a decoder keeps per stream (in insertion order). An encoder predicts
from nothing older than its last ``HISTORY // 2`` packets, or in keyframe-reference mode
from its latest keyframe at most ``HISTORY - 2`` packets back, so a decoder still has
the reference unless the packet that made it was lost."""
PREDICTOR_DEPTH = 3
"""Frames a prediction uses: the reference, its reference, and that one's."""

QUANT_GUARD = 1.001
"""Quantization steps are this much finer than the precision asks, so that the
float32 rounding of a decoded value never pushes the error over the bound."""
MAX_STEPS_XY = 1 << 14
"""Most quantization steps per unit of normalised x and y."""
MAX_STEPS_OTHER = 1 << 12
"""Most quantization steps per unit of z and per metre of world coordinates."""
MIN_VISIBILITY_LEVELS = 2
MAX_VISIBILITY_LEVELS = 256
"""Visibility is quantized to this many levels at most (one byte in a keyframe)."""


def clamp_image(img: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], int]:
    """Image landmarks (``[n, 33, 4]``) clamped into the accepted ranges, and how many
    values moved. Clamps in place, or into a copy when ``img`` is read-only; returns
    ``img`` itself when nothing is out of range. NaN stays NaN (the encoder refuses it)."""
    outside = int(np.count_nonzero((img < IMAGE_LO) | (img > IMAGE_HI)))
    if outside:
        if not img.flags.writeable:
            img = img.copy()
        np.clip(img, IMAGE_LO, IMAGE_HI, out=img)
    return img, outside
