"""The browser viewer's JavaScript decoder (pipeline/server/static/decoder.js) against the
Python decoder, in real Chromium on a page of a real ``serve`` process.

Every golden stream of tests/test_protocol_golden.py (every pose trace with and without
noise and world landmarks, two-pose frames, loss with acks and keyframe requests, random
poses, a fine quantization, mutated packets with fixed-up checksums) plus junk bytes is
decoded by both, packet by packet with one decoder per stream: the same result kind
(decoded, need keyframe with the same missing reference, refused, refused as another
version), the same header fields and the same float32 values. (Header and payload lengths
are compared as their sum: for a keyframe the Python ``Decoder`` counts the quantization
prelude as header, ``peek_header`` and the JavaScript decoder count it as payload, as
docs/protocol.md does.) The page hashes its results
(SHA-256 of the result lines and of the float32 bytes) so that 30,000 packets cost two
``page.evaluate`` calls; a stream whose digests differ is compared value by value (within
1e-7) to say where.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest

from bench.viewer import chromium_unavailable, launch, watch_page
from pipeline.codec import Decoded, Decoder, NeedKeyframe
from pipeline.errors import ProtocolError, UnsupportedVersionError
from tests.test_protocol_golden import GOLDEN, TRACES, compute_digests
from tests.test_server_support import ServeProcess

#: the page side (page.evaluate): decodes every stream, returns digests or everything
DECODE_JS = (Path(__file__).parent / "viewer_decode.js").read_text()

# the decoder refuses what is not a byte buffer, with its own error type
TYPES_JS = """
async () => {
  const m = await import('/static/decoder.js');
  return ['abc', 17, null, undefined, [0xb1, 1, 2], {}].map((v) => {
    try { new m.Decoder().decode(v); return 'decoded'; }
    catch (e) { return e instanceof m.ProtocolError ? 'E' : 'X ' + e; }
  });
}
"""


def _python(packets: list[bytes]) -> tuple[list[str], bytes]:
    dec = Decoder()
    lines: list[str] = []
    floats = bytearray()
    for pkt in packets:
        try:
            r = dec.decode(pkt)
        except UnsupportedVersionError:
            lines.append("U")
            continue
        except ProtocolError:
            lines.append("E")
            continue
        if isinstance(r, NeedKeyframe):
            lines.append(f"N {r.stream_id} {r.seq} {r.missing_ref}")
            continue
        assert isinstance(r, Decoded)
        h = r.header
        none = "null"
        lines.append(
            f"D {h.stream_id} {h.seq} {h.capture_ts_ns} {none if h.ref_seq is None else h.ref_seq} "
            f"{int(h.keyframe)} {int(h.has_world)} {h.num_poses} {h.epoch} {h.packet_len} "
            f"{none if h.ts_residual_us is None else h.ts_residual_us}"
        )
        floats += np.ascontiguousarray(r.frame.image, dtype="<f4").tobytes()
        if r.frame.world is not None:
            floats += np.ascontiguousarray(r.frame.world, dtype="<f4").tobytes()
    return lines, bytes(floats)


def _junk(seed: int = 5) -> list[bytes]:
    """Bytes that are not packets: short, long, wrong magic or version, random, random
    behind a valid first byte with a fixed-up checksum."""
    rng = np.random.default_rng(seed)
    out = [b"", b"\xb1" * 11, b"\xb2" + bytes(20), bytes(range(200)), b"\xbf\x0e" + bytes(9),
           b"\xbf\x10" + bytes(20), b"\xb1" * 1100, b"\xb1" * 1099]  # fmt: skip
    for i in range(600):
        body = bytearray(rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes())
        if i % 2:
            body[0] = 0xB1
            body[1] &= 0x3F if i % 4 == 1 else 0xFF
            body += google_crc32c.value(bytes(body)).to_bytes(4, "little")
        out.append(bytes(body))
    return out


Vectors = tuple[dict[str, str], dict[str, list[bytes]]]


def _vectors() -> Vectors:
    """The golden digests and, per stream, the packets fed to the decoder; junk too."""
    fed: dict[str, list[bytes]] = {}
    digests = compute_digests(fed)
    fed["junk"] = _junk()
    return digests, fed


@pytest.fixture(scope="module")
def vectors() -> Iterator[Future[Vectors]]:
    """Made in a thread while Chromium starts (the codec's kernels release the GIL)."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(_vectors)


@pytest.fixture(scope="module")
def page(vectors: Future[Vectors]) -> Iterator[Any]:
    reason = chromium_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    srv = ServeProcess(0)
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                pg = browser.new_page()
                problems: list[str] = []
                watch_page(pg, problems)
                pg.goto(f"{srv.url}/")
                yield pg
                assert not problems, problems
            finally:
                browser.close()
    finally:
        srv.stop()


def test_js_decoder_matches_python(page: Any, vectors: Future[Vectors]) -> None:
    if not any(TRACES.glob("*.npz")):
        pytest.skip(f"pose traces not found at {TRACES}")
    digests, fed = vectors.result()
    assert digests == GOLDEN  # these are the golden vectors
    streams = [
        [tag, base64.b64encode(b"".join(pkts)).decode(), [len(p) for p in pkts]]
        for tag, pkts in fed.items()
    ]
    got = page.evaluate(DECODE_JS, {"streams": streams, "full": []})
    expected = {tag: _python(pkts) for tag, pkts in fed.items()}
    differ = [
        tag
        for tag, (lines, floats) in expected.items()
        if got[tag]
        != [
            hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            hashlib.sha256(floats).hexdigest(),
        ]
    ]
    if differ:  # tell where, and allow float32 differences up to 1e-7
        full = page.evaluate(
            DECODE_JS, {"streams": [s for s in streams if s[0] in differ], "full": differ}
        )
        for tag in differ:
            lines, floats = expected[tag]
            js_lines, js_b64 = full[tag]
            for i, (a, b) in enumerate(zip(lines, js_lines, strict=True)):
                assert a == b, f"{tag}: packet {i}: python {a!r}, javascript {b!r}"
            ours = np.frombuffer(floats, "<f4")
            theirs = np.frombuffer(base64.b64decode(js_b64), "<f4")
            assert ours.shape == theirs.shape, tag
            assert np.max(np.abs(ours - theirs), initial=0.0) <= 1e-7, tag
    kinds = [line[0] for lines, _ in expected.values() for line in lines]
    # the vectors exercise every outcome: decoded, need keyframe, refused, other version
    assert {"D", "N", "E", "U"} <= set(kinds), set(kinds)


def test_js_decoder_refuses_non_buffers(page: Any) -> None:
    assert page.evaluate(TYPES_JS) == ["E"] * 6
    for value in ("abc", 17, None, [0xB1, 1, 2], {}):
        with pytest.raises(ProtocolError):
            Decoder().decode(value)  # type: ignore[arg-type]
