"""Named shared-memory segments: naming, creation, attaching, and sweeping stale ones.

A segment is a file in ``/dev/shm`` (on Linux that is exactly what
``shm_open(3)`` uses, so the names interoperate with every POSIX tool). This
module opens those files with :func:`os.open` and maps them with
:mod:`mmap` itself instead of going through
:class:`multiprocessing.shared_memory.SharedMemory`: on Python 3.11 every
``SharedMemory(name)`` registers the segment with the process's
``multiprocessing.resource_tracker``, which unlinks it when that process
exits (cpython#82300), so a stage that merely attached would destroy the
supervisor's ring. Nothing here talks to the resource tracker at all, in the
creating process or an attaching one; the supervisor unlinks explicitly, and
:func:`sweep_stale` cleans up after a supervisor that could not.

Names
    ``<prefix>-<run_id>-<ring>`` (:func:`segment_name`), prefix ``posewire``
    by default. The name is all a stage needs (plus the run directory for
    the ring's doorbell).

Liveness (who may sweep what)
    Page 0 of every segment is a *preamble* written by :meth:`Segment.create`:
    a magic, the creator's pid, the creator's start time (field 22 of
    ``/proc/<pid>/stat``, clock ticks since boot) and the paths of companion
    files (a ring's doorbell FIFO). The creator is the supervisor, so the
    supervisor of a run is alive iff ``/proc/<pid>/stat`` exists, is not a
    zombie, and shows the same start time (the start time defeats pid reuse).
    :func:`sweep_stale` removes the segments (and their companion files) whose
    creator is dead. This needs neither a particular run-id format nor a lock
    file, and it works from the segment alone. Assumptions: the sweeper and
    the creator share a pid namespace (true for one host without containers
    sharing ``/dev/shm``), and ``/proc`` is not mounted with ``hidepid`` for
    the same user. A file with the prefix whose preamble is not (yet) valid
    is a segment caught between ``open`` and the end of :meth:`Segment.create`;
    it is swept only when it is older than :data:`UNINITIALISED_GRACE_S`.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BrokenResourceError, RingError

SHM_DIR = Path("/dev/shm")
DEFAULT_PREFIX = "posewire"
PAGE = mmap.PAGESIZE
PREAMBLE_SIZE = 4096
"""Bytes at the start of every segment reserved for the preamble (one page)."""
UNINITIALISED_GRACE_S = 60.0
"""A prefixed file without a valid preamble is swept only when older than this."""

_SEG_MAGIC = b"posewSEG"
_SEG_VERSION = 1
# magic(8s) version(Q) pid(Q) start_time(Q) created_ns(Q) blob_len(Q), then the blob.
_PREAMBLE = struct.Struct("<8sQQQQQ")
_BLOB_MAX = PREAMBLE_SIZE - _PREAMBLE.size
_MAX_NAME = 200  # NAME_MAX is 255; leave room for companion suffixes such as ".bell"
_PART = re.compile(r"[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*")
_RING_PART = re.compile(r"[A-Za-z0-9_.]+")
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")


def segment_name(run_id: str, ring: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """The segment name of ring ``ring`` of run ``run_id``: ``<prefix>-<run_id>-<ring>``.

    ``run_id`` may contain dashes; ``ring`` and ``prefix`` may not contain any
    (so the ring name is always the text after the last dash). Allowed
    characters are ASCII letters, digits, ``_`` and ``.``.
    """
    if not _PART.fullmatch(prefix) or "-" in prefix:
        raise ValueError(f"invalid segment prefix {prefix!r}: use letters, digits, '_' or '.'")
    if not _PART.fullmatch(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '_', '.' and inner '-'")
    if not _RING_PART.fullmatch(ring):
        raise ValueError(f"invalid ring name {ring!r}: use letters, digits, '_' or '.'")
    name = f"{prefix}-{run_id}-{ring}"
    check_name(name)
    return name


def check_name(name: str) -> None:
    """Raise :class:`ValueError` unless ``name`` is a usable segment name."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid segment name {name!r}: use letters, digits, '_', '.', '-'")
    if len(name) > _MAX_NAME:
        raise ValueError(f"segment name {name!r} is longer than {_MAX_NAME} characters")


def segment_path(name: str) -> Path:
    """The file behind segment ``name``."""
    check_name(name)
    return SHM_DIR / name


def process_start_time(pid: int) -> int | None:
    """Start time of live process ``pid`` in clock ticks since boot; None if gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])  # field 22


def owner_alive(pid: int, start_time: int) -> bool:
    """True if process ``pid`` is alive and is the one that started at ``start_time``."""
    return pid > 0 and process_start_time(pid) == start_time


@dataclass(frozen=True)
class SegmentOwner:
    """The preamble of a segment: who created it and which files belong to it."""

    pid: int
    """Pid of the creating process (the supervisor)."""
    start_time: int
    """Start time of the creator, clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    created_ns: int
    """Wall-clock creation time, ``time.time_ns()``."""
    companions: tuple[str, ...]
    """Absolute paths of files that live and die with the segment (e.g. a doorbell FIFO)."""

    def alive(self) -> bool:
        """Whether the creator is still running."""
        return owner_alive(self.pid, self.start_time)


def _parse_preamble(raw: bytes) -> SegmentOwner | None:
    if len(raw) < _PREAMBLE.size:
        return None
    magic, version, pid, start, created, blob_len = _PREAMBLE.unpack_from(raw, 0)
    if magic != _SEG_MAGIC or version != _SEG_VERSION or blob_len > _BLOB_MAX:
        return None
    blob = raw[_PREAMBLE.size : _PREAMBLE.size + blob_len]
    companions = tuple(p.decode("utf-8", "surrogateescape") for p in blob.split(b"\0") if p)
    return SegmentOwner(pid, start, created, companions)


def read_owner(name: str) -> SegmentOwner | None:
    """The preamble of segment ``name``; None if it has no valid one yet.

    Raises :class:`FileNotFoundError` if there is no such segment.
    """
    fd = os.open(segment_path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _parse_preamble(os.pread(fd, PREAMBLE_SIZE, 0))
    finally:
        os.close(fd)


class Segment:
    """One mapped segment. The whole file is mapped shared, read-write, pre-faulted."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.size = size
        self._fd = fd
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._map: mmap.mmap | None = mmap.mmap(
            fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.buf: memoryview = memoryview(self._map)
        """The whole mapping, format ``B``. Views derived from it must be released before
        :meth:`close`."""

    @classmethod
    def create(cls, name: str, size: int, *, companions: tuple[str, ...] = ()) -> Segment:
        """Create segment ``name`` of ``size`` bytes (at least :data:`PREAMBLE_SIZE`).

        The file is allocated up front with ``posix_fallocate`` (a full
        ``/dev/shm`` is an error here, not a SIGBUS later), mapped with
        ``MAP_POPULATE``, and every page is written once, so the first real
        write into a slot does not pay page faults. The preamble records the
        calling process as the owner.
        """
        if size < PREAMBLE_SIZE:
            raise ValueError(f"segment size {size} is smaller than the preamble")
        blob = b"\0".join(os.fsencode(c) for c in companions)
        if len(blob) > _BLOB_MAX:
            raise ValueError("companion paths do not fit in the segment preamble")
        path = segment_path(name)
        try:
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except FileExistsError as exc:
            raise RingError(f"shared-memory segment {name!r} already exists") from exc
        except OSError as exc:
            raise RingError(f"cannot create shared-memory segment {name!r}: {exc}") from exc
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise RingError(
                        f"cannot allocate {size} bytes for segment {name!r} in {SHM_DIR}: "
                        f"{exc.strerror}"
                    ) from exc
                os.ftruncate(fd, size)
            seg = cls(name, fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        buf = seg.buf
        buf[PAGE - 1 :: PAGE] = bytes(len(range(PAGE - 1, size, PAGE)))  # touch every page
        me = os.getpid()
        start = process_start_time(me) or 0
        buf[_PREAMBLE.size : _PREAMBLE.size + len(blob)] = blob
        _PREAMBLE.pack_into(buf, 0, b"\0" * 8, _SEG_VERSION, me, start, time.time_ns(), len(blob))
        buf[0:8] = _SEG_MAGIC  # last: the preamble is valid from here on
        return seg

    @classmethod
    def open(cls, name: str) -> Segment:
        """Map existing segment ``name``. :class:`BrokenResourceError` if it does not exist."""
        path = segment_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise BrokenResourceError(f"no shared-memory segment {name!r}") from exc
        except OSError as exc:
            raise RingError(f"cannot open shared-memory segment {name!r}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if size < PREAMBLE_SIZE:
                raise RingError(f"shared-memory segment {name!r} is not initialised")
            seg = cls(name, fd, size)
        except BaseException:
            os.close(fd)
            raise
        if _parse_preamble(bytes(seg.buf[:PREAMBLE_SIZE])) is None:
            seg.close()
            raise RingError(f"shared-memory segment {name!r} is not a posewire segment")
        return seg

    def owner(self) -> SegmentOwner | None:
        """This segment's preamble."""
        return _parse_preamble(bytes(self.buf[:PREAMBLE_SIZE]))

    def vanished(self) -> bool:
        """True once the segment's name has been unlinked (our mapping stays valid)."""
        return os.fstat(self._fd).st_nlink == 0

    def close(self) -> None:
        """Unmap and close. Idempotent. Derived views of :attr:`buf` must be released first."""
        if self._map is None:
            return
        self.buf.release()
        # If someone still holds a view (Ring.recv_view), leave the mapping to the
        # garbage collector: it is unmapped when the last view is released.
        with contextlib.suppress(BufferError):
            self._map.close()
        self._map = None
        os.close(self._fd)


def unlink_segment(name: str) -> bool:
    """Remove segment ``name`` and its companion files; False if it did not exist."""
    path = segment_path(name)
    try:
        owner = read_owner(name)
    except FileNotFoundError:
        return False
    if owner is not None:
        _remove_companions(name, owner.companions)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _remove_companions(name: str, companions: tuple[str, ...]) -> None:
    for companion in companions:
        p = Path(companion)
        # Only files named after the segment, and only FIFOs or regular files: the
        # preamble is data, never a licence to delete arbitrary paths.
        if not p.name.startswith(name):
            continue
        try:
            mode = os.lstat(p).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISFIFO(mode) or stat.S_ISREG(mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def sweep_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove the segments named ``<prefix>-...`` whose creating supervisor is dead.

    Also removes their companion files (doorbell FIFOs in the run directory).
    Segments of live runs, and other users' segments, are left alone. Returns
    the names of the removed segments, sorted.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix + "-"):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError):
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: not ours
                continue
            raise
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
                continue
            owner = _parse_preamble(os.pread(fd, PREAMBLE_SIZE, 0))
        finally:
            os.close(fd)
        if owner is None:
            if now - st.st_mtime < UNINITIALISED_GRACE_S:
                continue
        elif owner.alive():
            continue
        else:
            _remove_companions(name, owner.companions)
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(name)
    return sorted(removed)
