"""A decoder that waits a moment for a missing reference instead of giving up at once.

Over a data channel the packets that must arrive (keyframes, anchors: the reliable
``control`` channel) and the others (the lossy ``pose`` channel) travel apart, so a
delta can arrive before the anchor it predicts from, which is still being
retransmitted or is being repaired (docs/webrtc.md, "Loss repair"). A plain
:class:`~pipeline.codec.Decoder` answers :class:`~pipeline.codec.NeedKeyframe` and
the frame is gone; :class:`HoldingDecoder` keeps such a packet for up to
``hold_s`` (at most ``max_held`` packets per stream) and decodes it as soon as its
reference has been decoded, in sequence order, then whatever waited on *that*.
What waited longer counts as undecodable (:attr:`HoldingDecoder.expired`).

Every packet carries an opaque tag (the receiver's arrival time and backfill flag)
that comes back with its decoded frame.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from pipeline.codec.decoder import Decoded, Decoder, NeedKeyframe

T = TypeVar("T")

#: how long a packet waits for its reference by default: six frames at 30 fps
HOLD_S: Final = 0.2
MAX_HELD: Final = 64


@dataclass(slots=True)
class _Held(Generic[T]):
    packet: bytes
    seq: int
    until: float
    tag: T


class HoldingDecoder(Generic[T]):
    """A :class:`Decoder` with a bounded wait for missing references (module docstring)."""

    def __init__(
        self, decoder: Decoder | None = None, *, hold_s: float = HOLD_S, max_held: int = MAX_HELD
    ) -> None:
        self.decoder = decoder if decoder is not None else Decoder()
        self.hold_s = hold_s
        self.max_held = max_held
        self._held: dict[int, dict[int, list[_Held[T]]]] = defaultdict(dict)
        """stream -> missing reference -> the packets waiting for it."""
        self.expired = 0
        """Packets that waited ``hold_s`` (or were pushed out by ``max_held``) in vain."""
        self.released = 0
        """Packets decoded after waiting for their reference."""

    def has(self, stream_id: int, seq: int) -> bool:
        return self.decoder.has(stream_id, seq)

    def held(self, stream_id: int) -> int:
        return sum(len(v) for v in self._held.get(stream_id, {}).values())

    def feed(
        self, packet: bytes, tag: T, now: float
    ) -> tuple[list[tuple[Decoded, T]], NeedKeyframe | None]:
        """Decode ``packet`` (raises :class:`~pipeline.errors.ProtocolError` for bad bytes):
        the frames decoded now (it, and what waited for it), and the
        :class:`NeedKeyframe` when it waits for its own reference."""
        res = self.decoder.decode(packet)
        if isinstance(res, NeedKeyframe):
            waiting = self._held[res.stream_id]
            if self.held(res.stream_id) >= self.max_held:
                self._drop_oldest(waiting)
            waiting.setdefault(res.missing_ref, []).append(
                _Held(bytes(packet), res.seq, now + self.hold_s, tag)
            )
            return [], res
        out = [(res, tag)]
        self._release(res.header.stream_id, res.header.seq, out)
        return out, None

    def expire(self, now: float) -> int:
        """Drop what waited past its time; the number dropped now."""
        n = 0
        for waiting in self._held.values():
            for ref in list(waiting):
                keep = [h for h in waiting[ref] if h.until > now]
                n += len(waiting[ref]) - len(keep)
                if keep:
                    waiting[ref] = keep
                else:
                    del waiting[ref]
        self.expired += n
        return n

    def forget(self) -> None:
        """A new session (a reconnect): nothing held is waited for any more."""
        self.expired += sum(self.held(sid) for sid in self._held)
        self._held.clear()

    def _release(self, stream_id: int, seq: int, out: list[tuple[Decoded, T]]) -> None:
        waiting = self._held.get(stream_id)
        todo = [seq]
        while waiting and todo:
            for h in sorted(waiting.pop(todo.pop(), []), key=lambda h: h.seq):
                res = self.decoder.decode(h.packet)  # decoded once already: well-formed
                if isinstance(res, Decoded):
                    self.released += 1
                    out.append((res, h.tag))
                    todo.append(res.header.seq)
                else:
                    waiting.setdefault(res.missing_ref, []).append(h)

    def _drop_oldest(self, waiting: dict[int, list[_Held[T]]]) -> None:
        ref = min(waiting, key=lambda r: min(h.until for h in waiting[r]))
        group = waiting[ref]
        group.remove(min(group, key=lambda h: h.until))
        if not group:
            del waiting[ref]
        self.expired += 1
