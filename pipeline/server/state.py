"""What one server process shares between requests (the app's :data:`STATE`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from pipeline.config import ServerConfig
from pipeline.server.guard import HttpGuard
from pipeline.server.metrics import ServerMetrics
from pipeline.server.rooms import RoomManager
from pipeline.server.rtc import RtcHub
from pipeline.server.tokens import TokenVerifier

if TYPE_CHECKING:  # redis is imported only when server.redis is configured
    from pipeline.server.backplane import Backplane


@dataclass
class ServerState:
    """Everything one server process shares between requests."""

    config: ServerConfig
    manager: RoomManager
    verifier: TokenVerifier
    metrics: ServerMetrics
    secret: str
    dev: bool
    guard: HttpGuard
    rtc: RtcHub
    cluster: Backplane | None = None
    """The Redis backplane (``server.redis``), or None: a single node."""
    ready: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def accepting(self) -> bool:
        cluster_ok = self.cluster is None or self.cluster.connected
        return cluster_ok and self.ready and self.manager.connections < self.config.max_connections


STATE = web.AppKey("posewire_state", ServerState)


def bearer(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None
