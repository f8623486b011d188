"""``ctl [--run-id ID] STAGE CMD [JSON]``: send a control command to a running pipeline.

The monitor's control endpoint (``POST /control/<stage>/<command>``) takes a
command only with the run's secret, which the supervisor's monitor writes
(mode 0600) into the private run directory next to the monitor's URL. This
command finds that directory (``--run-id``, else the only run under the run
base: ``supervisor.run_dir`` of ``--config``, else the default base), reads both,
and posts the command as ``application/json`` with the secret in the
``X-Posewire-Control-Token`` header. ``--monitor URL`` overrides the URL read
from the run directory. The answer is printed as JSON; a refusal exits 1.

Examples::

    python -m pipeline ctl transmit set '{"max_bandwidth_kbps": 64}'
    python -m pipeline ctl --run-id demo transmit switch_transport '{"to": "file"}'
    python -m pipeline ctl capture pause
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import load_config
from pipeline.errors import JsonInputError, SupervisorError
from pipeline.model import jsonsafe
from pipeline.monitor.http import CONTROL_TOKEN_FILE, MONITOR_URL_FILE, TOKEN_HEADER
from pipeline.runtime.control import COMMANDS
from pipeline.runtime.rundir import default_run_base

HELP = "Send a control command (set, pause, resume, stop, ...) to a stage of a running pipeline."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", help="stage name, e.g. transmit")
    parser.add_argument("cmd", choices=sorted(COMMANDS), help="command")
    parser.add_argument("args", nargs="?", default="{}", help="JSON object of arguments")
    parser.add_argument("--run-id", help="run id (default: the only running pipeline)")
    parser.add_argument(
        "--config", type=Path, help="pipeline YAML (its supervisor.run_dir is the run base)"
    )
    parser.add_argument("--run-dir", type=Path, help="the run base directory (overrides --config)")
    parser.add_argument("--monitor", metavar="URL", help="monitor URL (default: from the run)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")


def find_run(base: Path, run_id: str | None) -> Path:
    """The run directory of ``run_id`` under ``base``, else the only one that has a monitor."""
    if run_id is not None:
        path = base / run_id
        if not (path / CONTROL_TOKEN_FILE).exists():
            raise SupervisorError(f"no running pipeline with run id {run_id!r} under {base}")
        return path
    runs = sorted(p for p in base.glob(f"*/{CONTROL_TOKEN_FILE}")) if base.is_dir() else []
    if not runs:
        raise SupervisorError(f"no running pipeline with a monitor under {base}")
    if len(runs) > 1:
        ids = ", ".join(p.parent.name for p in runs)
        raise SupervisorError(f"several pipelines are running ({ids}): choose one with --run-id")
    return runs[0].parent


def _loopback_url(url: str) -> str:
    """A monitor bound to every address is reached (and named in Host) on loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host in ("0.0.0.0", "::", ""):
        loop = "127.0.0.1" if host != "::" else "[::1]"
        return urlunsplit((parts.scheme, f"{loop}:{parts.port}", "", "", ""))
    return url.rstrip("/")


def send(
    url: str, token: str, stage: str, cmd: str, args: dict[str, Any], timeout: float
) -> tuple[int, Any]:
    """POST one command; (HTTP status, decoded JSON answer)."""
    req = urllib.request.Request(
        f"{_loopback_url(url)}/control/{stage}/{cmd}",
        data=json.dumps(args).encode(),
        method="POST",
        headers={"Content-Type": "application/json", TOKEN_HEADER: token},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"error": body.decode(errors="replace")}
    except (urllib.error.URLError, OSError) as exc:
        raise SupervisorError(f"cannot reach the monitor at {url}: {exc}") from exc


def main(args: argparse.Namespace) -> int:
    try:
        cmd_args = jsonsafe.loads(args.args)
    except JsonInputError as exc:
        raise SupervisorError(f"arguments must be a JSON object: {exc}") from exc
    if not isinstance(cmd_args, dict):
        raise SupervisorError(f"arguments must be a JSON object, got {args.args!r}")
    base = args.run_dir
    if base is None and args.config is not None:
        base = load_config(args.config).supervisor.run_dir
    run = find_run(base or default_run_base(), args.run_id)
    try:
        token = (run / CONTROL_TOKEN_FILE).read_text(encoding="utf-8").strip()
        url = args.monitor or (run / MONITOR_URL_FILE).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SupervisorError(f"cannot read the run's control files in {run}: {exc}") from exc
    status, answer = send(url, token, args.stage, args.cmd, cmd_args, args.timeout)
    print(json.dumps(answer))
    return 0 if status == 202 else 1
