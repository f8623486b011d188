"""``python -m pipeline token``: mint an access token with the server's secret."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.serve import server_config
from pipeline.wire.tokens import (
    DEFAULT_TTL_S,
    PERMISSIONS,
    ROLE_PERMISSIONS,
    mint_token,
    resolve_secret,
)

HELP = (
    "Mint a room access token (JWT, HS256). The secret is read as the server reads it: "
    "$POSEWIRE_SECRET, else server.secret in --config."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--room", required=True, help="room name, or '*' for every room")
    parser.add_argument(
        "--role",
        required=True,
        help=f"role: {', '.join(sorted(ROLE_PERMISSIONS))} (sets the default permissions)",
    )
    parser.add_argument(
        "--ttl", type=float, default=DEFAULT_TTL_S, help="lifetime in seconds (default 3600)"
    )
    parser.add_argument("--subject", help="who the token is for (default: ROLE-<random>)")
    parser.add_argument(
        "--perms",
        help="comma-separated permissions instead of the role's: " + ", ".join(sorted(PERMISSIONS)),
    )
    parser.add_argument("--config", type=Path, help="pipeline YAML holding server.secret")


def main(args: argparse.Namespace) -> int:
    secret = resolve_secret(server_config(args.config))
    perms = None
    if args.perms is not None:
        perms = [p.strip() for p in args.perms.split(",") if p.strip()]
    token = mint_token(
        secret, room=args.room, role=args.role, subject=args.subject, ttl_s=args.ttl, perms=perms
    )
    print(token)
    return 0
