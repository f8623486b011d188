"""Feedback from a receiver to the encoder of a stream.

:class:`Feedback` is what a receiver sends back on the reliable channel after a
decode (:meth:`~pipeline.codec.decoder.Decoder.ack_for` makes it,
:meth:`~pipeline.codec.encoder.Encoder.on_feedback` applies it).

On the sender host, acknowledgements and keyframe requests travel from the
transmit stage to the encode stage on the ``feedback`` ring, one message per
slot: ``b"A" + seq (8 bytes LE)`` acknowledges that the receiving side decoded
packet ``seq``; ``b"K"`` asks for a keyframe (:func:`pack_ack`,
:func:`pack_keyframe_request`, :func:`parse`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class Feedback:
    """What a receiver sends back on the reliable channel after a decode.

    :meth:`Decoder.ack_for` makes it; :meth:`Encoder.on_feedback` applies it.
    """

    stream_id: int
    """The publisher stream this is about."""
    ack_seq: int | None = None
    """A frame the receiver decoded (the publisher may predict from it), or ``None``."""
    keyframe_request: bool = False
    """The receiver cannot decode the stream: it needs a keyframe or a refresh."""
    failed_seq: int | None = None
    """With ``keyframe_request``: the packet that could not be decoded (lets the
    encoder ignore a request it already answered)."""


# --------------------------------------------------------------------------- feedback ring

_ACK = struct.Struct("<cQ")


def pack_ack(seq: int) -> bytes:
    """The ring message acknowledging packet ``seq``."""
    return _ACK.pack(b"A", seq)


def pack_keyframe_request() -> bytes:
    """The ring message asking for a keyframe."""
    return b"K"


def parse(data: bytes | memoryview) -> tuple[str, int]:
    """``("ack", seq)`` or ``("keyframe", 0)``; :class:`ProtocolError` otherwise."""
    raw = bytes(data)
    if raw[:1] == b"A" and len(raw) == _ACK.size:
        return "ack", int(_ACK.unpack(raw)[1])
    if raw == b"K":
        return "keyframe", 0
    raise ProtocolError(f"unknown feedback message {raw[:16]!r}")
