"""Network sections of the configuration: WebRTC (ICE servers, link timing) and TLS.

Part of the one configuration tree of :mod:`pipeline.config` (which re-exports
these models); kept apart so that each module stays small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.settings import ConfigModel


class IceServer(ConfigModel):
    """A STUN or TURN server (the WebRTC ``RTCIceServer`` dictionary)."""

    urls: list[str] = Field(
        min_length=1, max_length=8, description="stun:, turn: or turns: URLs (host:port)."
    )
    username: str | None = Field(None, max_length=512, description="TURN user name.")
    credential: str | None = Field(None, max_length=512, description="TURN password.")

    @field_validator("urls")
    @classmethod
    def _schemes(cls, urls: list[str]) -> list[str]:
        for url in urls:
            scheme, _, rest = url.partition(":")
            if scheme not in ("stun", "stuns", "turn", "turns") or not rest:
                raise ValueError(f"{url!r} is not a stun:, stuns:, turn: or turns: URL")
        return urls

    @model_validator(mode="after")
    def _turn_credentials(self) -> IceServer:
        if any(u.startswith("turn") for u in self.urls) and (
            self.username is None or self.credential is None
        ):
            raise ValueError("a TURN server needs username and credential")
        return self


class RtcConfig(ConfigModel):
    """WebRTC peer connections (``docs/webrtc.md``): ICE, heartbeat, flow control."""

    ice_transport_policy: Literal["all", "relay"] = Field(
        "all", description="relay: use TURN relay candidates only."
    )
    heartbeat_ms: int = Field(
        250, ge=10, le=10000, description="Send a heartbeat after this long without sending."
    )
    dead_after_ms: int = Field(
        250, ge=30, le=60000, description="The path is dead after this long without receiving."
    )
    watermark_ms: int = Field(
        100,
        ge=10,
        le=5000,
        description="Most pose data the lossy channel may hold (bufferedAmount).",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, le=120, description="ICE + DTLS + SCTP must be up within this."
    )


class ServerRtcConfig(RtcConfig):
    """The room server's WebRTC side."""

    heartbeat_ms: int = Field(
        50,
        ge=10,
        le=10000,
        description="Send a heartbeat after this long without sending (clients notice a dead "
        "path after 250 ms of silence: keep this well below; 5 chances in 250 ms keep 10 % "
        "random loss from looking like a dead path).",
    )
    dead_after_ms: int = Field(
        1000, ge=30, le=60000, description="The path is dead after this long without receiving."
    )
    enabled: bool = Field(True, description="Accept WebRTC offers from members.")
    max_peers: int = Field(
        500, ge=0, le=100000, description="Peer connections per server (offers past it refused)."
    )


class TlsConfig(ConfigModel):
    """TLS of the room server (https/wss, TLS 1.2 or newer): both files or no section."""

    certfile: Path = Field(description="PEM certificate chain the server presents (leaf first).")
    keyfile: Path = Field(description="PEM private key of certfile (not encrypted).")
