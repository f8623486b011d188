"""The abstract transport: how pose packets and control messages leave and arrive.

A transport connects one member to a room. It sends pose packets
(:meth:`Transport.send`) and JSON control messages
(:meth:`Transport.send_control`), and yields what arrives
(:meth:`Transport.recv` or ``async for``): :class:`Packet` (another member's
pose packet), :class:`Control` (acks, keyframe requests, presence,
broadcasts...) and :class:`StateChange` (connected, disconnected, resumed).

Error vocabulary (the rings' one, from :mod:`pipeline.errors`):

* :class:`~pipeline.errors.ClosedResourceError`: *you* closed this transport,
  then used it.
* :class:`~pipeline.errors.BrokenResourceError`: the other side refused or
  dropped us for good (``code``/``reason`` from the close-code table of
  :mod:`pipeline.wire.close`); a token refusal is raised as
  :class:`~pipeline.errors.TokenError` instead.
* :class:`~pipeline.errors.TransportError` (their base): could not connect (yet).

:func:`refusal_of` reads a refusal (a token refusal or a broken resource) as a
:class:`Refusal`: its short reason and whether retrying can ever succeed (a
closed or missing room may be (re)opened; a kick, a refused token or a protocol
violation cannot be undone by retrying).

A transport never blocks the caller on a reconnect: while it is
disconnected, :meth:`Transport.send` drops the packet and counts it in
``send_failures``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pipeline.errors import BrokenResourceError, ClosedResourceError, TokenError


@dataclass(frozen=True, slots=True)
class Packet:
    """A pose packet from another member."""

    data: bytes
    received_ns: int
    """Local wall clock (``time.time_ns()``) when it arrived."""


@dataclass(frozen=True, slots=True)
class Control:
    """A control message (``type`` and the whole JSON object in ``body``)."""

    type: str
    body: Mapping[str, Any]
    received_ns: int


@dataclass(frozen=True, slots=True)
class StateChange:
    """The connection went up or down."""

    connected: bool
    code: int | None = None
    """Close code when going down (None when unknown)."""
    reason: str = ""
    resumed: bool = False
    """When going up: the server kept our member id."""


Received = Packet | Control | StateChange


@dataclass
class TransportStatistics:
    """What a transport measured so far (the transport policy reads these)."""

    kind: str
    connected: bool = False
    packets_sent: int = 0
    bytes_sent: int = 0
    send_failures: int = 0
    """Packets that could not be sent (disconnected or broken)."""
    packets_received: int = 0
    bytes_received: int = 0
    controls_received: int = 0
    bad_messages: int = 0
    """Messages from the far side refused and ignored (not JSON, too deep, out of range)."""
    dropped_received: int = 0
    """Received items dropped because the consumer did not keep up (oldest first)."""
    acks: int = 0
    ack_rtt_ms: float | None = None
    """Median send->ack round trip over the recent window."""
    send_ms: float | None = None
    """Mean time spent in ``send`` over the recent window."""
    buffered_bytes: int = 0
    """Bytes written but not yet handed to the kernel."""
    connects: int = 0
    reconnects: int = 0
    clock_offset_ns: int | None = None
    """Server clock minus local clock (NTP-style, minimum-RTT ping sample)."""
    clock_rtt_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Transport(abc.ABC):
    """One member's connection to a room."""

    kind: ClassVar[str] = "abstract"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and join; raise :class:`~pipeline.errors.TransportError` (cannot connect),
        :class:`~pipeline.errors.BrokenResourceError` or :class:`~pipeline.errors.TokenError`
        (refused)."""

    @abc.abstractmethod
    async def send(self, packet: bytes) -> None:
        """Send one pose packet (never waits for a reconnect)."""

    @abc.abstractmethod
    async def send_control(self, message: Mapping[str, Any]) -> None:
        """Send one control message (a JSON object with a ``type``)."""

    @abc.abstractmethod
    async def recv(self) -> Received:
        """The next received item; raises once closed or broken and drained."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Leave and release everything (idempotent)."""

    @abc.abstractmethod
    def statistics(self) -> TransportStatistics: ...

    async def probe_rtt_ms(self) -> float | None:
        """One probe exchange with the far side over the path the stream would take: its
        round trip in ms, None when lost, timed out or not possible (the hot standby's
        latency: it carries no stream, so no acks)."""
        return None

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    def __aiter__(self) -> Transport:
        return self

    async def __anext__(self) -> Received:
        try:
            return await self.recv()
        except ClosedResourceError:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class MemberTransport(Protocol):
    """What a receiving member needs of its transport: a joined member of one room
    (:class:`~pipeline.transports.websocket.WebSocketTransport`,
    :class:`~pipeline.transports.webrtc.WebRtcTransport`)."""

    @property
    def url(self) -> str:
        """The server's member endpoint in use (of the URLs it was given)."""

    member_id: str | None
    """Our member id (from the welcome; kept across a resume)."""
    members: dict[str, dict[str, Any]]
    """The room's member records by id (kept current by presence)."""

    @property
    def clock_offset_ns(self) -> int | None:
        """Server clock minus local clock, or None before it was measured."""

    def stream_owner(self, stream_id: int) -> dict[str, Any] | None:
        """The member record publishing ``stream_id``, if known."""

    async def request_keyframe(self, stream_id: int, ref_seq: int | None = None) -> None:
        """Ask the server (and through it the publisher) for a keyframe of ``stream_id``;
        ``ref_seq``: the missing reference, which the server sends again when it has it."""

    async def connect(self) -> None: ...

    async def recv(self) -> Received: ...

    def recv_nowait(self) -> Received | None:
        """The next received item, or None when nothing is waiting."""

    async def close(self) -> None: ...

    def statistics(self) -> TransportStatistics: ...


def _no_token() -> str:
    raise TokenError("malformed", "no access token given")


@dataclass(frozen=True)
class TransportContext:
    """What a transport factory needs besides the ``transmit`` config section."""

    token: Callable[[], str] = _no_token
    """The member's access token (called only by transports that join a room)."""
    name: str | None = None
    """The member's display name (the transmit stage uses the run id)."""
    publish: bool = True
    subscribe: bool = False
    pair: bool = False
    """Join as one of a publisher's two hot-standby connections (the transmit stage with
    a fallback: both its transports; docs/room-protocol.md)."""
    resolve_path: Callable[[Path], Path] = Path
    """Makes a configured path absolute (relative to the configuration file)."""


#: Refusals after which retrying (with backoff) can succeed: a moderator may reopen a
#: closed room, a missing room may be created.
RETRY_LATER_REASONS: frozenset[str] = frozenset({"room_closed", "room_not_found"})


@dataclass(frozen=True)
class Refusal:
    """The far side refused this member: why, and whether a retry can ever succeed."""

    reason: str
    """Short machine-readable reason (a close code's reason, e.g. ``kicked``)."""
    message: str
    final: bool
    """True when no retry can succeed (kicked, token refused, protocol violation)."""
    error: TokenError | BrokenResourceError


def refusal_of(exc: TokenError | BrokenResourceError) -> Refusal:
    """Classify a refusal: a token refusal is final; a broken resource is final unless its
    reason is in :data:`RETRY_LATER_REASONS`."""
    if isinstance(exc, TokenError):
        return Refusal(f"token_{exc.reason}", str(exc), True, exc)
    reason = exc.reason or (str(exc.code) if exc.code is not None else "unknown")
    return Refusal(reason, str(exc), reason not in RETRY_LATER_REASONS, exc)
