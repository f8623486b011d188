"""Close codes of the member WebSocket: the server closes with them, clients act on them.

Every refusal and every limit violation closes *that* connection with a code
from the table below (the private 4000-4999 range of RFC 6455) and a short
reason string (the same ``reason`` that labels ``posewire_server_rejections_total``).
Before closing, the server sends one text message
``{"type": "error", "code": C, "reason": R, "message": "..."}`` with a
human-readable explanation, so that a client can report more than 123 bytes.

====  ======================  ==================================================  =========
code  reason                  meaning                                             client
====  ======================  ==================================================  =========
4001  auth_timeout            no ``join`` within ``server.auth_timeout_s``        retries
4002  malformed_message       text message that is not a JSON object with a       fatal
                              string ``type``, or a field of the wrong type
4003  unknown_message_type    a ``type`` the server does not know                 fatal
4004  bad_packet              binary message that is not a valid pose packet      fatal
4005  stream_spoof            packet with a stream id another subject holds or    fatal
                              is bound to; or taken over by a newer connection
                              of the same subject
4006  not_joined              anything but ``join`` before joining; a 2nd join    fatal
4007  too_slow                control backlog to this member overflowed           retries
4008  too_many_streams        more than ``MAX_STREAMS_PER_MEMBER`` stream ids     fatal
4009  message_too_large       message over ``server.max_message_bytes``; a text   fatal
                              message over 8192 characters; broadcast data over
                              4096 bytes
4010  rate_limited            over ``server.max_messages_per_s`` (1 s burst)      retries
4011  too_many_connections    ``server.max_connections`` reached                  retries
4012  room_full               ``server.max_members_per_room`` reached             retries
4013  too_many_rooms          ``server.max_rooms`` reached                        retries
4014  room_closed             the room was closed by a moderator                  fatal
4015  room_not_found          no such room and ``auto_create_rooms`` is off       fatal
4016  kicked                  a moderator kicked this member                      fatal
4017  stale_packet            a packet whose sequence number is not after the     fatal
                              stream's last one (a replay; see rooms.py)
4018  bad_signaling           WebRTC signaling refused: SDP too large or of the   fatal
                              wrong shape, a malformed candidate, an unexpected
                              data channel (``docs/webrtc.md``)
4101  expired                 token refused: expired                              fatal
4102  not_yet_valid           token refused: nbf/iat in the future                fatal
4103  wrong_room              token refused: issued for another room              fatal
4104  bad_signature           token refused: signature does not match             fatal
4105  bad_algorithm           token refused: algorithm is not HS256               fatal
4106  missing_permission      token lacks a permission the action needs           fatal
4107  kicked_token            token refused: its subject or jti was kicked        fatal
4108  malformed               token refused: not a JWT / claims missing or bad    fatal
====  ======================  ==================================================  =========

A server shutting down closes members with 1001 (going away); clients reconnect.

The *client* column is :attr:`CloseCode.retryable`: a client reconnects (with
backoff) after a retryable code or a standard code in :data:`RETRY_STANDARD`,
and gives up after any other (a token refusal as
:class:`~pipeline.errors.TokenError`, the rest as
:class:`~pipeline.errors.BrokenResourceError` carrying the code and reason).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from pipeline.errors import BrokenResourceError, RefusedError, TokenError

#: Standard close codes after which a client reconnects (normal, going away,
#: abnormal, server error, restart, try again later, bad gateway).
RETRY_STANDARD: Final = frozenset({1000, 1001, 1006, 1011, 1012, 1013, 1014})

#: Stream ids one member may publish.
MAX_STREAMS_PER_MEMBER: Final = 8


class CloseCode(IntEnum):
    AUTH_TIMEOUT = 4001
    MALFORMED_MESSAGE = 4002
    UNKNOWN_MESSAGE_TYPE = 4003
    BAD_PACKET = 4004
    STREAM_SPOOF = 4005
    NOT_JOINED = 4006
    TOO_SLOW = 4007
    TOO_MANY_STREAMS = 4008
    MESSAGE_TOO_LARGE = 4009
    RATE_LIMITED = 4010
    TOO_MANY_CONNECTIONS = 4011
    ROOM_FULL = 4012
    TOO_MANY_ROOMS = 4013
    ROOM_CLOSED = 4014
    ROOM_NOT_FOUND = 4015
    KICKED = 4016
    STALE_PACKET = 4017
    BAD_SIGNALING = 4018
    TOKEN_EXPIRED = 4101
    TOKEN_NOT_YET_VALID = 4102
    TOKEN_WRONG_ROOM = 4103
    TOKEN_BAD_SIGNATURE = 4104
    TOKEN_BAD_ALGORITHM = 4105
    TOKEN_MISSING_PERMISSION = 4106
    TOKEN_KICKED = 4107
    TOKEN_MALFORMED = 4108

    @property
    def reason(self) -> str:
        return _REASON[self]

    @property
    def retryable(self) -> bool:
        """Whether a client should reconnect after this close."""
        return self in _RETRYABLE


_REASON: Final[dict[CloseCode, str]] = {
    CloseCode.AUTH_TIMEOUT: "auth_timeout",
    CloseCode.MALFORMED_MESSAGE: "malformed_message",
    CloseCode.UNKNOWN_MESSAGE_TYPE: "unknown_message_type",
    CloseCode.BAD_PACKET: "bad_packet",
    CloseCode.STREAM_SPOOF: "stream_spoof",
    CloseCode.NOT_JOINED: "not_joined",
    CloseCode.TOO_SLOW: "too_slow",
    CloseCode.TOO_MANY_STREAMS: "too_many_streams",
    CloseCode.MESSAGE_TOO_LARGE: "message_too_large",
    CloseCode.RATE_LIMITED: "rate_limited",
    CloseCode.TOO_MANY_CONNECTIONS: "too_many_connections",
    CloseCode.ROOM_FULL: "room_full",
    CloseCode.TOO_MANY_ROOMS: "too_many_rooms",
    CloseCode.ROOM_CLOSED: "room_closed",
    CloseCode.ROOM_NOT_FOUND: "room_not_found",
    CloseCode.KICKED: "kicked",
    CloseCode.STALE_PACKET: "stale_packet",
    CloseCode.BAD_SIGNALING: "bad_signaling",
    CloseCode.TOKEN_EXPIRED: "expired",
    CloseCode.TOKEN_NOT_YET_VALID: "not_yet_valid",
    CloseCode.TOKEN_WRONG_ROOM: "wrong_room",
    CloseCode.TOKEN_BAD_SIGNATURE: "bad_signature",
    CloseCode.TOKEN_BAD_ALGORITHM: "bad_algorithm",
    CloseCode.TOKEN_MISSING_PERMISSION: "missing_permission",
    CloseCode.TOKEN_KICKED: "kicked_token",
    CloseCode.TOKEN_MALFORMED: "malformed",
}

_RETRYABLE: Final = frozenset(
    {
        CloseCode.AUTH_TIMEOUT,
        CloseCode.TOO_SLOW,
        CloseCode.RATE_LIMITED,
        CloseCode.TOO_MANY_CONNECTIONS,
        CloseCode.ROOM_FULL,
        CloseCode.TOO_MANY_ROOMS,
    }
)

#: TokenError.reason -> close code.
TOKEN_CLOSE_CODES: Final[dict[str, CloseCode]] = {
    "expired": CloseCode.TOKEN_EXPIRED,
    "not_yet_valid": CloseCode.TOKEN_NOT_YET_VALID,
    "wrong_room": CloseCode.TOKEN_WRONG_ROOM,
    "bad_signature": CloseCode.TOKEN_BAD_SIGNATURE,
    "bad_algorithm": CloseCode.TOKEN_BAD_ALGORITHM,
    "missing_permission": CloseCode.TOKEN_MISSING_PERMISSION,
    "kicked": CloseCode.TOKEN_KICKED,
    "malformed": CloseCode.TOKEN_MALFORMED,
}

#: close code -> TokenError.reason (the inverse, for clients).
TOKEN_REASONS: Final[dict[int, str]] = {int(v): k for k, v in TOKEN_CLOSE_CODES.items()}


def close_code(value: int) -> CloseCode | None:
    """The :class:`CloseCode` for an int, or None for codes outside the table."""
    try:
        return CloseCode(value)
    except ValueError:
        return None


def refusal(code: CloseCode, message: str) -> RefusedError:
    """The error that closes a member with ``code`` (its reason) and ``message``."""
    return RefusedError(code.reason, message, code=int(code))


def final_error(
    code: int | None, message: str, reason: str | None = None
) -> TokenError | BrokenResourceError | None:
    """How a client reads a close: the error that ends it, or None when a retry may help.

    A token close code gives a :class:`TokenError` with its reason; a final
    posewire or unknown code a :class:`BrokenResourceError` carrying the code and
    reason (``reason`` names an unknown code, e.g. from the error message that
    came before the close); standard and retryable codes give None.
    """
    if code is None or code in RETRY_STANDARD:
        return None
    if code in TOKEN_REASONS:
        return TokenError(TOKEN_REASONS[code], f"token refused ({TOKEN_REASONS[code]}): {message}")
    cc = close_code(code)
    if cc is not None and cc.retryable:
        return None
    why = cc.reason if cc is not None else (reason or str(code))
    return BrokenResourceError(
        f"server closed the connection ({why}): {message}", code=code, reason=why
    )
