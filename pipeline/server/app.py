"""The room server's aiohttp application: factory, health, metrics and :func:`serve`.

Endpoints
---------
``GET /ws[?room=R]``
    The member WebSocket (:mod:`pipeline.server.members`; messages in
    :mod:`pipeline.wire.messages`, close codes in :mod:`pipeline.wire.close`),
    also the signaling of a member's WebRTC link (:mod:`pipeline.server.rtc`).
``GET /healthz``
    200 ``ok`` while the process runs.
``GET /readyz``
    200 when accepting members, 503 while starting, shutting down or full, or
    while ``server.redis`` is configured and Redis is unreachable.
``GET /metrics``
    Prometheus text: ``posewire_server_rooms``, ``_members``, ``_connections``,
    ``_pending_connections``, ``_messages_in_total``, ``_messages_out_total``,
    ``_drops_total``, ``_rejections_total{reason=...}`` and more
    (:mod:`pipeline.server.metrics`), the WebRTC ones (``_rtc_peers``, ...).
``/api/rooms...``, ``POST /api/dev/token``
    The rooms REST API (:mod:`pipeline.server.api`).
``GET /``, ``GET /room/{name}``, ``GET /static/{file}``
    The browser viewer (:mod:`pipeline.server.viewer`, pages in ``static/``).

Every connection passes :class:`~pipeline.server.guard.HttpGuard` first: a
deadline for its request (``server.header_timeout_s``), a cap on connections
not yet upgraded (``server.max_pending_connections``), masked client frames,
and one rate-limited log line per bad request instead of a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from pipeline.config import ServerConfig
from pipeline.errors import ConfigError, TransportError
from pipeline.model.net import is_loopback
from pipeline.model.tls import server_context
from pipeline.server import api, guard, members, viewer
from pipeline.server.metrics import ServerMetrics
from pipeline.server.rooms import Member, RoomManager
from pipeline.server.rtc import RtcHub
from pipeline.server.state import STATE, ServerState
from pipeline.server.tokens import KickList, TokenVerifier, resolve_secret

log = logging.getLogger("posewire.server")

#: listen backlog (a burst of connects waits in the kernel, not in our fds)
BACKLOG = 1024


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
    http_guard = guard.HttpGuard(
        header_timeout_s=config.header_timeout_s,
        max_pending=config.max_pending_connections,
        metrics=metrics,
    )

    async def on_binary(member: Member, data: bytes) -> None:
        await members.handle_binary(state, member, data, members.WEBRTC)

    async def on_text(member: Member, text: str) -> None:
        await members.handle_text(state, member, text, time.time_ns(), members.WEBRTC)

    store = None
    if config.redis is not None:  # a cluster node: redis is imported on this path only
        from pipeline.server.redisstore import RedisStore

        store = RedisStore(config.redis.key_prefix, config.redis.node_id)
    state = ServerState(
        config=config,
        manager=RoomManager(config, metrics, kicks, store),
        verifier=TokenVerifier(secret, leeway_s=config.token_leeway_s, kicks=kicks),
        metrics=metrics,
        secret=secret,
        dev=dev_mode,
        guard=http_guard,
        rtc=RtcHub(config, metrics, on_binary=on_binary, on_text=on_text),
    )
    if config.redis is not None:
        from pipeline.server.backplane import Backplane
        from pipeline.server.redisstore import RedisStore

        assert isinstance(store, RedisStore)
        state.cluster = Backplane(config.redis, state.manager, store)
    app = web.Application(client_max_size=api.MAX_BODY_BYTES)
    app[STATE] = state
    app.on_response_prepare.append(http_guard.on_response_prepare)
    members.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    api.add_routes(app, dev=dev_mode)
    viewer.add_routes(app)
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
    if state.cluster is not None:
        state.cluster.start()
    state.ready = True
    yield
    state.ready = False
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.ready = False
    await state.rtc.shutdown()
    await state.manager.shutdown()
    if state.cluster is not None:
        await state.cluster.stop()


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
    its :data:`STATE`. An address that cannot be bound raises
    :class:`~pipeline.errors.TransportError`. With ``config.tls`` it serves https/wss
    (TLS 1.2+; the handshake counts against ``header_timeout_s``); a certificate or key
    it cannot use raises :class:`~pipeline.errors.ConfigError` naming the field, before
    anything listens.
    """
    h = config.host if host is None else host
    p = config.port if port is None else port
    tls = config.tls
    ssl_ctx = server_context(tls.certfile, tls.keyfile) if tls is not None else None
    if app is None:
        app = create_app(config, host=h, dev=dev)
    state = app[STATE]
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=3.0, **guard.handler_args()
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    guard.install_log_filter(state.metrics)
    restore_handler = guard.install_loop_handler(loop, state.metrics)
    listener: asyncio.Server | None = None
    try:
        assert runner.server is not None
        try:
            # not a TCPSite: the guard wraps the protocol factory (aiohttp's web.Server)
            listener = await loop.create_server(
                state.guard.protocol_factory(runner.server),
                h,
                p,
                backlog=BACKLOG,
                ssl=ssl_ctx,
                ssl_handshake_timeout=config.header_timeout_s if ssl_ctx is not None else None,
            )
        except OSError as exc:
            raise TransportError(f"cannot listen on {h}:{p}: {exc.strerror or exc}") from exc
        bound = listener.sockets[0].getsockname()
        log.info("posewire server listening on %s://%s:%d", scheme(config), h, bound[1])
        if ready_cb is not None:
            ready_cb(h, int(bound[1]))
        if stop is None:
            stop = asyncio.Event()
        await stop.wait()
        log.info("posewire server stopping")
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()
        restore_handler()


def scheme(config: ServerConfig) -> str:
    """``https`` when the server speaks TLS (``server.tls``), else ``http``."""
    return "https" if config.tls is not None else "http"


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
        pending=state.guard.pending,
    )
    if state.cluster is not None:
        text += state.cluster.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


__all__ = ["STATE", "ServerState", "create_app", "scheme", "serve"]
