"""Member WebSocket messages: their types, their fields and the one validation of both.

Text messages are JSON objects with a string ``type``; binary messages are
pose packets (:mod:`pipeline.codec`). The server parses what members
send with :func:`parse` (a bad message raises
:class:`~pipeline.errors.RefusedError` with the close code to close with);
clients build their messages with the helpers below and read the server's
with :func:`parse` too (and with :meth:`Backfill.parse`). ``docs/room-protocol.md``
describes every message.

Client -> server: ``join`` (first message, once), ``ping``, ``clock``,
``keyframe_request``, ``ack``, ``broadcast``, ``kick``, ``leave``.
Server -> client: ``welcome``, ``presence``, ``pong``, ``ack``,
``keyframe_request``, ``broadcast``, ``kicked``, ``error``, ``backfill``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from pipeline.errors import RefusedError
from pipeline.wire.close import CloseCode, refusal

#: Types a member may send.
CLIENT_TYPES: Final = frozenset(
    {"join", "ping", "clock", "keyframe_request", "ack", "broadcast", "kick", "leave"}
)
#: Types the server sends.
SERVER_TYPES: Final = frozenset(
    {
        "welcome",
        "presence",
        "pong",
        "ack",
        "keyframe_request",
        "broadcast",
        "kicked",
        "error",
        "backfill",
    }
)
#: Longest accepted ``name``/``resume`` string of a join.
MAX_NAME_LEN: Final = 256

LEAVE: Final = '{"type":"leave"}'


def dumps(obj: Any) -> str:
    """Compact JSON, as every message is written."""
    return json.dumps(obj, separators=(",", ":"))


def parse(text: str, allowed: frozenset[str] = CLIENT_TYPES) -> dict[str, Any]:
    """A text message as a dict with a known string ``type``.

    Raises :class:`RefusedError` with ``malformed_message`` (not a JSON object
    with a string ``type``) or ``unknown_message_type``.
    """
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise refusal(CloseCode.MALFORMED_MESSAGE, f"not JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise refusal(
            CloseCode.MALFORMED_MESSAGE, "control messages are JSON objects with a 'type'"
        )
    if obj["type"] not in allowed:
        raise refusal(CloseCode.UNKNOWN_MESSAGE_TYPE, f"unknown message type {obj['type'][:40]!r}")
    return obj


def _malformed(message: str) -> RefusedError:
    return refusal(CloseCode.MALFORMED_MESSAGE, message)


def field_bool(obj: dict[str, Any], key: str, default: bool) -> bool:
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise _malformed(f"{obj['type']}: {key!r} must be true or false")
    return v


def field_int(obj: dict[str, Any], key: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _malformed(f"{obj['type']}: {key!r} must be an integer")
    return v


def field_str(obj: dict[str, Any], key: str, what: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise _malformed(f"{obj['type']}: {key!r} must be {what}")
    return v


def field_opt_str(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is not None and (not isinstance(v, str) or len(v) > MAX_NAME_LEN):
        raise _malformed(f"{obj['type']}: {key!r} must be a string")
    return v


@dataclass(frozen=True, slots=True)
class Join:
    """The first message of a member: its token, room and what it does."""

    token: str | None
    room: str | None
    publish: bool = False
    subscribe: bool = True
    resume: str | None = None
    """The member id of a previous connection to keep (a reconnect)."""
    name: str | None = None

    def dumps(self) -> str:
        msg: dict[str, Any] = {
            "type": "join",
            "token": self.token,
            "room": self.room,
            "publish": self.publish,
            "subscribe": self.subscribe,
        }
        if self.resume is not None:
            msg["resume"] = self.resume
        if self.name is not None:
            msg["name"] = self.name
        return dumps(msg)

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Join:
        """Fields of a parsed ``join``; ``token``/``room`` may be absent (None) but not
        of another type (the server may take them from the request)."""
        token = obj.get("token")
        if token is not None and not isinstance(token, str):
            raise refusal(CloseCode.TOKEN_MALFORMED, "join: no token (field 'token')")
        room = obj.get("room")
        if room is not None and not isinstance(room, str):
            raise _malformed("join: 'room' must be a string")
        return cls(
            token=token,
            room=room,
            publish=field_bool(obj, "publish", False),
            subscribe=field_bool(obj, "subscribe", True),
            resume=field_opt_str(obj, "resume"),
            name=field_opt_str(obj, "name"),
        )


def ack(stream_id: int, seq: int) -> str:
    return f'{{"type":"ack","stream_id":{stream_id},"seq":{seq}}}'


def ping(ping_id: int, t0_ns: int) -> str:
    return f'{{"type":"ping","id":{ping_id},"t0":{t0_ns}}}'


def keyframe_request(stream_id: int) -> dict[str, Any]:
    return {"type": "keyframe_request", "stream_id": stream_id}


def error(code: CloseCode | None, reason: str, message: str) -> dict[str, Any]:
    """The ``error`` message (before a close, or for a refused request: no code)."""
    out: dict[str, Any] = {"type": "error"}
    if code is not None:
        out["code"] = int(code)
    out["reason"] = reason
    out["message"] = message
    return out


@dataclass(frozen=True, slots=True)
class Backfill:
    """The server's announcement that the next ``count`` pose packets of ``stream_id``
    are stored history (the latest keyframe and the packets after it), not live.

    A joining (or resuming) subscriber receives, per publisher stream, one
    ``backfill`` message and then exactly those packets, in order, before any
    live packet of that stream: ``first_seq``/``last_seq`` are the sequence
    numbers of the first and the last of them.
    """

    stream_id: int
    count: int
    first_seq: int
    last_seq: int

    def message(self) -> dict[str, Any]:
        return {
            "type": "backfill",
            "stream_id": self.stream_id,
            "count": self.count,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
        }

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Backfill:
        return cls(
            field_int(obj, "stream_id"),
            field_int(obj, "count"),
            field_int(obj, "first_seq"),
            field_int(obj, "last_seq"),
        )
