"""Tests of the pose wire protocol (pipeline/codec/): format, codec, loss, validation."""

from __future__ import annotations

import os
import struct
from collections import deque
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest

from pipeline.codec import (
    HISTORY,
    MAX_PACKET_BYTES,
    PROTOCOL_VERSION,
    CodecConfig,
    Decoded,
    Decoder,
    Encoder,
    Feedback,
    NeedKeyframe,
    PacketHeader,
    PacketTooLargeError,
    peek_header,
)
from pipeline.config import traces_dir
from pipeline.errors import ConfigError, ProtocolError, UnsupportedVersionError
from pipeline.model.pose import PoseFrame

XY_BOUND = 0.5 / 1920  # normalised x/y error bound of the default configuration
TS0 = 1_760_000_000_000_000_000
TRACES = traces_dir()


def trace_paths() -> list[Path]:
    paths = sorted(TRACES.glob("*.npz")) if TRACES.is_dir() else []
    if not paths:
        if os.environ.get("CI") == "true":
            pytest.fail(f"pose traces missing at {TRACES} (CI must have them)")
        pytest.skip(f"pose traces not found at {TRACES} (set POSEWIRE_TRACES)")
    return paths


# A standing person, image coordinates (x, y), in MediaPipe's landmark order.
TEMPLATE = np.array(
    [
        [0.50, 0.25], [0.51, 0.235], [0.515, 0.235], [0.52, 0.235], [0.49, 0.235],
        [0.485, 0.235], [0.48, 0.235], [0.53, 0.24], [0.47, 0.24], [0.51, 0.265],
        [0.49, 0.265], [0.56, 0.33], [0.44, 0.33], [0.58, 0.42], [0.42, 0.42],
        [0.59, 0.50], [0.41, 0.50], [0.595, 0.52], [0.405, 0.52], [0.59, 0.525],
        [0.41, 0.525], [0.585, 0.515], [0.415, 0.515], [0.54, 0.55], [0.46, 0.55],
        [0.545, 0.68], [0.455, 0.68], [0.55, 0.80], [0.45, 0.80], [0.552, 0.815],
        [0.448, 0.815], [0.56, 0.83], [0.44, 0.83],
    ]
)  # fmt: skip


def walk(n_frames: int, n_poses: int = 1, seed: int = 0, world: bool = True) -> list[PoseFrame]:
    """People moving smoothly with detector-like noise, inside the accepted ranges."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.4, 1.0, n_poses)
    shift = rng.uniform(-0.3, 0.3, (n_poses, 2))
    phase = rng.uniform(0, 6.28, n_poses)
    frames = []
    for i in range(n_frames):
        img = np.empty((n_poses, 33, 4))
        world_m = np.empty((n_poses, 33, 3))
        for p in range(n_poses):
            t = i / 30.0 * 2.0 + phase[p]
            xy = (TEMPLATE - 0.5) * scale[p] + 0.5 + shift[p]
            xy[13:23, 1] -= 0.08 * scale[p] * (1 + np.sin(t))  # arms swing
            xy[:, 0] += 0.05 * np.sin(t / 3)  # walking sideways
            img[p, :, :2] = xy
            img[p, :, 2] = 0.1 * np.sin(t + np.arange(33) / 4.0)
            img[p, :, 3] = 0.95
            world_m[p] = np.concatenate(((xy - xy[23:25].mean(0)) * 1.8, img[p, :, 2:3]), 1)
        img[..., :2] += rng.normal(0, 0.002, img[..., :2].shape)
        img[..., 2] += rng.normal(0, 0.01, img[..., 2].shape)
        img[..., 3] = np.clip(img[..., 3] + rng.normal(0, 0.03, img[..., 3].shape), 0, 1)
        world_m += rng.normal(0, 0.005, world_m.shape)
        frames.append(
            PoseFrame(
                i,
                TS0 + i * 33_333_333 + int(rng.integers(-500_000, 500_000)),
                img.astype(np.float32),
                world_m.astype(np.float32) if world else None,
            )
        )
    return frames


def assert_close(decoded: PoseFrame, original: PoseFrame, config: CodecConfig) -> None:
    assert decoded.seq == original.seq
    assert decoded.image.shape == original.image.shape
    assert decoded.image.dtype == np.float32
    err = np.abs(decoded.image.astype(np.float64) - original.image.astype(np.float64))
    assert err[..., :2].max(initial=0) <= config.precision_px / config.reference_width_px
    assert err[..., 2].max(initial=0) <= config.z_precision
    assert err[..., 3].max(initial=0) <= 0.5 / (config.visibility_levels - 1) + 1e-7
    if config.world and original.world is not None:
        assert decoded.world is not None
        werr = np.abs(decoded.world.astype(np.float64) - original.world.astype(np.float64))
        assert werr.max(initial=0) <= config.world_precision_m
    else:
        assert decoded.world is None


def stream(frames: list[PoseFrame], config: CodecConfig | None = None) -> list[bytes]:
    enc = Encoder(config or CodecConfig(), 5, epoch=1)
    return [enc.encode(f) for f in frames]


# --------------------------------------------------------------------------- header


def test_header_fields_of_keyframe_and_delta() -> None:
    frames = walk(3)
    packets = stream(frames)
    key = peek_header(packets[0])
    assert isinstance(key, PacketHeader)
    assert (key.stream_id, key.seq, key.keyframe, key.ref_seq) == (5, 0, True, None)
    assert key.capture_ts_ns == frames[0].capture_ts_ns  # exact in keyframes
    assert (key.num_poses, key.has_world, key.version, key.epoch) == (1, False, 1, 1)
    assert key.packet_len == len(packets[0])
    delta = peek_header(memoryview(packets[2]))
    assert (delta.seq, delta.keyframe, delta.ref_seq) == (2, False, 1)
    assert delta.capture_ts_ns is None and delta.ts_residual_us is not None
    assert delta.header_len + delta.payload_len + 4 == len(packets[2])


def test_delta_header_is_compact() -> None:
    packets = stream(walk(40))
    h = peek_header(packets[5])
    # magic/version, flags, stream, seq, ref delta, ts residual (<= 3), length, crc
    assert h.header_len <= 1 + 1 + 1 + 1 + 1 + 3 + 1
    assert all(len(p) < MAX_PACKET_BYTES for p in packets)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", google_crc32c.value(body))


def test_unknown_version_is_refused_naming_both_versions() -> None:
    pkt = stream(walk(1))[0]
    bumped = _with_crc(bytes([0xB2]) + pkt[1:-4])
    with pytest.raises(UnsupportedVersionError) as exc:
        peek_header(bumped)
    assert "version 2" in str(exc.value) and f"version {PROTOCOL_VERSION}" in str(exc.value)
    with pytest.raises(UnsupportedVersionError, match="version 200"):
        Decoder().decode(_with_crc(bytes([0xBF, 200]) + pkt[1:-4]))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: b"", "too short"),
        (lambda p: p[:5], "too short"),
        (lambda p: bytes([0x7B]) + p[1:], "not a posewire packet"),
        (lambda p: p[:-1] + bytes([p[-1] ^ 1]), "checksum"),
        (lambda p: p[:10] + bytes([p[10] ^ 0x40]) + p[11:], "checksum"),
        (lambda p: _with_crc(p[:-5]), "payload length"),
        (lambda p: _with_crc(p[:-4] + b"\0"), "payload length"),
        (lambda p: bytes(1200), "too long"),
        (lambda p: _with_crc(p[:1] + bytes([9 << 2 | 1]) + p[2:-4]), "poses"),
    ],
)
def test_bad_packets_raise_protocol_error(mutate: object, message: str) -> None:
    pkt = stream(walk(1))[0]
    bad = mutate(pkt)  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=message):
        peek_header(bad)
    with pytest.raises(ProtocolError):
        Decoder().decode(bad)


def test_non_bytes_input_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        peek_header("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        Decoder().decode(12)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("world", [False, True])
@pytest.mark.parametrize("n_poses", [1, 3])
def test_round_trip_within_bound(world: bool, n_poses: int) -> None:
    config = CodecConfig(world=world)
    frames = walk(70, n_poses=n_poses, seed=n_poses)
    dec = Decoder()
    for f, pkt in zip(frames, stream(frames, config), strict=True):
        res = dec.decode(pkt)
        assert isinstance(res, Decoded)
        assert_close(res.frame, f, config)
        assert abs(res.frame.capture_ts_ns - f.capture_ts_ns) <= 500
        assert res.header.capture_ts_ns == res.frame.capture_ts_ns
        assert res.header.has_world == world


def test_world_off_drops_world_and_world_on_without_world_works() -> None:
    frames = walk(5)
    dec = Decoder()
    for pkt in stream(frames, CodecConfig(world=False)):
        res = dec.decode(pkt)
        assert isinstance(res, Decoded) and res.frame.world is None
    no_world = [PoseFrame(f.seq, f.capture_ts_ns, f.image) for f in frames]
    dec = Decoder()
    for pkt in stream(no_world, CodecConfig(world=True)):
        res = dec.decode(pkt)
        assert isinstance(res, Decoded) and res.frame.world is None


def test_empty_frames_and_changing_number_of_poses() -> None:
    counts = [0, 0, 1, 1, 2, 2, 0, 3, 1, 1, 8, 8, 2, 5]
    people = walk(len(counts), n_poses=8, seed=4)
    frames = [
        PoseFrame(i, f.capture_ts_ns, f.image[:n].copy(), None if f.world is None else f.world[:n])
        for i, (f, n) in enumerate(zip(people, counts, strict=True))
    ]
    config = CodecConfig(world=True)
    packets = stream(frames, config)
    dec = Decoder()
    for f, pkt in zip(frames, packets, strict=True):
        h = peek_header(pkt)
        assert h.num_poses == f.num_poses
        res = dec.decode(pkt)
        assert isinstance(res, Decoded)
        assert res.frame.num_poses == f.num_poses
        if f.num_poses and h.has_world:
            assert_close(res.frame, f, config)
        elif f.num_poses:
            assert_close(res.frame, f, CodecConfig())
    assert peek_header(packets[1]).payload_len == 0  # an empty delta frame is header only


def test_landmarks_slightly_outside_the_image_are_accepted() -> None:
    f = walk(1)[0]
    f.image[0, 23, 1] = 1.04  # hips below the frame, as MediaPipe reports them
    f.image[0, 0, 0] = -0.2
    res = Decoder().decode(stream([f])[0])
    assert isinstance(res, Decoded)
    assert abs(float(res.frame.image[0, 23, 1]) - 1.04) <= XY_BOUND


def test_real_traces_round_trip_within_bound() -> None:
    config = CodecConfig(world=True)
    for path in trace_paths():
        with np.load(path) as d:
            image, world = d["image"], d["world"]
        rng = np.random.default_rng(0)
        image = image.copy()
        image[..., :2] += rng.normal(0, 0.002, image[..., :2].shape).astype(np.float32)
        frames = [
            PoseFrame(i, TS0 + i * 33_333_333, image[i : i + 1], world[i : i + 1])
            for i in range(0, len(image), 3)
        ]
        dec = Decoder()
        for f, pkt in zip(frames, stream(frames, config), strict=True):
            assert len(pkt) < MAX_PACKET_BYTES
            res = dec.decode(pkt)
            assert isinstance(res, Decoded), path.name
            assert_close(res.frame, f, config)


def test_eight_poses_with_world_fit_or_drop_world_cleanly() -> None:
    # Uniformly random poses are the worst case for every predictor.
    rng = np.random.default_rng(8)
    img = rng.uniform(-1, 2, (8, 33, 4)).astype(np.float32)
    img[..., 2] = rng.uniform(-4, 4, (8, 33))
    img[..., 3] = rng.uniform(0, 1, (8, 33))
    world = rng.uniform(-8, 8, (8, 33, 3)).astype(np.float32)
    enc = Encoder(CodecConfig(world=True), 1)
    frame = PoseFrame(0, TS0, img, world)
    try:
        pkt = enc.encode(frame)
    except PacketTooLargeError as exc:
        assert "MAX_PACKET" not in str(exc) and "1100" in str(exc)
        assert enc.stats.packets == 0  # state unchanged
        return
    assert len(pkt) < MAX_PACKET_BYTES
    res = Decoder().decode(pkt)
    assert isinstance(res, Decoded)
    if enc.stats.world_dropped:
        assert res.frame.world is None and not peek_header(pkt).has_world


def test_eight_people_with_world_fit_world_follows_a_full_keyframe() -> None:
    # 8 people with world landmarks do not fit in one keyframe (about 1,350 bytes): the
    # keyframe carries the image landmarks and the world landmarks follow in the next
    # packet. Every packet stays under the bound.
    frames = walk(31, n_poses=8)
    config = CodecConfig(world=True)
    enc = Encoder(config, 1)
    dec = Decoder()
    for f in frames:
        pkt = enc.encode(f)
        assert len(pkt) < MAX_PACKET_BYTES
        h = peek_header(pkt)
        res = dec.decode(pkt)
        assert isinstance(res, Decoded)
        assert h.has_world != h.keyframe
        assert_close(res.frame, f, config if h.has_world else CodecConfig())
    assert enc.stats.world_dropped == enc.stats.keyframes == 2


# --------------------------------------------------------------------------- keyframes, acks, loss


def test_keyframe_interval_and_request() -> None:
    enc = Encoder(CodecConfig(keyframe_interval=10), 1)
    keys = [peek_header(enc.encode(f)).keyframe for f in walk(25)]
    assert [i for i, k in enumerate(keys) if k] == [0, 10, 20]
    enc = Encoder(CodecConfig(keyframe_interval=0), 1)
    frames = walk(6)
    keys = [peek_header(enc.encode(f)).keyframe for f in frames[:3]]
    enc.request_keyframe()
    keys += [peek_header(enc.encode(f)).keyframe for f in frames[3:]]
    assert keys == [True, False, False, True, False, False]
    assert peek_header(Encoder(CodecConfig(), 1).encode(frames[0], keyframe=True)).keyframe


def test_sequence_going_backwards_forces_a_keyframe() -> None:
    frames = walk(4)
    enc = Encoder(CodecConfig(), 1)
    enc.encode(frames[2])
    assert peek_header(enc.encode(frames[1])).keyframe


def test_lost_packet_gives_need_keyframe_never_a_wrong_pose() -> None:
    frames = walk(40)
    packets = stream(frames, CodecConfig(keyframe_interval=30))
    dec = Decoder()
    results = [dec.decode(p) for i, p in enumerate(packets) if i != 5]
    kept = [f for i, f in enumerate(frames) if i != 5]
    for f, res in zip(kept, results, strict=True):
        if f.seq < 5 or f.seq >= 30:
            assert isinstance(res, Decoded)
            assert_close(res.frame, f, CodecConfig())
        else:
            assert isinstance(res, NeedKeyframe)
            assert res.stream_id == 5 and res.seq == f.seq and res.missing_ref == f.seq - 1


def test_late_joiner_starts_at_a_keyframe() -> None:
    frames = walk(50)
    packets = stream(frames, CodecConfig(keyframe_interval=20))
    dec = Decoder()
    assert isinstance(dec.decode(packets[25]), NeedKeyframe)
    for f, p in zip(frames[40:], packets[40:], strict=True):
        res = dec.decode(p)
        assert isinstance(res, Decoded)
        assert_close(res.frame, f, CodecConfig())


def test_feedback_refresh_recovers_within_one_round_trip() -> None:
    rtt = 3
    config = CodecConfig(keyframe_interval=0)
    frames = walk(120)
    enc = Encoder(config, 9)
    dec = Decoder()
    lost = {10, 11, 40, 41, 42, 70, 74}  # 74 is the first refresh after the loss at 70
    pending: deque[tuple[int, Feedback]] = deque()
    last_loss = -100
    for i, f in enumerate(frames):
        while pending and pending[0][0] <= i:
            enc.on_feedback(pending.popleft()[1])
        pkt = enc.encode(f)
        if i in lost:
            last_loss = i
            continue
        res = dec.decode(pkt)
        if isinstance(res, NeedKeyframe):
            assert i - last_loss <= rtt
        else:
            assert_close(res.frame, f, config)
        pending.append((i + rtt, dec.ack_for(res)))
    assert enc.stats.keyframes == 1  # recovered by refreshes from acknowledged frames
    assert enc.stats.refreshes >= 4


def test_ack_for_and_feedback() -> None:
    frames = walk(3)
    packets = stream(frames)
    dec = Decoder()
    ok = dec.decode(packets[0])
    assert dec.ack_for(ok) == Feedback(5, ack_seq=0)
    miss = dec.decode(packets[2])
    assert isinstance(miss, NeedKeyframe)
    fb = dec.ack_for(miss)
    assert fb.keyframe_request and fb.failed_seq == 2 and fb.ack_seq is None
    enc = Encoder(CodecConfig(), 5)
    enc.encode(frames[0])
    enc.on_feedback(Feedback(6, keyframe_request=True))  # another stream: ignored
    assert not peek_header(enc.encode(frames[1])).keyframe
    enc.on_feedback(Feedback(5, keyframe_request=True, failed_seq=1))  # nothing acked: keyframe
    assert peek_header(enc.encode(frames[2])).keyframe


def test_decoder_handles_interleaved_streams_and_bounds_them() -> None:
    frames = walk(10)
    encs = [Encoder(CodecConfig(), sid) for sid in range(4)]
    dec = Decoder(max_streams=3)
    for f in frames:
        for e in encs[:3]:
            res = dec.decode(e.encode(f))
            assert isinstance(res, Decoded)
            assert_close(res.frame, f, CodecConfig())
    assert sorted(dec.streams) == [0, 1, 2]
    dec.decode(encs[3].encode(frames[0]))
    assert len(dec.streams) == 3 and 3 in dec.streams and 0 not in dec.streams
    dec.forget(3)
    assert 3 not in dec.streams


def test_restarted_publisher_never_mixes_references() -> None:
    frames = walk(10)
    dec = Decoder()
    old = Encoder(CodecConfig(), 1, epoch=0)
    for f in frames[:6]:
        dec.decode(old.encode(f))
    new = Encoder(CodecConfig(), 1, epoch=1)  # a restarted encode stage, same stream id
    packets = [new.encode(f) for f in frames[3:]]
    # its keyframe (seq 3) is lost: seq 4 must not decode against the old run's seq 3
    res = dec.decode(packets[1])
    assert isinstance(res, NeedKeyframe)
    res = dec.decode(new.encode(frames[9], keyframe=True))
    assert isinstance(res, Decoded)


def test_history_is_bounded() -> None:
    dec = Decoder()
    enc = Encoder(CodecConfig(keyframe_interval=0), 1)
    for f in walk(HISTORY * 3):
        dec.decode(enc.encode(f))
    assert len(dec._streams[1].entries) <= HISTORY


def test_stats_count() -> None:
    frames = walk(5)
    enc = Encoder(CodecConfig(), 1)
    dec = Decoder()
    packets = [enc.encode(f) for f in frames]
    assert enc.stats.packets == 5 and enc.stats.keyframes == 1
    assert enc.stats.bytes == sum(map(len, packets))
    dec.decode(packets[0])
    dec.decode(packets[2])
    with pytest.raises(ProtocolError):
        dec.decode(b"junk")
    assert (dec.stats.decoded, dec.stats.need_keyframe, dec.stats.errors) == (1, 1, 1)


# --------------------------------------------------------------------------- encoder validation


def _frame(image: Any, world: Any = None) -> PoseFrame:
    return PoseFrame(0, TS0, image, world)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.__setitem__((0, 15, 0), np.nan), r"landmark 15 \(left_wrist\) x = nan is not"),
        (lambda a: a.__setitem__((0, 3, 1), np.inf), "y = inf is not finite"),
        (lambda a: a.__setitem__((0, 0, 0), 2.5), r"x = 2.5 is outside \[-1, 2\]"),
        (lambda a: a.__setitem__((0, 0, 2), -9.0), "z = -9.0 is outside"),
        (lambda a: a.__setitem__((0, 32, 3), 1.5), r"32 \(right_foot_index\) visibility = 1.5"),
    ],
)
def test_encoder_rejects_bad_values(edit: object, message: str) -> None:
    img = walk(1)[0].image.copy()
    edit(img)  # type: ignore[operator]
    enc = Encoder(CodecConfig(), 1)
    with pytest.raises(ProtocolError, match=message):
        enc.encode(_frame(img))
    assert enc.stats.packets == 0


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((1, 32, 4), np.float32), r"shape \[n, 33, 4\]"),
        (np.zeros((1, 33, 3), np.float32), r"shape \[n, 33, 4\]"),
        (np.zeros((33, 4), np.float32), "shape"),
        (np.zeros((9, 33, 4), np.float32), "9 poses in one frame, at most 8"),
        (np.zeros((1, 33, 4), bool), "numbers"),
        ([[0.0] * 4] * 33, "numpy array"),
    ],
)
def test_encoder_rejects_bad_shapes(image: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Encoder(CodecConfig(), 1).encode(_frame(image))


def test_encoder_rejects_bad_world_and_fields() -> None:
    img = walk(1)[0].image
    enc = Encoder(CodecConfig(world=True), 1)
    with pytest.raises(ProtocolError, match="world"):
        enc.encode(_frame(img, np.zeros((1, 33, 4), np.float32)))
    with pytest.raises(ProtocolError, match="2 world poses for 1 image poses"):
        enc.encode(_frame(img, np.zeros((2, 33, 3), np.float32)))
    bad_world = np.zeros((1, 33, 3), np.float32)
    bad_world[0, 5, 2] = np.nan
    with pytest.raises(ProtocolError, match="world z = nan"):
        enc.encode(_frame(img, bad_world))
    with pytest.raises(ProtocolError, match="sequence"):
        enc.encode(PoseFrame(-1, TS0, img))
    with pytest.raises(ProtocolError, match="timestamp"):
        enc.encode(PoseFrame(0, 2**63, img))
    with pytest.raises(ProtocolError, match="at most 2"):
        Encoder(CodecConfig(max_poses=2), 1).encode(_frame(walk(1, n_poses=3)[0].image))
    with pytest.raises(ProtocolError, match="stream id"):
        Encoder(CodecConfig(), -1)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="precision_px"):
        CodecConfig(precision_px=0)
    with pytest.raises(ConfigError, match="visibility_levels"):
        CodecConfig(visibility_levels=1)
    with pytest.raises(ConfigError, match="max_poses"):
        CodecConfig(max_poses=9)
    with pytest.raises(ConfigError, match="quantization"):
        CodecConfig(precision_px=0.001)


def test_custom_precision_travels_in_the_keyframe() -> None:
    config = CodecConfig(precision_px=2.0, reference_width_px=1280, z_precision=0.05)
    frames = walk(10)
    dec = Decoder()  # default config: the stream's own precision comes with the keyframe
    for f, pkt in zip(frames, stream(frames, config), strict=True):
        res = dec.decode(pkt)
        assert isinstance(res, Decoded)
        assert_close(res.frame, f, config)


def test_finest_precision_with_wild_poses_decodes_or_is_refused() -> None:
    """At 0.06 px (16,016 steps per unit) random poses need Rice parameters of 14 and
    more. Every packet the encoder writes must decode within the bound; frames it
    cannot code are refused. (The reference code 15 means "no such group": the
    encoder once took it as k = 14 + 1 and wrote a group as all-zero.)"""
    config = CodecConfig(precision_px=0.06)
    rng = np.random.default_rng(1)
    enc = Encoder(config, 1, epoch=0)
    dec = Decoder()
    sent = refused = 0
    for i in range(200):
        img = np.empty((1, 33, 4), np.float32)
        img[..., :2] = rng.uniform(-1.0, 2.0, (1, 33, 2))
        img[..., 2] = rng.uniform(-4.0, 4.0, (1, 33))
        img[..., 3] = rng.uniform(0.0, 1.0, (1, 33))
        frame = PoseFrame(i, TS0 + i * 33_000_000, img)
        try:
            pkt = enc.encode(frame, keyframe=True)
        except ProtocolError as exc:
            assert "residual too large to code" in str(exc)
            refused += 1
            continue
        res = dec.decode(pkt)
        assert isinstance(res, Decoded)
        assert_close(res.frame, frame, config)
        sent += 1
    assert sent >= 50 and refused >= 50  # both paths ran
