"""The rooms REST API and the dev token endpoint.

``GET /api/rooms``, ``POST /api/rooms`` ``{"name": R}``, ``GET /api/rooms/{R}``,
``DELETE /api/rooms/{R}``, ``POST /api/rooms/{R}/kick`` ``{"member": ID}``,
``POST /api/rooms/{R}/broadcast`` ``{"data": ...}``
    JSON, ``Authorization: Bearer <token>`` with the ``moderate`` permission
    for that room (a token for room ``*`` covers every room). Errors:
    ``{"error": reason, "message": text}`` with 400/401/403/404/413/503.
    The token is verified *before* the body is read; a body is at most
    :data:`MAX_BODY_BYTES` and parsed with :func:`pipeline.model.jsonsafe.loads`
    (bounded nesting, finite numbers).
``POST /api/dev/token`` ``{"room": R, "role": ROLE, "subject": S, "ttl": SECONDS}``
    Only with ``--dev`` (a loopback listen address): mints a publisher or
    subscriber token for one named room, ``ttl`` at most :data:`DEV_MAX_TTL_S`
    (default :data:`DEV_DEFAULT_TTL_S`). Refused with 403 (counted in
    ``rejections_total{reason="dev_token_<why>"}``): a peer that is not
    loopback (``X-Forwarded-For`` is ignored), a ``Host`` that is not a
    loopback name or address (DNS rebinding), a browser request from another
    origin (an ``Origin`` other than this server's loopback origin, or
    ``Sec-Fetch-Site: cross-site``/``same-site``); no CORS headers are sent.
    Refused with 400: role ``moderator`` (or any but publisher/subscriber),
    room ``*`` or an invalid room name, a longer ttl.

A refusal is a :class:`~pipeline.errors.RefusedError`; its ``status`` is the
HTTP status of the answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from pipeline.errors import JsonInputError, RefusedError, TokenError
from pipeline.model import jsonsafe
from pipeline.model.net import is_loopback
from pipeline.server.rooms import Room
from pipeline.server.state import STATE, bearer
from pipeline.wire import messages
from pipeline.wire.close import CloseCode
from pipeline.wire.tokens import ANY_ROOM, MODERATE, Claims, mint_token

Handler = Callable[[web.Request], Awaitable[web.Response]]

#: the largest request body the API reads (also the app's ``client_max_size``)
MAX_BODY_BYTES: Final = 64 * 1024
#: dev tokens: roles that may be minted, longest and default lifetime
DEV_ROLES: Final = frozenset({"publisher", "subscriber"})
DEV_MAX_TTL_S: Final = 3600.0
DEV_DEFAULT_TTL_S: Final = 600.0
DEV_MAX_SUBJECT: Final = 64


def add_routes(app: web.Application, *, dev: bool) -> None:
    app.router.add_get("/api/rooms", api_list_rooms)
    app.router.add_post("/api/rooms", api_create_room)
    app.router.add_get("/api/rooms/{name}", api_room_info)
    app.router.add_delete("/api/rooms/{name}", api_close_room)
    app.router.add_post("/api/rooms/{name}/kick", api_kick)
    app.router.add_post("/api/rooms/{name}/broadcast", api_broadcast)
    if dev:
        app.router.add_post("/api/dev/token", api_dev_token)


def error_response(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": reason, "message": message}, status=status)


def _refused(status: int, reason: str, message: str) -> RefusedError:
    return RefusedError(reason, message, status=status)


def _moderator(request: web.Request, room: str | None) -> Claims:
    """The request's verified moderator claims covering ``room`` (None: its own room)."""
    state = request.app[STATE]
    token = bearer(request)
    if token is None:
        raise _refused(401, "malformed", "missing 'Authorization: Bearer <token>'")
    try:
        claims = state.verifier.decode(token)
    except TokenError as exc:
        state.metrics.reject(exc.reason)
        raise _refused(401, exc.reason, str(exc)) from exc
    if MODERATE not in claims.perms:
        raise _refused(403, "missing_permission", "the rooms API needs the 'moderate' permission")
    _covers(request, claims, room or claims.room)
    return claims


def _covers(request: web.Request, claims: Claims, room: str) -> None:
    """Refuse unless ``claims`` (verified) cover ``room`` and are not kicked from it."""
    if not claims.covers_room(room):
        raise _refused(403, "wrong_room", f"token is for room {claims.room!r}, not {room!r}")
    if request.app[STATE].verifier.kicks.is_kicked(claims, room, time.time()):
        raise _refused(403, "kicked", f"{claims.subject!r} was kicked")


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object: at most :data:`MAX_BODY_BYTES`, bounded nesting."""
    too_large = _refused(413, "body_too_large", f"body larger than {MAX_BODY_BYTES} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise too_large from exc
    try:
        body = jsonsafe.loads(raw)
    except JsonInputError as exc:
        raise _refused(400, "malformed_message", f"body refused: {exc}") from exc
    if not isinstance(body, dict):
        raise _refused(400, "malformed_message", "body must be a JSON object")
    return body


def _api(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except RefusedError as exc:
            status = exc.status
            if exc.code is not None:  # a room manager refusal (its close code)
                status = 503 if exc.code == CloseCode.TOO_MANY_ROOMS else 400
            return error_response(status, exc.reason, str(exc))

    return wrapped


def _room_or_404(request: web.Request, name: str) -> Room:
    room = request.app[STATE].manager.rooms.get(name)
    if room is None:
        raise _refused(404, "room_not_found", f"no room {name!r}")
    return room


@_api
async def api_list_rooms(request: web.Request) -> web.Response:
    claims = _moderator(request, None)
    rooms = request.app[STATE].manager.rooms.values()
    return web.json_response(
        {
            "rooms": [
                {"name": r.name, "members": len(r.members), "streams": len(r.streams)}
                for r in rooms
                if claims.covers_room(r.name)
            ]
        }
    )


@_api
async def api_create_room(request: web.Request) -> web.Response:
    claims = _moderator(request, None)  # before the body is read
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str):
        raise _refused(400, "malformed_message", "'name' must be a string")
    _covers(request, claims, name)
    manager = request.app[STATE].manager
    existed = name in manager.rooms
    room = manager.create(name, created_by=claims.subject)
    return web.json_response(room.info(), status=200 if existed else 201)


@_api
async def api_room_info(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    _moderator(request, name)
    return web.json_response(_room_or_404(request, name).info())


@_api
async def api_close_room(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    _moderator(request, name)
    if not await request.app[STATE].manager.close_room(name):
        raise _refused(404, "room_not_found", f"no room {name!r}")
    return web.json_response({"closed": name})


@_api
async def api_kick(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    claims = _moderator(request, name)
    body = await _json_body(request)
    member = body.get("member")
    if not isinstance(member, str):
        raise _refused(400, "malformed_message", "'member' must be a member id")
    room = _room_or_404(request, name)
    if not request.app[STATE].manager.kick(room, member, claims.subject):
        raise _refused(404, "member_not_found", f"no member {member!r} in room {name!r}")
    return web.json_response({"kicked": member})


@_api
async def api_broadcast(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    claims = _moderator(request, name)
    body = await _json_body(request)
    room = _room_or_404(request, name)
    data = messages.field_data(body)  # the same 4 KB bound as a member's broadcast
    room.broadcast({"type": "broadcast", "from": f"api:{claims.subject}", "data": data})
    return web.json_response({"members": len(room.members)})


@_api
async def api_dev_token(request: web.Request) -> web.Response:
    try:
        return await _dev_token(request)
    except RefusedError as exc:
        why = exc.reason if exc.reason.startswith("dev_token_") else f"dev_token_{exc.reason}"
        request.app[STATE].metrics.reject(why)
        raise


async def _dev_token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _dev_caller(request)  # before the body is read
    body = await _json_body(request)
    room = body.get("room", "demo")
    role = body.get("role", "subscriber")
    subject = body.get("subject")
    ttl = body.get("ttl", DEV_DEFAULT_TTL_S)
    if not isinstance(room, str) or not isinstance(role, str):
        raise _refused(400, "malformed_message", "'room' and 'role' must be strings")
    if role not in DEV_ROLES:
        raise _refused(
            400, "dev_token_role", f"dev tokens are publisher or subscriber tokens, not {role!r}"
        )
    if room == ANY_ROOM or not messages.valid_room_name(room):
        raise _refused(400, "dev_token_room", f"dev tokens are for one named room, not {room!r}")
    if subject is not None and (
        not isinstance(subject, str)
        or not 0 < len(subject) <= DEV_MAX_SUBJECT
        or not subject.isprintable()
    ):
        raise _refused(
            400, "malformed_message", f"'subject' must be 1 to {DEV_MAX_SUBJECT} printable chars"
        )
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise _refused(400, "malformed_message", "'ttl' must be a number of seconds")
    if not (math.isfinite(ttl) and 0 < ttl <= DEV_MAX_TTL_S):
        raise _refused(
            400, "dev_token_ttl", f"'ttl' must be in (0, {DEV_MAX_TTL_S:.0f}] seconds, got {ttl}"
        )
    try:
        token = mint_token(state.secret, room=room, role=role, subject=subject, ttl_s=float(ttl))
    except TokenError as exc:
        raise _refused(400, exc.reason, str(exc)) from exc
    return web.json_response({"token": token})


def _dev_caller(request: web.Request) -> None:
    """Refuse (403) a dev token request that does not come from this machine's own user
    agent: a non-loopback peer, a foreign Host (DNS rebinding) or a cross-origin page."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    peer_host = peer[0] if isinstance(peer, tuple) and peer else ""
    if not is_loopback(str(peer_host)):  # the socket's peer: X-Forwarded-For is not read
        raise _refused(403, "dev_token_peer", "dev tokens are minted for loopback peers only")
    host = request.headers.get("Host", "")
    if not is_loopback(_host_part(host)):
        raise _refused(
            403, "dev_token_host", f"dev tokens need a loopback Host header, not {host[:80]!r}"
        )
    fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
    if fetch_site in ("cross-site", "same-site"):
        raise _refused(403, "dev_token_origin", "dev tokens are not minted for other sites")
    origin = request.headers.get("Origin")
    if origin is not None and not _own_origin(origin, request):
        raise _refused(
            403, "dev_token_origin", f"dev tokens are not minted for origin {origin[:80]!r}"
        )


def _host_part(host: str) -> str:
    """``host`` of a Host header value ``host[:port]`` (IPv6 in brackets)."""
    h = host.strip()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rpartition(":")[0] if h.count(":") == 1 else h


def _own_origin(origin: str, request: web.Request) -> bool:
    """True when ``origin`` is ``http://<loopback>:<this server's port>``."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or scheme.lower() != "http" or "/" in rest:
        return False
    transport = request.transport
    sock = transport.get_extra_info("sockname") if transport is not None else None
    port = str(sock[1]) if isinstance(sock, tuple) and len(sock) >= 2 else ""
    host, _, origin_port = rest.rpartition(":")
    return bool(host) and origin_port == port and is_loopback(host)
