"""Publisher streams of a room: stored packets, history, what a subscriber has, replays.

A stream is the packets of one ``stream_id`` (the packet header's) in one room,
published by one member at a time (its *owner*). The relay rules that use these
are in :mod:`pipeline.server.rooms`; who may own a stream id (bindings to the
token's subject) is decided there too.

Replays: within one owner's connection the sequence numbers of a stream only
go forward. A packet whose ``seq`` is not after the stream's last accepted one
is refused (``stale_packet``), whatever it carries, so a publisher cannot make
the server relay (and every subscriber reset its history for) the same
keyframe again and again. The one exception is a keyframe of a *new epoch*
(a restarted encoder numbers its frames afresh), accepted at most once every
:data:`EPOCH_CHANGE_INTERVAL_S` per stream. A new connection (a reconnect)
starts a new stream state, and its publisher sends a keyframe first anyway.

Packets that arrived on a WebRTC data channel (``docs/webrtc.md``) may come out
of order: :meth:`StreamState.unordered` is the same check, but what it rejects is
dropped and counted (``late``) instead of refused, and a keyframe that arrives
after newer deltas (keyframes travel on the reliable channel, deltas on the lossy
one) is still taken when it is newer than the stream's stored keyframe.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from pipeline.codec.anchors import AnchorTracker

HAVE_WINDOW: Final = 256
EPOCH_CHANGE_INTERVAL_S: Final = 1.0
OwnerT = TypeVar("OwnerT")
"""The member type of the relay (:class:`pipeline.server.rooms.Member`)."""


@dataclass(slots=True)
class StoredPacket:
    """One accepted pose packet with the header fields the relay needs."""

    stream_id: int
    seq: int
    ref_seq: int | None
    keyframe: bool
    data: bytes
    epoch: int = 0
    """The encoder instance (header flags); references never cross epochs."""
    t_recv_ns: int = 0
    """``time.monotonic_ns()`` when the server received it (relay latency); 0: unknown."""
    lossy: bool = False
    """A delta that may go on a lossy channel: it predicts from the stream's latest
    keyframe or anchor and no later packet predicts from it
    (:class:`~pipeline.codec.anchors.AnchorTracker`: ``free``), and the stream's deltas
    have been self-contained for a whole keyframe interval
    (:attr:`StreamState.anchored`); every other packet needs a reliable path."""
    early: bool = False
    """It arrived before its reference (a WebRTC publisher's anchor or keyframe still on
    the reliable channel, or being repaired by NACK): relayed anyway, the subscriber
    holds it until the reference follows."""
    audio: bool = False
    """An audio packet (:mod:`pipeline.codec.audio`): relayed lossy, never stored, always
    decodable (``seq`` is its audio frame counter)."""


class Snapshot:
    """A late-join snapshot in a member's queue: sent whole, never dropped."""

    __slots__ = ("packets",)

    def __init__(self, packets: list[StoredPacket]) -> None:
        self.packets = packets


class Have:
    """Sequence numbers of one stream a subscriber has received since its last keyframe."""

    __slots__ = ("epoch", "newest", "order", "seqs")

    def __init__(self) -> None:
        self.seqs: set[int] = set()
        self.order: deque[int] = deque()
        self.epoch = 0
        self.newest = -1

    def reset(self, epoch: int) -> None:
        self.seqs.clear()
        self.order.clear()
        self.epoch = epoch
        self.newest = -1

    def add(self, seq: int) -> None:
        if len(self.order) >= HAVE_WINDOW:
            self.seqs.discard(self.order.popleft())
        self.order.append(seq)
        self.seqs.add(seq)
        self.newest = max(self.newest, seq)

    def discard(self, seq: int) -> None:
        """Forget ``seq`` (it was not sent after all: the lossy channel's watermark)."""
        self.seqs.discard(seq)


class StreamState(Generic[OwnerT]):
    """A publisher stream: owner, latest keyframe, the packets after it, the last seq."""

    def __init__(self, stream_id: int, history: int) -> None:
        self.stream_id = stream_id
        self.owner: OwnerT | None = None
        self.keyframe: StoredPacket | None = None
        self.since: deque[StoredPacket] = deque(maxlen=max(history - 1, 0))
        self.last_keyframe_request = -1e9
        self.packets = 0
        self.last_seq = -1
        self.audio_last_seq = -1
        """The newest audio frame counter relayed (audio seqs are their own sequence)."""
        self.shared = False
        """Published by the two connections of a hot-standby pair (Room.paired): a packet
        not after the last one is a duplicate of the other path, dropped as late, never a
        replay (``stale_packet``)."""
        self.epoch: int | None = None
        self.epoch_changed = -1e9
        self.anchored = False
        """Every delta of the last complete keyframe interval predicted from its keyframe
        (the publisher's ``references: keyframe`` mode): such deltas decode on their
        own, so they may be lost without harm. Learned over one interval, or presumed
        for a publisher on WebRTC (:meth:`presume_anchored`); lost for good at the
        first delta that predicts from another frame."""
        self._interval_anchored = False
        self._chained = False
        """A delta that predicted from another frame than its keyframe or anchor was seen."""
        self.tracker = AnchorTracker()

    def stale(self, seq: int, epoch: int, keyframe: bool, now: float) -> str | None:
        """Why a packet is a replay (see the module docstring), or None to accept it;
        an accepted packet advances the stream's last sequence number."""
        if self.epoch is not None and seq <= self.last_seq:
            if epoch == self.epoch:
                return f"sequence {seq} is not after {self.last_seq}, the stream's last"
            if not keyframe:
                return f"a new epoch starts with a keyframe (sequence {seq})"
            if now - self.epoch_changed < EPOCH_CHANGE_INTERVAL_S:
                return f"a new epoch at most every {EPOCH_CHANGE_INTERVAL_S:g}s"
        if self.epoch is not None and epoch != self.epoch:
            self.epoch_changed = now
        self.epoch = epoch
        self.last_seq = seq
        return None

    def unordered(self, seq: int, epoch: int, keyframe: bool, now: float) -> str | None:
        """Acceptance of a packet from a data channel: why it is dropped (late, a
        duplicate, a keyframe not newer than the stored one), or None to accept it.

        A late keyframe of the current epoch newer than the stored keyframe is
        accepted without moving the stream's last sequence number back.
        """
        if self.epoch is not None and epoch == self.epoch and seq <= self.last_seq:
            if not keyframe:
                kf = self.keyframe
                if kf is not None and kf.epoch == epoch and seq > kf.seq and not self.stored(seq):
                    return None  # a late packet the stream lacks (an anchor: NACK repair)
                return f"sequence {seq} is not after {self.last_seq}, the stream's last"
            kf = self.keyframe
            if kf is not None and kf.epoch == epoch and seq <= kf.seq:
                return f"keyframe {seq} is not after the stored keyframe {kf.seq}"
            return None
        return self.stale(seq, epoch, keyframe, now)

    def presume_anchored(self) -> None:
        """The publisher sends over WebRTC, where docs/webrtc.md asks for keyframe
        references: treat the stream as anchored from its start, unless a chained
        delta was already seen."""
        if not self._chained:
            self.anchored = True

    def add(self, pkt: StoredPacket) -> None:
        self.packets += 1
        kind = self.tracker.classify(pkt.seq, pkt.ref_seq, pkt.keyframe, pkt.epoch)
        if pkt.keyframe:
            if self.keyframe is not None and self.since:
                self.anchored = self._interval_anchored
            self._interval_anchored = True
            self.keyframe = pkt
            self.since.clear()
        elif self.keyframe is not None:
            if kind == "chained" or pkt.epoch != self.keyframe.epoch:
                self._interval_anchored = self.anchored = False
                self._chained = True
            pkt.lossy = self.anchored and kind == "free"
            self.since.append(pkt)

    def lacks(self, ref_seq: int | None) -> bool:
        """Whether the reference ``ref_seq`` of a delta that just arrived is missing here:
        newer than the stored keyframe and not in the history (an anchor that the
        reliable channel is still retransmitting, or that was lost)."""
        kf = self.keyframe
        if ref_seq is None or kf is None or ref_seq <= kf.seq:
            return False
        return self.stored(ref_seq) is None

    def stored(self, seq: int) -> StoredPacket | None:
        """The stored packet ``seq`` (the keyframe or one of the history), if any."""
        kf = self.keyframe
        if kf is not None and kf.seq == seq:
            return kf
        if kf is None or seq < kf.seq:
            return None
        for p in reversed(self.since):
            if p.seq == seq:
                return p
        return None

    def snapshot(self) -> list[StoredPacket]:
        """The keyframe and the history packets that decode from it, in order."""
        if self.keyframe is None:
            return []
        out = [self.keyframe]
        have = {self.keyframe.seq}
        epoch = self.keyframe.epoch
        for p in sorted(self.since, key=lambda p: p.seq):  # a late anchor came after its deltas
            if p.ref_seq is not None and p.ref_seq in have and p.epoch == epoch:
                out.append(p)
                have.add(p.seq)
        return out
