"""A :class:`~pipeline.client.api.Client`'s arguments as the transmit stage's
:class:`~pipeline.config.TransmitConfig`: the client runs the stage's ``Sender`` and the
supervisor's switching policy on it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.config import IceServer, RtcConfig, TransmitConfig, TransportKind
from pipeline.errors import ConfigError
from pipeline.transports.endpoints import server_urls

#: the fields of ``transmit`` a client's ``policy`` may set
POLICY_FIELDS = (
    "max_latency_ms",
    "switch_threshold",
    "recovery_interval_s",
    "hold_s",
    "window_s",
    "max_switches_per_min",
)


def transmit_config(
    kind: TransportKind,
    server_url: str | Sequence[str],
    room: str,
    *,
    ice_servers: Sequence[IceServer | Mapping[str, Any]],
    rtc: RtcConfig | None,
    connect_timeout_s: float,
    max_bandwidth_kbps: float | None,
    ca_file: str | Path | None,
    fallback: TransportKind | None = None,
    policy: Mapping[str, Any] | None = None,
) -> TransmitConfig:
    """The :class:`TransmitConfig` of a client's constructor arguments; a bad one is a
    :class:`ConfigError` naming each field (``policy.<key>`` for the switching ones)."""
    urls = server_urls(server_url)  # a TransportError naming a bad URL, before anything else
    unknown = sorted(set(policy or {}) - set(POLICY_FIELDS))
    if unknown:
        raise ConfigError(
            [f"policy.{k}: not a switching setting (one of {', '.join(POLICY_FIELDS)})"
             for k in unknown]
        )  # fmt: skip
    data: dict[str, Any] = {
        **(policy or {}),
        "primary": kind,
        "fallback": fallback,
        "servers": urls,
        "ca_file": ca_file,
        "room": room,
        "connect_timeout_s": connect_timeout_s,
        "max_bandwidth_kbps": max_bandwidth_kbps,
        "ice_servers": [
            s.model_dump() if isinstance(s, IceServer) else dict(s) for s in ice_servers
        ],
    }
    if rtc is not None:
        data["webrtc"] = rtc
    try:
        return TransmitConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_field(e["loc"]) + f": {e['msg']}" for e in exc.errors()]) from None


def _field(loc: Sequence[Any]) -> str:
    """A validation error's field as the caller named it (``policy.`` for the switching
    settings)."""
    name = ".".join(str(x) for x in loc)
    return f"policy.{name}" if loc and loc[0] in POLICY_FIELDS else name
