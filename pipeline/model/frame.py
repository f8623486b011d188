"""The frame-slot layout shared by the capture and detect stages.

A slot of the ``frames`` ring carries one video frame::

    offset  size  field
    0       4     magic  b"PWFR"
    4       2     height (px, uint16 LE)
    6       2     width (px, uint16 LE)
    8       1     channels (3)
    9       1     flags (FLAG_RGB, FLAG_END_OF_STREAM)
    10      6     reserved (zero): pixels start 16-byte aligned
    16      h*w*c pixels, uint8, row-major, RGB order when FLAG_RGB is set

The ring's own ``Item.seq`` *is* the frame sequence number (strictly
increasing, also across stage restarts) and ``Item.ts_ns`` the capture
timestamp (``time.time_ns()`` when the frame was read): neither is repeated
here. A payload with :data:`FLAG_END_OF_STREAM` and no pixels tells the
detect stage that the source has ended (a non-looping file).

This module imports no OpenCV: the capture stage writes pixels straight into
a :class:`FrameBuffer`'s view (one pass, no extra copy) and the detect stage
reads them as a numpy view of the slot data (:func:`frame_from_slot`, no copy).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.errors import ProtocolError

FRAME_MAGIC = b"PWFR"
_HEADER = struct.Struct("<4sHHBB6x")
#: Bytes before the pixels (16, so pixels are 16-byte aligned in the slot).
FRAME_HEADER_SIZE = _HEADER.size
#: Pixels are in RGB order (always set by the capture stage).
FLAG_RGB = 0x01
#: The source has ended; the payload has no pixels.
FLAG_END_OF_STREAM = 0x02
_KNOWN_FLAGS = FLAG_RGB | FLAG_END_OF_STREAM
MAX_SIDE = 0xFFFF

Pixels = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class FrameHeader:
    """The fixed header of a frame slot."""

    height: int
    """Rows of pixels."""
    width: int
    """Columns of pixels."""
    channels: int
    """Bytes per pixel (3)."""
    flags: int
    """Bit set of ``FLAG_*``."""

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data after the header."""
        return self.height * self.width * self.channels

    @property
    def end_of_stream(self) -> bool:
        """True for the end-of-stream marker (no pixels)."""
        return bool(self.flags & FLAG_END_OF_STREAM)

    @property
    def rgb(self) -> bool:
        """True when the pixels are in RGB order (BGR otherwise)."""
        return bool(self.flags & FLAG_RGB)


def frame_slot_size(max_w: int, max_h: int, channels: int = 3) -> int:
    """Bytes one ring slot needs for frames up to ``max_w`` x ``max_h``."""
    if not (0 < max_w <= MAX_SIDE and 0 < max_h <= MAX_SIDE and 0 < channels <= 4):
        raise ValueError(f"impossible frame size {max_w}x{max_h}x{channels}")
    return FRAME_HEADER_SIZE + max_w * max_h * channels


def pack_frame_header(
    buf: bytearray | memoryview,
    height: int,
    width: int,
    channels: int = 3,
    flags: int = FLAG_RGB,
) -> int:
    """Write the header into ``buf[0:FRAME_HEADER_SIZE]``; return the payload length."""
    if not (0 <= height <= MAX_SIDE and 0 <= width <= MAX_SIDE and 0 < channels <= 4):
        raise ValueError(f"impossible frame size {width}x{height}x{channels}")
    _HEADER.pack_into(buf, 0, FRAME_MAGIC, height, width, channels, flags)
    return FRAME_HEADER_SIZE + height * width * channels


def end_of_stream_payload() -> bytes:
    """A payload that marks the end of the source (no pixels)."""
    buf = bytearray(FRAME_HEADER_SIZE)
    pack_frame_header(buf, 0, 0, 3, FLAG_RGB | FLAG_END_OF_STREAM)
    return bytes(buf)


def frame_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and check the header of a slot payload; :class:`ProtocolError` if invalid."""
    if len(data) < FRAME_HEADER_SIZE:
        raise ProtocolError(f"frame slot too short: {len(data)} bytes")
    magic, height, width, channels, flags = _HEADER.unpack_from(data, 0)
    if magic != FRAME_MAGIC:
        raise ProtocolError(f"not a frame slot (magic {magic!r})")
    if flags & ~_KNOWN_FLAGS or not 0 < channels <= 4:
        raise ProtocolError(f"corrupt frame header (channels={channels}, flags={flags:#x})")
    header = FrameHeader(height, width, channels, flags)
    if len(data) < FRAME_HEADER_SIZE + header.nbytes:
        raise ProtocolError(
            f"frame slot truncated: {width}x{height}x{channels} needs "
            f"{FRAME_HEADER_SIZE + header.nbytes} bytes, got {len(data)}"
        )
    return header


def frame_from_slot(data: bytes | bytearray | memoryview) -> tuple[FrameHeader, Pixels]:
    """The header and an ``[h, w, c]`` uint8 *view* of the pixels (no copy).

    The view shares memory with ``data``: copy it if ``data`` may be reused
    while you still need the pixels. For an end-of-stream marker the array is
    empty (shape ``[0, 0, c]``).
    """
    header = frame_header(data)
    pixels = np.frombuffer(data, np.uint8, header.nbytes, FRAME_HEADER_SIZE)
    return header, pixels.reshape(header.height, header.width, header.channels)


class FrameBuffer:
    """A reusable send buffer of one slot: header + pixels, allocated once.

    The capture stage asks for :meth:`pixels` (a writable view of the right
    shape), lets OpenCV write the frame into it (``dst=``) or copies it in,
    and sends :meth:`payload`.
    """

    def __init__(self, max_w: int, max_h: int, channels: int = 3) -> None:
        self.max_w = max_w
        self.max_h = max_h
        self.channels = channels
        self._buf = bytearray(frame_slot_size(max_w, max_h, channels))
        self._shape = (0, 0)

    @property
    def capacity(self) -> int:
        """Bytes of the buffer (= the slot size it is made for)."""
        return len(self._buf)

    def fits(self, height: int, width: int) -> bool:
        """True when a ``width`` x ``height`` frame fits the slot."""
        return 0 < width <= self.max_w and 0 < height <= self.max_h

    def pixels(self, height: int, width: int) -> Pixels:
        """A writable ``[height, width, channels]`` view where the next frame goes."""
        if not self.fits(height, width):
            raise ValueError(
                f"frame {width}x{height} does not fit a {self.max_w}x{self.max_h} slot"
            )
        self._shape = (height, width)
        n = height * width * self.channels
        view = np.frombuffer(self._buf, np.uint8, n, FRAME_HEADER_SIZE)
        return view.reshape(height, width, self.channels)

    def payload(self, flags: int = FLAG_RGB) -> memoryview:
        """Header + pixels of the frame last written through :meth:`pixels`."""
        height, width = self._shape
        n = pack_frame_header(self._buf, height, width, self.channels, flags)
        return memoryview(self._buf)[:n]

    def pack(self, frame: Pixels, flags: int = FLAG_RGB) -> memoryview:
        """Copy ``frame`` ``[h, w, c]`` in and return the payload (one copy)."""
        h, w = frame.shape[:2]
        np.copyto(self.pixels(h, w), frame)
        return self.payload(flags)
