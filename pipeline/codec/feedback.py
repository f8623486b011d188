"""Messages on the ``feedback`` ring (transmit -> encode): acknowledgements and keyframe requests.

One message per slot: ``b"A" + seq (8 bytes LE)`` acknowledges that the
receiving side decoded packet ``seq``; ``b"K"`` asks for a keyframe.
"""

from __future__ import annotations

import struct

from pipeline.errors import ProtocolError

_ACK = struct.Struct("<cQ")


def pack_ack(seq: int) -> bytes:
    return _ACK.pack(b"A", seq)


def pack_keyframe_request() -> bytes:
    return b"K"


def parse(data: bytes | memoryview) -> tuple[str, int]:
    """``("ack", seq)`` or ``("keyframe", 0)``; :class:`ProtocolError` otherwise."""
    raw = bytes(data)
    if raw[:1] == b"A" and len(raw) == _ACK.size:
        return "ack", int(_ACK.unpack(raw)[1])
    if raw == b"K":
        return "keyframe", 0
    raise ProtocolError(f"unknown feedback message {raw[:16]!r}")
