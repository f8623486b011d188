"""The sender's priority queue (issue 13): the real queue in front of a real WebSocket
transport to a real room server; a subscriber decodes what arrives with the real decoder.

Ages are given to the queue explicitly (``now``) where a test needs a delta to be stale,
so that no test depends on how fast this machine is; the throttle test runs in real time
and asserts counts and the cap, not times.
"""

from __future__ import annotations

import asyncio
import time

from pipeline.codec import Decoder, NeedKeyframe, peek_header
from pipeline.codec.audio import pack_audio
from pipeline.codec.header import ANCHOR_INTERVAL
from pipeline.transports.base import Packet
from pipeline.transports.sendqueue import Priority, SendQueue, send_next
from pipeline.transports.throttle import Throttle
from pipeline.transports.websocket import WebSocketTransport
from tests.test_server_support import PoseSource, Server, member, running_server, until

FRAME_NS = 33_333_333


def _frames(src: PoseSource, n: int, t0: int) -> list[tuple[bytes, int]]:
    """``n`` packets of ``src`` with capture timestamps one frame apart from ``t0``."""
    return [(src.next(), t0 + i * FRAME_NS) for i in range(n)]


async def _pair(srv: Server) -> tuple[WebSocketTransport, WebSocketTransport]:
    pub = member(srv, "Q", publish=True, subscribe=False, subject="pub")
    sub = member(srv, "Q", "subscriber", subject="sub")
    await sub.connect()
    await pub.connect()
    return pub, sub


async def _received(sub: WebSocketTransport, n: int) -> list[bytes]:
    items = await until(sub, lambda xs: sum(isinstance(i, Packet) for i in xs) >= n)
    return [i.data for i in items if isinstance(i, Packet)]


def _decodable(packets: list[bytes]) -> int:
    dec = Decoder()
    return sum(not isinstance(dec.decode(p), NeedKeyframe) for p in packets)


def test_keyframes_first_and_stale_deltas_dropped_not_sent_late() -> None:
    """Keyframe references (the WebRTC default): every delta predicts from the keyframe,
    so a delta that waited longer than a frame while a newer one waits is dropped."""

    async def main() -> None:
        async with running_server() as srv:
            pub, sub = await _pair(srv)
            src = PoseSource(7, references="keyframe", keyframe_interval=30)
            q = SendQueue(16)
            t0 = time.time_ns()
            for packet, ts in _frames(src, 5, t0):  # K1 D2 D3 D4 D5, queued at 0
                q.put(packet, capture_ts_ns=ts, now=0.0)
            assert round(q.interval_s * 1000) == 33
            sent = []
            while (item := q.pop(now=0.2)) is not None:  # they all waited 200 ms
                await pub.send(item.packet)
                sent.append(item)
            # D4 is ANCHOR_INTERVAL after the keyframe: an anchor candidate, which must
            # arrive until the stream's mode is known (pipeline/codec/anchors.py)
            assert [(i.priority, i.seq) for i in sent] == [
                (Priority.KEYFRAME, 1),
                (Priority.KEYFRAME, 4),
                (Priority.DELTA, 5),
            ]
            m = q.metrics()
            assert m["sendqueue_dropped_delta_total"] == 2
            assert m["sendqueue_dropped_stale_total"] == 2
            assert m["sendqueue_dropped_keyframe_total"] == 0
            got = await _received(sub, 3)
            assert [peek_header(p).seq for p in got] == [1, 4, 5]
            assert _decodable(got) == 3  # the newest pose, at once
            await pub.close()
            await sub.close()

    asyncio.run(main())


def test_previous_references_a_full_queue_breaks_the_chain_and_asks_a_keyframe() -> None:
    """Previous-packet references (the WebSocket default): a delta a waiting packet
    predicts from is never stale; past the capacity the oldest delta goes, the deltas that
    depended on it are dropped as undecodable and one keyframe request follows."""

    async def main() -> None:
        async with running_server() as srv:
            pub, sub = await _pair(srv)
            src = PoseSource(8, references="previous", keyframe_interval=30)
            asked: list[int] = []
            q = SendQueue(4, on_broken=lambda: asked.append(1))
            t0 = time.time_ns()
            frames = _frames(src, 6, t0)  # K1 D2..D6, each predicting from the previous
            for packet, ts in frames[:4]:
                q.put(packet, capture_ts_ns=ts, now=0.0)
            item = q.pop(now=1.0)  # K1; D2..D4 wait long but each is a reference: kept
            assert item is not None and item.seq == 1
            await pub.send(item.packet)
            assert len(q) == 3
            for packet, ts in frames[4:]:  # D5, D6: past the capacity D2 is dropped
                q.put(packet, capture_ts_ns=ts, now=1.0)
            assert q.pop(now=1.0) is None  # D3..D6 all lost their reference
            m = q.metrics()
            assert m["sendqueue_dropped_full_total"] == 1
            assert m["sendqueue_dropped_unreferenced_total"] == 4
            assert asked == [1]  # one keyframe request per break
            key = src.next(keyframe=True)  # what the encoder does on that request
            q.put(key, capture_ts_ns=t0 + 6 * FRAME_NS, now=1.0)
            q.put(src.next(), capture_ts_ns=t0 + 7 * FRAME_NS, now=1.0)
            while (item := q.pop(now=1.0)) is not None:
                await pub.send(item.packet)
            got = await _received(sub, 3)
            assert [peek_header(p).seq for p in got] == [1, 7, 8]
            assert _decodable(got) == 3  # nothing undecodable went on the wire
            await pub.close()
            await sub.close()

    asyncio.run(main())


def test_under_a_bandwidth_cap_keyframes_all_go_and_the_rest_is_counted() -> None:
    """A 30 fps stream into a cap of about half its rate, in real time: the throttle holds
    the cap, every keyframe arrives, every packet is either received or counted as a drop,
    and every received packet decodes."""

    async def main() -> None:
        async with running_server() as srv:
            pub, sub = await _pair(srv)
            src = PoseSource(9, references="keyframe", keyframe_interval=10)
            q = SendQueue(16)
            throttle = Throttle(6.0)  # kbit/s; the stream is about 12
            offered = keyframes = sent = largest = 0
            t_start = time.monotonic()
            next_frame = t_start
            sent_bytes = 0
            while offered < 60:  # 2 s of frames, paced like a camera
                now = time.monotonic()
                if now >= next_frame:
                    packet = src.next()
                    largest = max(largest, len(packet))
                    keyframes += peek_header(packet).keyframe
                    q.put(packet, capture_ts_ns=time.time_ns())
                    offered += 1
                    next_frame += 1 / 30

                async def send(p: bytes) -> bool:
                    throttle.consume(len(p))
                    await pub.send(p)
                    return True

                done = await send_next(q, throttle, send)
                if done is not None:
                    sent += 1
                    sent_bytes += len(done[0].packet)
                else:
                    await asyncio.sleep(0.002)
            elapsed = time.monotonic() - t_start
            m = q.metrics()
            assert sent + m["sendqueue_dropped_total"] + len(q) == offered
            assert m["sendqueue_dropped_keyframe_total"] == 0
            assert 0 < m["sendqueue_dropped_delta_total"] < offered
            # the bucket allows its burst (0.1 s) and a debt of one packet above the rate
            assert sent_bytes * 8 / 1000 <= 6.0 * (elapsed + 0.1) + largest * 8 / 1000
            got = await _received(sub, sent)
            assert sum(peek_header(p).keyframe for p in got) == keyframes
            assert _decodable(got) == sent
            await pub.close()
            await sub.close()

    asyncio.run(main())


def test_the_anchors_of_an_anchor_stream_rank_with_keyframes() -> None:
    """Anchor references (the WebRTC default): the deltas after an anchor predict from it,
    so it must arrive: it ranks (and goes) with the keyframes, never dropped as stale."""
    src = PoseSource(10, references="anchor", keyframe_interval=60)
    q = SendQueue(64)
    t0 = time.time_ns()
    for packet, ts in _frames(src, 2 * ANCHOR_INTERVAL + 2, t0):
        q.put(packet, capture_ts_ns=ts, now=0.0)
    first = [q.pop(now=0.0) for _ in range(3)]
    assert [i.priority for i in first if i is not None] == [Priority.KEYFRAME] * 3
    anchors = [i.seq for i in first[1:] if i is not None]
    assert anchors == [1 + ANCHOR_INTERVAL, 1 + 2 * ANCHOR_INTERVAL]
    rest = []
    while (item := q.pop(now=1.0)) is not None:
        rest.append(item)
    assert [i.seq for i in rest] == [2 + 2 * ANCHOR_INTERVAL]  # the newest delta only
    assert q.metrics()["sendqueue_dropped_keyframe_total"] == 0


def test_audio_ranks_after_keyframes_and_before_pose_deltas() -> None:
    """One queue for pose and audio (issue 13/14): a keyframe goes first, then audio, then
    the pose deltas; a full queue drops deltas before audio, and audio is never stale."""
    src = PoseSource(11, keyframe_interval=60)
    q = SendQueue(5)
    t0 = time.time_ns()
    frames = list(_frames(src, 3, t0))
    audio = [pack_audio(11, 100 + k, t0 + k * 20_000_000, 960, b"\x08" * 40) for k in range(3)]
    q.put(frames[1][0], capture_ts_ns=frames[1][1], now=0.0)  # a delta first
    q.put(audio[0], capture_ts_ns=t0, now=0.0)
    q.put(frames[0][0], capture_ts_ns=frames[0][1], now=0.0)  # the keyframe last
    q.put(audio[1], capture_ts_ns=t0, now=0.0)
    q.put(frames[2][0], capture_ts_ns=frames[2][1], now=0.0)
    q.put(audio[2], capture_ts_ns=t0, now=0.0)  # six in a queue of five: a delta goes
    assert q.metrics()["sendqueue_dropped_delta_total"] == 1
    assert q.metrics()["sendqueue_dropped_audio_total"] == 0
    order = []
    while (item := q.pop(now=5.0)) is not None:  # long after: stale deltas go, audio stays
        order.append(item.priority)
    assert order[:4] == [Priority.KEYFRAME, Priority.AUDIO, Priority.AUDIO, Priority.AUDIO]
    assert set(order[4:]) <= {Priority.DELTA}


def test_packets_sent_beside_the_queue_count_in_the_offered_rate() -> None:
    q = SendQueue(4)
    q.put(PoseSource(5).next())
    before = q.queued_bytes
    q.offered_beside(123)  # an audio packet that went at once
    assert q.queued_bytes == before + 123
    assert q.metrics()["sendqueue_queued_bytes_total"] == before + 123
    assert len(q) == 1  # nothing queued by it
