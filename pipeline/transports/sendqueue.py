"""The sender's priority queue: what goes first when the link cannot take everything.

The transmit stage does not hand each packet to the transport as it comes: it puts every
packet of the ``packets`` ring into a :class:`SendQueue` and sends from it whenever the
throttle (:class:`~pipeline.transports.throttle.Throttle`, ``transmit.max_bandwidth_kbps``)
says a packet may go (:func:`send_next`). The queue orders by :class:`Priority`, then age:

* ``CONTROL`` (0): control messages and acks. The transports send their own control
  traffic (heartbeats, clock pings, joins, acks) beside the queue, never behind a pose:
  that is the same order, strictly first. The class exists for callers that queue control
  data themselves.
* ``KEYFRAME`` (1): a keyframe is what every later delta of its stream needs; losing one
  costs up to a keyframe interval of undecodable deltas. The anchors of an anchor stream
  (``encode.references: anchor``, the WebRTC default) rank here too, for the same reason.
* ``AUDIO`` (2; an audio packet goes straight to the transport while the queue is empty
  and the throttle lets it, else it waits here, behind keyframes and anchors, before
  every pose delta): a lost 20 ms
  audio frame is an audible gap that concealment only hides for a frame or two, while a
  lost pose delta is covered by the next one 33 ms later (a viewer draws the newest
  pose); but an audio frame never costs anything *after* it, so it ranks below keyframes.
* ``DELTA`` (3): pose deltas; the newest one makes the older ones worthless.

Drops, each counted per priority and per reason (:meth:`SendQueue.metrics`):

* ``stale`` (a live link only: a file sink records every packet): a delta that has
  waited longer than one frame interval (measured from the capture timestamps) while a
  newer pose packet of its stream waits behind it is dropped
  at the sender rather than sent late: a late pose is worthless. A delta that a waiting
  packet predicts from (``encode.references: previous``) is never stale: dropping it
  would make the waiting one undecodable.
* ``superseded``: a packet older (by sequence number) than one of its stream already sent
  (a keyframe goes before older deltas): the room server takes a stream's packets in
  order only, and the newer pose made it worthless anyway.
* ``full``: past ``capacity`` the oldest packet of the lowest priority goes.
* ``unreferenced``: a delta whose reference was dropped cannot be decoded by anybody; it
  is dropped too, and ``on_broken`` asks the encoder for a keyframe (once per break).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pipeline.codec import peek_header
from pipeline.codec.anchors import AnchorTracker, tracker_for
from pipeline.codec.audio import is_audio
from pipeline.errors import ProtocolError, WouldBlock
from pipeline.transports.throttle import Throttle

#: frame interval assumed until the stream shows its own (30 fps)
DEFAULT_INTERVAL_S = 1 / 30
#: the drop reasons, in the order of the metrics
REASONS = ("stale", "superseded", "full", "unreferenced")
#: sequence numbers of dropped packets remembered per stream (until its next keyframe)
MAX_MISSING = 1024


class Priority(enum.IntEnum):
    """Lower goes first (see the module docstring for the order and why)."""

    CONTROL = 0
    KEYFRAME = 1
    AUDIO = 2
    DELTA = 3


@dataclass
class Item:
    """One queued packet."""

    packet: bytes
    priority: Priority
    order: int
    """Arrival order (older first within a priority)."""
    queued_at: float
    """Monotonic time it entered the queue."""
    capture_ts_ns: int | None
    stream_id: int | None = None
    seq: int | None = None
    ref_seq: int | None = None


def classify(
    packet: bytes, trackers: dict[int, AnchorTracker]
) -> tuple[Priority, int | None, int | None, int | None]:
    """Priority, stream id, seq and reference of a pose packet. What must arrive ranks as
    a keyframe: keyframes, and the anchors of an anchor stream (the next deltas predict
    from them; :class:`~pipeline.codec.anchors.AnchorTracker`, per stream in
    ``trackers``). A packet that is not one of ours (no valid header) is not ours to
    judge: it ranks as a keyframe, never stale."""
    if is_audio(packet):
        return Priority.AUDIO, None, None, None
    try:
        h = peek_header(packet)
    except ProtocolError:
        return Priority.KEYFRAME, None, None, None
    tracker = tracker_for(trackers, h.stream_id)
    kind = tracker.classify(h.seq, h.ref_seq, h.keyframe, h.epoch)
    prio = Priority.KEYFRAME if kind in ("keyframe", "anchor") else Priority.DELTA
    return prio, h.stream_id, h.seq, h.ref_seq


class SendQueue:
    """A bounded priority queue of packets with stale-delta dropping (module docstring)."""

    def __init__(
        self, capacity: int, *, on_broken: Callable[[], None] = lambda: None, live: bool = True
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.on_broken = on_broken
        self.live = live
        """Drop stale deltas (a live link; not a file sink, which records everything)."""
        self._items: list[Item] = []
        self._order = itertools.count()
        self.interval_s = DEFAULT_INTERVAL_S
        """Frame interval of the stream (a running mean of capture-timestamp gaps)."""
        self._last_ts: int | None = None
        self._missing: dict[int | None, set[int]] = {}
        self._want_key: set[int | None] = set()
        self._trackers: dict[int, AnchorTracker] = {}
        self._sent_seq: dict[int | None, int] = {}
        """The newest sequence number popped, per stream."""
        self.dropped: dict[tuple[Priority, str], int] = {}
        self.peak = 0
        self.queued = 0
        self.queued_bytes = 0
        """Bytes put (the rate offered to the link, whatever went)."""

    def __len__(self) -> int:
        return len(self._items)

    def put(
        self, packet: bytes, *, capture_ts_ns: int | None = None, now: float | None = None
    ) -> None:
        """Queue ``packet`` (its priority from its header); past the capacity the oldest
        packet of the lowest priority is dropped (``full``)."""
        now = time.monotonic() if now is None else now
        prio, sid, seq, ref = classify(packet, self._trackers)
        if capture_ts_ns is not None and prio != Priority.CONTROL:
            if self._last_ts is not None and 0 < capture_ts_ns - self._last_ts < 1_000_000_000:
                gap = (capture_ts_ns - self._last_ts) / 1e9
                self.interval_s += 0.2 * (gap - self.interval_s)
            self._last_ts = capture_ts_ns
        item = Item(packet, prio, next(self._order), now, capture_ts_ns, sid, seq, ref)
        self._items.append(item)
        self.queued += 1
        self.queued_bytes += len(packet)
        if len(self._items) > self.capacity:
            victim = max(self._items, key=lambda i: (i.priority, -i.order))
            self._drop(victim, "full")
        self.peak = max(self.peak, len(self._items))

    def offered_beside(self, nbytes: int) -> None:
        """A packet sent beside the queue (audio while nothing waits): it is part of the
        rate offered to the link (``queued_bytes``, which the degradation ladder reads)
        all the same."""
        self.queued_bytes += nbytes

    def _drop(self, item: Item, reason: str) -> None:
        self._items.remove(item)
        key = (item.priority, reason)
        self.dropped[key] = self.dropped.get(key, 0) + 1
        if item.seq is None or reason in ("stale", "superseded"):
            return  # never a reference of a waiting packet
        missing = self._missing.setdefault(item.stream_id, set())
        if len(missing) < MAX_MISSING:
            missing.add(item.seq)
        if reason == "unreferenced" and item.stream_id not in self._want_key:
            self._want_key.add(item.stream_id)  # the chain is broken: a keyframe mends it
            self.on_broken()

    def _sweep(self, now: float, stale: bool) -> None:
        """Drop superseded and unreferenced deltas, and stale ones with ``stale``."""
        referenced = {(i.stream_id, i.ref_seq) for i in self._items if i.ref_seq is not None}
        newest: dict[int | None, int] = {}
        for i in self._items:
            if i.seq is not None and i.priority != Priority.CONTROL:
                newest[i.stream_id] = max(newest.get(i.stream_id, -1), i.seq)
        for item in list(self._items):
            if (
                item.ref_seq is not None  # a keyframe may restart a stream
                and item.seq is not None
                and item.seq <= self._sent_seq.get(item.stream_id, -1)
            ):
                self._drop(item, "superseded")
                continue
            if item.priority != Priority.DELTA or item.seq is None:
                continue
            if item.ref_seq in self._missing.get(item.stream_id, ()):
                self._drop(item, "unreferenced")
            elif (
                stale
                and now - item.queued_at > self.interval_s
                and newest.get(item.stream_id, -1) > item.seq
                and (item.stream_id, item.seq) not in referenced
            ):
                self._drop(item, "stale")

    def pop(self, now: float | None = None, *, stale: bool = True) -> Item | None:
        """The next packet to send (highest priority, then oldest), after dropping what
        is undecodable or out of order, and (``stale`` and :attr:`live`) stale; ``None``
        when nothing is left."""
        self._sweep(time.monotonic() if now is None else now, stale and self.live)
        if not self._items:
            return None
        item = min(self._items, key=lambda i: (i.priority, i.order))
        self._items.remove(item)
        if item.seq is not None:
            self._sent_seq[item.stream_id] = item.seq
        if item.ref_seq is None and item.seq is not None:  # a keyframe: a fresh start
            self._missing.pop(item.stream_id, None)
            self._want_key.discard(item.stream_id)
        return item

    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def metrics(self) -> dict[str, float]:
        """``sendqueue_depth``, ``_peak``, ``_interval_ms``, what was queued, and the
        drops: per priority ``sendqueue_dropped_<priority>_total`` and per reason
        ``sendqueue_dropped_<reason>_total``."""
        out: dict[str, float] = {
            "sendqueue_depth": float(len(self._items)),
            "sendqueue_peak": float(self.peak),
            "sendqueue_capacity": float(self.capacity),
            "sendqueue_interval_ms": self.interval_s * 1000,
            "sendqueue_dropped_total": float(self.dropped_total()),
            "sendqueue_queued_total": float(self.queued),
            "sendqueue_queued_bytes_total": float(self.queued_bytes),
        }
        for prio in Priority:
            n = sum(v for (p, _), v in self.dropped.items() if p == prio)
            out[f"sendqueue_dropped_{prio.name.lower()}_total"] = float(n)
        for reason in REASONS:
            n = sum(v for (_, r), v in self.dropped.items() if r == reason)
            out[f"sendqueue_dropped_{reason}_total"] = float(n)
        return out


async def fill(queue: SendQueue, ring: Any) -> bool:
    """Move what waits in ``ring`` (a bounded-queue ring of the pipeline) into ``queue``
    without blocking, as far as it has room; with ``queue`` empty, wait for one item in a
    thread (at most 0.1 s). False when nothing is queued."""
    while len(queue) < queue.capacity:
        try:
            item = ring.recv(timeout=0)
        except WouldBlock:
            break
        queue.put(bytes(item.data), capture_ts_ns=item.ts_ns)
    if not queue:
        try:
            item = await asyncio.get_running_loop().run_in_executor(None, ring.recv, 0.1)
        except WouldBlock:
            return False
        queue.put(bytes(item.data), capture_ts_ns=item.ts_ns)
    return True


async def send_next(
    queue: SendQueue, throttle: Throttle, send: Callable[[bytes], Awaitable[bool]]
) -> tuple[Item, bool] | None:
    """Send the queue's next packet when the throttle lets one go now; ``None`` when it
    says wait or nothing is queued (the caller fills the queue meanwhile, and what went
    stale in the wait is dropped by the next call). Returns the item and whether
    ``send`` succeeded."""
    if not queue or throttle.delay() > 0:
        return None
    item = queue.pop()
    if item is None:
        return None
    return item, await send(item.packet)
