"""``python -m pipeline FILE.yaml``: run the pipeline under its supervisor."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.runtime.stage import setup_logging

log = logging.getLogger("posewire.supervisor")

HELP = "Run the pipeline described by a YAML file (capture, detect, encode, transmit)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", type=Path, nargs="?", default=Path("pipeline.yaml"), help="pipeline YAML"
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds of streaming, counted once every stage is up (exit 0)",
    )
    parser.add_argument("--report", type=Path, metavar="PATH", help="write a JSON run report")
    parser.add_argument("--run-id", help="run id (default: supervisor.run_id, else random)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def main(args: argparse.Namespace) -> int:
    setup_logging("supervisor", getattr(logging, args.log_level))
    cfg = load_config(args.config)
    if args.duration is not None and args.duration <= 0:
        raise SystemExit("--duration must be positive")
    from pipeline.monitor.figures import Monitor
    from pipeline.runtime.supervisor import run_pipeline
    from stages.topology import pose_topology

    try:
        topology = pose_topology(cfg)
    except ValueError as exc:
        raise SystemExit(f"invalid pipeline topology: {exc}") from exc
    ensure_secret(cfg)
    return run_pipeline(
        cfg,
        topology,
        duration_s=args.duration,
        report_path=args.report,
        run_id=args.run_id,
        observer=lambda run_dir, run_id: Monitor(
            cfg.monitor,
            topology,
            primary_transport=cfg.transmit.primary.value,
            run_dir=run_dir,
            run_id=run_id,
        ),
    )


def ensure_secret(cfg: Config) -> None:
    """An embedded server with no configured secret gets a random one for this run.

    It is exported as ``$POSEWIRE_SECRET`` to the stages (spawned children
    inherit the environment), so the embedded server and the transmit stage
    agree, and it never touches the disk. Receivers then need a token from
    ``python -m pipeline token`` run with the same secret, or from the
    server's dev endpoint when ``server.dev`` is on (loopback only).
    """
    if not cfg.server.embedded or os.environ.get("POSEWIRE_SECRET") or cfg.server.secret:
        return
    os.environ["POSEWIRE_SECRET"] = secrets.token_urlsafe(32)
    log.info("embedded server: using a random per-run token secret")
