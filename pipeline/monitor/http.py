"""The monitor's HTTP endpoint and the families it exports.

A stdlib :class:`~http.server.ThreadingHTTPServer` in a daemon thread serves
``GET /metrics`` (Prometheus text, every family declared in :data:`METRICS`,
names ``posewire_*``), ``GET /status`` (the last sample as JSON) and accepts
``POST /control/<stage>/<command>`` with a JSON object of arguments. The
request is queued as a :class:`ControlRequest`; the supervisor's loop takes it,
sends it to the stage on its own thread (ZeroMQ sockets are not thread-safe)
and the HTTP answer carries the command id (the stage's reply is logged by the
supervisor).

Control is for the user of this run only (a web page in their browser must not
reach it, by CSRF or DNS rebinding): a control request is refused (403/415)
unless it comes from a loopback peer, names a loopback ``Host``, carries no
foreign ``Origin`` (only ``http://`` loopback origins pass), has
``Content-Type: application/json`` and the run's secret in the
:data:`TOKEN_HEADER` header: a random token the monitor writes, mode 0600, to
``<run_dir>/control.token`` (:data:`CONTROL_TOKEN_FILE`; ``python -m pipeline
ctl`` sends it). The body is parsed with :func:`pipeline.model.jsonsafe.loads`
and the arguments are checked per command (:func:`check_args`: known names,
finite numbers in range); anything else is a 400 naming it.

Bounded: at most ``monitor.max_connections`` connections are served at once
(more are answered 503 and closed at once, never given a thread), and a
request must arrive whole within ``monitor.request_timeout_s`` (an idle or
trickling connection is closed).
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pipeline.config import TransportKind
from pipeline.errors import JsonInputError, SupervisorError
from pipeline.model import jsonsafe
from pipeline.model.net import is_loopback
from pipeline.model.prometheus import Exposition
from pipeline.monitor.alerts import AlertBook
from pipeline.monitor.samples import StageView, occupancy
from pipeline.runtime import control

log = logging.getLogger("posewire.monitor")

#: every exported metric family: name -> (type, help). README's "Monitoring" lists the same.
METRICS: dict[str, tuple[str, str]] = {
    "posewire_up": ("gauge", "1 while the supervisor runs."),
    "posewire_uptime_seconds": ("gauge", "Seconds since the supervisor started."),
    "posewire_frames_total": (
        "counter",
        "Frames through the pipeline by kind: captured, detected, skipped, encoded, sent, dropped.",
    ),
    "posewire_stage_up": ("gauge", "1 when the stage's process is alive and heartbeating."),
    "posewire_stage_info": ("gauge", "Always 1; labels: stage, state, pid."),
    "posewire_stage_restarts_total": ("counter", "Restarts of the stage (crash or hang)."),
    "posewire_stage_hung_total": ("counter", "Times the stage was declared hung."),
    "posewire_stage_fps": ("gauge", "Items per second the stage outputs (its own rolling rate)."),
    "posewire_stage_metric": (
        "untyped",
        "Every number of the stage's last heartbeat, label metric (counters summed over restarts).",
    ),
    "posewire_process_cpu_percent": (
        "gauge",
        "CPU use of the process (stage or supervisor) in percent of one core.",
    ),
    "posewire_process_rss_bytes": ("gauge", "Resident set size of the process."),
    "posewire_latency_seconds": (
        "gauge",
        "Latency per hop (capture_to_send, capture_to_detect, detect, encode) at quantile "
        "0.5/0.95/0.99 of the measuring stage's rolling window.",
    ),
    "posewire_skip_rate": (
        "gauge",
        "Frames skipped by latest-wins / frames captured, over the alert window.",
    ),
    "posewire_drop_rate": (
        "gauge",
        "Frames dropped (full rings, failed sends) / frames captured, over the alert window.",
    ),
    "posewire_ring_occupancy": ("gauge", "Items waiting in the ring now."),
    "posewire_ring_peak_occupancy": ("gauge", "Highest occupancy the ring has seen."),
    "posewire_ring_slots": ("gauge", "Slots of the ring."),
    "posewire_ring_items_total": (
        "counter",
        "Ring items by event: written, read, skipped, dropped.",
    ),
    "posewire_packets_sent_total": ("counter", "Packets handed to the transport."),
    "posewire_bytes_sent_total": ("counter", "Payload bytes handed to the transport."),
    "posewire_bytes_per_frame": ("gauge", "Mean packet size over the alert window."),
    "posewire_compression_ratio": (
        "gauge",
        "Bytes per frame / 528 (raw float32 landmarks), over the alert window.",
    ),
    "posewire_bandwidth_bits_per_second": (
        "gauge",
        "Send rate of the transmit stage over the last sample interval.",
    ),
    "posewire_transport_active": ("gauge", "1 for the transport in use; label transport."),
    "posewire_transport_switches_total": (
        "counter",
        "Transport switches (primary <-> fallback); label reason with a hot standby.",
    ),
    "posewire_transport_switch_rate": (
        "gauge",
        "Transport switches / packets sent, over the alert window.",
    ),
    "posewire_degradation_level": ("gauge", "Degradation ladder level (0: the full stream)."),
    "posewire_degradation_steps_total": (
        "counter",
        "Degradation ladder steps applied; label direction (down, up).",
    ),
    "posewire_alert_active": ("gauge", "1 while the alert is raised; label alert."),
    "posewire_alert_value": ("gauge", "The alert's current value; label alert."),
    "posewire_alert_threshold": ("gauge", "The alert's threshold; label alert."),
    "posewire_alerts_raised_total": ("counter", "Times the alert was entered; label alert."),
}


@dataclass
class ControlRequest:
    """A command for a stage, queued by the HTTP thread for the supervisor's loop."""

    stage: str
    cmd: str
    args: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    cmd_id: int | None = None

    def resolve(self, cmd_id: int) -> None:
        """Called by the supervisor's loop once the command is sent."""
        self.cmd_id = cmd_id
        self.done.set()


class Endpoint(Protocol):
    """What the HTTP thread reads of the monitor (all thread-safe)."""

    def exposition(self) -> str: ...

    def status_json(self) -> bytes: ...

    def stage_names(self) -> frozenset[str]: ...

    def submit(self, req: ControlRequest) -> None: ...


#: the header that carries the run's control secret
TOKEN_HEADER = "X-Posewire-Control-Token"
#: the file in the run directory that holds it (mode 0600)
CONTROL_TOKEN_FILE = "control.token"
#: the file in the run directory that holds the monitor's URL
MONITOR_URL_FILE = "monitor.url"
#: the largest control request body
MAX_BODY = 65536

#: ``set`` arguments the pipeline knows: name -> (min, max) of a finite number (or null)
SET_ARGUMENTS: dict[str, tuple[float, float]] = {
    "max_bandwidth_kbps": (0.0, 10_000_000.0),  # as transmit.max_bandwidth_kbps (0: no cap)
}


def new_control_token() -> str:
    return secrets.token_urlsafe(32)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600, no symlink followed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def publish_endpoint(run_dir: Path, url: str, token: str) -> None:
    """Write the control token (0600), then the URL, into the private run directory."""
    with contextlib.suppress(OSError):
        write_private(run_dir / CONTROL_TOKEN_FILE, f"{token}\n")
        (run_dir / MONITOR_URL_FILE).write_text(f"{url}\n", encoding="utf-8")


def _number(name: str, value: object, lo: float, hi: float, nullable: bool) -> str | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} must be a number{' or null' if nullable else ''}, got {value!r}"
    if not math.isfinite(value) or not lo <= value <= hi:
        return f"{name} must be a finite number in [{lo:g}, {hi:g}], got {value!r}"
    return None


def check_args(cmd: str, args: Mapping[str, Any]) -> str | None:
    """What is wrong with the arguments of command ``cmd`` (None: nothing).

    ``set`` takes the names of :data:`SET_ARGUMENTS`; ``switch_transport`` one ``to``
    naming a transport kind, ``pin`` an optional one; ``stop``, ``pause``, ``resume``,
    ``keyframe`` and ``unpin`` none.
    """
    if cmd == "set":
        known: Mapping[str, object] = SET_ARGUMENTS
    elif cmd in ("switch_transport", "pin"):
        known = {"to": None}
    else:
        known = {}
    unknown = sorted(k for k in args if k not in known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        return f"{cmd}: unknown argument(s) {', '.join(map(repr, unknown))} (allowed: {allowed})"
    if cmd == "set":
        if not args:
            return f"set: no argument (allowed: {', '.join(sorted(SET_ARGUMENTS))})"
        for name, value in args.items():
            lo, hi = SET_ARGUMENTS[name]
            problem = _number(name, value, lo, hi, nullable=True)
            if problem is not None:
                return f"set: {problem}"
    if cmd == "switch_transport" or (cmd == "pin" and "to" in args):
        kinds = [k.value for k in TransportKind]
        if args.get("to") not in kinds:
            return f"{cmd}: 'to' must be one of {', '.join(kinds)}"
    return None


class HTTPServer(ThreadingHTTPServer):
    """Threads bounded by ``max_connections``; a request must arrive within
    ``request_timeout_s``."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: refusals are answered, not left in SYN limbo
    monitor: Endpoint

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int = 16,
        request_timeout_s: float = 5.0,
        control_token: str | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.control_token = control_token
        self.refused_connections = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        self._last_refusal_log = 0.0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # no thread for this one
            self.refused_connections += 1
            now = time.monotonic()
            if now - self._last_refusal_log >= 10.0:
                self._last_refusal_log = now
                log.warning(
                    "monitor: %d connections already open (monitor.max_connections): "
                    "refusing more (%d refused so far)",
                    self.max_connections,
                    self.refused_connections,
                )
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.recv(MAX_BODY)  # what has arrived (unread bytes would turn FIN into RST)
            with contextlib.suppress(OSError):
                request.send(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away or misbehaved: one line, no traceback
        log.debug("monitor: connection from %s ended with an error", client_address)


_BUSY_BODY = b'{"error": "too many monitor connections"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Server6(HTTPServer):
    address_family = socket.AF_INET6


def make_server(
    host: str,
    port: int,
    monitor: Endpoint,
    *,
    max_connections: int = 16,
    request_timeout_s: float = 5.0,
    control_token: str | None = None,
) -> HTTPServer:
    """Bind ``host:port`` (0: any free port); ``SupervisorError`` if it cannot.

    Control requests need ``control_token`` (None: control is refused)."""
    cls = _Server6 if ":" in host else HTTPServer
    try:
        server = cls(
            (host, port),
            _Handler,
            max_connections=max_connections,
            request_timeout_s=request_timeout_s,
            control_token=control_token,
        )
    except OSError as exc:
        raise SupervisorError(
            f"monitor: cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; "
            "choose another monitor.port (0: any free port) or set monitor.enabled: false"
        ) from exc
    server.monitor = monitor
    return server


def _hostname(url: str) -> str:
    """The host of ``url`` (``//host:port`` for a Host header); "" when malformed."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail once the handler's deadline has passed (a request must
    arrive whole in time: no slowloris)."""

    def __init__(self, sock: socket.socket, handler: _Handler) -> None:
        self.sock = sock
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        left = self.handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


class _Handler(BaseHTTPRequestHandler):
    """``GET /metrics``, ``GET /status``, ``POST /control/<stage>/<command>``."""

    server: HTTPServer
    server_version = "posewire-monitor"
    protocol_version = "HTTP/1.1"
    deadline = 0.0

    def setup(self) -> None:
        super().setup()
        self.deadline = time.monotonic() + self.server.request_timeout_s
        self.rfile.close()  # (a makefile keeps the socket open until closed)
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def handle_one_request(self) -> None:
        # each request (also the next on a kept-alive connection) gets the full time
        self.deadline = time.monotonic() + self.server.request_timeout_s
        super().handle_one_request()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        mon = self.server.monitor
        if path == "/metrics":
            self._send(
                HTTPStatus.OK,
                mon.exposition().encode(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        elif path == "/status":
            self._send(HTTPStatus.OK, mon.status_json(), "application/json")
        elif path == "/":
            self._send(
                HTTPStatus.OK,
                b"posewire monitor: GET /metrics, GET /status, "
                b"POST /control/<stage>/<command> (loopback, with the run's control token)\n",
                "text/plain; charset=utf-8",
            )
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")

    def _forbidden(self) -> tuple[HTTPStatus, str] | None:
        """Why this control request may not come in (None: it may)."""
        if not is_loopback(str(self.client_address[0])):
            return HTTPStatus.FORBIDDEN, "control is accepted from loopback clients only"
        host = self.headers.get("Host")
        if not host or not is_loopback(_hostname(f"//{host}")):
            return HTTPStatus.FORBIDDEN, f"control needs a loopback Host header, got {host!r}"
        origin = self.headers.get("Origin")
        if origin is not None and (
            not origin.startswith("http://") or not is_loopback(_hostname(origin))
        ):
            return HTTPStatus.FORBIDDEN, f"control refuses cross-origin requests ({origin!r})"
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return (
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"control needs Content-Type: application/json, got {ctype or 'none'!r}",
            )
        expected = self.server.control_token
        given = self.headers.get(TOKEN_HEADER) or ""
        if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
            return (
                HTTPStatus.FORBIDDEN,
                f"control needs the run's secret in {TOKEN_HEADER} (the run directory's "
                f"{CONTROL_TOKEN_FILE}; python -m pipeline ctl sends it)",
            )
        return None

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "control":
            self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")
            return
        refused = self._forbidden()
        if refused is not None:
            log.warning("monitor: control request refused: %s", refused[1])
            self._error(*refused)
            return
        _, stage, cmd = parts
        mon = self.server.monitor
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return
        if length > MAX_BODY:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body larger than 64 KiB")
            return
        try:
            raw = self.rfile.read(length) if length else b""
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        try:
            args = jsonsafe.loads(raw) if raw.strip() else {}
        except JsonInputError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"body is not acceptable JSON: {exc}")
            return
        if not isinstance(args, dict):
            self._error(HTTPStatus.BAD_REQUEST, "body must be a JSON object of arguments")
            return
        if stage not in mon.stage_names():
            known = ", ".join(sorted(mon.stage_names())) or "none yet"
            self._error(HTTPStatus.NOT_FOUND, f"no stage {stage!r} (stages: {known})")
            return
        if cmd not in control.COMMANDS:
            self._error(
                HTTPStatus.BAD_REQUEST,
                f"unknown command {cmd!r} (commands: {', '.join(sorted(control.COMMANDS))})",
            )
            return
        problem = check_args(cmd, args)
        if problem is not None:
            self._error(HTTPStatus.BAD_REQUEST, problem)
            return
        req = ControlRequest(stage, cmd, args)
        mon.submit(req)
        if not req.done.wait(5.0) or req.cmd_id is None:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the supervisor did not take the command")
            return
        body = {"id": req.cmd_id, "stage": stage, "cmd": cmd, "args": args, "sent": True}
        self._send(HTTPStatus.ACCEPTED, json.dumps(body).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.close_connection = True  # an unread request body must not become the next request
        self._send(status, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
        self.connection.settimeout(self.server.request_timeout_s)  # a reader that stalls
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.client_address[0], *args)


_QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))


_SWITCH_REASON = re.compile(r"transport_switches_[a-z0-9_]+_total")


def render_exposition(
    c: Mapping[str, Any],
    stages: Mapping[str, StageView],
    metrics: Mapping[str, Mapping[str, float]],
    procs: Mapping[str, Mapping[str, Any]],
    rings: Mapping[str, Mapping[str, int]],
    wire: Mapping[str, float],
    bandwidth: float | None,
    alerts: AlertBook,
) -> str:
    """The ``/metrics`` text of one sample: ``c`` is the sample's figures (``/status``),
    ``wire`` the egress stages' metrics."""
    ex = Exposition(METRICS)
    ex.add("posewire_up", 1)
    ex.add("posewire_uptime_seconds", round(c["t_s"], 3))
    for kind, v in c["frames"].items():
        ex.add("posewire_frames_total", v, kind=kind)
    for name, st in stages.items():
        alive = st.proc is not None and st.state in ("running", "paused", "stopping")
        ex.add("posewire_stage_up", 1 if alive else 0, stage=name)
        pid = procs[name]["pid"]
        ex.add(
            "posewire_stage_info",
            1,
            stage=name,
            state=c["stages"][name]["state"],
            pid="" if pid is None else str(pid),
        )
        ex.add("posewire_stage_restarts_total", st.restarts, stage=name)
        ex.add("posewire_stage_hung_total", st.hung, stage=name)
        ex.add("posewire_stage_fps", metrics[name].get("fps"), stage=name)
        for key, value in sorted(metrics[name].items()):
            ex.add("posewire_stage_metric", value, stage=name, metric=key)
    for name, p in procs.items():
        ex.add("posewire_process_cpu_percent", p["cpu_percent"], process=name)
        ex.add("posewire_process_rss_bytes", p["rss_bytes"], process=name)
    for hop, q in c["latency_ms"].items():
        for key, quantile in _QUANTILES:
            v = q.get(key)
            ex.add(
                "posewire_latency_seconds",
                None if v is None else v / 1000,
                hop=hop,
                quantile=quantile,
            )
    ex.add("posewire_skip_rate", c["skip_rate"])
    ex.add("posewire_drop_rate", c["drop_rate"])
    for r, s in rings.items():
        ex.add("posewire_ring_occupancy", occupancy(s), ring=r)
        ex.add("posewire_ring_peak_occupancy", s.get("peak_occupancy"), ring=r)
        ex.add("posewire_ring_slots", s.get("slots"), ring=r)
        for event in ("written", "read", "skipped", "dropped"):
            ex.add("posewire_ring_items_total", s.get(event), ring=r, event=event)
    ex.add("posewire_packets_sent_total", wire.get("packets_sent_total", 0.0))
    ex.add("posewire_bytes_sent_total", wire.get("bytes_sent_total", 0.0))
    ex.add("posewire_bytes_per_frame", c["bytes_per_frame"])
    ex.add("posewire_compression_ratio", c["compression_ratio"])
    ex.add("posewire_bandwidth_bits_per_second", bandwidth)
    ex.add("posewire_transport_active", 1, transport=c["transport"]["active"])
    reasons = {k[19:-6]: v for k, v in wire.items() if _SWITCH_REASON.fullmatch(k)}
    for reason, count in sorted(reasons.items()):  # the hot standby's switches, by reason
        ex.add("posewire_transport_switches_total", count, reason=reason)
    if not reasons:
        ex.add("posewire_transport_switches_total", c["transport"]["switches"])
    ex.add("posewire_transport_switch_rate", c["transport"]["switch_rate"])
    for m in metrics.values():  # the stage that applies the ladder (encode)
        if "degradation_level" in m:
            ex.add("posewire_degradation_level", m["degradation_level"])
            for d in ("down", "up"):
                ex.add(
                    "posewire_degradation_steps_total",
                    m.get(f"degradation_steps_{d}_total"),
                    direction=d,
                )
    for n, a in alerts.alerts.items():
        ex.add("posewire_alert_active", 1 if a.active else 0, alert=n)
        ex.add("posewire_alert_value", a.value, alert=n)
        ex.add("posewire_alert_threshold", a.threshold, alert=n)
        ex.add("posewire_alerts_raised_total", a.raised, alert=n)
    return ex.render()
