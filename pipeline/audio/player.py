"""Every publisher's audio at one receiving member: a :class:`Playout` per stream.

:class:`AudioPlayer` is what :class:`pipeline.client.receiver.Receiver` hands audio
packets and decoded poses to (``receive --audio``): it checks each packet
(:func:`~pipeline.codec.audio.parse_audio`; a malformed one is counted and skipped),
starts one :class:`~pipeline.audio.playout.Playout` per stream with its virtual sound
card as a task of the running event loop (the first stream's writes the WAV), and puts
both on the server's clock with the offsets the receiver knows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.audio.playout import Playout
from pipeline.codec.audio import parse_audio
from pipeline.errors import ProtocolError


class AudioPlayer:
    """The audio streams of one room as one member hears them."""

    def __init__(self, wav: Path | None, now_server_ns: Callable[[], int], *, sync: bool) -> None:
        self.wav = wav
        self.now = now_server_ns
        self.sync = sync
        """The audio delay also covers the poses' transit (lip sync); False: audio only."""
        self.playouts: dict[int, Playout] = {}
        self.bad = 0
        """Malformed audio packets (skipped)."""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def on_packet(self, data: bytes, offsets: Callable[[int], tuple[int, int]], t: int) -> bool:
        """One audio packet that arrived at wall-clock ``t``; ``offsets(stream_id)`` gives
        (ours, the publisher's) clock offsets to the server. False: malformed, skipped."""
        try:
            pkt = parse_audio(data)
        except ProtocolError:
            self.bad += 1
            for playout in self.playouts.values():
                playout.stats.bad += 1
            return False
        if pkt.stream_id not in self.playouts:
            wav = self.wav if not self.playouts else None
            made = self.playouts[pkt.stream_id] = Playout(wav, self.now, sync=self.sync)
            self._tasks.append(asyncio.get_running_loop().create_task(made.run(self._stop)))
        playout = self.playouts[pkt.stream_id]
        playout.stats.bytes += len(data)
        mine, pub = offsets(pkt.stream_id)
        playout.on_packet(pkt, pkt.capture_ts_ns + pub, t + mine)
        return True

    def on_pose(self, stream_id: int, capture_ns: int, arrival_ns: int) -> None:
        """A live decoded pose (server-clock times), presented on its stream's audio clock."""
        playout = self.playouts.get(stream_id)
        if playout is not None:
            playout.on_pose(capture_ns, arrival_ns)

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for playout in self.playouts.values():
            playout.close()

    def frames(self) -> list[int]:
        """The WAV's frames' capture times (publisher clock; -1: concealed)."""
        first = next(iter(self.playouts.values()), None)
        return first.frame_raw_capture if first is not None else []

    def report(self) -> dict[str, Any]:
        return {str(k): p.report() for k, p in sorted(self.playouts.items())}
