"""Send-rate cap of a publisher: a token bucket in bytes.

:class:`Throttle` caps the send rate: a packet waits until the bucket has room, so a low
cap backs packets up into the ring (latency grows, the ring drops the oldest).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.errors import CommandError

#: the largest cap ``set max_bandwidth_kbps`` accepts (as ``transmit.max_bandwidth_kbps``)
MAX_BANDWIDTH_KBPS = 10_000_000.0


class Throttle:
    """Token bucket in bytes; the bucket may go into debt by one packet, never more.

    A packet may go when the bucket is not in debt; sending takes its size from
    the bucket, which refills at the rate up to ``burst_s`` seconds' worth.
    """

    def __init__(self, kbps: float | None, burst_s: float = 0.1) -> None:
        self.burst_s = burst_s
        self.kbps: float | None = None
        self._tokens = 0.0
        self._at = time.monotonic()
        self.set_rate(kbps)

    def set_rate(self, kbps: float | None) -> None:
        """New cap in kbit/s; ``None`` or 0 lifts it."""
        self._refill()
        self.kbps = kbps if kbps else None
        self._tokens = min(self._tokens, self._capacity())

    def _capacity(self) -> float:
        return 0.0 if self.kbps is None else self.kbps * 125.0 * self.burst_s

    def _refill(self) -> None:
        now = time.monotonic()
        if self.kbps is not None:
            self._tokens = min(self._capacity(), self._tokens + (now - self._at) * self.kbps * 125)
        self._at = now

    def delay(self) -> float:
        """Seconds until the next packet may go (0: now)."""
        if self.kbps is None:
            return 0.0
        self._refill()
        return 0.0 if self._tokens >= 0 else -self._tokens / (self.kbps * 125)

    def consume(self, nbytes: int) -> None:
        if self.kbps is not None:
            self._refill()
            self._tokens -= nbytes

    def on_set(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """``set`` handler: applies ``max_bandwidth_kbps`` (other keys are the business of
        ``set``'s generic parameters; the monitor refuses names nobody knows); refuses a
        value that is not a finite number in [0, :data:`MAX_BANDWIDTH_KBPS`] or null."""
        if "max_bandwidth_kbps" not in args:
            return None
        value = args["max_bandwidth_kbps"]
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= MAX_BANDWIDTH_KBPS  # NaN and inf fail this too
        ):
            raise CommandError(
                f"max_bandwidth_kbps must be a number in [0, {MAX_BANDWIDTH_KBPS:g}] or null, "
                f"got {value!r}"
            )
        self.set_rate(float(value) if value else None)
        return {"max_bandwidth_kbps": self.kbps}
