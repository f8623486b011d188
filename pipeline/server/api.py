"""The rooms REST API and the dev token endpoint.

``GET /api/rooms``, ``POST /api/rooms`` ``{"name": R}``, ``GET /api/rooms/{R}``,
``DELETE /api/rooms/{R}``, ``POST /api/rooms/{R}/kick`` ``{"member": ID}``,
``POST /api/rooms/{R}/broadcast`` ``{"data": ...}``
    JSON, ``Authorization: Bearer <token>`` with the ``moderate`` permission
    for that room (a token for room ``*`` covers every room). Errors:
    ``{"error": reason, "message": text}`` with 400/401/403/404/503.
``POST /api/dev/token`` ``{"room": R, "role": ROLE, "subject": S, "ttl": SECONDS}``
    Only with ``--dev`` (loopback only): mints a token for local demos.

A refusal is a :class:`~pipeline.errors.RefusedError`; its ``status`` is the
HTTP status of the answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pipeline.errors import RefusedError, TokenError
from pipeline.server.rooms import Room
from pipeline.server.state import STATE, bearer
from pipeline.wire.close import CloseCode
from pipeline.wire.tokens import MODERATE, Claims, mint_token

Handler = Callable[[web.Request], Awaitable[web.Response]]


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
    """The request's verified moderator claims covering ``room`` (None: any room claim)."""
    state = request.app[STATE]
    token = bearer(request)
    if token is None:
        raise _refused(401, "malformed", "missing 'Authorization: Bearer <token>'")
    try:
        claims = state.verifier.decode(token)
    except TokenError as exc:
        state.metrics.reject(exc.reason)
        raise _refused(401, exc.reason, str(exc)) from exc
    if room is not None and not claims.covers_room(room):
        raise _refused(403, "wrong_room", f"token is for room {claims.room!r}, not {room!r}")
    if state.verifier.kicks.is_kicked(claims, room or claims.room, time.time()):
        raise _refused(403, "kicked", f"{claims.subject!r} was kicked")
    if MODERATE not in claims.perms:
        raise _refused(403, "missing_permission", "the rooms API needs the 'moderate' permission")
    return claims


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _refused(400, "malformed_message", f"body is not JSON: {exc}") from exc
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
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str):
        raise _refused(400, "malformed_message", "'name' must be a string")
    claims = _moderator(request, name)
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
    room.broadcast({"type": "broadcast", "from": f"api:{claims.subject}", "data": body.get("data")})
    return web.json_response({"members": len(room.members)})


@_api
async def api_dev_token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    room = body.get("room", "demo")
    role = body.get("role", "subscriber")
    subject = body.get("subject")
    ttl = body.get("ttl", 3600)
    if not isinstance(room, str) or not isinstance(role, str):
        raise _refused(400, "malformed_message", "'room' and 'role' must be strings")
    if subject is not None and not isinstance(subject, str):
        raise _refused(400, "malformed_message", "'subject' must be a string")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise _refused(400, "malformed_message", "'ttl' must be a number of seconds")
    try:
        token = mint_token(state.secret, room=room, role=role, subject=subject, ttl_s=float(ttl))
    except TokenError as exc:
        raise _refused(400, exc.reason, str(exc)) from exc
    return web.json_response({"token": token})
