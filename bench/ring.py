"""bench/ring: one-way hop latency and throughput of the shared-memory ring vs the usual suspects.

Two real processes (multiprocessing ``spawn``): this process sends frames, a
child receives them. Transports, all in the same run:

* ``ring``: :class:`pipeline.runtime.ring.Ring` (LATEST mode, 3 slots): ``send``
  copies the frame in, the receiver ``recv_into`` a preallocated array (two
  copies);
* ``ring zero-copy view``: ``send`` copies in, the receiver takes
  ``recv_view`` and checks ``valid()`` after "using" it (one copy);
* ``ring zero-copy both ends``: the producer writes its frame straight into
  ``reserve()``, ``commit()`` publishes it, the receiver as above (no copy
  beyond producing the frame; for information, not used for the targets);
* ``mp.Queue`` (``maxsize=2``, pickles the array);
* ``mp.Pipe`` (``send_bytes`` / ``recv_bytes_into`` a preallocated buffer);
* ``zmq ipc`` (PUSH/PULL over ``ipc://``, HWM 2, ``recv_multipart()`` copies);
* ``zmq ipc zero-copy`` (``send(copy=False)`` / ``recv(copy=False)``);
* ``memcpy``: ``numpy.copyto`` of one frame into a preallocated array in one
  process, the floor.

Frames are 640x480x3 and 1280x720x3 ``uint8``, paced at 30 fps and flat out
(the sender sends again as soon as ``send`` returns; bounded transports then
block the sender, the latest-wins ring skips frames instead, shown as
``lost``, as are views overwritten while in use). Before every send the
producer writes a fresh frame (a copy of a template into one of 8 rotating
buffers, as a camera decoder would), outside the timed hop; the memcpy floor
does the same. Hop latency is measured from just before ``send`` to just
after the receiver holds the whole frame (``recv`` returned), both ends
reading ``CLOCK_MONOTONIC`` (system-wide on Linux). The first frames of every
case are warm-up and not counted.

On a shared 2-vCPU KVM guest a copy made after ~33 ms of idling costs about
twice a back-to-back one (caches gone cold), which is why the paced rows are
slower than the flat-out ones for every transport, the floor included.

Targets (1280x720x3, paced at 30 fps, p50): the ring at least 10x faster than
``mp.Queue``, at least 2x faster than ZeroMQ ipc (copy), and within 3x of the
memcpy floor.

``--doorbells`` measures the reader wake-up options instead (FIFO, eventfd,
ZeroMQ PUSH/PULL, polling with 0.5 ms sleeps): results in ``docs/ring.md``.

Run: ``python -m bench.ring [--quick] [--json] [--doorbells]``.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import multiprocessing as mp
import os
import random
import select
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from bench.common import add_json_flag, machine_info, percentile, report, target

NAME = "ring"
SIZES: dict[str, tuple[int, int, int]] = {"480p": (480, 640, 3), "720p": (720, 1280, 3)}
RESERVE = "ring zero-copy both ends"
TRANSPORTS = (
    "ring",
    "ring zero-copy view",
    RESERVE,
    "mp.Queue",
    "mp.Pipe",
    "zmq ipc",
    "zmq ipc zero-copy",
)
POOL = 8  # source frames in rotation, so no frame is rewritten while a transport may hold it
FPS = 30.0
WARMUP = 5
END = -1
INVALID = -2  # a zero-copy view that the writer overwrote while it was in use
RECV_TIMEOUT_S = 20.0
_TS = struct.Struct("<q")
COLUMNS = [
    "name",
    "frame",
    "pacing",
    "frames",
    "lost",
    "p50_ms",
    "p99_ms",
    "fps",
    "mb_per_s",
]


def _now() -> int:
    return time.monotonic_ns()


# --------------------------------------------------------------------------- receiver (child)


def _receiver(kind: str, ctrl: Connection, chan: Any, endpoint: str) -> None:
    """Child process: receive cases until told to quit; report latencies per case."""
    import zmq

    ctx: zmq.Context[Any] | None = None
    sock: zmq.Socket[Any] | None = None
    if kind.startswith("zmq"):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, 2)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
    try:
        while True:
            msg = ctrl.recv()
            if msg[0] == "quit":
                return
            _, shape, ring_name, run_dir = msg
            buf = np.empty(shape, dtype=np.uint8)
            recv_one = _make_recv(kind, chan, sock, buf, ring_name, run_dir)
            ctrl.send("ready")
            lat: list[int] = []
            stamps: list[int] = []
            try:
                while True:
                    t0 = recv_one()
                    t1 = _now()
                    if t0 == END:
                        break
                    if t0 == INVALID:
                        continue
                    lat.append(t1 - t0)
                    stamps.append(t1)
            finally:
                close = getattr(recv_one, "close", None)
                if close is not None:
                    close()
            ctrl.send(("done", lat, stamps))
    finally:
        if sock is not None:
            sock.close(0)
        if ctx is not None:
            ctx.term()


class _RingRecv:
    def __init__(self, name: str, run_dir: str, buf: np.ndarray[Any, Any]) -> None:
        from pipeline.errors import WouldBlock
        from pipeline.runtime.ring import Ring

        self.ring = Ring.attach(name, run_dir=Path(run_dir))
        self.buf = buf
        with contextlib.suppress(WouldBlock):
            while True:  # leftovers of a previous case
                self.ring.recv_into(buf, timeout=0)

    def __call__(self) -> int:
        item = self.ring.recv_into(self.buf, timeout=RECV_TIMEOUT_S)
        return END if item.meta == END else item.ts_ns

    def close(self) -> None:
        self.ring.close()


class _RingViewRecv(_RingRecv):
    def __call__(self) -> int:
        item = self.ring.recv_view(timeout=RECV_TIMEOUT_S)
        if item.meta == END:
            return END
        # Here a consumer would use item.data in place; then it validates:
        if not self.ring.valid(item):
            return INVALID
        return item.ts_ns


def _make_recv(
    kind: str,
    chan: Any,
    sock: Any,
    buf: np.ndarray[Any, Any],
    ring_name: str,
    run_dir: str,
) -> Callable[[], int]:
    if kind == "ring":
        return _RingRecv(ring_name, run_dir, buf)
    if kind in ("ring zero-copy view", RESERVE):
        return _RingViewRecv(ring_name, run_dir, buf)
    if kind == "mp.Queue":

        def recv_queue() -> int:
            msg = chan.get(timeout=RECV_TIMEOUT_S)
            if msg is None:
                return END
            t0, arr = msg
            assert arr.shape == buf.shape
            return int(t0)

        return recv_queue
    if kind == "mp.Pipe":
        view = buf.reshape(-1)

        def recv_pipe() -> int:
            if not chan.poll(RECV_TIMEOUT_S):
                raise TimeoutError("mp.Pipe: nothing received")
            (t0,) = _TS.unpack(chan.recv_bytes())
            if t0 == END:
                return END
            chan.recv_bytes_into(view)
            return int(t0)

        return recv_pipe
    copy = kind == "zmq ipc"

    def recv_zmq() -> int:
        if not sock.poll(int(RECV_TIMEOUT_S * 1000)):
            raise TimeoutError(f"{kind}: nothing received")
        parts = sock.recv_multipart(copy=copy)
        head = parts[0] if copy else parts[0].bytes
        (t0,) = _TS.unpack(head)
        if len(parts) == 1:
            return END
        frame = parts[1] if copy else parts[1].buffer
        assert len(frame) == buf.nbytes
        return int(t0)

    return recv_zmq


# --------------------------------------------------------------------------- sender (this process)


def _make_send(kind: str, chan: Any, sock: Any, ring: Any) -> Callable[[Any, int], None]:
    if kind == RESERVE:

        def commit_ring(frame: Any, t0: int) -> None:
            ring.commit(frame, ts_ns=t0)

        return commit_ring
    if kind.startswith("ring"):

        def send_ring(frame: Any, t0: int) -> None:
            ring.send(frame, ts_ns=t0)

        return send_ring
    if kind == "mp.Queue":

        def send_queue(frame: Any, t0: int) -> None:
            chan.put((t0, frame))

        return send_queue
    if kind == "mp.Pipe":

        def send_pipe(frame: Any, t0: int) -> None:
            chan.send_bytes(_TS.pack(t0))
            chan.send_bytes(frame.reshape(-1))

        return send_pipe
    copy = kind == "zmq ipc"

    def send_zmq(frame: Any, t0: int) -> None:
        sock.send_multipart([_TS.pack(t0), frame], copy=copy)

    return send_zmq


def _send_end(kind: str, chan: Any, sock: Any, ring: Any) -> None:
    if kind.startswith("ring"):
        ring.send(b"", ts_ns=END, meta=END)
    elif kind == "mp.Queue":
        chan.put(None)
    elif kind == "mp.Pipe":
        chan.send_bytes(_TS.pack(END))
    else:
        sock.send_multipart([_TS.pack(END)])


def _run_transport(
    kind: str, cases: list[tuple[str, bool]], paced_s: float, flat_s: float, run_dir: Path
) -> list[dict[str, Any]]:
    import zmq

    from pipeline.runtime.ring import Ring, RingMode, segment_name

    ctx_mp = mp.get_context("spawn")
    ctrl, child_ctrl = ctx_mp.Pipe()
    chan: Any = None
    child_chan: Any = None
    endpoint = f"ipc://{run_dir}/bench.sock"
    zctx: zmq.Context[Any] | None = None
    sock: zmq.Socket[Any] | None = None
    rings: dict[str, Ring] = {}
    if kind == "mp.Queue":
        chan = child_chan = ctx_mp.Queue(maxsize=2)
    elif kind == "mp.Pipe":
        chan, child_chan = ctx_mp.Pipe()
    elif kind.startswith("zmq"):
        zctx = zmq.Context()
        sock = zctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 2)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
    elif kind.startswith("ring"):
        for size, shape in SIZES.items():
            name = segment_name(f"bench{os.getpid()}", f"r{size}")
            rings[size] = Ring.create(
                name,
                slot_size=int(np.prod(shape)),
                slots=3,
                mode=RingMode.LATEST,
                run_dir=run_dir,
            )
    proc = ctx_mp.Process(
        target=_receiver, args=(kind, child_ctrl, child_chan, endpoint), daemon=True
    )
    proc.start()
    rows: list[dict[str, Any]] = []
    try:
        for size, paced in cases:
            shape = SIZES[size]
            template = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
            pool = [np.empty_like(template) for _ in range(POOL)]
            ring = rings.get(size)
            ctrl.send(("case", shape, ring.name if ring else "", str(run_dir)))
            if not ctrl.poll(30):
                raise RuntimeError(f"{kind}: receiver did not get ready")
            ctrl.recv()
            send = _make_send(kind, chan, sock, ring)
            produce = _producer(kind, pool, template, ring)
            sent = 0
            if paced:
                period = 1.0 / FPS
                n = WARMUP + max(int(paced_s * FPS), 10)
                nxt = time.monotonic()
                for _ in range(n):
                    delay = nxt - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    frame = produce(sent)
                    send(frame, _now())
                    sent += 1
                    nxt += period
                time.sleep(period)  # let the last frame land before the end marker
            else:
                end = time.monotonic() + flat_s
                while sent < WARMUP or time.monotonic() < end:
                    frame = produce(sent)
                    send(frame, _now())
                    sent += 1
            _send_end(kind, chan, sock, ring)
            if not ctrl.poll(RECV_TIMEOUT_S + 10):
                raise RuntimeError(f"{kind}: receiver did not report")
            _, lat, stamps = ctrl.recv()
            rows.append(_row(kind, size, paced, template.nbytes, sent, lat, stamps))
        ctrl.send(("quit",))
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        for ring in rings.values():
            ring.unlink()
            ring.close()
        if sock is not None:
            sock.close(0)
        if zctx is not None:
            zctx.term()
        if kind == "mp.Queue":
            chan.close()
            chan.join_thread()
    return rows


def _producer(
    kind: str, pool: list[np.ndarray[Any, Any]], template: np.ndarray[Any, Any], ring: Any
) -> Callable[[int], Any]:
    """How the sender makes frame ``i``: into its own pool, or (RESERVE) straight into the ring."""
    if kind != RESERVE:
        return lambda i: _produce(pool, i, template)

    def into_slot(i: int) -> int:
        view = ring.reserve()
        dst = np.frombuffer(view, dtype=np.uint8, count=template.size).reshape(template.shape)
        np.copyto(dst, template)
        return int(template.nbytes)  # what commit() publishes

    return into_slot


def _produce(
    pool: list[np.ndarray[Any, Any]], i: int, template: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """The producer writes a fresh frame (as a camera decoder would), outside the timed hop."""
    frame = pool[i % len(pool)]
    np.copyto(frame, template)
    return frame


def _row(
    kind: str,
    size: str,
    paced: bool,
    nbytes: int,
    sent: int,
    lat_ns: list[int],
    stamps: list[int],
) -> dict[str, Any]:
    """Statistics of one case; the first WARMUP received frames are dropped."""
    received = len(lat_ns)
    skip = min(WARMUP, max(0, received - 2))
    lat_ms = [x / 1e6 for x in lat_ns[skip:]]
    st = stamps[skip:]
    fps = (len(st) - 1) / ((st[-1] - st[0]) / 1e9) if len(st) > 1 and st[-1] > st[0] else 0.0
    return {
        "name": f"{kind} {size} {'30fps' if paced else 'flat'}",
        "transport": kind,
        "frame": "{1}x{0}x{2}".format(*SIZES[size]),
        "pacing": "30 fps" if paced else "flat out",
        "frames": len(lat_ms),
        "lost": sent - received,
        "p50_ms": percentile(lat_ms, 50),
        "p99_ms": percentile(lat_ms, 99),
        "fps": fps,
        "mb_per_s": fps * nbytes / 1e6,
    }


def _memcpy_rows(paced_s: float, flat_s: float) -> list[dict[str, Any]]:
    rows = []
    for size, shape in SIZES.items():
        template = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
        pool = [np.empty_like(template) for _ in range(POOL)]
        dst = np.empty_like(template)
        for paced in (True, False):
            lat: list[int] = []
            stamps: list[int] = []
            if paced:
                nxt = time.monotonic()
                for _ in range(WARMUP + max(int(paced_s * FPS), 10)):
                    delay = nxt - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    src = _produce(pool, len(lat), template)
                    t0 = _now()
                    np.copyto(dst, src)
                    t1 = _now()
                    lat.append(t1 - t0)
                    stamps.append(t1)
                    nxt += 1.0 / FPS
            else:
                end = time.monotonic() + flat_s
                while time.monotonic() < end or len(lat) < WARMUP + 10:
                    src = _produce(pool, len(lat), template)
                    t0 = _now()
                    np.copyto(dst, src)
                    t1 = _now()
                    lat.append(t1 - t0)
                    stamps.append(t1)
            rows.append(_row("memcpy", size, paced, template.nbytes, len(lat), lat, stamps))
    return rows


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ring's targets at 720p, for both ring receive paths and both pacings."""
    by = {r["name"]: r for r in rows}
    out: list[dict[str, Any]] = []
    for ring_kind in ("ring", "ring zero-copy view"):
        for pacing in ("30fps", "flat"):
            ring = by.get(f"{ring_kind} 720p {pacing}")
            if ring is None:
                continue
            r50 = float(ring["p50_ms"])
            for other, factor in (("mp.Queue", 10.0), ("zmq ipc", 2.0)):
                base = by.get(f"{other} 720p {pacing}")
                if base is not None:
                    ratio = float(base["p50_ms"]) / r50
                    out.append(
                        target(
                            f"{other} p50 / {ring_kind} p50, 720p {pacing}",
                            round(ratio, 2),
                            f">= {factor:g}",
                            ratio >= factor,
                        )
                    )
            floor = by.get(f"memcpy 720p {pacing}")
            if floor is not None:
                ratio = r50 / float(floor["p50_ms"])
                out.append(
                    target(
                        f"{ring_kind} p50 / memcpy p50, 720p {pacing}",
                        round(ratio, 2),
                        "<= 3",
                        ratio <= 3.0,
                    )
                )
    return out


# --------------------------------------------------------------------------- doorbells


IDLE_S = 1.0
DOORBELLS = ("fifo", "eventfd", "zmq push/pull", "poll 0.5 ms sleep")


def _bell_child(kind: str, ctrl: Connection, path: str, samples: int) -> None:
    """Child: wait for `samples` wake-ups; report latencies and CPU seconds used."""
    import zmq

    lat: list[int] = []
    idle: list[float] = []  # CPU seconds spent waiting for the first ring (an idle phase)
    cpu0 = [0.0]

    def ready() -> None:
        cpu0[0] = time.process_time()
        ctrl.send("ready")

    def got(t0: int) -> None:
        lat.append(_now() - t0)
        if not idle:
            idle.append(time.process_time() - cpu0[0])
        ctrl.send_bytes(b"k")  # lock-step: the waker waits for this before the next ring

    if kind == "fifo":
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        p = select.poll()
        p.register(fd, select.POLLIN)
        ready()
        while len(lat) <= samples:  # one idle-phase ring + samples
            p.poll()
            got(_TS.unpack(os.read(fd, 8))[0])
        os.close(fd)
    elif kind == "eventfd":
        from multiprocessing.reduction import recv_handle

        fd = recv_handle(ctrl)
        p = select.poll()
        p.register(fd, select.POLLIN)
        ready()
        while len(lat) <= samples:  # one idle-phase ring + samples
            p.poll()
            got(os.eventfd_read(fd))
        os.close(fd)
    elif kind == "zmq push/pull":
        zctx = zmq.Context()
        s = zctx.socket(zmq.PULL)
        s.connect(path)
        ready()
        while len(lat) <= samples:  # one idle-phase ring + samples
            got(_TS.unpack(s.recv())[0])
        s.close(0)
        zctx.term()
    else:
        fd = os.open(path, os.O_RDWR)
        m = mmap.mmap(fd, 8)
        ready()
        last = 0
        while len(lat) <= samples:  # one idle-phase ring + samples
            (t0,) = _TS.unpack_from(m, 0)
            if t0 != last:
                got(t0)
                last = t0
            else:
                time.sleep(0.0005)
        m.close()
        os.close(fd)
    ctrl.send((lat[1:], idle[0]))


def _doorbell_rows(samples: int) -> list[dict[str, Any]]:
    import zmq

    ctx_mp = mp.get_context("spawn")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="posewire-bench-bell-"))
    try:
        for kind in DOORBELLS:
            ctrl, child = ctx_mp.Pipe()
            fd = -1
            zctx: zmq.Context[Any] | None = None
            sock: zmq.Socket[Any] | None = None
            mem: mmap.mmap | None = None
            if kind == "fifo":
                path = str(tmp / "bell")
                os.mkfifo(path)
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            elif kind == "eventfd":
                path = ""
                fd = os.eventfd(0, os.EFD_NONBLOCK)
            elif kind == "zmq push/pull":
                path = f"ipc://{tmp}/bell.sock"
                zctx = zmq.Context()
                sock = zctx.socket(zmq.PUSH)
                sock.bind(path)
            else:
                path = str(tmp / "word")
                with open(path, "wb") as fh:
                    fh.write(b"\0" * 8)
                fd = os.open(path, os.O_RDWR)
                mem = mmap.mmap(fd, 8)
            proc = ctx_mp.Process(target=_bell_child, args=(kind, child, path, samples))
            proc.start()
            if kind == "eventfd":
                from multiprocessing.reduction import send_handle

                send_handle(ctrl, fd, proc.pid or 0)
            ctrl.recv()
            time.sleep(IDLE_S)  # idle phase: what does the waiting reader cost?
            for _ in range(samples + 1):
                time.sleep(random.uniform(0.002, 0.004))  # the reader is asleep again
                t0 = _now()
                if kind == "fifo":
                    os.write(fd, _TS.pack(t0))
                elif kind == "eventfd":
                    os.eventfd_write(fd, t0)
                elif sock is not None:
                    sock.send(_TS.pack(t0))
                elif mem is not None:
                    _TS.pack_into(mem, 0, t0)
                if not ctrl.poll(10):
                    raise RuntimeError(f"doorbell {kind}: the reader did not wake up")
                ctrl.recv_bytes()
            lat, idle_cpu = ctrl.recv()
            proc.join(5)
            lat_us = [x / 1e3 for x in lat]
            rows.append(
                {
                    "name": f"doorbell {kind}",
                    "frames": len(lat_us),
                    "p50_us": percentile(lat_us, 50),
                    "p99_us": percentile(lat_us, 99),
                    "idle_reader_cpu_pct": 100.0 * idle_cpu / IDLE_S,
                    "needs": {
                        "fifo": "a path",
                        "eventfd": "fd passing",
                        "zmq push/pull": "an ipc path (<108 chars)",
                    }.get(kind, "a shared word"),
                }
            )
            if mem is not None:
                mem.close()
            if fd >= 0:
                os.close(fd)
            if sock is not None:
                sock.close(0)
            if zctx is not None:
                zctx.term()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- main


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a markdown table (or ``--json``). Returns 0 when it ran."""
    parser = argparse.ArgumentParser(
        prog="python -m bench ring", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a ~15 s run with fewer frames")
    parser.add_argument(
        "--doorbells", action="store_true", help="measure the reader wake-up options instead"
    )
    add_json_flag(parser)
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # A harness that times us out with SIGTERM still gets rings and temp dirs removed.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)

    if args.doorbells:
        bell_rows = _doorbell_rows(100 if args.quick else 300)
        report(
            f"{NAME}-doorbells",
            bell_rows,
            [],
            as_json=args.json,
            title=None if args.json else "ring doorbell: one-way wake-up latency",
            params={"samples": bell_rows[0]["frames"] if bell_rows else 0},
        )
        return 0

    paced_s, flat_s = (0.45, 0.2) if args.quick else (3.5, 1.5)
    cases = [(size, paced) for size in SIZES for paced in (True, False)]
    started = time.monotonic()
    machine = machine_info()
    run_dir = Path(tempfile.mkdtemp(prefix="posewire-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        for kind in TRANSPORTS:
            rows.extend(_run_transport(kind, cases, paced_s, flat_s, run_dir))
        rows.extend(_memcpy_rows(paced_s, flat_s))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    order = {name: i for i, name in enumerate((*TRANSPORTS, "memcpy"))}
    rows.sort(key=lambda r: (r["frame"], r["pacing"], order[r["transport"]]))
    targets = _targets(rows)
    report(
        NAME,
        rows,
        targets,
        as_json=args.json,
        columns=COLUMNS,
        title=None if args.json else "ring: one-way hop latency, two processes",
        machine=machine,
        params={
            "paced_s": paced_s,
            "flat_s": flat_s,
            "warmup_frames": WARMUP,
            "elapsed_s": round(time.monotonic() - started, 1),
        },
    )
    if not args.json:
        print(f"\n(elapsed {time.monotonic() - started:.1f} s)", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
