"""The codec's ``anchor`` reference mode: every ``ANCHOR_INTERVAL``-th frame is an
anchor predicting from the previous anchor (or keyframe), every delta predicts from
the latest anchor or keyframe; a server tells an anchor from its header alone
(``PacketHeader.anchor``). docs/codec.md, "Reference modes"."""

from __future__ import annotations

import numpy as np

from pipeline.codec import (
    ANCHOR_INTERVAL,
    CodecConfig,
    Decoded,
    Decoder,
    Encoder,
    NeedKeyframe,
    peek_header,
)
from tests.test_codec_references import encode_all, keyframe_positions, trace_frames
from tests.test_protocol import assert_close, walk

ANCHOR = CodecConfig(references="anchor")


def test_anchor_mode_round_trips_the_traces_and_marks_its_anchors() -> None:
    assert ANCHOR_INTERVAL == 3
    config = CodecConfig(references="anchor", world=True)
    for frames in trace_frames(world=True):
        packets = encode_all(frames, config)
        dec = Decoder()
        key = anchor = -1
        for f, pkt in zip(frames, packets, strict=True):
            h = peek_header(pkt)
            if h.keyframe:
                key = anchor = h.seq
                assert not h.anchor
            else:
                assert h.ref_seq == anchor  # every delta predicts from the latest anchor
                assert h.anchor == ((h.seq - key) % ANCHOR_INTERVAL == 0)
                if h.anchor:
                    anchor = h.seq
            res = dec.decode(pkt)
            assert isinstance(res, Decoded)
            assert_close(res.frame, f, config)
        assert keyframe_positions(packets) == list(range(0, len(frames), 30))


def test_anchor_mode_costs_at_most_15_percent_more_bytes_than_previous() -> None:
    sizes = {"previous": 0, "anchor": 0, "keyframe": 0}
    for frames in trace_frames():
        for mode in sizes:
            config = CodecConfig(references=mode)  # type: ignore[arg-type]
            sizes[mode] += sum(len(p) for p in encode_all(frames, config))
    assert sizes["anchor"] <= 1.15 * sizes["previous"]
    assert sizes["anchor"] < sizes["keyframe"]


def test_every_delivered_packet_decodes_when_only_non_anchors_are_lost() -> None:
    delivered = decoded = 0
    for k, frames in enumerate(trace_frames()):
        rng = np.random.default_rng(70 + k)
        dec = Decoder()
        for f, pkt in zip(frames, encode_all(frames, ANCHOR), strict=True):
            h = peek_header(pkt)
            if not (h.keyframe or h.anchor) and rng.random() < 0.2:
                continue  # lost on the lossy channel; keyframes and anchors arrive
            delivered += 1
            res = dec.decode(pkt)
            assert isinstance(res, Decoded), (frames[0], h.seq)
            assert_close(res.frame, f, ANCHOR)
            decoded += 1
    assert delivered > 2000 and decoded == delivered


def test_deltas_overtaking_their_late_anchor_decode_once_it_arrives() -> None:
    frames = walk(40, world=False)
    packets = encode_all(frames, ANCHOR)
    late = ANCHOR_INTERVAL * 2
    assert peek_header(packets[late]).anchor
    dec = Decoder()
    held = []
    for i, pkt in enumerate(packets[:20]):
        if i == late:
            continue  # retransmitted: arrives after the packets that follow it
        res = dec.decode(pkt)
        if i < late:
            assert isinstance(res, Decoded)
            continue
        # every later packet depends on it, directly or through the next anchors
        assert isinstance(res, NeedKeyframe)
        if i <= late + ANCHOR_INTERVAL:
            assert res.missing_ref == late
        held.append(i)
    assert isinstance(dec.decode(packets[late]), Decoded)
    for i in held:  # the receiver retries what it held, oldest first
        res = dec.decode(packets[i])
        assert isinstance(res, Decoded)
        assert_close(res.frame, frames[i], ANCHOR)


def test_refresh_request_makes_the_next_packet_a_keyframe_in_anchor_mode() -> None:
    frames = walk(12, world=False)
    enc = Encoder(ANCHOR, 4, epoch=0)
    for f in frames[:7]:
        enc.encode(f)
    enc.request_refresh()
    assert peek_header(enc.encode(frames[7])).keyframe
    assert enc.stats.refreshes == 0
    h = peek_header(enc.encode(frames[8]))
    assert h.ref_seq == 7 and not h.anchor
