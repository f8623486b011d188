"""The embedded room server stage (``server.embedded: true``).

Runs :func:`pipeline.server.app.serve` inside a supervised process, on
``server.host``/``server.port``. It ticks the supervisor from a periodic task,
publishes the server's counters as stage metrics, and on an orderly stop
closes every member (1001, they reconnect elsewhere or later) and returns 0.
Once listening it prints ``viewer: http://HOST:PORT/room/ROOM`` (the browser viewer of
the room the transmit stage publishes into) on stdout.
Kicks, closed rooms and stream/member-id bindings persist in the server's
store in ``server.data_dir`` (a relative path resolves against the config
file's directory), so a restart of this stage forgets none of them; a data
directory it cannot use is a user error (exit 78, the run exits 2), and so is a
``server.tls`` certificate or key it cannot use (https/wss otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib

from pipeline.config import server_section
from pipeline.errors import ConfigError, TransportError
from pipeline.runtime.stage import StageContext
from pipeline.server.app import STATE, create_app, serve

TICK_S = 0.1


def viewer_url(host: str, port: int, room: str) -> str:
    """The browser viewer's address of ``room`` on a server listening on ``host``."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # every address: the local one opens
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/room/{room}"


def run(ctx: StageContext) -> int:
    try:
        return asyncio.run(_main(ctx))
    except ConfigError as exc:  # no secret, dev mode on a public address, unusable data_dir
        return ctx.refuse(str(exc))
    except TransportError as exc:  # the address is taken or not ours: a restart cannot fix that
        return ctx.refuse(f"server.port: {exc}")


async def _main(ctx: StageContext) -> int:
    cfg = server_section(ctx.config)
    app = create_app(cfg, host=cfg.host)
    state = app[STATE]
    stop = asyncio.Event()

    def ready(host: str, port: int) -> None:
        ctx.metrics["port"] = float(port)
        # the one line a `make run` user needs: where to watch the room (README)
        print(f"viewer: {viewer_url(host, port, ctx.config.transmit.room)}", flush=True)

    async def ticker() -> None:
        while True:
            ctx.tick()
            m = state.metrics
            ctx.metrics.update(
                {
                    "rooms": float(len(state.manager.rooms)),
                    "members": float(state.manager.members),
                    "connections": float(state.manager.connections),
                    "messages_in_total": float(m.messages_in),
                    "messages_out_total": float(m.messages_out),
                    "packets_in_total": float(m.packets_in),
                    "packets_out_total": float(m.packets_out),
                    "drops_total": float(m.drops),
                    "rejections_total": float(sum(m.rejections.values())),
                }
            )
            if ctx.stopping:
                stop.set()
                return
            await asyncio.sleep(TICK_S)

    tick_task = asyncio.get_running_loop().create_task(ticker(), name="posewire-server-tick")
    try:
        await serve(cfg, host=cfg.host, port=cfg.port, ready_cb=ready, stop=stop, app=app)
    finally:
        tick_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick_task
    ctx.log.info("room server stopped")
    return 0
