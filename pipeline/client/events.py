"""What a :class:`~pipeline.client.api.Client` yields from ``events()``: decoded poses,
presence and connection changes (docs/client-api.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.model.pose import PoseFrame


@dataclass(frozen=True, slots=True)
class PoseEvent:
    """A decoded pose of one publisher stream."""

    member_id: str | None
    """The publishing member (None until its member record is known)."""
    stream_id: int
    frame: PoseFrame
    """As the decoder output it (within the codec's precision of what was published)."""
    latency_ms: float
    """Capture to decode, both on the server's clock (see ``docs/room-protocol.md``)."""
    backfill: bool = False
    """A stored packet the server sent on joining (history), not a live one."""


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """Another member joined, left, or changed its record."""

    kind: Literal["join", "leave", "update"]
    member_id: str
    member: Mapping[str, Any]
    """The member record (``id``, ``name``, ``role``, ``subject``...)."""


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """The connection went down or up, or the server refused us."""

    connected: bool
    transport: str
    """The transport kind in use (``websocket`` or ``webrtc``)."""
    reason: str = ""
    code: int | None = None
    refused: bool = False
    """The server refused this member (``reason`` says why)."""
    final: bool = False
    """A refusal no retry can fix (kicked, token refused): the events end."""
    switched: bool = False
    """The stream moved to ``transport`` (``reason``: ``dead``, ``latency``,
    ``failure_rate``, ``recovered``)."""


Event = PoseEvent | PresenceEvent | ConnectionEvent
