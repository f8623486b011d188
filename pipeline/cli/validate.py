"""``python -m pipeline validate FILE``: check a configuration, print every problem."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.errors import ConfigError

HELP = "Validate a pipeline configuration: every error with its YAML path and line; exit 2."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="pipeline YAML file")


def main(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{args.file}: valid")
    return 0
