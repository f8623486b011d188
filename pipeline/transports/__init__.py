"""Transports: how pose packets reach the room (WebSocket now, WebRTC later).

:class:`~pipeline.transports.base.Transport` is the small abstract base;
:class:`~pipeline.transports.websocket.WebSocketTransport` the WebSocket client
used by the transmit stage and every receiver.
"""

from pipeline.transports.base import (
    Control,
    Packet,
    Received,
    StateChange,
    Transport,
    TransportBroken,
    TransportClosed,
    TransportStatistics,
)

__all__ = [
    "Control",
    "Packet",
    "Received",
    "StateChange",
    "Transport",
    "TransportBroken",
    "TransportClosed",
    "TransportStatistics",
]
