"""A blocking wrapper of :class:`~pipeline.client.api.Client`, with the original design's names.

:class:`SyncClient` runs one event loop in a background thread (daemon, named
``posewire-client``) and calls the async client there; every method blocks until
its coroutine is done (at most ``timeout_s``). Received events are moved into a
bounded thread-safe queue (the oldest dropped when nobody reads them) for
:meth:`SyncClient.poses` / :meth:`SyncClient.poll`.

Original design (issue 17): ``join_room(room_id, user_id, role) -> bool``,
``send_pose_data(pose_data, room_id, priority) -> bool``,
``get_performance_metrics() -> dict``, and ``leave()``. ``join_room`` returns False
when the server refuses (token, closed room: the exception is kept in
:attr:`SyncClient.last_error`); a bad URL or option raises as with the async client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from pipeline.client.api import Client, Priority
from pipeline.client.events import Event, PoseEvent
from pipeline.errors import BrokenResourceError, ClosedResourceError, TokenError, TransportError

T = TypeVar("T")

#: roles of the original design that publish (a subscriber only receives)
PUBLISHING_ROLES = frozenset({"publisher", "moderator"})


class SyncClient:
    """A blocking client (see the module docstring). ``token`` must allow ``role``."""

    def __init__(
        self,
        server_url: str,
        token: str,
        *,
        timeout_s: float = 15.0,
        max_events: int = 4096,
        **options: Any,
    ) -> None:
        self.server_url = server_url
        self.token = token
        self.timeout_s = timeout_s
        self.options = options
        self.client: Client | None = None
        self.last_error: BaseException | None = None
        self.events_dropped = 0
        self._queue: queue.Queue[Event] = queue.Queue(maxsize=max_events)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="posewire-client", daemon=True
        )
        self._thread.start()
        self._pump: concurrent.futures.Future[None] | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise ClosedResourceError("this client was closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout_s)

    # ------------------------------------------------------------------ original names

    def join_room(self, room_id: str, user_id: str, role: str = "subscriber") -> bool:
        """Join ``room_id`` as ``user_id`` (the member name); a ``publisher`` or
        ``moderator`` also publishes. False (and :attr:`last_error`) when refused or
        unreachable; leaves the room joined before."""
        if self.client is not None:
            self.leave()
        options = {"name": user_id, "publish": role in PUBLISHING_ROLES, **self.options}
        client = Client(self.server_url, room_id, self.token, **options)
        try:
            self._run(client.open())
        except (TokenError, BrokenResourceError, TransportError) as exc:
            self.last_error = exc
            return False
        self.client = client
        self.last_error = None
        self._pump = asyncio.run_coroutine_threadsafe(self._forward(client), self._loop)
        return True

    def send_pose_data(
        self, pose_data: Any, room_id: str | None = None, priority: Priority = "normal"
    ) -> bool:
        """Publish one pose (a ``PoseFrame`` or a MediaPipe result) into the joined room;
        ``room_id``, when given, must be that room (:class:`TransportError` otherwise)."""
        client = self._joined()
        if room_id is not None and room_id != client.room:
            raise TransportError(f"not joined to room {room_id!r} (joined: {client.room!r})")
        return self._run(client.publish(pose_data, priority=priority))

    def get_performance_metrics(self) -> dict[str, Any]:
        """:meth:`Client.metrics` of the joined room, plus ``events_dropped`` here."""
        client = self._joined()
        out: dict[str, Any] = self._run(_call(client.metrics))
        out["sync_events_dropped"] = self.events_dropped
        return out

    def leave(self) -> None:
        """Leave the joined room (nothing when none)."""
        client, self.client = self.client, None
        if client is not None:
            self._run(client.close())
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None

    # ------------------------------------------------------------------ receiving

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """The events waiting (waits up to ``timeout`` for the first one)."""
        out: list[Event] = []
        try:
            out.append(
                self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            )
            while True:
                out.append(self._queue.get_nowait())
        except queue.Empty:
            return out

    def poses(self, timeout: float = 1.0) -> Iterator[PoseEvent]:
        """Received poses as they come; ends when none came for ``timeout`` seconds
        (other events are skipped: :meth:`poll` has them)."""
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                return
            if isinstance(event, PoseEvent):
                yield event

    async def _forward(self, client: Client) -> None:
        async for event in client.events():
            while True:
                try:
                    self._queue.put_nowait(event)
                    break
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                        self.events_dropped += 1
                    except queue.Empty:
                        pass

    def _joined(self) -> Client:
        if self.client is None:
            raise ClosedResourceError("not in a room: join_room first")
        return self.client

    def close(self) -> None:
        """Leave and stop the background thread (idempotent)."""
        if not self._thread.is_alive():
            return
        try:
            self.leave()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout_s)
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _call(fn: Any) -> Any:
    """Run a plain function in the client's loop (its state belongs to that thread)."""
    return fn()
