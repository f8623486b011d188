"""Clock offset to the server, NTP-style: every transport that measures latency uses it.

A ping carries the client's send time ``t0``; the server answers with its
receive and send times ``t1`` and ``t2``; the client notes ``t3`` on arrival.
The round trip is ``(t3 - t0) - (t2 - t1)`` and the offset (server clock minus
local clock) ``((t1 - t0) + (t2 - t3)) / 2``, exact when both legs take equally
long. The estimate is the offset of the sample with the smallest round trip
among the recent ones (the least queueing, so the least asymmetry).

:class:`ClockSync` runs the exchanges for a transport, over the path it is given.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pipeline.wire import messages


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


#: sends one text message to the server over whichever path is current (raises
#: ``ConnectionError`` when that path is closed)
SendText = Callable[[str], Awaitable[None]]


class ClockSync:
    """The ping/pong exchanges of one member: pending pings, their answers, the estimate.

    The owner hands every ``pong`` to :meth:`on_pong` and chooses the path each
    ping goes over (the WebSocket, or a WebRTC control channel once open).
    """

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.estimate = ClockOffset()
        self.timeout_s = timeout_s
        self._pings: dict[int, asyncio.Future[tuple[int, int, int, int]]] = {}
        self._next_id = 0

    def on_pong(self, obj: Mapping[str, Any], t3: int) -> None:
        pid = obj.get("id")
        fut = self._pings.pop(pid, None) if isinstance(pid, int) else None
        t0, t1, t2 = obj.get("t0"), obj.get("t1"), obj.get("t2")
        if fut is not None and not fut.done() and all(type(v) is int for v in (t0, t1, t2)):
            fut.set_result((int(t0 or 0), int(t1 or 0), int(t2 or 0), t3))

    async def ping(self, send: SendText) -> tuple[int, int] | None:
        """One exchange: its ``(rtt_ns, offset_ns)``, or None on timeout or a closed path."""
        self._next_id += 1
        pid = self._next_id
        fut: asyncio.Future[tuple[int, int, int, int]] = asyncio.get_running_loop().create_future()
        self._pings[pid] = fut
        t0 = time.time_ns()
        try:
            await send(messages.ping(pid, t0))
            async with asyncio.timeout(self.timeout_s):
                t0, t1, t2, t3 = await fut
        except (TimeoutError, ConnectionError):
            return None
        finally:
            self._pings.pop(pid, None)
        return self.estimate.add(t0, t1, t2, t3)

    async def measure(self, send: SendText, samples: int, *, fresh: bool = False) -> None:
        """Up to ``samples`` exchanges in a row (stops at the first that fails);
        ``fresh`` forgets the earlier samples first (a new server, a new path)."""
        if fresh:
            self.estimate.clear()
        for _ in range(samples):
            if await self.ping(send) is None:
                break

    def cancel(self) -> None:
        for fut in self._pings.values():
            fut.cancel()
        self._pings.clear()
