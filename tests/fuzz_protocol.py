"""Fuzz harness for the packet decoder (atheris / libFuzzer; a random fallback without it).

Run by hand, as long as you like (new interesting inputs are added to the corpus
directory you pass; pass a copy to keep ``tests/fuzz_corpus`` as committed)::

    python tests/fuzz_protocol.py -max_total_time=600 tests/fuzz_corpus

The payload is decoded by compiled kernels (pipeline/codec/kernels.py), which
libFuzzer's coverage does not see; ``NUMBA_DISABLE_JIT=1`` runs them as
instrumented Python instead (much slower per input, see docs/codec.md, but
coverage-guided inside the bit decoder). Run both.

``tests/test_protocol_properties.py`` runs it for about 20 seconds. Regenerate the
seed corpus with ``python tests/fuzz_protocol.py --make-corpus``.

Input format: the first byte selects the mode; bit 0 set means "the rest is a
packet without its checksum: append a correct CRC32C" (so that mutations reach
the payload decoder instead of dying at the checksum), clear means "the rest is
the packet as is". Every input is decoded by a fresh decoder that already holds
the reference frames of four streams (so delta packets decode too). Anything
but :class:`ProtocolError` (or one that only wraps an unexpected exception:
"malformed packet: ..."), or a decoded frame with non-finite or out-of-range
values, is a crash.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import sys
import time
import types
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.codec import (  # noqa: E402
    WORLD_RANGE_M,
    XY_RANGE,
    Z_RANGE,
    CodecConfig,
    Decoded,
    Decoder,
    Encoder,
    peek_header,
)
from pipeline.errors import ProtocolError  # noqa: E402
from pipeline.model.pose import PoseFrame  # noqa: E402

CORPUS = ROOT / "tests" / "fuzz_corpus"


def fix_crc(body: bytes) -> bytes:
    """``body`` with a correct CRC32C appended."""
    return body + struct.pack("<I", google_crc32c.value(body))


def _frames(n_frames: int, n_poses: int, seed: int) -> list[PoseFrame]:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.3, 0.7, (n_poses, 33, 4))
    base[..., 2] = rng.uniform(-0.2, 0.2, (n_poses, 33))
    base[..., 3] = 0.9
    wbase = rng.uniform(-0.9, 0.9, (n_poses, 33, 3))
    out = []
    for i in range(n_frames):
        img = base + rng.normal(0, 0.003, base.shape)
        img[..., 3] = np.clip(img[..., 3], 0, 1)
        w = wbase + rng.normal(0, 0.005, wbase.shape)
        out.append(
            PoseFrame(
                i,
                1_760_000_000_000_000_000 + i * 33_333_333,
                img.astype(np.float32),
                w.astype(np.float32),
            )
        )
    return out


# (stream id, poses, world) of the streams the decoder is primed with
_STREAMS = ((7, 2, True), (8, 1, False), (9, 0, False), (10, 8, False))
_PRIME_FRAMES = 4


def _build() -> tuple[list[bytes], list[bytes]]:
    primes: list[bytes] = []
    seeds: list[bytes] = []
    for sid, n, world in _STREAMS:
        enc = Encoder(CodecConfig(world=world, keyframe_interval=0), sid, epoch=0)
        frames = _frames(_PRIME_FRAMES + 2, n, sid)
        primes += [enc.encode(f) for f in frames[:_PRIME_FRAMES]]
        seeds.append(enc.encode(frames[_PRIME_FRAMES]))
        seeds.append(enc.encode(frames[_PRIME_FRAMES + 1], keyframe=True))
    return primes, seeds


_PRIMES, _SEEDS = _build()


def seed_packets() -> list[bytes]:
    """Valid packets that decode against a :func:`prime` d decoder."""
    return list(_SEEDS)


def prime(dec: Decoder) -> Decoder:
    """Give ``dec`` the reference frames the seed packets predict from."""
    for p in _PRIMES:
        dec.decode(p)
    return dec


def check_decoded(res: Decoded) -> None:
    """Invariants of anything that decodes, whatever the input."""
    f = res.frame
    n = res.header.num_poses
    assert f.image.dtype == np.float32 and f.image.shape == (n, 33, 4), f.image.shape
    assert np.isfinite(f.image).all()
    tol = 1e-3
    assert (f.image[..., :2] >= XY_RANGE[0] - tol).all() and (
        f.image[..., :2] <= XY_RANGE[1] + tol
    ).all()
    assert (f.image[..., 2] >= Z_RANGE[0] - tol).all() and (
        f.image[..., 2] <= Z_RANGE[1] + tol
    ).all()
    assert (f.image[..., 3] >= -tol).all() and (f.image[..., 3] <= 1 + tol).all()
    if f.world is not None:
        assert res.header.has_world and f.world.shape == (n, 33, 3)
        assert np.isfinite(f.world).all()
        assert (np.abs(f.world) <= WORLD_RANGE_M[1] + tol).all()
    assert res.header.capture_ts_ns == f.capture_ts_ns


def one_input(data: bytes) -> None:
    """The fuzz target."""
    if not data:
        return
    packet = fix_crc(data[1:]) if data[0] & 1 else data[1:]
    with contextlib.suppress(ProtocolError):
        peek_header(packet)
    dec = prime(Decoder())
    try:
        res = dec.decode(packet)
    except ProtocolError as exc:
        # the decoder's last line of defence turned an unexpected exception (an
        # IndexError from a bounds-checked kernel, say) into this: a bug all the same
        assert not str(exc).startswith("malformed packet"), exc
        return
    if isinstance(res, Decoded):
        check_decoded(res)
        # and the same packet again (a duplicate) must still behave
        try:
            again = dec.decode(packet)
        except ProtocolError:
            return
        if isinstance(again, Decoded):
            check_decoded(again)


def make_corpus(directory: Path = CORPUS) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, pkt in enumerate(_SEEDS):
        h = peek_header(pkt)
        kind = "key" if h.keyframe else "delta"
        stem = f"{i:02d}_{kind}_s{h.stream_id}_{h.num_poses}p{'_world' if h.has_world else ''}"
        (directory / f"{stem}_crcfix").write_bytes(b"\x01" + pkt[:-4])
        (directory / f"{stem}_raw").write_bytes(b"\x00" + pkt)
    print(f"wrote {2 * len(_SEEDS)} seeds to {directory}")


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[pos] = rng.randrange(256)
        elif op == 2:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and b:
            del b[pos : pos + rng.randint(1, 16)]
        else:
            b = b[: rng.randint(0, len(b))]
    return bytes(b)


def random_fuzz(seconds: float, corpus: list[bytes], seed: int = 0) -> int:
    """The fallback without atheris: random mutations of the corpus and random bytes."""
    rng = random.Random(seed)
    pool = corpus or [b"\x01"]
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        data = (
            rng.randbytes(rng.randint(0, 200))
            if rng.random() < 0.1
            else _mutate(rng, rng.choice(pool))
        )
        one_input(data)
        runs += 1
    return runs


def instrument_posewire(atheris: Any) -> int:
    """Atheris coverage for posewire's own Python code (the ``pipeline`` package: the
    header, the decoder's logic, the range checks), function by function; the number of
    functions instrumented. The compiled kernels are opaque to libFuzzer either way, and
    instrumenting every loaded module (numpy, numba...: ``instrument_all``, kept behind
    ``POSEWIRE_FUZZ_INSTRUMENT_ALL=1``) took a minute of the test's 72 s."""
    done = 0
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "pipeline" or name.startswith("pipeline.")):
            continue
        for obj in list(vars(mod).values()):
            members = list(vars(obj).values()) if isinstance(obj, type) else []
            for f in [obj, *members]:
                f = f.fget if isinstance(f, property) else getattr(f, "__func__", f)
                if isinstance(f, types.FunctionType) and f.__module__ == name:
                    atheris.instrument_func(f)
                    done += 1
    return done


def main(argv: list[str]) -> int:
    if "--make-corpus" in argv:
        make_corpus()
        return 0
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is None or os.environ.get("POSEWIRE_FUZZ_FALLBACK"):
        seconds = 20.0
        dirs = []
        for a in argv[1:]:
            if a.startswith("-max_total_time="):
                seconds = float(a.split("=", 1)[1])
            elif not a.startswith("-"):
                dirs.append(Path(a))
        corpus = [p.read_bytes() for d in dirs for p in sorted(d.iterdir()) if p.is_file()]
        runs = random_fuzz(seconds, corpus)
        print(f"random fallback fuzzing (atheris not installed): {runs} inputs, no failure")
        return 0
    # Compile (or load) the codec kernels before instrumenting: numba compiles from
    # bytecode, and atheris' instrumented bytecode is not compilable. The compiled
    # kernels are then opaque to libFuzzer's coverage; NUMBA_DISABLE_JIT=1 runs them
    # as Python, instrumented (slower, but coverage-guided inside the bit decoder).
    for seed in _SEEDS:
        one_input(b"\x00" + seed)
    if os.environ.get("POSEWIRE_FUZZ_INSTRUMENT_ALL"):
        atheris.instrument_all()  # every loaded module: about a minute of instrumenting
    else:
        instrument_posewire(atheris)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
