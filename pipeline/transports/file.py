"""The file transport: packets appended to a local file (a sink for offline use and tests).

Format: a sequence of records, each ``u16 length (little endian)`` followed by
one protocol packet of that length. :func:`read_packets` reads it back. It
receives nothing: :meth:`FileTransport.recv` waits until the transport is
closed.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.config import TransmitConfig
from pipeline.errors import ClosedResourceError, ProtocolError, TransportError
from pipeline.transports import TRANSPORTS
from pipeline.transports.base import Received, Transport, TransportContext, TransportStatistics

_LEN = struct.Struct("<H")


class FileTransport(Transport):
    """Appends length-prefixed packets to ``path``."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO | None = None
        self._closed = asyncio.Event()
        self._stats = TransportStatistics(kind=self.kind)

    @property
    def connected(self) -> bool:
        return self._fh is not None

    async def connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("ab", buffering=0)
        except OSError as exc:
            raise TransportError(f"cannot open packet file {self.path}: {exc}") from exc
        self._stats.connected = True
        self._stats.connects += 1

    async def send(self, packet: bytes) -> None:
        if self._fh is None:
            self._stats.send_failures += 1
            raise ClosedResourceError("file transport is not open")
        try:
            self._fh.write(_LEN.pack(len(packet)) + packet)
        except OSError as exc:
            self._stats.send_failures += 1
            raise TransportError(f"cannot write {self.path}: {exc}") from exc
        self._stats.packets_sent += 1
        self._stats.bytes_sent += len(packet)

    async def send_control(self, message: Mapping[str, Any]) -> None:
        """A file has no far side: control messages are ignored."""

    async def recv(self) -> Received:
        await self._closed.wait()
        raise ClosedResourceError("file transport closed")

    async def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._stats.connected = False
        self._closed.set()

    def statistics(self) -> TransportStatistics:
        return self._stats


def file_transport(cfg: TransmitConfig, context: TransportContext) -> FileTransport:
    """The ``file`` transport of the ``transmit`` section (``transmit.file``)."""
    return FileTransport(context.resolve_path(cfg.file))


TRANSPORTS.add("file", TransmitConfig, file_transport)


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
