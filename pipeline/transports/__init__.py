"""Transports: how pose packets reach the room (file and WebSocket now, WebRTC later).

:class:`~pipeline.transports.base.Transport` is the small abstract base. Each
transport is one module that registers a factory in :data:`TRANSPORTS` under
its :class:`~pipeline.config.TransportKind` value::

    TRANSPORTS.add("websocket", TransmitConfig, member_factory(WebSocketTransport))

A factory takes the ``transmit`` config section and a
:class:`~pipeline.transports.base.TransportContext` (token, member name, path
resolution) and returns an unconnected transport; :func:`make_transport`
finds it. :mod:`~pipeline.transports.sender` is the publishing machinery the
transmit stage wraps (throttle, make-before-break switching, feedback).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import TransmitConfig
from pipeline.registry import Registry
from pipeline.transports.base import (
    Control,
    Packet,
    Received,
    StateChange,
    Transport,
    TransportContext,
    TransportStatistics,
)

TransportFactory = Callable[[TransmitConfig, TransportContext], Transport]

#: Transport plugins by kind (``file``, ``websocket``).
TRANSPORTS: Registry[TransportFactory] = Registry(
    "transport", package="pipeline.transports", entry_points="posewire.transports"
)


def make_transport(kind: str, cfg: TransmitConfig, context: TransportContext) -> Transport:
    """An unconnected transport of ``kind``; :class:`~pipeline.registry.RegistryError`
    when no module registered that kind."""
    return TRANSPORTS.get(kind).factory(cfg, context)


__all__ = [
    "TRANSPORTS",
    "Control",
    "Packet",
    "Received",
    "StateChange",
    "Transport",
    "TransportContext",
    "TransportFactory",
    "TransportStatistics",
    "make_transport",
]
