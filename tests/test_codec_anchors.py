"""The codec's ``anchor`` reference mode: every ``ANCHOR_INTERVAL``-th frame is an
anchor predicting from the previous anchor (or keyframe), every delta predicts from
the latest anchor or keyframe; a server tells an anchor from its header alone
(``PacketHeader.anchor``). docs/codec.md, "Reference modes"."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from pipeline.codec import (
    ANCHOR_INTERVAL,
    CodecConfig,
    Decoded,
    Decoder,
    Encoder,
    NeedKeyframe,
    PacketHeader,
    peek_header,
)
from pipeline.codec.anchors import AnchorTracker
from tests.test_codec_references import encode_all, keyframe_positions, trace_frames
from tests.test_protocol import assert_close, walk
from tests.test_server_support import PoseSource

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


# --------------------------------------------------------------------------- AnchorTracker


def _headers(mode: str, n: int = 95) -> list[PacketHeader]:
    src = PoseSource(1, references=mode, keyframe_interval=30)
    return [peek_header(src.next()) for _ in range(n)]


def _kinds(headers: list[PacketHeader]) -> tuple[str, str]:
    t = AnchorTracker()
    kinds = "".join(t.classify(h.seq, h.ref_seq, h.keyframe, h.epoch)[0] for h in headers)
    return kinds, t.mode


def _late(headers: list[PacketHeader], late: Callable[[PacketHeader], bool]) -> list[PacketHeader]:
    """``headers`` with every packet ``late`` says arriving after the next two."""
    out: list[PacketHeader] = []
    i = 0
    while i < len(headers):
        if i > 0 and late(headers[i]):
            out += [*headers[i + 1 : i + 3], headers[i]]
            i += 3
        else:
            out.append(headers[i])
            i += 1
    return out


@pytest.mark.parametrize("reorder", ["none", "anchors", "keyframes"])
def test_tracker_learns_the_mode_and_which_packets_must_arrive(reorder: str) -> None:
    """The room server and a WebRTC publisher split a stream into what must arrive and what
    may be lost from the headers alone, whatever arrives first on the two channels."""
    late: dict[str, Callable[[PacketHeader], bool]] = {
        "none": lambda h: False,
        "anchors": lambda h: h.anchor and not h.keyframe,
        "keyframes": lambda h: h.keyframe,
    }
    for mode in ("anchor", "keyframe", "previous"):
        headers = _headers(mode)
        if mode == "anchor":  # the order of arrival is the test's; the anchors are the codec's
            arrival = _late(headers, late[reorder])
        else:
            arrival = _late(headers, late[reorder] if reorder == "keyframes" else late["none"])
        kinds, learned = _kinds(arrival)
        by_seq = dict(zip((h.seq for h in arrival), kinds, strict=True))
        assert learned == ("chained" if mode == "previous" else mode), (mode, kinds)
        for h in headers:
            kind = by_seq[h.seq]
            if h.keyframe:
                assert kind == "k"
            elif mode == "anchor":
                assert kind == ("a" if h.anchor else "f"), (mode, reorder, kinds)
            elif mode == "keyframe":  # one speculative anchor, before the mode is known
                assert kind == ("a" if h.seq == headers[3].seq else "f"), (mode, reorder, kinds)
            else:  # every delta after the first is a reference: must arrive
                assert kind == ("f" if h.seq == headers[1].seq else "c"), (mode, reorder, kinds)
