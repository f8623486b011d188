"""Member WebSocket messages: their types, their fields and the one validation of both.

Text messages are JSON objects with a string ``type``; binary messages are
pose packets (:mod:`pipeline.codec`). The server parses what members
send with :func:`parse` (a bad message raises
:class:`~pipeline.errors.RefusedError` with the close code to close with);
clients build their messages with the helpers below and read the server's
with :func:`parse` too (``allowed=SERVER_TYPES``; :func:`member_record` for a
member record on its own). ``docs/room-protocol.md`` describes every message.

This is the one validation of the member protocol: JSON through
:func:`pipeline.model.jsonsafe.loads` (bounded nesting, finite numbers, 64-bit
integers), then per type (:data:`CLIENT_FIELDS`, :data:`SERVER_FIELDS`) the
type and range of every field: clock offsets within +-1 day, RTTs 0-60 s,
stream ids 0..2**32-1, sequence numbers and timestamps 0..2**63-1; room names
and member ids matched whole (``fullmatch``).

Client -> server: ``join`` (first message, once), ``ping``, ``clock``,
``keyframe_request``, ``ack``, ``broadcast``, ``kick``, ``leave``; WebRTC
(``docs/webrtc.md``): ``rtc_offer``, ``rtc_candidate``, ``rtc_close``, ``hb``.
Server -> client: ``welcome``, ``presence``, ``pong``, ``ack``,
``keyframe_request``, ``broadcast``, ``kicked``, ``error``, ``backfill``;
WebRTC: ``rtc_answer``, ``rtc_state``, ``hb``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from pipeline.errors import JsonInputError, RefusedError
from pipeline.model import jsonsafe
from pipeline.wire.close import CloseCode, refusal

#: Types a member may send.
CLIENT_TYPES: Final = frozenset(
    {
        "join",
        "ping",
        "clock",
        "keyframe_request",
        "ack",
        "broadcast",
        "kick",
        "leave",
        "hb",
        "rtc_offer",
        "rtc_candidate",
        "rtc_close",
    }
)
#: Types the server sends.
SERVER_TYPES: Final = frozenset(
    {
        "welcome",
        "presence",
        "pong",
        "ack",
        "keyframe_request",
        "nack",
        "broadcast",
        "kicked",
        "error",
        "backfill",
        "hb",
        "rtc_answer",
        "rtc_state",
    }
)
#: Longest accepted ``name``/``resume`` string of a join.
MAX_NAME_LEN: Final = 256
#: Longest control (text) message a member may send, in characters; the server's own
#: messages (a welcome lists every member) are not bounded by it.
MAX_CONTROL_CHARS: Final = 8192
#: Largest ``data`` of a broadcast, as compact JSON.
MAX_BROADCAST_BYTES: Final = 4096

#: Room names and member ids: matched whole (``fullmatch``: no trailing newline).
ROOM_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
MEMBER_ID_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,32}")

# Numeric ranges (inclusive) of every numeric field, client and server messages alike.
DAY_NS: Final = 86_400 * 10**9
OFFSET_NS: Final = (-DAY_NS, DAY_NS)
"""A clock offset to the server: within +-1 day."""
RTT_NS: Final = (0, 60 * 10**9)
"""A round-trip time: 0 to 60 s."""
STREAM_ID: Final = (0, 2**32 - 1)
SEQ: Final = (0, 2**63 - 1)
TIME_NS: Final = (0, 2**63 - 1)
"""Wall-clock nanoseconds (``time.time_ns()``)."""
COUNT: Final = (0, 2**53)
"""Counters and sizes."""
CLOSE_CODE: Final = (1000, 4999)

LEAVE: Final = '{"type":"leave"}'


def valid_room_name(name: object) -> TypeGuard[str]:
    """1-64 of letters, digits, ``_ . -``, starting with a letter or digit; nothing else."""
    return isinstance(name, str) and ROOM_NAME_RE.fullmatch(name) is not None


def valid_member_id(mid: object) -> TypeGuard[str]:
    return isinstance(mid, str) and MEMBER_ID_RE.fullmatch(mid) is not None


def dumps(obj: Any) -> str:
    """Compact JSON, as every message is written."""
    return json.dumps(obj, separators=(",", ":"))


def parse(
    text: str | bytes, allowed: frozenset[str] = CLIENT_TYPES, *, max_chars: int | None = None
) -> dict[str, Any]:
    """A text message as a dict with a known string ``type`` and valid fields.

    Parsed with :func:`pipeline.model.jsonsafe.loads` (nesting, non-finite and
    huge numbers refused before anything else looks at them), then every field
    of its type is checked (:func:`validate`). Raises :class:`RefusedError`
    with ``message_too_large`` (over ``max_chars``), ``malformed_message`` (not
    a JSON object with a string ``type``, too deep, a field of the wrong type or
    out of range) or ``unknown_message_type``. Clients parse the server's
    messages with ``allowed=SERVER_TYPES``.
    """
    if max_chars is not None and len(text) > max_chars:
        raise refusal(
            CloseCode.MESSAGE_TOO_LARGE,
            f"control message of {len(text)} characters, at most {max_chars}",
        )
    try:
        obj = jsonsafe.loads(text)
    except JsonInputError as exc:
        raise refusal(CloseCode.MALFORMED_MESSAGE, f"not acceptable JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise refusal(
            CloseCode.MALFORMED_MESSAGE, "control messages are JSON objects with a 'type'"
        )
    if obj["type"] not in allowed:
        raise refusal(CloseCode.UNKNOWN_MESSAGE_TYPE, f"unknown message type {obj['type'][:40]!r}")
    validate(obj, server=not allowed <= CLIENT_TYPES)
    return obj


def _malformed(message: str) -> RefusedError:
    return refusal(CloseCode.MALFORMED_MESSAGE, message)


def _where(obj: Mapping[str, Any], key: str) -> str:
    return f"{obj.get('type', 'member')}: {key!r}"


def field_bool(obj: Mapping[str, Any], key: str, default: bool) -> bool:
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise _malformed(f"{_where(obj, key)} must be true or false")
    return v


def field_int(obj: Mapping[str, Any], key: str, bounds: tuple[int, int] = SEQ) -> int:
    """An integer field (not a bool, not a float) within ``bounds``, inclusive."""
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _malformed(f"{_where(obj, key)} must be an integer")
    lo, hi = bounds
    if not lo <= v <= hi:
        raise _malformed(f"{_where(obj, key)} must be within {lo}..{hi}")
    return v


def field_opt_int(obj: Mapping[str, Any], key: str, bounds: tuple[int, int]) -> int | None:
    if obj.get(key) is None:
        return None
    return field_int(obj, key, bounds)


def field_str(obj: Mapping[str, Any], key: str, what: str, max_len: int = MAX_NAME_LEN) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or len(v) > max_len:
        raise _malformed(f"{_where(obj, key)} must be {what}")
    return v


def field_opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is not None and (not isinstance(v, str) or len(v) > MAX_NAME_LEN):
        raise _malformed(f"{_where(obj, key)} must be a string")
    return v


def field_member_id(obj: Mapping[str, Any], key: str) -> str:
    v = obj.get(key)
    if not valid_member_id(v):
        raise _malformed(f"{_where(obj, key)} must be a member id (1-32 of A-Z a-z 0-9 _ -)")
    return v


def field_data(obj: Mapping[str, Any], key: str = "data") -> Any:
    """A broadcast's free-form ``data``: any JSON value up to :data:`MAX_BROADCAST_BYTES`."""
    v = obj.get(key)
    size = len(dumps(v).encode())
    if size > MAX_BROADCAST_BYTES:
        raise refusal(
            CloseCode.MESSAGE_TOO_LARGE,
            f"{_where(obj, key)} is {size} bytes of JSON, at most {MAX_BROADCAST_BYTES}",
        )
    return v


def member_record(obj: Any) -> dict[str, Any]:
    """A member record (``welcome.members[]``, ``presence.member``) as the server writes it.

    Clients check every record they receive with it: a publisher's absurd
    ``clock_offset_ns`` (or any field out of range) is refused here, before a
    latency computation can overflow.
    """
    if not isinstance(obj, dict):
        raise _malformed("a member record must be an object")
    rec: dict[str, Any] = obj
    field_member_id(rec, "id")
    field_str(rec, "subject", "a string")
    field_str(rec, "role", "a string")
    field_opt_str(rec, "name")
    field_bool(rec, "publish", False)
    field_bool(rec, "subscribe", False)
    streams = rec.get("streams", [])
    if not isinstance(streams, list) or len(streams) > 64:
        raise _malformed("member: 'streams' must be a list of stream ids")
    for i in range(len(streams)):
        field_int({"type": "member", f"streams[{i}]": streams[i]}, f"streams[{i}]", STREAM_ID)
    field_opt_int(rec, "clock_offset_ns", OFFSET_NS)
    field_opt_int(rec, "joined_ns", TIME_NS)
    field_opt_int(rec, "packets_sent", COUNT)
    field_opt_int(rec, "packets_dropped", COUNT)
    return rec


def _ping(obj: Mapping[str, Any]) -> None:
    field_opt_int(obj, "id", SEQ)
    field_opt_int(obj, "t0", TIME_NS)


def _clock(obj: Mapping[str, Any]) -> None:
    field_int(obj, "offset_ns", OFFSET_NS)
    field_opt_int(obj, "rtt_ns", RTT_NS)


def _stream(obj: Mapping[str, Any]) -> None:
    field_int(obj, "stream_id", STREAM_ID)


def _keyframe_request(obj: Mapping[str, Any]) -> None:
    """``stream_id``, and optionally ``ref_seq``: the missing reference of a packet that
    did not decode (a NACK: the server sends that packet again when it has it)."""
    field_int(obj, "stream_id", STREAM_ID)
    if "ref_seq" in obj:
        field_int(obj, "ref_seq", SEQ)


def _ack(obj: Mapping[str, Any]) -> None:
    field_int(obj, "stream_id", STREAM_ID)
    field_int(obj, "seq", SEQ)


def _nothing(obj: Mapping[str, Any]) -> None:
    pass


SESSION: Final = (1, 2**31 - 1)
"""A WebRTC session number (``docs/webrtc.md``)."""


def _rtc_sdp(obj: Mapping[str, Any]) -> None:
    field_int(obj, "session", SESSION)
    field_str(obj, "sdp", "an SDP string", MAX_CONTROL_CHARS)


def _rtc_candidate(obj: Mapping[str, Any]) -> None:
    field_int(obj, "session", SESSION)
    cand = obj.get("candidate")
    if not isinstance(cand, str) or len(cand) > 512:
        raise _malformed("rtc_candidate: 'candidate' must be a string of at most 512 characters")
    mid = obj.get("sdpMid")
    if mid is not None and not (isinstance(mid, str) and len(mid) <= 32):
        raise _malformed("rtc_candidate: 'sdpMid' must be a short string or null")
    field_opt_int(obj, "sdpMLineIndex", (0, 64))


def _rtc_session(obj: Mapping[str, Any]) -> None:
    field_int(obj, "session", SESSION)


def _rtc_state(obj: Mapping[str, Any]) -> None:
    field_int(obj, "session", SESSION)
    if obj.get("state") not in ("open", "closed"):
        raise _malformed("rtc_state: 'state' must be open or closed")
    if "reason" in obj:
        field_str(obj, "reason", "a string", 4096)


def _welcome(obj: Mapping[str, Any]) -> None:
    field_member_id(obj, "member_id")
    field_str(obj, "room", "a room name")
    field_bool(obj, "resumed", False)
    field_str(obj, "role", "a string")
    field_int(obj, "server_time_ns", TIME_NS)
    members = obj.get("members", [])
    if not isinstance(members, list):
        raise _malformed("welcome: 'members' must be a list")
    for m in members:
        member_record(m)
    webrtc = obj.get("webrtc", {})  # {"enabled": bool}: the server takes rtc_offer
    if not isinstance(webrtc, dict):
        raise _malformed("welcome: 'webrtc' must be an object")
    field_bool(webrtc, "enabled", False)


def _presence(obj: Mapping[str, Any]) -> None:
    if obj.get("event") not in ("join", "leave", "update"):
        raise _malformed("presence: 'event' must be join, leave or update")
    member_record(obj.get("member"))


def _pong(obj: Mapping[str, Any]) -> None:
    _ping(obj)
    field_int(obj, "t1", TIME_NS)
    field_int(obj, "t2", TIME_NS)


def _backfill(obj: Mapping[str, Any]) -> None:
    Backfill.parse(obj)


def _server_broadcast(obj: Mapping[str, Any]) -> None:
    field_str(obj, "from", "a member id or api:SUBJECT", MAX_NAME_LEN + 4)
    field_data(obj)


def _error(obj: Mapping[str, Any]) -> None:
    field_opt_int(obj, "code", CLOSE_CODE)
    field_str(obj, "reason", "a string")
    field_str(obj, "message", "a string", 4096)


#: Per type, the one check of its fields: what a member sends ...
CLIENT_FIELDS: Final[Mapping[str, Callable[[Mapping[str, Any]], object]]] = {
    "join": lambda obj: Join.parse(obj),
    "ping": _ping,
    "clock": _clock,
    "keyframe_request": _keyframe_request,
    "ack": _ack,
    "broadcast": field_data,
    "kick": lambda obj: field_member_id(obj, "member"),
    "leave": _nothing,
    "hb": _nothing,
    "rtc_offer": _rtc_sdp,
    "rtc_candidate": _rtc_candidate,
    "rtc_close": _rtc_session,
}
#: ... and what the server sends (checked by the clients).
SERVER_FIELDS: Final[Mapping[str, Callable[[Mapping[str, Any]], object]]] = {
    "welcome": _welcome,
    "presence": _presence,
    "pong": _pong,
    "ack": _ack,
    "keyframe_request": _stream,
    "nack": _ack,
    "backfill": _backfill,
    "broadcast": _server_broadcast,
    "kicked": lambda obj: field_member_id(obj, "member"),
    "error": _error,
    "hb": _nothing,
    "rtc_answer": _rtc_sdp,
    "rtc_state": _rtc_state,
}


def validate(obj: Mapping[str, Any], *, server: bool = False) -> None:
    """Check every field of a message of a known type (``server``: a server message).

    Type, range and finiteness of every numeric field; strings are bounded;
    room names and member ids are matched whole. Unknown extra fields are
    ignored. Raises :class:`RefusedError` (``malformed_message``, or
    ``message_too_large`` for a broadcast over :data:`MAX_BROADCAST_BYTES`).
    """
    table = SERVER_FIELDS if server else CLIENT_FIELDS
    check = table.get(obj["type"])
    if check is None:
        raise refusal(CloseCode.UNKNOWN_MESSAGE_TYPE, f"unknown message type {obj['type'][:40]!r}")
    check(obj)


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
    pair: bool = False
    """One of a publisher's two hot-standby connections (docs/room-protocol.md: two
    live ``pair`` connections of one subject share their streams)."""

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
        if self.pair:
            msg["pair"] = True
        return dumps(msg)

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> Join:
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
            resume=None if obj.get("resume") is None else field_member_id(obj, "resume"),
            name=field_opt_str(obj, "name"),
            pair=field_bool(obj, "pair", False),
        )


def ack(stream_id: int, seq: int) -> str:
    return f'{{"type":"ack","stream_id":{stream_id},"seq":{seq}}}'


def nack(stream_id: int, seq: int) -> str:
    """To a WebRTC publisher: packet ``seq`` of ``stream_id``, which later packets predict
    from, has not arrived: send it again (on the lossy channel) if you still have it."""
    return f'{{"type":"nack","stream_id":{stream_id},"seq":{seq}}}'


def ping(ping_id: int, t0_ns: int) -> str:
    return f'{{"type":"ping","id":{ping_id},"t0":{t0_ns}}}'


def keyframe_request(stream_id: int, ref_seq: int | None = None) -> dict[str, Any]:
    if ref_seq is None:
        return {"type": "keyframe_request", "stream_id": stream_id}
    return {"type": "keyframe_request", "stream_id": stream_id, "ref_seq": ref_seq}


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
    def parse(cls, obj: Mapping[str, Any]) -> Backfill:
        return cls(
            field_int(obj, "stream_id", STREAM_ID),
            field_int(obj, "count", COUNT),
            field_int(obj, "first_seq", SEQ),
            field_int(obj, "last_seq", SEQ),
        )
