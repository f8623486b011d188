"""Access tokens as both sides see them: claims, roles, permissions, minting (JWT, HS256).

A token grants one *subject* access to one *room* with a *role* and a set of
*permissions*. Claims::

    sub    subject (who), a string
    room   the room name, or "*" for every room (server-wide moderators)
    role   publisher | subscriber | moderator (or any string, with explicit perms)
    perms  list of permissions: publish_pose, publish_audio, subscribe, moderate
    exp    expiry (seconds since the epoch)
    nbf    not valid before
    iat    issued at
    jti    unique token id (kicks are recorded by jti and by subject-in-room)

Verification is the server's (:mod:`pipeline.server.tokens`); a refusal
raises :class:`~pipeline.errors.TokenError` with one of the :data:`REASONS`
codes, which a client also receives as a close code
(:data:`pipeline.wire.close.TOKEN_CLOSE_CODES`).

The secret is read the same way by the server, by a publisher that mints
its own token (the transmit stage) and by ``python -m pipeline token``: the
``POSEWIRE_SECRET`` environment variable, else ``server.secret`` in the
configuration. Without a secret only ``--dev`` servers start (they use a
random secret that lives as long as the process).
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt

from pipeline.config import ServerConfig
from pipeline.errors import ConfigError, TokenError
from pipeline.wire.messages import valid_room_name

ALGORITHM: Final = "HS256"
SECRET_ENV: Final = "POSEWIRE_SECRET"
MIN_SECRET_LEN: Final = 32
ANY_ROOM: Final = "*"

PUBLISH_POSE: Final = "publish_pose"
PUBLISH_AUDIO: Final = "publish_audio"
SUBSCRIBE: Final = "subscribe"
MODERATE: Final = "moderate"
PERMISSIONS: Final = frozenset({PUBLISH_POSE, PUBLISH_AUDIO, SUBSCRIBE, MODERATE})

#: Default permission set of each role.
ROLE_PERMISSIONS: Final[Mapping[str, frozenset[str]]] = {
    "publisher": frozenset({PUBLISH_POSE, PUBLISH_AUDIO, SUBSCRIBE}),
    "subscriber": frozenset({SUBSCRIBE}),
    "moderator": frozenset({PUBLISH_POSE, PUBLISH_AUDIO, SUBSCRIBE, MODERATE}),
}

#: Refusal reason codes (``TokenError.reason``).
REASONS: Final = (
    "expired",
    "not_yet_valid",
    "wrong_room",
    "bad_signature",
    "bad_algorithm",
    "missing_permission",
    "kicked",
    "malformed",
)

DEFAULT_TTL_S: Final = 3600.0
MAX_TTL_S: Final = 366 * 24 * 3600.0
REQUIRED_CLAIMS: Final = ["sub", "room", "role", "perms", "exp", "nbf", "iat", "jti"]


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified token's claims."""

    subject: str
    room: str
    role: str
    perms: frozenset[str]
    exp: float
    nbf: float
    iat: float
    jti: str

    def allows(self, perm: str) -> bool:
        return perm in self.perms

    def covers_room(self, room: str) -> bool:
        return self.room == ANY_ROOM or self.room == room


def resolve_secret(config: ServerConfig | None, *, dev: bool = False) -> str:
    """The token secret: ``$POSEWIRE_SECRET``, else ``server.secret``.

    With neither: a random per-process secret when ``dev`` is true, else a
    :class:`ConfigError` explaining how to set one.
    """
    env = os.environ.get(SECRET_ENV)
    if env is not None and env != "":
        if len(env) < MIN_SECRET_LEN:
            raise ConfigError(
                [f"${SECRET_ENV}: the token secret must be at least {MIN_SECRET_LEN} characters"]
            )
        return env
    if config is not None and config.secret:
        return config.secret
    if dev:
        return secrets.token_urlsafe(32)
    raise ConfigError(
        [
            f"server.secret: no token secret: set ${SECRET_ENV} or server.secret "
            f"(at least {MIN_SECRET_LEN} characters), or run the server with --dev"
        ]
    )


def permissions_for(role: str, perms: Iterable[str] | None = None) -> frozenset[str]:
    """Explicit ``perms`` (validated), else the role's default set."""
    if perms is not None:
        out = frozenset(perms)
        unknown = out - PERMISSIONS
        if unknown:
            raise TokenError("malformed", f"unknown permission(s): {', '.join(sorted(unknown))}")
        return out
    try:
        return ROLE_PERMISSIONS[role]
    except KeyError:
        known = ", ".join(sorted(ROLE_PERMISSIONS))
        raise TokenError(
            "malformed", f"unknown role {role!r} (known: {known}; or give explicit permissions)"
        ) from None


def mint_token(
    secret: str,
    *,
    room: str,
    role: str,
    subject: str | None = None,
    ttl_s: float = DEFAULT_TTL_S,
    perms: Iterable[str] | None = None,
    now: float | None = None,
    not_before: float | None = None,
    jti: str | None = None,
) -> str:
    """Sign a token for ``subject`` in ``room`` with ``role`` (HS256)."""
    if room != ANY_ROOM and not valid_room_name(room):
        raise TokenError(
            "malformed",
            f"room {room[:80]!r}: 1-64 of letters, digits, '_', '.', '-' (or '*': every room)",
        )
    if not 0 < ttl_s <= MAX_TTL_S:
        raise TokenError("malformed", f"ttl must be in (0, {MAX_TTL_S:.0f}] seconds, got {ttl_s}")
    t = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": subject or f"{role}-{secrets.token_hex(4)}",
        "room": room,
        "role": role,
        "perms": sorted(permissions_for(role, perms)),
        "iat": int(t),
        "nbf": int(t if not_before is None else not_before),
        "exp": int(t + ttl_s),
        "jti": jti or uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
