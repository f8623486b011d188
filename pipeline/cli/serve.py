"""``python -m pipeline serve``: run the room server in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from pipeline.config import RedisConfig, ServerConfig, TlsConfig, load_config, server_section
from pipeline.errors import ConfigError

HELP = (
    "Run the room server (rooms, tokens, WebSocket relay, /metrics). The token secret comes "
    "from $POSEWIRE_SECRET, else server.secret in --config; --dev mints demo tokens (loopback)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: server.port, 8765)")
    parser.add_argument("--config", type=Path, help="pipeline YAML (its server section is used)")
    parser.add_argument(
        "--dev",
        action="store_true",
        help="development mode: POST /api/dev/token mints tokens; refused on non-loopback hosts",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(
        "--certfile", type=Path, help="serve https/wss: PEM certificate chain (server.tls)"
    )
    parser.add_argument("--keyfile", type=Path, help="with --certfile: its PEM private key")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="share rooms with other nodes through Redis, e.g. redis://127.0.0.1:6379/0 "
        "(config server.redis.url; docs/scaling.md)",
    )
    parser.add_argument(
        "--node-id", metavar="NAME", help="this node's id in the cluster (server.redis.node_id)"
    )


def server_config(path: Path | None, args: argparse.Namespace | None = None) -> ServerConfig:
    """The ``server`` section of ``path`` (defaults without one), its paths absolute;
    ``--certfile/--keyfile`` of ``args`` replace ``server.tls``."""
    cfg = server_section(load_config(path)) if path is not None else ServerConfig()  # type: ignore[call-arg]
    cert, key = (getattr(args, "certfile", None), getattr(args, "keyfile", None))
    if (cert is None) != (key is None):
        raise ConfigError(["--certfile and --keyfile go together (server.tls): give both"])
    if cert is not None and key is not None:
        cfg = cfg.model_copy(update={"tls": TlsConfig(certfile=cert, keyfile=key)})
    return cfg


def with_redis(cfg: ServerConfig, url: str | None, node_id: str | None) -> ServerConfig:
    """``cfg`` with ``--redis``/``--node-id`` applied over ``server.redis``; a bad value
    raises :class:`ConfigError` naming the option."""
    if url is None and node_id is None:
        return cfg
    base = cfg.redis.model_dump() if cfg.redis is not None else {}
    given = {"url": url, "node_id": node_id}
    fields = base | {k: v for k, v in given.items() if v is not None}
    options = {"url": "--redis", "node_id": "--node-id"}
    try:
        redis = RedisConfig.model_validate(fields)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "redis"
            problems.append(f"{options.get(name, 'server.redis.' + name)}: {err['msg']}")
        raise ConfigError(problems) from None
    return cfg.model_copy(update={"redis": redis})


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (each connection is a descriptor);
    returns the limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def main(args: argparse.Namespace) -> int:
    from pipeline.model.tls import TLS_FIELDS, server_context
    from pipeline.server.app import scheme, serve

    cfg = with_redis(server_config(args.config, args), args.redis, args.node_id)
    if cfg.tls is not None:  # a certificate or key it cannot use: one error, nothing starts
        names = ("--certfile", "--keyfile") if args.certfile else TLS_FIELDS
        server_context(cfg.tls.certfile, cfg.tls.keyfile, fields=names)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s server %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    soft, _ = raise_fd_limit()
    if soft != resource.RLIM_INFINITY and soft < cfg.max_connections + cfg.max_pending_connections:
        logging.getLogger("posewire.server").warning(
            "file descriptor limit %d is below server.max_connections + "
            "max_pending_connections (%d): connections are capped to what it leaves",
            soft,
            cfg.max_connections + cfg.max_pending_connections,
        )
    dev = True if args.dev else None

    def ready(host: str, port: int) -> None:
        extra = "  (dev: POST /api/dev/token)" if (dev or cfg.dev) else ""
        print(f"posewire server listening on {scheme(cfg)}://{host}:{port}{extra}", flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, host=args.host, port=args.port, dev=dev, ready_cb=ready, stop=stop)

    asyncio.run(run())
    return 0
