"""``python -m bench [NAME ...] [OPTIONS]``: run benchmarks by name.

``python -m bench ring --quick`` runs one benchmark with its own options;
``python -m bench ring codec`` runs several, one after the other, each with
the options that follow the names. With no name, every benchmark runs.
Each benchmark module has ``main(argv) -> int`` and prints its own table.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("ring", "codec", "pipeline_fps", "fanout")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(BENCHMARKS))
        return 0
    names = []
    while args and not args[0].startswith("-"):
        name = args.pop(0)
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        names.append(name)
    worst = 0
    for name in names or list(BENCHMARKS):
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"benchmark {name} is not available: {exc}", file=sys.stderr)
            worst = max(worst, 1)
            continue
        worst = max(worst, int(module.main(list(args))))
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
