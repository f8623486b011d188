"""Shared-memory rings: single producer, single consumer, fixed slots, no lock on the hot path.

A :class:`Ring` moves frames (or any bytes) between two processes through a
segment in ``/dev/shm`` (:mod:`pipeline.runtime.shm`). The supervisor creates every
ring (:meth:`Ring.create`) and unlinks it (:meth:`Ring.unlink`); stages only
:meth:`Ring.attach` and :meth:`Ring.close`. All ring state (the write and read
counters, statistics) lives in the segment, so a restarted writer or reader
resumes where the ring was: a crash costs only the item in flight.

Modes
    :attr:`RingMode.LATEST` (latest-wins): :meth:`Ring.recv` returns the newest
    complete item; older unread items are counted as *skipped*. Use at least
    3 slots: the writer fills the slot after the newest while the reader
    copies the newest.
    :attr:`RingMode.QUEUE` (bounded queue): :meth:`Ring.recv` returns the
    oldest unread item; when the writer laps the reader the oldest unread item
    is overwritten and counted as *dropped*.

Copies
    :meth:`Ring.send` copies the item into a slot; :meth:`Ring.recv` copies it
    out into new ``bytes``, :meth:`Ring.recv_into` into the caller's buffer:
    two copies in all, each validated. Two zero-copy variants exist for hot
    paths: :meth:`Ring.reserve` / :meth:`Ring.commit` let the producer build
    the item in the slot itself (decode a frame straight into shared memory),
    and :meth:`Ring.recv_view` hands the reader a read-only view of the slot,
    which it must confirm with :meth:`Ring.valid` *after* using it (the writer
    may have lapped it meanwhile; then the result is discarded). What each
    path costs is measured by ``python -m bench.ring`` (see ``docs/ring.md``).

Layout, sequence numbers and memory ordering
    The segment layout, the per-slot seqlock that never returns a torn slot,
    and why plain 8-byte word stores suffice on x86-64 are described in
    :mod:`pipeline.runtime.ringlayout`.

Doorbell (reader wake-up)
    :meth:`Ring.fileno` is a named FIFO a stage can poll beside its control
    socket; how it is rung and drained is described in
    :mod:`pipeline.runtime.ringlayout`.

Closed vs broken (like trio's channels)
    :class:`ClosedResourceError`: *this* end was closed and then used.
    :class:`BrokenResourceError`: the segment was marked broken (the
    supervisor's :meth:`Ring.unlink` does that, and rings the doorbell so a
    blocked reader wakes up) or its name vanished (checked while waiting).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pipeline.errors import BrokenResourceError, ClosedResourceError, RingError, WouldBlock
from pipeline.runtime.ringlayout import (
    _BELL,
    _DRAIN,
    _DROPPED,
    _FLAG_BROKEN,
    _FLAGS,
    _PEAK,
    _READ_COUNT,
    _READ_SEQ,
    _RVER,
    _SKIPPED,
    _SLOT_ENTRY,
    _TABLE_OFF,
    _WAIT_SLICE_S,
    _WRITE_SEQ,
    Header,
    Item,
    RingMode,
    RingStats,
    _bell_path,
    _open_bell,
    read_header,
)
from pipeline.runtime.shm import (
    Segment,
    check_name,
    segment_name,
    segment_path,
    sweep_stale,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy as np
    from typing_extensions import Buffer

    BufferLike: TypeAlias = Buffer | np.ndarray[Any, Any]
    """Anything with the buffer protocol; numpy<2 arrays are listed because their stubs
    do not declare ``__buffer__``."""

__all__ = [
    "Item",
    "Ring",
    "RingMode",
    "RingStats",
    "segment_name",
    "sweep_stale",
]


class Ring:
    """One end of a shared-memory ring. Use :meth:`create` or :meth:`attach`, not the constructor.

    Not thread-safe: one thread per end. Either end may call any method, but
    a ring has exactly one sending process and one receiving process at a time.
    """

    def __init__(self, seg: Segment, bell_fd: int, bell_path: Path) -> None:
        self._seg: Segment | None = seg
        self._bell = bell_fd
        self._bell_path = bell_path
        self._name = seg.name
        h = read_header(seg.buf, seg.name)
        if seg.size < h.payload_off + h.slots * h.stride:
            raise RingError(f"shared-memory segment {seg.name!r} has a corrupt ring header")
        self._slots, self._slot_size, self._stride = h.slots, h.slot_size, h.stride
        self._payload_off = h.payload_off
        self._mode = mode = h.mode
        self._latest = mode is RingMode.LATEST
        self._mem: memoryview = seg.buf
        meta_area = seg.buf[: self._payload_off]
        self._q: memoryview = meta_area.cast("Q")
        self._i: memoryview = meta_area.cast("q")
        meta_area.release()
        self._poll = select.poll()
        self._poll.register(bell_fd, select.POLLIN)
        self._reserved = 0
        self.retries = 0
        """Copies discarded because the writer lapped them (diagnostics, this end only)."""

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls, name: str, *, slot_size: int, slots: int, mode: RingMode, run_dir: Path
    ) -> Ring:
        """Create ring ``name`` (a :func:`segment_name`) and its doorbell in ``run_dir``.

        SUPERVISOR ONLY. Allocates and touches every page. Raises
        :class:`ValueError` for impossible geometry and :class:`RingError` if
        the segment exists or cannot be allocated (``/dev/shm`` full, run
        directory missing or not writable).
        """
        check_name(name)
        if not isinstance(mode, RingMode):
            raise ValueError(f"ring {name!r}: mode must be a RingMode, got {mode!r}")
        if not isinstance(slot_size, int) or slot_size < 1:
            raise ValueError(f"ring {name!r}: slot_size must be a positive int, got {slot_size!r}")
        if not isinstance(slots, int) or slots < 2:
            raise ValueError(f"ring {name!r}: slots must be an int >= 2, got {slots!r}")
        h = Header.plan(mode, slot_size, slots)
        run_dir = Path(run_dir)
        bell_path = _bell_path(run_dir, name)
        try:
            os.mkfifo(bell_path, 0o600)
        except FileExistsError as exc:
            raise RingError(f"ring {name!r}: doorbell {bell_path} already exists") from exc
        except OSError as exc:
            raise RingError(f"ring {name!r}: cannot create doorbell {bell_path}: {exc}") from exc
        try:
            seg = Segment.create(name, h.size, companions=(str(bell_path.absolute()),))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bell_path)
            raise
        h.write(seg.buf)
        try:
            return cls(seg, _open_bell(bell_path, name), bell_path)
        except BaseException:
            seg.close()
            for path in (segment_path(name), bell_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise

    @classmethod
    def attach(cls, name: str, *, run_dir: Path) -> Ring:
        """Attach to existing ring ``name``; geometry and mode come from its header.

        Never registers with ``multiprocessing.resource_tracker``, so this
        process exiting (cleanly or not) leaves the segment alone.
        :class:`BrokenResourceError` if the segment or its doorbell does not
        exist or the ring is marked broken; :class:`RingError` if the segment is
        not a ring.
        """
        seg = Segment.open(name)
        try:
            bell_path = _bell_path(Path(run_dir), name)
            bell = _open_bell(bell_path, name)
        except BaseException:
            seg.close()
            raise
        try:
            ring = cls(seg, bell, bell_path)
        except BaseException:
            seg.close()
            os.close(bell)
            raise
        if ring._q[_FLAGS] & _FLAG_BROKEN:
            ring.close()
            raise BrokenResourceError(f"ring {name!r} is marked broken")
        return ring

    def close(self) -> None:
        """Detach this end. Idempotent. Afterwards every operation raises ClosedResourceError."""
        seg = self._seg
        if seg is None:
            return
        self._seg = None
        self._q.release()
        self._i.release()
        seg.close()
        with contextlib.suppress(KeyError):
            self._poll.unregister(self._bell)
        os.close(self._bell)

    def unlink(self) -> None:
        """SUPERVISOR ONLY: mark the ring broken, wake its reader, remove segment and doorbell.

        Attached ends keep their mappings; their next operation raises
        :class:`BrokenResourceError`. Idempotent; works after :meth:`close` too.
        """
        if self._seg is not None:
            self._q[_FLAGS] = self._q[_FLAGS] | _FLAG_BROKEN
            self._ring_bell()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment_path(self._name))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._bell_path)

    def mark_broken(self) -> None:
        """Mark the ring broken without removing it (both ends then raise BrokenResourceError)."""
        q = self._live()
        q[_FLAGS] = q[_FLAGS] | _FLAG_BROKEN
        self._ring_bell()

    def __enter__(self) -> Ring:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._seg is None else "open"
        return (
            f"<Ring {self._name!r} {self._mode.value} slots={self._slots} "
            f"slot_size={self._slot_size} {state}>"
        )

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        """The segment name."""
        return self._name

    @property
    def slot_size(self) -> int:
        """Largest payload in bytes."""
        return self._slot_size

    @property
    def slots(self) -> int:
        """Number of slots."""
        return self._slots

    @property
    def mode(self) -> RingMode:
        """LATEST or QUEUE."""
        return self._mode

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._seg is None

    def fileno(self) -> int:
        """The doorbell FIFO: readable when an item may be waiting (see the module docstring)."""
        self._live()
        return self._bell

    # ------------------------------------------------------------------ writer

    def send(self, data: BufferLike, *, ts_ns: int = 0, meta: int = 0) -> int:
        """Copy ``data`` into the next slot, publish it, ring the doorbell; return its seq.

        ``data`` is any object with the buffer protocol (bytes, bytearray,
        memoryview, a numpy array: one ``memcpy`` when C-contiguous). Never
        blocks: LATEST overwrites, QUEUE drops the oldest unread item when
        full. ``ts_ns`` and ``meta`` are signed 64-bit. :class:`ValueError` if
        ``data`` is larger than :attr:`slot_size`.
        """
        q = self._live()
        if q[_FLAGS] & _FLAG_BROKEN:
            raise BrokenResourceError(f"ring {self._name!r} is broken")
        src = memoryview(data)  # type: ignore[arg-type,unused-ignore]
        n = src.nbytes
        if n > self._slot_size:
            raise ValueError(
                f"ring {self._name!r}: item of {n} bytes exceeds slot_size {self._slot_size}"
            )
        seq = int(q[_WRITE_SEQ]) + 1
        slot = (seq - 1) % self._slots
        t = (_TABLE_OFF + slot * _SLOT_ENTRY) // 8
        off = self._payload_off + slot * self._stride
        q[t] = 2 * seq - 1  # odd: being written
        if src.c_contiguous and src.format == "B" and src.ndim == 1:
            self._mem[off : off + n] = src
        else:
            self._copy_any(src, off, n)
        return self._publish(q, seq, t, n, ts_ns, meta)

    def reserve(self) -> memoryview:
        """Zero-copy send, step 1: a writable view of the next slot (:attr:`slot_size` bytes).

        Write the item straight into it (e.g. decode a camera frame into
        ``numpy.frombuffer(view, numpy.uint8)``), then :meth:`commit`. Until
        then the slot is marked as being written, so no reader returns it;
        if this process dies first, the item simply never existed. Calling
        :meth:`reserve` again before :meth:`commit` returns the same slot.
        Never touch the view after :meth:`commit`: the slot belongs to the
        reader then, and a later write would go unnoticed.
        """
        q = self._live()
        if q[_FLAGS] & _FLAG_BROKEN:
            raise BrokenResourceError(f"ring {self._name!r} is broken")
        seq = int(q[_WRITE_SEQ]) + 1
        slot = (seq - 1) % self._slots
        q[(_TABLE_OFF + slot * _SLOT_ENTRY) // 8] = 2 * seq - 1  # odd: being written
        self._reserved = seq
        off = self._payload_off + slot * self._stride
        return self._mem[off : off + self._slot_size]

    def commit(self, nbytes: int, *, ts_ns: int = 0, meta: int = 0) -> int:
        """Zero-copy send, step 2: publish the first ``nbytes`` of the reserved slot.

        Returns the item's seq, like :meth:`send`. :class:`RingError` without
        a preceding :meth:`reserve`; :class:`ValueError` if ``nbytes`` is not
        within ``0..slot_size``.
        """
        q = self._live()
        seq = int(q[_WRITE_SEQ]) + 1
        if self._reserved != seq:
            raise RingError(f"ring {self._name!r}: commit() without reserve()")
        if not 0 <= nbytes <= self._slot_size:
            raise ValueError(
                f"ring {self._name!r}: nbytes {nbytes} is not within 0..{self._slot_size}"
            )
        if q[_FLAGS] & _FLAG_BROKEN:
            raise BrokenResourceError(f"ring {self._name!r} is broken")
        t = (_TABLE_OFF + ((seq - 1) % self._slots) * _SLOT_ENTRY) // 8
        return self._publish(q, seq, t, nbytes, ts_ns, meta)

    def _publish(self, q: memoryview, seq: int, t: int, n: int, ts_ns: int, meta: int) -> int:
        """Complete item ``seq`` in slot-table entry ``t`` and announce it."""
        i = self._i
        i[t + 1] = ts_ns
        i[t + 2] = meta
        q[t + 3] = n
        q[t] = 2 * seq  # even: complete
        q[_WRITE_SEQ] = seq
        self._reserved = 0
        occupancy = min(seq - int(q[_READ_SEQ]), 1 if self._latest else self._slots)
        if occupancy > q[_PEAK]:
            q[_PEAK] = occupancy
        self._ring_bell()
        return seq

    def _copy_any(self, src: memoryview, off: int, n: int) -> None:
        if src.c_contiguous:
            try:
                self._mem[off : off + n] = src.cast("B")
                return
            except TypeError:
                pass  # a format memoryview cannot cast (e.g. a numpy record): let numpy copy
        import numpy as np  # only for non-contiguous or exotic sources

        arr = np.asarray(src)
        dst: np.ndarray[Any, Any] = np.ndarray(
            arr.shape, dtype=arr.dtype, buffer=self._mem, offset=off
        )
        np.copyto(dst, arr)

    def _ring_bell(self) -> None:
        # A full FIFO means the reader has plenty of wake-ups pending already.
        with contextlib.suppress(BlockingIOError):
            os.write(self._bell, _BELL)

    # ------------------------------------------------------------------ reader

    def recv(self, timeout: float | None = None) -> Item:
        """Take an item, copied into a new ``bytes`` object.

        LATEST: the newest complete item. QUEUE: the oldest unread one.
        Blocks up to ``timeout`` seconds (None: forever, 0: not at all);
        :class:`WouldBlock` when nothing arrived in time,
        :class:`ClosedResourceError` if this end is closed,
        :class:`BrokenResourceError` if the ring is broken or vanished.
        """
        return self._recv(None, timeout)

    def recv_into(self, buffer: BufferLike, timeout: float | None = None) -> Item:
        """Like :meth:`recv`, but copy the payload into ``buffer`` (no allocation).

        ``buffer`` is any writable C-contiguous buffer (bytearray, numpy
        array, ...). ``Item.data`` is a byte view of its first ``length``
        bytes. :class:`ValueError` (and the item stays unread) if the item is
        larger than ``buffer``.
        """
        dst = memoryview(buffer)  # type: ignore[arg-type,unused-ignore]
        if dst.readonly or not dst.c_contiguous:
            raise ValueError("recv_into needs a writable C-contiguous buffer")
        if dst.format != "B" or dst.ndim != 1:
            dst = dst.cast("B")
        return self._recv(dst, timeout)

    def recv_view(self, timeout: float | None = None) -> Item:
        """Zero-copy :meth:`recv`: ``Item.data`` is a read-only view of the slot itself.

        The slot was complete when this returned, but the writer reuses it
        ``slots`` items later (LATEST: after ``slots - 1`` newer sends; QUEUE:
        when the ring is full). So: use the data, *then* call
        :meth:`valid`; if it returns False the writer overwrote the slot while
        you were using it and whatever you computed from it must be discarded.
        Copy out (or use :meth:`recv_into`) for anything slower than a
        fraction of ``slots`` frame intervals. The view keeps the mapping
        alive even after :meth:`close`; release it when done.
        """
        return self._recv(None, timeout, view=True)

    def valid(self, item: Item) -> bool:
        """True if ``item``'s slot still holds ``item`` (see :meth:`recv_view`)."""
        q = self._live()
        slot = (item.seq - 1) % self._slots
        return bool(q[(_TABLE_OFF + slot * _SLOT_ENTRY) // 8] == 2 * item.seq)

    def _recv(self, dst: memoryview | None, timeout: float | None, view: bool = False) -> Item:
        q = self._live()
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            if q[_FLAGS] & _FLAG_BROKEN:
                raise BrokenResourceError(f"ring {self._name!r} is broken")
            self._drain()
            item = self._take(q, dst, view)
            if item is not None:
                if q[_WRITE_SEQ] > q[_READ_SEQ]:
                    self._ring_bell()  # keep fileno() readable while items remain
                return item
            if timeout is not None and timeout <= 0:
                raise WouldBlock(f"ring {self._name!r} is empty")
            self._wait(deadline)
            q = self._live()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._bell, _DRAIN)

    def _wait(self, deadline: float | None) -> None:
        if deadline is None:
            slice_s = _WAIT_SLICE_S
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WouldBlock(f"ring {self._name!r}: nothing arrived in time")
            slice_s = min(remaining, _WAIT_SLICE_S)
        events = self._poll.poll(slice_s * 1000.0)
        seg = self._seg
        if seg is None:
            raise ClosedResourceError(f"ring {self._name!r} is closed")
        if not events and seg.vanished():
            raise BrokenResourceError(f"ring {self._name!r}: the segment was removed")

    def _take(self, q: memoryview, dst: memoryview | None, view: bool) -> Item | None:
        """One non-blocking attempt; commits the reader's counters. None if nothing to take."""
        r = int(q[_READ_SEQ])
        start_r = r
        slots = self._slots
        while True:
            w = int(q[_WRITE_SEQ])
            if w <= r:
                if r != start_r:  # we discovered drops but found nothing to take
                    self._commit(q, r, r - start_r, taken=False)
                return None
            s = w if self._latest else max(r + 1, w - slots + 1)
            slot = (s - 1) % slots
            t = (_TABLE_OFF + slot * _SLOT_ENTRY) // 8
            version = 2 * s
            if q[t] != version:
                # The writer has already started reusing this slot.
                self.retries += 1
                if not self._latest:
                    r = s  # QUEUE: item s is lost (dropped); try the next one
                continue
            n = int(q[t + 3])
            ts_ns = int(self._i[t + 1])
            meta = int(self._i[t + 2])
            off = self._payload_off + slot * self._stride
            if n > self._slot_size:  # only possible while torn; the re-check catches it
                n = 0
            data: memoryview | bytes
            if view:
                data = self._mem[off : off + n].toreadonly()
            elif dst is None:
                data = bytes(self._mem[off : off + n])
            elif n <= dst.nbytes:
                data = dst[:n]
                data[:] = self._mem[off : off + n]
            elif q[t] == version:
                raise ValueError(
                    f"ring {self._name!r}: item of {n} bytes does not fit a buffer of "
                    f"{dst.nbytes} bytes"
                )
            if q[t] != version:  # torn: the writer lapped us during the copy
                self.retries += 1
                if not self._latest:
                    r = s
                continue
            self._commit(q, s, s - start_r - 1, taken=True)
            return Item(seq=s, ts_ns=ts_ns, data=data, meta=meta)

    def _commit(self, q: memoryview, new_r: int, lost: int, *, taken: bool) -> None:
        version = int(q[_RVER])
        odd = version + 1 + (version & 1)
        q[_RVER] = odd
        if lost:
            index = _SKIPPED if self._latest else _DROPPED
            q[index] = q[index] + lost
        if taken:
            q[_READ_COUNT] = q[_READ_COUNT] + 1
        q[_READ_SEQ] = new_r
        q[_RVER] = odd + 1

    # ------------------------------------------------------------------ both

    def statistics(self) -> RingStats:
        """A consistent snapshot of the ring's counters (shared by both ends)."""
        q = self._live()
        for _ in range(10_000):
            v1 = int(q[_RVER])
            if v1 & 1:
                time.sleep(0)
                continue
            r = int(q[_READ_SEQ])
            read = int(q[_READ_COUNT])
            skipped = int(q[_SKIPPED])
            dropped = int(q[_DROPPED])
            if int(q[_RVER]) == v1:
                break
        else:  # a reader died mid-commit; its successor will repair the counter
            r, read, skipped, dropped = (
                int(q[k]) for k in (_READ_SEQ, _READ_COUNT, _SKIPPED, _DROPPED)
            )
        w = int(q[_WRITE_SEQ])
        pending = max(0, w - r)
        if self._latest:
            occupancy = min(pending, 1)
            skipped += pending - occupancy
        else:
            occupancy = min(pending, self._slots)
            dropped += pending - occupancy
        return RingStats(
            written=w,
            read=read,
            skipped=skipped,
            dropped=dropped,
            peak_occupancy=int(q[_PEAK]),
            occupancy=occupancy,
            slots=self._slots,
        )

    def _live(self) -> memoryview:
        if self._seg is None:
            raise ClosedResourceError(f"ring {self._name!r} is closed")
        return self._q
