"""The room server: aiohttp application, member WebSocket, rooms API, health and metrics.

Endpoints
---------
``GET /ws[?room=R]``
    The member WebSocket (see *Wire* below).
``GET /healthz``
    200 ``ok`` while the process runs.
``GET /readyz``
    200 when accepting members, 503 while starting, shutting down or full.
``GET /metrics``
    Prometheus text: ``posewire_server_rooms``, ``_members``, ``_connections``,
    ``_messages_in_total``, ``_messages_out_total``, ``_drops_total``,
    ``_rejections_total{reason=...}`` and more.
``GET /api/rooms``, ``POST /api/rooms`` ``{"name": R}``, ``GET /api/rooms/{R}``,
``DELETE /api/rooms/{R}``, ``POST /api/rooms/{R}/kick`` ``{"member": ID}``,
``POST /api/rooms/{R}/broadcast`` ``{"data": ...}``
    Rooms API, JSON, ``Authorization: Bearer <token>`` with the ``moderate``
    permission for that room (a token for room ``*`` covers every room).
    Errors: ``{"error": reason, "message": text}`` with 400/401/403/404/503.
``POST /api/dev/token`` ``{"room": R, "role": ROLE, "subject": S, "ttl": SECONDS}``
    Only with ``--dev`` (loopback only): mints a token for local demos.

Wire (``/ws``)
--------------
The token travels in the first message (browsers cannot set headers on a
WebSocket; a query string would end up in access logs); an
``Authorization: Bearer`` header on the upgrade request is accepted too.
Client -> server, text (JSON objects with a ``type``)::

    join       {"token": T, "room": R, "publish": bool, "subscribe": bool,
                "resume": MEMBER_ID?, "name": str?}          first message, once
    ping       {"id": any, "t0": client_ns}                   -> pong
    clock      {"offset_ns": int, "rtt_ns": int}              the member's offset to the server
    keyframe_request {"stream_id": int}                       forwarded to the publisher
    ack        {"stream_id": int, "seq": int}                 accepted, ignored (see below)
    broadcast  {"data": any}                                  to every other member
    kick       {"member": ID}                                 needs ``moderate``
    leave      {}                                             closes with 1000

Server -> client, text::

    welcome    {"member_id", "room", "resumed", "members": [member...],
                "server_time_ns", "limits": {...}}
    presence   {"event": "join" | "leave" | "update", "member": member}
    pong       {"id", "t0", "t1": server receive ns, "t2": server send ns}
    ack        {"stream_id", "seq"}     every packet the server accepted
    keyframe_request {"stream_id"}      to a publisher
    broadcast  {"from": ID, "data": any}
    kicked     {"member": ID}           reply to a successful kick
    error      {"code", "reason", "message"}   before a close, or a refused request

Binary messages are pose packets (:mod:`pipeline.codec`) in both
directions: the server validates each header with ``peek_header`` and relays
the bytes unchanged; the stream id in the header identifies the publisher
(``streams`` in its member record). Acknowledgements: the server acknowledges
every accepted packet itself (see :mod:`pipeline.server.rooms`); receivers need
not send acks over WebSocket. Close codes: :mod:`pipeline.server.limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from pipeline.codec import peek_header
from pipeline.config import ServerConfig
from pipeline.errors import ConfigError, ProtocolError, TokenError, TransportError
from pipeline.server.limits import (
    MAX_STREAMS_PER_MEMBER,
    TOKEN_CLOSE_CODES,
    CloseCode,
    RateLimiter,
)
from pipeline.server.metrics import ServerMetrics
from pipeline.server.rooms import (
    JoinRefused,
    Member,
    Room,
    RoomManager,
    StoredPacket,
    close_ws,
    dumps,
)
from pipeline.server.tokens import (
    MODERATE,
    PUBLISH_POSE,
    SUBSCRIBE,
    Claims,
    KickList,
    TokenVerifier,
    mint_token,
    resolve_secret,
)

log = logging.getLogger("posewire.server")

CLOSE_TIMEOUT_S = 2.0
_CONTROL_TYPES = frozenset(
    {"ping", "clock", "keyframe_request", "ack", "broadcast", "kick", "leave", "join"}
)


@dataclass
class ServerState:
    """Everything one server process shares between requests."""

    config: ServerConfig
    manager: RoomManager
    verifier: TokenVerifier
    metrics: ServerMetrics
    secret: str
    dev: bool
    ready: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def accepting(self) -> bool:
        return self.ready and self.manager.connections < self.config.max_connections


STATE = web.AppKey("posewire_state", ServerState)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MemberSocket(web.WebSocketResponse):
    """A WebSocketResponse that closes oversized messages with 4009 instead of 1009."""

    too_large = False
    max_message_bytes = 0

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            self.too_large = True
            code = CloseCode.MESSAGE_TOO_LARGE
            message = CloseCode.MESSAGE_TOO_LARGE.reason.encode()
            error = {
                "type": "error",
                "code": int(code),
                "reason": CloseCode.MESSAGE_TOO_LARGE.reason,
                "message": f"message larger than {self.max_message_bytes} bytes",
            }
            with contextlib.suppress(ConnectionError):
                await self.send_str(dumps(error))
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                return await super().close(code=code, message=message, drain=drain)
        except TimeoutError:
            return True


# --------------------------------------------------------------------------- app


def create_app(config: ServerConfig, *, host: str, dev: bool | None = None) -> web.Application:
    """The aiohttp application; ``host`` is the listen address (``--dev`` needs loopback)."""
    dev_mode = config.dev if dev is None else dev
    if dev_mode and not is_loopback(host):
        raise ConfigError(
            [f"server.dev: dev token minting is allowed only on a loopback address, not {host!r}"]
        )
    secret = resolve_secret(config, dev=dev_mode)
    metrics = ServerMetrics()
    kicks = KickList()
    state = ServerState(
        config=config,
        manager=RoomManager(config, metrics, kicks),
        verifier=TokenVerifier(secret, leeway_s=config.token_leeway_s, kicks=kicks),
        metrics=metrics,
        secret=secret,
        dev=dev_mode,
    )
    app = web.Application(client_max_size=64 * 1024)
    app[STATE] = state
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/api/rooms", api_list_rooms)
    app.router.add_post("/api/rooms", api_create_room)
    app.router.add_get("/api/rooms/{name}", api_room_info)
    app.router.add_delete("/api/rooms/{name}", api_close_room)
    app.router.add_post("/api/rooms/{name}/kick", api_kick)
    app.router.add_post("/api/rooms/{name}/broadcast", api_broadcast)
    if dev_mode:
        app.router.add_post("/api/dev/token", api_dev_token)
    app.cleanup_ctx.append(_housekeeping)
    app.on_shutdown.append(_on_shutdown)
    return app


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]

    async def loop() -> None:
        while True:
            await asyncio.sleep(30.0)
            state.verifier.kicks.prune(time.time())

    task = asyncio.get_running_loop().create_task(loop(), name="posewire-housekeeping")
    state.ready = True
    yield
    state.ready = False
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.ready = False
    await state.manager.shutdown()


async def serve(
    config: ServerConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    dev: bool | None = None,
    ready_cb: Callable[[str, int], None] | None = None,
    stop: asyncio.Event | None = None,
    app: web.Application | None = None,
) -> None:
    """Run the server until ``stop`` is set (forever without one), then shut down cleanly.

    ``ready_cb(host, port)`` is called once listening, with the bound port
    (useful with ``port=0``). Members are closed with 1001 on shutdown. Pass
    ``app`` (from :func:`create_app` with the same host) to keep a handle on
    its :data:`STATE`.
    """
    h = config.host if host is None else host
    p = config.port if port is None else port
    if app is None:
        app = create_app(config, host=h, dev=dev)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=3.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, h, p, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise TransportError(f"cannot listen on {h}:{p}: {exc.strerror or exc}") from exc
        bound = runner.addresses[0]
        log.info("posewire server listening on http://%s:%d", h, bound[1])
        if ready_cb is not None:
            ready_cb(h, int(bound[1]))
        if stop is None:
            stop = asyncio.Event()
        await stop.wait()
        log.info("posewire server stopping")
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- HTTP


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = state.accepting
    return web.json_response(
        {"ready": ok, "connections": state.manager.connections, "rooms": len(state.manager.rooms)},
        status=200 if ok else 503,
    )


async def metrics_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    text = state.metrics.render(
        rooms=len(state.manager.rooms),
        members=state.manager.members,
        connections=state.manager.connections,
        ready=state.accepting,
    )
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": reason, "message": message}, status=status)


class _ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


def _moderator(request: web.Request, room: str | None) -> Claims:
    """The request's verified moderator claims covering ``room`` (None: any room claim)."""
    state = request.app[STATE]
    token = _bearer(request)
    if token is None:
        raise _ApiError(401, "malformed", "missing 'Authorization: Bearer <token>'")
    try:
        claims = state.verifier.decode(token)
    except TokenError as exc:
        state.metrics.reject(exc.reason)
        raise _ApiError(401, exc.reason, str(exc)) from exc
    if room is not None and not claims.covers_room(room):
        raise _ApiError(403, "wrong_room", f"token is for room {claims.room!r}, not {room!r}")
    if state.verifier.kicks.is_kicked(claims, room or claims.room, time.time()):
        raise _ApiError(403, "kicked", f"{claims.subject!r} was kicked")
    if MODERATE not in claims.perms:
        raise _ApiError(403, "missing_permission", "the rooms API needs the 'moderate' permission")
    return claims


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _ApiError(400, "malformed_message", f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _ApiError(400, "malformed_message", "body must be a JSON object")
    return body


def _api(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except _ApiError as exc:
            return _error(exc.status, exc.reason, str(exc))
        except JoinRefused as exc:
            status = 503 if exc.code == CloseCode.TOO_MANY_ROOMS else 400
            return _error(status, exc.code.reason, str(exc))

    return wrapped


def _room_or_404(request: web.Request, name: str) -> Room:
    room = request.app[STATE].manager.rooms.get(name)
    if room is None:
        raise _ApiError(404, "room_not_found", f"no room {name!r}")
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
        raise _ApiError(400, "malformed_message", "'name' must be a string")
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
        raise _ApiError(404, "room_not_found", f"no room {name!r}")
    return web.json_response({"closed": name})


@_api
async def api_kick(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    claims = _moderator(request, name)
    body = await _json_body(request)
    member = body.get("member")
    if not isinstance(member, str):
        raise _ApiError(400, "malformed_message", "'member' must be a member id")
    room = _room_or_404(request, name)
    if not request.app[STATE].manager.kick(room, member, claims.subject):
        raise _ApiError(404, "member_not_found", f"no member {member!r} in room {name!r}")
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
        raise _ApiError(400, "malformed_message", "'room' and 'role' must be strings")
    if subject is not None and not isinstance(subject, str):
        raise _ApiError(400, "malformed_message", "'subject' must be a string")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise _ApiError(400, "malformed_message", "'ttl' must be a number of seconds")
    try:
        token = mint_token(state.secret, room=room, role=role, subject=subject, ttl_s=float(ttl))
    except TokenError as exc:
        raise _ApiError(400, exc.reason, str(exc)) from exc
    return web.json_response({"token": token})


# --------------------------------------------------------------------------- WebSocket


class _Closed(Exception):
    """The member's connection is being closed with ``code``."""

    def __init__(self, code: CloseCode, message: str) -> None:
        self.code = code
        super().__init__(message)


async def _reject(state: ServerState, ws: web.WebSocketResponse, code: int, message: str) -> None:
    try:
        reason = CloseCode(code).reason
    except ValueError:
        reason = str(code)
    state.metrics.reject(reason)
    log.info("closing connection: %s (%d): %s", reason, code, message)
    await close_ws(ws, code, message)


async def ws_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    cfg = state.config
    if not state.ready:
        return _error(503, "not_ready", "server is not accepting members")
    ws = MemberSocket(
        max_msg_size=cfg.max_message_bytes + 1,
        heartbeat=cfg.heartbeat_s,
        compress=False,
        timeout=CLOSE_TIMEOUT_S,
    )
    ws.max_message_bytes = cfg.max_message_bytes
    await ws.prepare(request)
    manager = state.manager
    manager.connections += 1
    state.metrics.connections_total += 1
    try:
        if manager.connections > cfg.max_connections:
            await _reject(
                state,
                ws,
                CloseCode.TOO_MANY_CONNECTIONS,
                f"server has {cfg.max_connections} connections, the maximum",
            )
            return ws
        limiter = RateLimiter(cfg.max_messages_per_s)
        member = await _join(state, ws, request, limiter)
        if member is None:
            return ws
        try:
            await _member_loop(state, member, limiter)
        except _Closed as exc:
            await _reject(state, ws, exc.code, str(exc))
        finally:
            member.room.remove(member)
            await member.stop_writer()
            if not ws.closed:
                await close_ws(ws, 1000)
    finally:
        manager.connections -= 1
    return ws


def _is_bool(obj: dict[str, Any], key: str, default: bool) -> bool:
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise _Closed(CloseCode.MALFORMED_MESSAGE, f"join: {key!r} must be true or false")
    return v


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is not None and (not isinstance(v, str) or len(v) > 256):
        raise _Closed(CloseCode.MALFORMED_MESSAGE, f"join: {key!r} must be a string")
    return v


def _parse_control(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise _Closed(CloseCode.MALFORMED_MESSAGE, f"not JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise _Closed(
            CloseCode.MALFORMED_MESSAGE, "control messages are JSON objects with a 'type'"
        )
    if obj["type"] not in _CONTROL_TYPES:
        raise _Closed(CloseCode.UNKNOWN_MESSAGE_TYPE, f"unknown message type {obj['type'][:40]!r}")
    return obj


async def _join(
    state: ServerState, ws: MemberSocket, request: web.Request, limiter: RateLimiter
) -> Member | None:
    cfg = state.config
    try:
        async with asyncio.timeout(cfg.auth_timeout_s):
            msg = await ws.receive()
    except TimeoutError:
        await _reject(
            state, ws, CloseCode.AUTH_TIMEOUT, f"no join message within {cfg.auth_timeout_s}s"
        )
        return None
    state.metrics.messages_in += 1
    limiter.allow()
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
        return None
    if msg.type == WSMsgType.ERROR:
        if ws.too_large:
            state.metrics.reject(CloseCode.MESSAGE_TOO_LARGE.reason)
        return None
    try:
        if msg.type != WSMsgType.TEXT:
            raise _Closed(CloseCode.NOT_JOINED, "the first message must be a join (JSON text)")
        obj = _parse_control(msg.data)
        if obj["type"] != "join":
            raise _Closed(CloseCode.NOT_JOINED, f"{obj['type']!r} before join")
        token = obj.get("token")
        if token is None:
            token = _bearer(request)
        if not isinstance(token, str):
            raise _Closed(CloseCode.TOKEN_MALFORMED, "join: no token (field 'token')")
        room_name = obj.get("room", request.query.get("room"))
        if not isinstance(room_name, str):
            raise _Closed(CloseCode.MALFORMED_MESSAGE, "join: 'room' must be a string")
        q_room = request.query.get("room")
        if q_room is not None and q_room != room_name:
            raise _Closed(CloseCode.MALFORMED_MESSAGE, "join: room differs from ?room=")
        publish = _is_bool(obj, "publish", False)
        subscribe = _is_bool(obj, "subscribe", True)
        resume = _opt_str(obj, "resume")
        name = _opt_str(obj, "name")
        required = ([PUBLISH_POSE] if publish else []) + ([SUBSCRIBE] if subscribe else [])
        try:
            claims = state.verifier.verify(token, room=room_name, require=required)
        except TokenError as exc:
            raise _Closed(TOKEN_CLOSE_CODES[exc.reason], str(exc)) from exc
        try:
            room = state.manager.room_for_join(room_name)
        except JoinRefused as exc:
            raise _Closed(exc.code, str(exc)) from exc
    except _Closed as exc:
        await _reject(state, ws, exc.code, str(exc))
        return None
    member_id, resumed = state.manager.new_member_id(room, resume)
    transport = request.transport
    member = Member(
        state.manager,
        room,
        ws,
        transport if isinstance(transport, asyncio.Transport) else None,
        claims,
        member_id=member_id,
        publish=publish,
        subscribe=subscribe,
        name=name,
    )
    member.post(
        {
            "type": "welcome",
            "member_id": member_id,
            "room": room.name,
            "resumed": resumed,
            "role": claims.role,
            "perms": sorted(claims.perms),
            "members": [m.info() for m in room.members.values()],
            "server_time_ns": time.time_ns(),
            "limits": {
                "max_message_bytes": cfg.max_message_bytes,
                "max_messages_per_s": cfg.max_messages_per_s,
                "subscriber_queue": cfg.subscriber_queue,
            },
        }
    )
    if subscribe:
        member.post_snapshot(room.snapshot_for(member))
    room.add(member)
    log.info(
        "member %s (%s, %s) joined room %s%s",
        member_id,
        claims.subject,
        claims.role,
        room.name,
        " (resumed)" if resumed else "",
    )
    return member


async def _member_loop(state: ServerState, member: Member, limiter: RateLimiter) -> None:
    ws = member.ws
    assert isinstance(ws, MemberSocket)
    metrics = state.metrics
    while True:
        msg = await ws.receive()
        t_recv = time.time_ns()
        kind = msg.type
        if kind == WSMsgType.BINARY:
            metrics.messages_in += 1
            metrics.bytes_in += len(msg.data)
            if not limiter.allow():
                raise _Closed(CloseCode.RATE_LIMITED, _rate_message(state))
            await _on_packet(state, member, msg.data)
        elif kind == WSMsgType.TEXT:
            metrics.messages_in += 1
            metrics.bytes_in += len(msg.data)
            if not limiter.allow():
                raise _Closed(CloseCode.RATE_LIMITED, _rate_message(state))
            await _on_control(state, member, _parse_control(msg.data), t_recv)
        elif kind == WSMsgType.ERROR:
            if ws.too_large:
                metrics.reject(CloseCode.MESSAGE_TOO_LARGE.reason)
            return
        else:  # CLOSE, CLOSING, CLOSED; PING/PONG are handled by aiohttp
            return
        if member.closed:
            return


def _rate_message(state: ServerState) -> str:
    return f"more than {state.config.max_messages_per_s:g} messages per second"


async def _on_packet(state: ServerState, member: Member, data: bytes) -> None:
    try:
        h = peek_header(data)
    except ProtocolError as exc:
        raise _Closed(CloseCode.BAD_PACKET, f"not a pose packet: {exc}") from exc
    if PUBLISH_POSE not in member.claims.perms:
        raise _Closed(CloseCode.TOKEN_MISSING_PERMISSION, "publishing needs 'publish_pose'")
    room = member.room
    stream = room.streams.get(h.stream_id)
    if stream is None:
        if len(member.streams) >= MAX_STREAMS_PER_MEMBER:
            raise _Closed(
                CloseCode.TOO_MANY_STREAMS, f"at most {MAX_STREAMS_PER_MEMBER} streams per member"
            )
        member.publish = True
        stream = room.claim(member, h.stream_id)
    elif stream.owner is not member:
        raise _Closed(
            CloseCode.STREAM_SPOOF, f"stream {h.stream_id} belongs to another member of the room"
        )
    pkt = StoredPacket(h.stream_id, h.seq, h.ref_seq, h.keyframe, data, h.epoch)
    stream.add(pkt)
    state.metrics.packets_in += 1
    member.post_text(f'{{"type":"ack","stream_id":{h.stream_id},"seq":{h.seq}}}')
    if stream.keyframe is None:
        room.request_keyframe(h.stream_id)
    await room.relay(member, pkt)


async def _on_control(state: ServerState, member: Member, obj: dict[str, Any], t_recv: int) -> None:
    kind = obj["type"]
    room = member.room
    if kind == "ping":
        member.post(
            {"type": "pong", "id": obj.get("id"), "t0": obj.get("t0"), "t1": t_recv,
             "t2": time.time_ns()}
        )  # fmt: skip
    elif kind == "clock":
        offset = obj.get("offset_ns")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise _Closed(CloseCode.MALFORMED_MESSAGE, "clock: 'offset_ns' must be an integer")
        member.clock_offset_ns = offset
        room.broadcast(
            {"type": "presence", "event": "update", "member": member.info()}, exclude=member
        )
    elif kind == "keyframe_request":
        sid = obj.get("stream_id")
        if isinstance(sid, bool) or not isinstance(sid, int):
            raise _Closed(CloseCode.MALFORMED_MESSAGE, "keyframe_request: 'stream_id' must be int")
        room.request_keyframe(sid)
    elif kind == "ack":
        pass  # the server is the acknowledging party over WebSocket (see module docstring)
    elif kind == "broadcast":
        room.broadcast(
            {"type": "broadcast", "from": member.id, "data": obj.get("data")}, exclude=member
        )
    elif kind == "kick":
        target = obj.get("member")
        if not isinstance(target, str):
            raise _Closed(CloseCode.MALFORMED_MESSAGE, "kick: 'member' must be a member id")
        if MODERATE not in member.claims.perms:
            member.post(
                {"type": "error", "reason": "missing_permission",
                 "message": "kicking needs the 'moderate' permission"}
            )  # fmt: skip
        elif state.manager.kick(room, target, member.claims.subject):
            member.post({"type": "kicked", "member": target})
        else:
            member.post(
                {"type": "error", "reason": "member_not_found", "message": f"no member {target!r}"}
            )
    elif kind == "leave":
        member.closed = True
    elif kind == "join":
        raise _Closed(CloseCode.NOT_JOINED, "already joined")


__all__ = ["STATE", "ServerState", "create_app", "dumps", "is_loopback", "serve"]
