"""Shared-memory ring: real /dev/shm segments, real spawn processes, no mocks, no timing asserts."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import select
import signal
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import BrokenResourceError, ClosedResourceError, RingError, WouldBlock
from pipeline.runtime.ring import Item, Ring, RingMode, RingStats, segment_name, sweep_stale
from pipeline.runtime.shm import SHM_DIR, read_owner, segment_path

SPAWN = mp.get_context("spawn")
END = -1


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def run_id() -> Iterator[str]:
    """A fresh run id; after the test no segment of this run may remain in /dev/shm."""
    rid = f"t{os.getpid()}x{uuid.uuid4().hex[:8]}"
    yield rid
    left = sorted(p.name for p in SHM_DIR.iterdir() if rid in p.name)
    for name in left:  # clean up so that one failure does not leak, then fail
        (SHM_DIR / name).unlink(missing_ok=True)
    assert left == [], f"segments left in /dev/shm: {left}"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


def _create(
    run_id: str, run_dir: Path, mode: RingMode, *, slots: int = 4, slot_size: int = 64
) -> Ring:
    return Ring.create(
        segment_name(run_id, "r"), slot_size=slot_size, slots=slots, mode=mode, run_dir=run_dir
    )


def _check_invariant(st: RingStats) -> None:
    assert st.written == st.read + st.skipped + st.dropped + st.occupancy, st


def _join(proc: Any, timeout: float = 60.0) -> int:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("child process did not finish")
    code: int = proc.exitcode
    return code


# --------------------------------------------------------------------------- child processes


def _child_attach_send_exit(name: str, run_dir: str, how: str) -> None:
    ring = Ring.attach(name, run_dir=Path(run_dir))
    ring.send(b"from the child", meta=7)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    ring.close()


def _child_reader(name: str, run_dir: str, count: int, conn: Connection) -> None:
    ring = Ring.attach(name, run_dir=Path(run_dir))
    got = []
    for _ in range(count):
        item = ring.recv(timeout=10)
        got.append((item.seq, bytes(item.data)))
    conn.send(got)
    ring.close()


def _child_blocked_reader(name: str, run_dir: str, conn: Connection) -> None:
    ring = Ring.attach(name, run_dir=Path(run_dir))
    conn.send("attached")
    ring.recv()  # blocks until killed


def _child_writer(name: str, run_dir: str, payloads: list[bytes]) -> None:
    ring = Ring.attach(name, run_dir=Path(run_dir))
    for p in payloads:
        ring.send(p)
    ring.close()


def _child_reserve_and_die(name: str, run_dir: str) -> None:
    """A writer that dies between reserve() and commit()."""
    ring = Ring.attach(name, run_dir=Path(run_dir))
    view = ring.reserve()
    view[:4] = b"half"
    os.kill(os.getpid(), signal.SIGKILL)


def _child_create_and_die(name: str, run_dir: str) -> None:
    """A 'supervisor' that creates a ring and dies without unlinking it."""
    Ring.create(name, slot_size=64, slots=2, mode=RingMode.QUEUE, run_dir=Path(run_dir))
    os._exit(0)


def _hammer_writer(name: str, run_dir: str, seconds: float, conn: Connection) -> None:
    ring = Ring.attach(name, run_dir=Path(run_dir))
    rng = random.Random(20261122)
    pool = []
    for _ in range(64):
        body = rng.randbytes(rng.randrange(1, ring.slot_size - 4))
        pool.append(body + struct.pack("<I", zlib.crc32(body)))
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ring.send(pool[sent % len(pool)], ts_ns=time.monotonic_ns(), meta=sent)
        sent += 1
    ring.send(b"", meta=END)
    conn.send(sent)
    ring.close()


# --------------------------------------------------------------------------- naming


def test_segment_names_carry_prefix_and_run_id(run_id: str, run_dir: Path) -> None:
    name = segment_name(run_id, "frames")
    assert name == f"posewire-{run_id}-frames"
    assert segment_name("20261122-ab", "poses", prefix="other") == "other-20261122-ab-poses"
    for bad in [("", "x"), ("a/b", "x"), ("a", "x-y"), ("a", ""), ("-a", "x"), ("a b", "x")]:
        with pytest.raises(ValueError):
            segment_name(*bad)
    ring = Ring.create(name, slot_size=16, slots=2, mode=RingMode.QUEUE, run_dir=run_dir)
    try:
        assert segment_path(name).exists()
        assert segment_path(name).name.startswith("posewire-")
        assert (run_dir / f"{name}.bell").exists()
        owner = read_owner(name)
        assert owner is not None and owner.pid == os.getpid() and owner.alive()
    finally:
        ring.unlink()
        ring.close()
    assert not segment_path(name).exists()
    assert not (run_dir / f"{name}.bell").exists()


def test_create_allocates_every_slot(run_id: str, run_dir: Path) -> None:
    ring = _create(run_id, run_dir, RingMode.LATEST, slots=3, slot_size=1280 * 720 * 3)
    try:
        st = os.stat(segment_path(ring.name))
        assert st.st_blocks * 512 >= st.st_size >= 3 * 1280 * 720 * 3
    finally:
        ring.unlink()
        ring.close()


# --------------------------------------------------------------------------- basic use


@pytest.mark.parametrize("mode", list(RingMode))
def test_create_attach_send_recv(run_id: str, run_dir: Path, mode: RingMode) -> None:
    sup = _create(run_id, run_dir, mode, slots=8, slot_size=1024)
    writer = Ring.attach(sup.name, run_dir=run_dir)
    reader = Ring.attach(sup.name, run_dir=run_dir)
    try:
        assert (reader.name, reader.slot_size, reader.slots, reader.mode) == (
            sup.name,
            1024,
            8,
            mode,
        )
        arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
        for data in (b"abc", bytearray(b"defg"), memoryview(b"hij"), arr, arr[:, ::2]):
            seq = writer.send(data, ts_ns=123_456_789, meta=-5)
            item = reader.recv(timeout=1)
            assert isinstance(item, Item)
            assert item.seq == seq
            assert (item.ts_ns, item.meta) == (123_456_789, -5)
            assert bytes(item.data) == np.ascontiguousarray(data).tobytes()
        floats = np.linspace(0, 1, 10, dtype=np.float32)
        writer.send(floats)
        buf = np.zeros(10, dtype=np.float32)
        item = reader.recv_into(buf, timeout=1)
        assert item.seq == 6 and np.array_equal(buf, floats) and len(item.data) == 40
        writer.send(b"view me", meta=2**63 - 1)
        view = reader.recv_view(timeout=1)
        assert bytes(view.data) == b"view me" and view.meta == 2**63 - 1
        assert reader.valid(view)
        del view
        with pytest.raises(WouldBlock):
            reader.recv(timeout=0)
        with pytest.raises(WouldBlock):
            reader.recv(timeout=0.05)
        with pytest.raises(ValueError):
            writer.send(bytes(1025))
        st = sup.statistics()
        assert (st.written, st.read, st.skipped, st.dropped, st.occupancy) == (7, 7, 0, 0, 0)
        _check_invariant(st)
    finally:
        for r in (reader, writer):
            r.close()
        sup.unlink()
        sup.close()


@pytest.mark.parametrize("mode", list(RingMode))
def test_reserve_commit_zero_copy_send(run_id: str, run_dir: Path, mode: RingMode) -> None:
    sup = _create(run_id, run_dir, mode, slots=3, slot_size=4 * 6)
    reader = Ring.attach(sup.name, run_dir=run_dir)
    try:
        with pytest.raises(RingError):
            sup.commit(4)
        view = sup.reserve()
        assert len(view) == sup.slot_size and not view.readonly
        frame = np.frombuffer(view, dtype=np.uint8).reshape(4, 6)
        frame[:] = np.arange(24, dtype=np.uint8).reshape(4, 6)
        with pytest.raises(WouldBlock):
            reader.recv(timeout=0)  # reserved, not committed: invisible
        with pytest.raises(ValueError):
            sup.commit(sup.slot_size + 1)
        assert sup.reserve() == view  # same slot again until committed
        seq = sup.commit(24, ts_ns=5, meta=6)
        del frame, view
        item = reader.recv(timeout=0)
        assert (item.seq, item.ts_ns, item.meta) == (seq, 5, 6)
        assert bytes(item.data) == bytes(range(24))
        with pytest.raises(RingError):
            sup.commit(1)  # one reserve, one commit
        # A writer that dies between reserve and commit costs nothing but its item.
        proc = SPAWN.Process(target=_child_reserve_and_die, args=(sup.name, str(run_dir)))
        proc.start()
        assert _join(proc) == -signal.SIGKILL
        with pytest.raises(WouldBlock):
            reader.recv(timeout=0)
        assert sup.send(b"next") == seq + 1
        assert bytes(reader.recv(timeout=0).data) == b"next"
        _check_invariant(sup.statistics())
    finally:
        reader.close()
        sup.unlink()
        sup.close()


def test_recv_into_too_small_leaves_item_unread(run_id: str, run_dir: Path) -> None:
    ring = _create(run_id, run_dir, RingMode.QUEUE)
    try:
        ring.send(b"0123456789")
        with pytest.raises(ValueError):
            ring.recv_into(bytearray(4), timeout=0)
        with pytest.raises(ValueError):
            ring.recv_into(b"read-only buffer", timeout=0)
        assert bytes(ring.recv(timeout=0).data) == b"0123456789"
    finally:
        ring.unlink()
        ring.close()


def test_latest_skip_accounting(run_id: str, run_dir: Path) -> None:
    ring = _create(run_id, run_dir, RingMode.LATEST, slots=3)
    try:
        for i in range(10):
            ring.send(bytes([i]))
        st = ring.statistics()
        assert (st.written, st.read, st.skipped, st.occupancy, st.dropped) == (10, 0, 9, 1, 0)
        item = ring.recv(timeout=0)
        assert (item.seq, bytes(item.data)) == (10, b"\x09")
        st = ring.statistics()
        assert (st.written, st.read, st.skipped, st.occupancy) == (10, 1, 9, 0)
        ring.send(b"a")
        ring.send(b"b")
        item = ring.recv(timeout=0)
        assert (item.seq, bytes(item.data)) == (12, b"b")
        st = ring.statistics()
        assert (st.read, st.skipped) == (2, 10)
        assert st.skipped == st.written - st.read  # every older unread item was skipped
        assert st.peak_occupancy == 1
        _check_invariant(st)
    finally:
        ring.unlink()
        ring.close()


def test_queue_drop_oldest_accounting(run_id: str, run_dir: Path) -> None:
    ring = _create(run_id, run_dir, RingMode.QUEUE, slots=4)
    try:
        for i in range(10):
            ring.send(bytes([i]))
        st = ring.statistics()
        assert (st.written, st.read, st.dropped, st.occupancy, st.skipped) == (10, 0, 6, 4, 0)
        assert st.peak_occupancy == 4
        _check_invariant(st)
        got = [ring.recv(timeout=0) for _ in range(4)]
        assert [i.seq for i in got] == [7, 8, 9, 10]
        assert [bytes(i.data) for i in got] == [b"\x06", b"\x07", b"\x08", b"\x09"]
        with pytest.raises(WouldBlock):
            ring.recv(timeout=0)
        st = ring.statistics()
        assert (st.written, st.read, st.dropped, st.occupancy, st.slots) == (10, 4, 6, 0, 4)
        _check_invariant(st)
    finally:
        ring.unlink()
        ring.close()


def test_statistics_peak_and_shared_view(run_id: str, run_dir: Path) -> None:
    sup = _create(run_id, run_dir, RingMode.QUEUE, slots=8)
    other = Ring.attach(sup.name, run_dir=run_dir)
    try:
        for _ in range(3):
            sup.send(b"x")
        other.recv(timeout=0)
        sup.send(b"y")
        st, st2 = sup.statistics(), other.statistics()
        assert st == st2
        assert (st.written, st.read, st.occupancy, st.peak_occupancy, st.slots) == (4, 1, 3, 3, 8)
        _check_invariant(st)
    finally:
        other.close()
        sup.unlink()
        sup.close()


def test_fileno_is_a_level_triggered_doorbell(run_id: str, run_dir: Path) -> None:
    sup = _create(run_id, run_dir, RingMode.QUEUE)
    reader = Ring.attach(sup.name, run_dir=run_dir)
    try:

        def readable() -> bool:
            return bool(select.select([reader.fileno()], [], [], 0)[0])

        assert not readable()
        sup.send(b"1")
        sup.send(b"2")
        assert readable()
        reader.recv(timeout=0)
        assert readable()  # one item is still waiting
        reader.recv(timeout=0)
        assert not readable()
    finally:
        reader.close()
        sup.unlink()
        sup.close()


# --------------------------------------------------------------------------- processes


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_attaching_process_that_exits_does_not_destroy_segment(
    run_id: str, run_dir: Path, how: str
) -> None:
    sup = _create(run_id, run_dir, RingMode.QUEUE)
    try:
        proc = SPAWN.Process(target=_child_attach_send_exit, args=(sup.name, str(run_dir), how))
        proc.start()
        code = _join(proc)
        assert code == (-signal.SIGKILL if how == "kill" else 0)
        time.sleep(0.3)  # a resource tracker would unlink right after the child's exit
        assert segment_path(sup.name).exists()
        again = Ring.attach(sup.name, run_dir=run_dir)
        item = again.recv(timeout=0)
        assert (bytes(item.data), item.meta) == (b"from the child", 7)
        again.close()
    finally:
        sup.unlink()
        sup.close()


def test_restarted_reader_and_writer_resume_from_the_ring(run_id: str, run_dir: Path) -> None:
    sup = _create(run_id, run_dir, RingMode.QUEUE, slots=16)
    name, rd = sup.name, str(run_dir)
    try:
        for i in range(5):
            sup.send(f"item{i + 1}".encode())
        # First reader takes two items and exits.
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=_child_reader, args=(name, rd, 2, child))
        proc.start()
        assert parent.recv() == [(1, b"item1"), (2, b"item2")]
        assert _join(proc) == 0
        # A restarted writer continues the sequence.
        proc = SPAWN.Process(target=_child_writer, args=(name, rd, [b"item6", b"item7"]))
        proc.start()
        assert _join(proc) == 0
        # The restarted reader resumes where the ring was.
        proc = SPAWN.Process(target=_child_reader, args=(name, rd, 5, child))
        proc.start()
        got = parent.recv()
        assert _join(proc) == 0
        assert got == [(s, f"item{s}".encode()) for s in range(3, 8)]
        st = sup.statistics()
        assert (st.written, st.read, st.occupancy) == (7, 7, 0)
        _check_invariant(st)
    finally:
        sup.unlink()
        sup.close()


def test_blocked_reader_process_killed_then_replaced(run_id: str, run_dir: Path) -> None:
    sup = _create(run_id, run_dir, RingMode.LATEST)
    try:
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=_child_blocked_reader, args=(sup.name, str(run_dir), child))
        proc.start()
        assert parent.recv() == "attached"
        os.kill(proc.pid or 0, signal.SIGKILL)
        _join(proc)
        sup.send(b"after the crash")
        proc = SPAWN.Process(target=_child_reader, args=(sup.name, str(run_dir), 1, child))
        proc.start()
        assert parent.recv() == [(1, b"after the crash")]
        assert _join(proc) == 0
    finally:
        sup.unlink()
        sup.close()


@pytest.mark.parametrize(("mode", "seconds"), [(RingMode.LATEST, 3.0), (RingMode.QUEUE, 2.0)])
def test_two_processes_hammering_never_tear(
    run_id: str, run_dir: Path, mode: RingMode, seconds: float
) -> None:
    """Writer flat out in a child, reader here; every payload carries its crc32."""
    sup = _create(run_id, run_dir, mode, slots=2, slot_size=65536)
    reader = Ring.attach(sup.name, run_dir=run_dir)
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_hammer_writer, args=(sup.name, str(run_dir), seconds, child))
    proc.start()
    buf = bytearray(65536)
    mismatches = checked = invalid_views = 0
    last_seq = 0
    returned = 0
    try:
        while True:
            how = returned % 3
            if how == 0:
                item = reader.recv(timeout=30)
                data = bytes(item.data)
            elif how == 1:
                item = reader.recv_into(buf, timeout=30)
                data = bytes(item.data)
            else:
                item = reader.recv_view(timeout=30)
                data = bytes(item.data)
                if not reader.valid(item):
                    invalid_views += 1  # overwritten while we used it: discarded, as documented
                    data = b""
            returned += 1
            assert item.seq > last_seq
            last_seq = item.seq
            if item.meta == END:
                break
            if not data:
                continue
            checked += 1
            body, crc = data[:-4], data[-4:]
            if struct.pack("<I", zlib.crc32(body)) != crc:
                mismatches += 1
        sent = parent.recv()
        assert _join(proc) == 0
        st = sup.statistics()
    finally:
        if proc.is_alive():
            proc.kill()
        reader.close()
        sup.unlink()
        sup.close()
    print(
        f"{mode.value}: sent {sent}, checked {checked}, torn copies retried {reader.retries}, "
        f"views invalidated {invalid_views}"
    )
    assert mismatches == 0
    assert checked > 0
    assert st.written == sent + 1 and st.read == returned and st.occupancy == 0
    assert (st.dropped if mode is RingMode.LATEST else st.skipped) == 0
    _check_invariant(st)


# --------------------------------------------------------------------------- closed vs broken


def test_closed_end_raises_closed(run_id: str, run_dir: Path) -> None:
    sup = _create(run_id, run_dir, RingMode.QUEUE)
    reader = Ring.attach(sup.name, run_dir=run_dir)
    try:
        sup.send(b"x")
        reader.close()
        reader.close()  # idempotent
        assert reader.closed
        for op in (
            lambda: reader.recv(timeout=0),
            lambda: reader.recv_into(bytearray(8), timeout=0),
            lambda: reader.recv_view(timeout=0),
            lambda: reader.send(b"y"),
            reader.fileno,
            reader.statistics,
        ):
            with pytest.raises(ClosedResourceError):
                op()
        # The other end is unaffected, and the item is still there.
        assert bytes(sup.recv(timeout=0).data) == b"x"
    finally:
        sup.unlink()
        sup.close()


def test_unlinked_ring_is_broken_for_attached_ends(run_id: str, run_dir: Path) -> None:
    sup = _create(run_id, run_dir, RingMode.LATEST)
    reader = Ring.attach(sup.name, run_dir=run_dir)
    writer = Ring.attach(sup.name, run_dir=run_dir)
    errors: list[BaseException] = []

    def blocked_recv() -> None:
        try:
            reader.recv()  # no timeout: only the doorbell of unlink() can end this
        except BrokenResourceError as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked_recv)
    t.start()
    try:
        time.sleep(0.2)
        sup.unlink()
        t.join(10)
        assert not t.is_alive()
        assert len(errors) == 1
        with pytest.raises(BrokenResourceError):
            writer.send(b"x")
        with pytest.raises(BrokenResourceError):
            reader.recv(timeout=0)
        with pytest.raises(BrokenResourceError):
            Ring.attach(sup.name, run_dir=run_dir)
        assert isinstance(errors[0], RingError)
        assert not isinstance(errors[0], ClosedResourceError)
    finally:
        for r in (reader, writer, sup):
            r.close()
        sup.unlink()  # idempotent, also after close


def test_vanished_segment_is_broken(run_id: str, run_dir: Path) -> None:
    sup = _create(run_id, run_dir, RingMode.QUEUE)
    reader = Ring.attach(sup.name, run_dir=run_dir)
    try:
        os.unlink(segment_path(sup.name))  # e.g. swept by someone else, no broken mark
        with pytest.raises(BrokenResourceError):
            reader.recv(timeout=5)
    finally:
        reader.close()
        sup.unlink()
        sup.close()


def test_mark_broken(run_id: str, run_dir: Path) -> None:
    sup = _create(run_id, run_dir, RingMode.QUEUE)
    reader = Ring.attach(sup.name, run_dir=run_dir)
    try:
        sup.mark_broken()
        with pytest.raises(BrokenResourceError):
            reader.recv(timeout=0)
        with pytest.raises(BrokenResourceError):
            sup.send(b"x")
    finally:
        reader.close()
        sup.unlink()
        sup.close()


def test_bad_input_gives_precise_errors(run_id: str, run_dir: Path) -> None:
    name = segment_name(run_id, "r")
    with pytest.raises(BrokenResourceError):
        Ring.attach(name, run_dir=run_dir)
    for kwargs in ({"slots": 1}, {"slots": 0}, {"slot_size": 0}, {"slot_size": -1}):
        args: dict[str, Any] = {"slot_size": 16, "slots": 2, **kwargs}
        with pytest.raises(ValueError):
            Ring.create(name, mode=RingMode.QUEUE, run_dir=run_dir, **args)
    with pytest.raises(RingError):
        Ring.create(name, slot_size=16, slots=2, mode=RingMode.QUEUE, run_dir=run_dir / "nope")
    assert not segment_path(name).exists()
    ring = Ring.create(name, slot_size=16, slots=2, mode=RingMode.QUEUE, run_dir=run_dir)
    try:
        with pytest.raises(RingError):
            Ring.create(name, slot_size=16, slots=2, mode=RingMode.QUEUE, run_dir=run_dir)
        with pytest.raises(RingError):
            Ring.create(name, slot_size=16, slots=2, mode=RingMode.QUEUE, run_dir=run_dir / "x")
    finally:
        ring.unlink()
        ring.close()
    bogus = segment_name(run_id, "bogus")
    segment_path(bogus).write_bytes(bytes(8192))
    try:
        with pytest.raises(RingError):
            Ring.attach(bogus, run_dir=run_dir)
    finally:
        segment_path(bogus).unlink()


# --------------------------------------------------------------------------- sweeping


def test_sweep_stale_removes_dead_runs_and_keeps_live_ones(run_id: str, run_dir: Path) -> None:
    prefix = f"pwt{uuid.uuid4().hex[:8]}"
    dead_name = segment_name(f"{run_id}dead", "frames", prefix=prefix)
    live_name = segment_name(f"{run_id}live", "frames", prefix=prefix)
    fresh_junk = segment_name(f"{run_id}junk", "x", prefix=prefix)
    old_junk = segment_name(f"{run_id}old", "x", prefix=prefix)
    proc = SPAWN.Process(target=_child_create_and_die, args=(dead_name, str(run_dir)))
    proc.start()
    assert _join(proc) == 0
    assert segment_path(dead_name).exists() and (run_dir / f"{dead_name}.bell").exists()
    live = Ring.create(live_name, slot_size=64, slots=2, mode=RingMode.QUEUE, run_dir=run_dir)
    try:
        segment_path(fresh_junk).write_bytes(b"")  # being created right now, maybe
        segment_path(old_junk).write_bytes(b"")
        two_minutes_ago = time.time() - 120
        os.utime(segment_path(old_junk), (two_minutes_ago, two_minutes_ago))
        removed = sweep_stale(prefix)
        assert removed == sorted([dead_name, old_junk])
        assert not segment_path(dead_name).exists()
        assert not (run_dir / f"{dead_name}.bell").exists()
        assert segment_path(live_name).exists() and (run_dir / f"{live_name}.bell").exists()
        assert segment_path(fresh_junk).exists()
        assert sweep_stale(prefix) == []
        live.send(b"still works")
        assert bytes(live.recv(timeout=0).data) == b"still works"
    finally:
        live.unlink()
        live.close()
        for name in (dead_name, fresh_junk, old_junk):
            segment_path(name).unlink(missing_ok=True)
    assert not [p for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]
