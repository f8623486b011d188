"""The file transport: packets appended to a local file (a sink for offline use and tests).

Format: a sequence of records, each ``u16 length (little endian)`` followed by
one protocol packet of that length. :func:`read_packets` reads it back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import ProtocolError, TransportError

_LEN = struct.Struct("<H")


class FileTransport:
    """Appends length-prefixed packets to ``path``."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO | None = None
        self.sent = 0
        self.bytes_sent = 0

    async def connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("ab", buffering=0)
        except OSError as exc:
            raise TransportError(f"cannot open packet file {self.path}: {exc}") from exc

    async def send(self, packet: bytes) -> None:
        if self._fh is None:
            raise TransportError("file transport is not connected")
        try:
            self._fh.write(_LEN.pack(len(packet)) + packet)
        except OSError as exc:
            raise TransportError(f"cannot write {self.path}: {exc}") from exc
        self.sent += 1
        self.bytes_sent += len(packet)

    async def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_packets(path: Path) -> Iterator[bytes]:
    """The packets of a file written by :class:`FileTransport`; a truncated tail is an error."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        if pos + _LEN.size > len(data):
            raise ProtocolError(f"{path}: truncated record header at byte {pos}")
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if pos + n > len(data):
            raise ProtocolError(f"{path}: truncated packet at byte {pos}")
        yield data[pos : pos + n]
        pos += n
