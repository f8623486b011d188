"""``python -m pipeline FILE.yaml``: run the pipeline under its supervisor."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.config import load_config
from pipeline.runtime.stage import setup_logging

HELP = "Run the pipeline described by a YAML file (capture, detect, encode, transmit)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", type=Path, nargs="?", default=Path("pipeline.yaml"), help="pipeline YAML"
    )
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop after this many seconds (exit 0)"
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
    from pipeline.runtime.supervisor import run_pipeline

    return run_pipeline(cfg, duration_s=args.duration, report_path=args.report, run_id=args.run_id)
