"""The per-connection rate limiter of the member WebSocket.

The close codes a limit violation closes with are in :mod:`pipeline.wire.close`.
"""

from __future__ import annotations

import time


class RateLimiter:
    """Token bucket: ``rate`` messages per second with a burst of one second's worth."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self._tokens = self.burst
        self._last = time.monotonic()

    def allow(self, now: float | None = None) -> bool:
        """Take one token; False when the bucket is empty."""
        t = time.monotonic() if now is None else now
        tokens = self._tokens + (t - self._last) * self.rate
        self._last = t
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True
