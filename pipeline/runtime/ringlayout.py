"""The shared-memory ring's format: segment layout, word indices, the value types.

Layout (offsets in bytes)
    ``0``: the segment preamble (owner pid and start time, doorbell path);
    ``4096``: ring header, 8-byte words; the writer's counters and the reader's
    counters sit on separate 64-byte lines; ``4608``: slot table, one 64-byte
    line per slot: ``version, ts_ns, meta, length``; then the payloads, each
    slot page-aligned. Every page is allocated and touched at creation.

Sequence numbers and the per-slot seqlock
    Item ``s`` (1-based, the ring's write counter) lives in slot
    ``(s - 1) % slots``. The writer stores ``version = 2s - 1`` (odd: being
    written), then ``ts_ns``, ``meta``, ``length`` and the payload, then
    ``version = 2s`` (even: complete), then the header's ``write_seq = s``,
    then rings the doorbell. The reader loads ``write_seq``, picks ``s``,
    checks ``version == 2s``, copies the payload *into its own memory*, and
    checks ``version`` again: if it changed, the writer lapped it during the
    copy, the copy is discarded (LATEST: retry with the newest item; QUEUE: the
    item was dropped, go on with the next). A torn slot is never returned.
    ``Ring.reserve`` stores the odd version and ``Ring.commit`` the
    rest; ``Ring.recv_view`` checks the version before returning, and
    ``Ring.valid`` re-checks it for the caller.

Memory ordering
    Every counter is one aligned 8-byte word, stored and loaded through a
    ``memoryview.cast("Q")``: a single ``mov`` on x86-64, so a word is never
    seen half-written. x86-64 is TSO: stores become visible in program order
    and loads are not reordered with older loads, which is exactly what a
    seqlock needs (writer: version, data, version, write_seq; reader:
    write_seq, version, data, version). The large copies are ``memcpy``;
    glibc ends its non-temporal-store path with ``sfence``, and the interpreter
    executes the Python statements in order. On weakly ordered CPUs (aarch64)
    this reasoning does not hold without barriers, which pure Python cannot
    issue; the ring is written and tested for x86-64.

    Single writer per word: the writer owns ``write_seq`` and ``peak``, the
    reader owns ``read_seq``, ``read``, ``skipped``, ``dropped`` (published
    under a small reader-side seqlock so ``Ring.statistics`` sees a
    consistent snapshot). The writer never moves the reader's counter: items
    it overwrote are discovered by the reader, and ``Ring.statistics``
    adds the ones not yet discovered, so ``written == read + skipped +
    dropped + occupancy`` always holds.

Doorbell (reader wake-up)
    A named FIFO ``<run_dir>/<name>.bell``, created with the segment and
    opened ``O_RDWR | O_NONBLOCK`` by both ends (so neither open blocks and
    neither end sees EOF or EPIPE when the other restarts). After each commit
    the writer writes one byte (a full pipe is ignored: the reader is awake
    anyway). ``Ring.fileno()`` returns the FIFO, so a stage can poll ring and
    control socket together; it is level-triggered with respect to unread
    items (after taking an item, ``recv`` drains the FIFO and, if items remain,
    writes one byte back), but may wake spuriously: follow a wake-up with
    ``recv(timeout=0)`` and handle ``WouldBlock``. The blocked reader
    sleeps in ``poll(2)``; it uses no CPU while idle.

    The FIFO was chosen over an eventfd (which has no name, so a process that
    knows only the ring's name and run directory cannot open it), a ZeroMQ
    PUSH/PULL pair (an I/O thread hop on both sides) and polling (CPU for
    latency): ``docs/ring.md`` has the measurements.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pipeline.errors import BrokenResourceError, RingError
from pipeline.runtime.shm import PAGE, PREAMBLE_SIZE

_RING_MAGIC: Final = int.from_bytes(b"posewRNG", "little")
_RING_VERSION: Final = 1
_HEADER_OFF: Final = PREAMBLE_SIZE
_HEADER_SIZE: Final = 512
_TABLE_OFF: Final = _HEADER_OFF + _HEADER_SIZE
_SLOT_ENTRY: Final = 64
_SLOT_ALIGN: Final = PAGE

# Word indices (8-byte words from the start of the segment).
_H: Final = _HEADER_OFF // 8
_MAGIC: Final = _H + 0
_VERSION: Final = _H + 1
_MODE: Final = _H + 2
_SLOT_SIZE: Final = _H + 3
_SLOTS: Final = _H + 4
_STRIDE: Final = _H + 5
_PAYLOAD_OFF: Final = _H + 6
_FLAGS: Final = _H + 7
_WRITE_SEQ: Final = _H + 16  # writer's line
_PEAK: Final = _H + 17
_RVER: Final = _H + 32  # reader's line
_READ_SEQ: Final = _H + 33
_READ_COUNT: Final = _H + 34
_SKIPPED: Final = _H + 35
_DROPPED: Final = _H + 36

_FLAG_BROKEN: Final = 1
_MODE_CODE: Final = {"latest": 1, "queue": 2}
_WAIT_SLICE_S: Final = 0.25  # a blocked reader re-checks closed/broken this often
_BELL: Final = b"\x01"
_DRAIN: Final = 4096


class RingMode(enum.Enum):
    """How a ring treats items the reader has not taken yet."""

    LATEST = "latest"
    """Latest-wins: the reader gets the newest item; older unread ones are skipped."""
    QUEUE = "queue"
    """Bounded queue: the reader gets the oldest unread item; when full, the oldest is dropped."""


@dataclass(frozen=True)
class RingStats:
    """A consistent snapshot of a ring's counters (they survive stage restarts).

    ``written == read + skipped + dropped + occupancy`` always holds.
    """

    written: int
    """Items committed by writers since creation (the last sequence number)."""
    read: int
    """Items returned to readers."""
    skipped: int
    """LATEST: items superseded by a newer one before the reader took them."""
    dropped: int
    """QUEUE: items overwritten by the writer before the reader took them."""
    peak_occupancy: int
    """Highest occupancy the writer saw right after a commit."""
    occupancy: int
    """Items the reader can still take: QUEUE up to ``slots``, LATEST 0 or 1."""
    slots: int
    """Number of slots."""


@dataclass
class Item:
    """One item taken from a ring."""

    seq: int
    """The ring's write counter for this item: 1-based, strictly increasing, survives restarts."""
    ts_ns: int
    """The timestamp the writer passed to ``Ring.send``."""
    data: memoryview | bytes
    """The payload, already copied out of the ring and validated: ``bytes`` from
    ``Ring.recv``, a view of the caller's buffer from ``Ring.recv_into``."""
    meta: int
    """The caller-defined signed 64-bit field passed to ``Ring.send``."""


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _bell_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.bell"


def _open_bell(path: Path, name: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise BrokenResourceError(f"ring {name!r}: doorbell {path} does not exist") from exc
    except OSError as exc:
        raise RingError(f"ring {name!r}: cannot open doorbell {path}: {exc}") from exc


@dataclass(frozen=True)
class Header:
    """A ring's geometry and mode, as its segment header stores them."""

    mode: RingMode
    slot_size: int
    slots: int
    stride: int
    """Bytes from one slot's payload to the next (page-aligned)."""
    payload_off: int
    """Offset of the first payload."""

    @classmethod
    def plan(cls, mode: RingMode, slot_size: int, slots: int) -> Header:
        """The geometry of a new ring."""
        stride = _round_up(slot_size, _SLOT_ALIGN)
        payload_off = _round_up(_TABLE_OFF + slots * _SLOT_ENTRY, PAGE)
        return cls(mode, slot_size, slots, stride, payload_off)

    @property
    def size(self) -> int:
        """Bytes of the whole segment."""
        return self.payload_off + self.slots * self.stride

    def write(self, buf: memoryview) -> None:
        """Store the header; the magic goes last: the header is valid from then on."""
        q = buf[:_TABLE_OFF].cast("Q")
        q[_MODE] = _MODE_CODE[self.mode.value]
        q[_SLOT_SIZE] = self.slot_size
        q[_SLOTS] = self.slots
        q[_STRIDE] = self.stride
        q[_PAYLOAD_OFF] = self.payload_off
        q[_VERSION] = _RING_VERSION
        q[_MAGIC] = _RING_MAGIC
        q.release()


def read_header(buf: memoryview, name: str) -> Header:
    """The header of segment ``name``; ``RingError`` if it is not a ring or is corrupt."""
    head = buf[:_TABLE_OFF]
    q = head.cast("Q")
    try:
        if q[_MAGIC] != _RING_MAGIC or q[_VERSION] != _RING_VERSION:
            raise RingError(f"shared-memory segment {name!r} is not a posewire ring")
        code = int(q[_MODE])
        fields = (int(q[_SLOT_SIZE]), int(q[_SLOTS]), int(q[_STRIDE]), int(q[_PAYLOAD_OFF]))
    finally:
        q.release()
        head.release()
    mode = {v: RingMode(k) for k, v in _MODE_CODE.items()}.get(code)
    if mode is None:
        raise RingError(f"shared-memory segment {name!r} has a corrupt ring header")
    return Header(mode, *fields)
