"""Access tokens: JWT (HS256) minted with a server secret, verified with fixed algorithms.

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

Verification accepts HS256 only, whatever the token's header says: the
algorithm is read from the header first so that ``alg: none`` and RS/HS
confusion get their own refusal reason (``bad_algorithm``) instead of a
generic one. Every refusal raises :class:`~pipeline.errors.TokenError` with
one of the :data:`REASONS` codes.

The secret is read the same way by the server and by ``python -m pipeline
token``: the ``POSEWIRE_SECRET`` environment variable, else ``server.secret``
in the configuration. Without a secret only ``--dev`` servers start (they use
a random secret that lives as long as the process).
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
_REQUIRED = ["sub", "room", "role", "perms", "exp", "nbf", "iat", "jti"]


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
    if not room or len(room) > 64:
        raise TokenError("malformed", "room must be 1 to 64 characters")
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


class KickList:
    """Kicked tokens (by jti) and subjects (per room), remembered until the token expires."""

    def __init__(self) -> None:
        self._jti: dict[str, float] = {}
        self._subject: dict[tuple[str, str], float] = {}

    def kick(self, claims: Claims, room: str) -> None:
        self._jti[claims.jti] = max(self._jti.get(claims.jti, 0.0), claims.exp)
        key = (room, claims.subject)
        self._subject[key] = max(self._subject.get(key, 0.0), claims.exp)

    def is_kicked(self, claims: Claims, room: str, now: float) -> bool:
        exp = self._jti.get(claims.jti)
        if exp is not None and exp >= now:
            return True
        exp = self._subject.get((room, claims.subject))
        return exp is not None and exp >= now

    def prune(self, now: float) -> None:
        self._jti = {k: v for k, v in self._jti.items() if v >= now}
        self._subject = {k: v for k, v in self._subject.items() if v >= now}

    def __len__(self) -> int:
        return len(self._jti)


class TokenVerifier:
    """Verifies tokens against one secret; the algorithm is fixed to HS256."""

    def __init__(self, secret: str, *, leeway_s: float = 2.0, kicks: KickList | None = None):
        self._secret = secret
        self.leeway_s = leeway_s
        self.kicks = kicks if kicks is not None else KickList()

    def decode(self, token: str) -> Claims:
        """Signature, algorithm, times and claim shapes; no room or permission check."""
        if not isinstance(token, str) or not token:
            raise TokenError("malformed", "no token given")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise TokenError("malformed", f"not a JWT: {exc}") from exc
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise TokenError(
                "bad_algorithm", f"token algorithm {alg!r} refused: the server accepts HS256 only"
            )
        try:
            raw = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                leeway=self.leeway_s,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenError("expired", "token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenError(
                "not_yet_valid", "token not yet valid (nbf/iat in the future)"
            ) from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenError(
                "bad_signature", "token signature does not match the server secret"
            ) from exc
        except jwt.InvalidAlgorithmError as exc:
            raise TokenError("bad_algorithm", f"token algorithm refused: {exc}") from exc
        except jwt.InvalidTokenError as exc:
            raise TokenError("malformed", f"malformed token: {exc}") from exc
        return _claims(raw)

    def verify(
        self, token: str, *, room: str, require: Iterable[str] = (), now: float | None = None
    ) -> Claims:
        """Decode, then check the room, the kick list and the required permissions."""
        claims = self.decode(token)
        if not claims.covers_room(room):
            raise TokenError(
                "wrong_room", f"token is for room {claims.room!r}, not for room {room!r}"
            )
        t = time.time() if now is None else now
        if self.kicks.is_kicked(claims, room, t):
            raise TokenError("kicked", f"{claims.subject!r} was kicked from room {room!r}")
        missing = sorted(set(require) - claims.perms)
        if missing:
            raise TokenError(
                "missing_permission", f"token lacks permission(s): {', '.join(missing)}"
            )
        return claims


def _claims(raw: Mapping[str, Any]) -> Claims:
    def text(name: str) -> str:
        v = raw.get(name)
        if not isinstance(v, str) or not v or len(v) > 256:
            raise TokenError("malformed", f"claim {name!r} must be a non-empty string")
        return v

    def number(name: str) -> float:
        v = raw.get(name)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TokenError("malformed", f"claim {name!r} must be a number")
        return float(v)

    perms = raw.get("perms")
    if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
        raise TokenError("malformed", "claim 'perms' must be a list of strings")
    unknown = set(perms) - PERMISSIONS
    if unknown:
        raise TokenError("malformed", f"unknown permission(s): {', '.join(sorted(unknown))}")
    return Claims(
        subject=text("sub"),
        room=text("room"),
        role=text("role"),
        perms=frozenset(perms),
        exp=number("exp"),
        nbf=number("nbf"),
        iat=number("iat"),
        jti=text("jti"),
    )
