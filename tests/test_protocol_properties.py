"""Property tests of the wire protocol (hypothesis), and the fuzz harness run briefly.

* random poses (any number of people, values anywhere in the accepted ranges,
  world landmarks or not, sequence gaps) round trip within the error bound;
* arbitrary bytes, and valid packets mutated (with their checksum fixed up, so
  that the mutations reach the payload decoder), give only ``ProtocolError``;
  whatever does decode holds finite values inside the documented ranges.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.codec import (
    MAX_PACKET_BYTES,
    WORLD_RANGE_M,
    XY_RANGE,
    Z_RANGE,
    CodecConfig,
    Decoded,
    Decoder,
    Encoder,
    PacketTooLargeError,
    peek_header,
)
from pipeline.model.pose import PoseFrame
from tests.fuzz_protocol import fix_crc, one_input, seed_packets

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(
    deadline=None,
    max_examples=int(os.environ.get("POSEWIRE_HYPOTHESIS_EXAMPLES", "150")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _f32(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def pose_frames(draw: st.DrawFn) -> tuple[list[PoseFrame], bool]:
    world = draw(st.booleans())
    n_frames = draw(st.integers(1, 6))
    frames = []
    seq = draw(st.integers(0, 2**40))
    ts = draw(st.integers(-(2**62), 2**62))
    for _ in range(n_frames):
        n = draw(st.integers(0, 3))
        img = draw(arrays(np.float32, (n, 33, 4), elements=_f32(*XY_RANGE)))
        img[..., 2] = draw(arrays(np.float32, (n, 33), elements=_f32(*Z_RANGE)))
        img[..., 3] = draw(arrays(np.float32, (n, 33), elements=_f32(0.0, 1.0)))
        w = draw(arrays(np.float32, (n, 33, 3), elements=_f32(*WORLD_RANGE_M)))
        frames.append(PoseFrame(seq, ts, img, w if world else None))
        seq += draw(st.integers(1, 5))
        ts += draw(st.integers(0, 10**9))
    return frames, world


@SETTINGS
@given(pose_frames(), st.integers(0, 3))
def test_random_poses_round_trip_within_bound(data: tuple[list[PoseFrame], bool], ki: int) -> None:
    frames, world = data
    config = CodecConfig(world=world, keyframe_interval=ki)
    enc = Encoder(config, 3)
    dec = Decoder()
    for f in frames:
        try:
            pkt = enc.encode(f)
        except PacketTooLargeError:
            continue  # uniformly random people are the codec's worst case
        assert len(pkt) < MAX_PACKET_BYTES
        res = dec.decode(pkt)
        assert isinstance(res, Decoded)
        out = res.frame
        assert out.num_poses == f.num_poses
        err = np.abs(out.image.astype(np.float64) - f.image.astype(np.float64))
        assert err[..., :2].max(initial=0) <= 0.5 / 1920
        assert err[..., 2].max(initial=0) <= config.z_precision
        assert err[..., 3].max(initial=0) <= 0.5 / 15 + 1e-7
        if out.world is not None:
            assert f.world is not None
            werr = np.abs(out.world.astype(np.float64) - f.world.astype(np.float64))
            assert werr.max(initial=0) <= config.world_precision_m
        if peek_header(pkt).keyframe:
            assert out.capture_ts_ns == f.capture_ts_ns
        else:
            assert abs(out.capture_ts_ns - f.capture_ts_ns) <= 500


@SETTINGS
@given(st.binary(max_size=1300))
def test_arbitrary_bytes_only_protocol_error(data: bytes) -> None:
    one_input(b"\x00" + data)  # as they are
    one_input(b"\x01" + data)  # with a valid checksum, so the payload decoder sees them


_SEEDS = seed_packets()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(st.sampled_from(_SEEDS))[:-4])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 4))
        pos = draw(st.integers(0, max(0, len(body) - 1)))
        if kind == 0 and body:
            body[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1 and body:
            body[pos] = draw(st.integers(0, 255))
        elif kind == 2:
            body[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == 3 and body:
            del body[pos : pos + draw(st.integers(1, 8))]
        else:
            del body[draw(st.integers(0, len(body))) :]
    return fix_crc(bytes(body))


@SETTINGS
@given(mutated())
def test_mutated_packets_only_protocol_error(packet: bytes) -> None:
    one_input(b"\x00" + packet)


@pytest.mark.slow
def test_fuzz_harness_runs_briefly(tmp_path: Path) -> None:
    """The atheris harness for ~10 s on a copy of the seed corpus (the hypothesis
    fallback when atheris is not installed), with the codec kernels compiled with
    bounds checks (a fresh numba cache): an out-of-bounds index inside them becomes
    an IndexError, which the decoder reports as "malformed packet", which the
    harness counts as a crash. Longer by hand:
    ``python tests/fuzz_protocol.py -max_total_time=600 tests/fuzz_corpus``."""
    seconds = os.environ.get("POSEWIRE_FUZZ_SECONDS", "10")
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "tests" / "fuzz_corpus", corpus)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NUMBA_BOUNDSCHECK": "1",
        "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),
    }
    # not measured by `make unit`'s coverage: under its tracer the bounds-checked
    # compile and the instrumented run take several times longer than the timeout
    env.pop("COVERAGE_PROCESS_CONFIG", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz_protocol.py"),
            f"-max_total_time={seconds}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        env=env,
        # a hang guard, not a timing bound: compile + instrument + fuzz take ~20 s alone
        # and run beside other tests in `make unit`'s parallel pass
        timeout=int(seconds) + 270,
        check=False,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert not list(tmp_path.glob("crash-*")), tail


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "tests/fuzz_corpus").iterdir()))
def test_seed_corpus_entries_are_handled(name: str) -> None:
    from tests.fuzz_protocol import one_input

    one_input((ROOT / "tests/fuzz_corpus" / name).read_bytes())
