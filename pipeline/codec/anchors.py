"""Which packets of one stream must arrive: keyframes, and the anchors of an anchor stream.

A sender of a data channel (the publisher's WebRTC transport) and the room server
both split a stream's packets into those that must arrive (they travel on the
reliable ``control`` channel) and those that may be lost without harm (the lossy
``pose`` channel; docs/webrtc.md). Neither knows the encoder's reference mode
(``encode.references``), so both learn it from the headers, the same way, here:

* a keyframe must arrive;
* a delta that predicts from the stream's latest keyframe or latest *anchor* is
  *self-contained*: it decodes with what must arrive anyway;
* a delta at least :data:`~pipeline.codec.header.ANCHOR_INTERVAL` after a
  self-contained reference is an anchor *candidate*. In ``anchor`` mode the next
  deltas predict from it (it must arrive); in ``keyframe`` mode they keep predicting
  from the keyframe (it is an ordinary delta with a long gap). The first delta that
  names a candidate, or the keyframe past a candidate, settles the mode of the
  stream (:attr:`AnchorTracker.mode`); until then a candidate is treated as an anchor
  (sending one packet reliably costs nothing, losing an anchor costs frames);
* any other delta (``previous`` mode: it predicts from the packet before it) is
  *chained*: one loss breaks the packets after it, so it must arrive too.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Literal

from pipeline.codec.header import ANCHOR_INTERVAL

#: streams one sender follows at most (:func:`tracker_for`: past it they start afresh)
MAX_TRACKED_STREAMS: Final = 64
#: packets remembered to tell "predicts from a packet seen" from "from one not here yet"
SEEN: Final = 64

Mode = Literal["unknown", "anchor", "keyframe", "chained"]
Kind = Literal["keyframe", "anchor", "free", "chained"]


class AnchorTracker:
    """Classifies the packets of one stream in arrival order (see the module docstring)."""

    __slots__ = ("_anchor", "_candidate", "_epoch", "_keyframe", "_seen", "_seen_order", "mode")

    def __init__(self) -> None:
        self.mode: Mode = "unknown"
        self._epoch = -1
        self._keyframe: int | None = None
        self._anchor: int | None = None
        """The latest anchor (or candidate): what the next deltas may predict from."""
        self._candidate = False
        self._seen: set[int] = set()
        """The sequence numbers of the last :data:`SEEN` packets."""
        self._seen_order: deque[int] = deque()

    def classify(self, seq: int, ref_seq: int | None, keyframe: bool, epoch: int) -> Kind:
        """What the packet is: ``keyframe``, ``anchor`` (must arrive), ``free`` (may be
        lost) or ``chained`` (must arrive: packets after it predict from it)."""
        if keyframe or ref_seq is None:
            if epoch != self._epoch:
                self.mode, self._epoch = "unknown", epoch
            if self._keyframe is None or seq > self._keyframe:  # not a late, older one
                self._keyframe = seq
                if self._anchor is None or self._anchor < seq:  # (an anchor on it overtook it)
                    self._anchor, self._candidate = None, False
            self._see(seq)
            return "keyframe"
        if epoch != self._epoch or self._keyframe is None:
            return "chained"
        seen = ref_seq in self._seen
        self._see(seq)
        if self.mode == "chained":
            return "chained"
        if ref_seq == self._anchor:
            if self._candidate:  # the next deltas predict from the candidate
                self.mode, self._candidate = "anchor", False
        elif ref_seq == self._keyframe:
            if self._candidate and self._anchor is not None and seq > self._anchor:
                self.mode, self._candidate = "keyframe", False  # they do not
        elif not seen and ref_seq > max(self._keyframe, self._anchor or -1):
            # predicts from a packet not here yet: a keyframe or an anchor still on the
            # reliable channel (a delta on the lossy one overtook it)
            pass
        else:
            self.mode = "chained"
            return "chained"
        if seq - ref_seq >= ANCHOR_INTERVAL and self.mode in ("unknown", "anchor"):
            self._anchor, self._candidate = seq, self.mode == "unknown"
            return "anchor"
        return "free"

    def _see(self, seq: int) -> None:
        if len(self._seen_order) >= SEEN:
            self._seen.discard(self._seen_order.popleft())
        self._seen_order.append(seq)
        self._seen.add(seq)


def tracker_for(trackers: dict[int, AnchorTracker], stream_id: int) -> AnchorTracker:
    """The tracker of ``stream_id`` in ``trackers`` (made on first use; at most
    :data:`MAX_TRACKED_STREAMS`, all forgotten past it)."""
    tracker = trackers.get(stream_id)
    if tracker is None:
        if len(trackers) >= MAX_TRACKED_STREAMS:
            trackers.clear()
        tracker = trackers[stream_id] = AnchorTracker()
    return tracker
