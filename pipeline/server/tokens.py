"""Token verification on the server: fixed algorithm, times, room, kick list, permissions.

Kicks are revocations in the server's store (:mod:`pipeline.server.store`):
they survive a restart.

Verification accepts HS256 only, whatever the token's header says: the
algorithm is read from the header first so that ``alg: none`` and RS/HS
confusion get their own refusal reason (``bad_algorithm``) instead of a
generic one. Every refusal raises :class:`~pipeline.errors.TokenError` with
one of the :data:`~pipeline.wire.tokens.REASONS` codes. Claims, roles,
permissions, minting and the secret are shared with the clients in
:mod:`pipeline.wire.tokens` (re-exported here).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import jwt

from pipeline.errors import TokenError
from pipeline.server.store import MemoryStore, RoomStore
from pipeline.wire.tokens import (
    ALGORITHM,
    ANY_ROOM,
    DEFAULT_TTL_S,
    MAX_TTL_S,
    MIN_SECRET_LEN,
    MODERATE,
    PERMISSIONS,
    PUBLISH_AUDIO,
    PUBLISH_POSE,
    REASONS,
    REQUIRED_CLAIMS,
    ROLE_PERMISSIONS,
    SECRET_ENV,
    SUBSCRIBE,
    Claims,
    mint_token,
    permissions_for,
    resolve_secret,
)

__all__ = [
    "ALGORITHM",
    "ANY_ROOM",
    "DEFAULT_TTL_S",
    "MAX_TTL_S",
    "MIN_SECRET_LEN",
    "MODERATE",
    "PERMISSIONS",
    "PUBLISH_AUDIO",
    "PUBLISH_POSE",
    "REASONS",
    "ROLE_PERMISSIONS",
    "SECRET_ENV",
    "SUBSCRIBE",
    "Claims",
    "KickList",
    "TokenVerifier",
    "mint_token",
    "permissions_for",
    "resolve_secret",
]


class KickList:
    """Kicked tokens (by jti, every room) and subjects (per room), refused until the
    kicked token expires.

    The records live in a :class:`~pipeline.server.store.RoomStore`: in memory
    until the room manager attaches the server's persistent store
    (:meth:`attach`), so that a kick survives a restart.
    """

    def __init__(self, store: RoomStore | None = None) -> None:
        self.store: RoomStore = store if store is not None else MemoryStore()

    def attach(self, store: RoomStore) -> None:
        """Keep the records in ``store`` (the server's, before it accepts anyone)."""
        self.store = store

    def kick(self, claims: Claims, room: str) -> None:
        self.store.revoke(room, claims.subject, claims.jti, claims.exp)

    def is_kicked(self, claims: Claims, room: str, now: float) -> bool:
        return self.store.is_revoked(room, claims.subject, claims.jti, now)

    def prune(self, now: float) -> None:
        self.store.prune(now)

    def __len__(self) -> int:
        return self.store.revocations()


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
                options={"require": REQUIRED_CLAIMS},
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
