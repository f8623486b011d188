"""Clock offset to the server, NTP-style: every transport that measures latency uses it.

A ping carries the client's send time ``t0``; the server answers with its
receive and send times ``t1`` and ``t2``; the client notes ``t3`` on arrival.
The round trip is ``(t3 - t0) - (t2 - t1)`` and the offset (server clock minus
local clock) ``((t1 - t0) + (t2 - t3)) / 2``, exact when both legs take equally
long. The estimate is the offset of the sample with the smallest round trip
among the recent ones (the least queueing, so the least asymmetry).
"""

from __future__ import annotations

from collections import deque


class ClockOffset:
    """The minimum-RTT offset estimate over the last ``window`` ping exchanges."""

    def __init__(self, window: int = 32) -> None:
        self._samples: deque[tuple[int, int]] = deque(maxlen=window)  # (rtt_ns, offset_ns)

    def add(self, t0: int, t1: int, t2: int, t3: int) -> tuple[int, int]:
        """Record one exchange (wall-clock ns); returns its ``(rtt_ns, offset_ns)``."""
        rtt = max((t3 - t0) - (t2 - t1), 0)
        offset = ((t1 - t0) + (t2 - t3)) // 2
        self._samples.append((rtt, offset))
        return rtt, offset

    def clear(self) -> None:
        """Forget every sample (a reconnect may reach another server)."""
        self._samples.clear()

    @property
    def offset_ns(self) -> int | None:
        """Server clock minus local clock from the minimum-RTT sample, or None."""
        return min(self._samples)[1] if self._samples else None

    @property
    def rtt_ns(self) -> int | None:
        """The smallest round trip seen (ns), or None."""
        return min(self._samples)[0] if self._samples else None
