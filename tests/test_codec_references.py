"""The codec's reference modes (``CodecConfig.references``): ``keyframe`` mode, where
every delta packet predicts from the stream's latest keyframe, against ``previous``
(the default, whose packets the golden digests of tests/test_protocol_golden.py pin),
and the encode stage's resolution of ``encode.references: auto``."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.codec import (
    HISTORY,
    CodecConfig,
    Decoded,
    Decoder,
    Encoder,
    Feedback,
    NeedKeyframe,
    peek_header,
)
from pipeline.config import Config, TransmitConfig, TransportKind, parse_config
from pipeline.errors import ConfigError
from pipeline.model.pose import PoseFrame
from stages.encode import references_for
from tests.test_protocol import TS0, assert_close, trace_paths, walk

KEYFRAME = CodecConfig(references="keyframe")


def trace_frames(world: bool = False) -> list[list[PoseFrame]]:
    """Every CMU trace as one pose at 30 fps, with the bench's detector noise and
    0.5 ms of capture jitter (seeded)."""
    clips = []
    for k, path in enumerate(trace_paths()):
        with np.load(path) as d:
            image = d["image"].astype(np.float32)
            wl = d["world"].astype(np.float32)
        rng = np.random.default_rng(k)
        image[..., :2] += rng.normal(0, 0.002, image[..., :2].shape).astype(np.float32)
        image[..., 2] += rng.normal(0, 0.01, image[..., 2].shape).astype(np.float32)
        np.clip(image[..., :2], -1.0, 2.0, out=image[..., :2])
        jitter = rng.normal(0, 500_000, len(image))
        clips.append(
            [
                PoseFrame(
                    i,
                    TS0 + round(i * 1e9 / 30 + jitter[i]),
                    image[i : i + 1],
                    wl[i : i + 1] if world else None,
                )
                for i in range(len(image))
            ]
        )
    return clips


def encode_all(frames: list[PoseFrame], config: CodecConfig) -> list[bytes]:
    enc = Encoder(config, 9, epoch=3)
    return [enc.encode(f) for f in frames]


def keyframe_positions(packets: list[bytes]) -> list[int]:
    return [i for i, p in enumerate(packets) if peek_header(p).keyframe]


# --------------------------------------------------------------------------- encoder


def test_keyframe_mode_round_trips_the_traces_within_the_bound() -> None:
    config = CodecConfig(references="keyframe", world=True)
    for frames in trace_frames(world=True):
        packets = encode_all(frames, config)
        dec = Decoder()
        key = -1
        for f, pkt in zip(frames, packets, strict=True):
            h = peek_header(pkt)
            if h.keyframe:
                key = h.seq
            else:
                assert h.ref_seq == key  # every delta predicts from the latest keyframe
            res = dec.decode(pkt)
            assert isinstance(res, Decoded)
            assert_close(res.frame, f, config)
            assert res.frame.capture_ts_ns == pytest.approx(f.capture_ts_ns, abs=500)
        assert keyframe_positions(packets) == list(range(0, len(frames), 30))


def test_keyframe_interval_is_clamped_to_the_decoder_history() -> None:
    assert HISTORY - 1 == 31
    for interval, expect in ((15, 15), (31, 31), (32, 31), (100, 31), (0, 31)):
        config = CodecConfig(references="keyframe", keyframe_interval=interval)
        assert config.effective_keyframe_interval() == expect
        keys = keyframe_positions(encode_all(walk(70, world=False), config))
        assert keys == list(range(0, 70, expect)), interval
    # the previous mode keeps the configured interval, 0 included
    assert CodecConfig(keyframe_interval=100).effective_keyframe_interval() == 100
    assert CodecConfig(keyframe_interval=0).effective_keyframe_interval() == 0


def test_longest_interval_decodes_with_two_late_packets_in_between() -> None:
    """Interval HISTORY - 1: the keyframe is still held for the last delta of its
    interval although two late packets of the previous interval were decoded after it."""
    frames = walk(2 * (HISTORY - 1), world=False)
    packets = encode_all(frames, CodecConfig(references="keyframe", keyframe_interval=100))
    k = HISTORY - 1
    assert keyframe_positions(packets) == [0, k]
    order = [*range(k - 2), k, k - 2, k - 1, *range(k + 1, 2 * k)]  # 29, 30 arrive late
    dec = Decoder()
    for i in order:
        res = dec.decode(packets[i])
        assert isinstance(res, Decoded), i
        assert_close(res.frame, frames[i], CodecConfig())
    # the margin is exactly that: a third late packet evicts the keyframe first
    order = [*range(k - 3), k, k - 3, k - 2, k - 1, *range(k + 1, 2 * k)]
    dec = Decoder()
    results = {i: dec.decode(packets[i]) for i in order}
    assert [i for i, r in results.items() if isinstance(r, NeedKeyframe)] == [2 * k - 1]


def test_refresh_request_makes_the_next_packet_a_keyframe() -> None:
    frames = walk(20, world=False)
    enc = Encoder(KEYFRAME, 4, epoch=0)
    dec = Decoder()
    packets = [enc.encode(f) for f in frames[:5]]
    for p in packets[:3]:
        enc.on_feedback(dec.ack_for(dec.decode(p)))
    enc.on_feedback(Feedback(4, keyframe_request=True, failed_seq=4))
    assert peek_header(enc.encode(frames[5])).keyframe
    assert not peek_header(enc.encode(frames[6])).keyframe
    # a request about a packet older than that keyframe was answered already
    enc.on_feedback(Feedback(4, keyframe_request=True, failed_seq=4))
    h = peek_header(enc.encode(frames[7]))
    assert not h.keyframe and h.ref_seq == 5
    enc.request_refresh()
    assert peek_header(enc.encode(frames[8])).keyframe
    enc.request_keyframe()
    assert peek_header(enc.encode(frames[9])).keyframe
    assert enc.stats.refreshes == 0 and enc.stats.keyframes == 4


def test_references_is_validated() -> None:
    with pytest.raises(ConfigError, match="references must be one of previous, keyframe"):
        CodecConfig(references="newest")  # type: ignore[arg-type]
    assert CodecConfig().references == "previous"  # the golden digests' mode


# --------------------------------------------------------------------------- loss


def _decode_with_lost_deltas(
    frames: list[PoseFrame], config: CodecConfig, loss: float, seed: int
) -> tuple[int, int]:
    """Drop ``loss`` of the delta packets (seeded); every keyframe arrives. Returns
    (deltas delivered, deltas decoded); each decoded pose is checked against the bound."""
    rng = np.random.default_rng(seed)
    dec = Decoder()
    delivered = decoded = 0
    for f, pkt in zip(frames, encode_all(frames, config), strict=True):
        keyframe = peek_header(pkt).keyframe
        if not keyframe and rng.random() < loss:
            continue
        res = dec.decode(pkt)
        if keyframe:
            assert isinstance(res, Decoded)
            continue
        delivered += 1
        if isinstance(res, Decoded):
            decoded += 1
            assert_close(res.frame, f, config)
    return delivered, decoded


def test_every_delivered_delta_decodes_in_keyframe_mode_at_20_percent_loss() -> None:
    totals = {"keyframe": [0, 0], "previous": [0, 0]}
    for k, frames in enumerate(trace_frames()):
        for mode in totals:
            config = CodecConfig(references=mode)  # type: ignore[arg-type]
            delivered, decoded = _decode_with_lost_deltas(frames, config, 0.2, seed=50 + k)
            totals[mode][0] += delivered
            totals[mode][1] += decoded
            if mode == "keyframe":
                assert decoded == delivered, frames[0]
    key_delivered, key_decoded = totals["keyframe"]
    prev_delivered, prev_decoded = totals["previous"]
    assert key_delivered > 2000 and key_decoded == key_delivered
    # the contrast: predicting from the previous packet, one loss breaks the chain up to
    # the next keyframe, so most delivered deltas cannot be decoded
    assert prev_decoded < 0.5 * prev_delivered


def test_a_lost_keyframe_leaves_its_deltas_undecodable_until_the_next() -> None:
    frames = walk(100, world=False)
    packets = encode_all(frames, KEYFRAME)
    assert keyframe_positions(packets) == [0, 30, 60, 90]
    dec = Decoder()
    for i, (f, pkt) in enumerate(zip(frames, packets, strict=True)):
        if i == 30:
            continue  # the keyframe is lost (the server would repair it)
        res = dec.decode(pkt)
        if 30 < i < 60:
            assert isinstance(res, NeedKeyframe), i
            assert res.missing_ref == 30 and res.seq == i
        else:
            assert isinstance(res, Decoded), i
            assert_close(res.frame, f, KEYFRAME)


# --------------------------------------------------------------------------- encode stage


def _config(primary: str, references: str = "auto") -> Config:
    return parse_config(f"encode: {{references: {references}}}\ntransmit: {{primary: {primary}}}\n")


def test_auto_references_follow_the_transport() -> None:
    assert references_for(_config("webrtc")) == "anchor"
    assert references_for(_config("websocket")) == "previous"
    assert references_for(_config("file")) == "previous"
    assert references_for(_config("webrtc", "previous")) == "previous"
    assert references_for(_config("websocket", "keyframe")) == "keyframe"
    assert references_for(_config("websocket", "anchor")) == "anchor"
    # a webrtc fallback counts too
    cfg = _config("websocket")
    cfg.transmit = TransmitConfig.model_construct(
        primary=TransportKind.WEBSOCKET, fallback=TransportKind.WEBRTC
    )
    assert references_for(cfg) == "anchor"
