"""The monitor's HTTP endpoint and the families it exports.

A stdlib :class:`~http.server.ThreadingHTTPServer` in a daemon thread serves
``GET /metrics`` (Prometheus text, every family declared in :data:`METRICS`,
names ``posewire_*``), ``GET /status`` (the last sample as JSON) and accepts
``POST /control/<stage>/<command>`` with a JSON object of arguments from
loopback clients only. The request is queued as a :class:`ControlRequest`; the
supervisor's loop takes it, sends it to the stage on its own thread (ZeroMQ
sockets are not thread-safe) and the HTTP answer carries the command id (the
stage's reply is logged by the supervisor).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from pipeline.errors import SupervisorError
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
    "posewire_transport_switches_total": ("counter", "Transport switches (primary <-> fallback)."),
    "posewire_transport_switch_rate": (
        "gauge",
        "Transport switches / packets sent, over the alert window.",
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


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    monitor: Endpoint


class _Server6(HTTPServer):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, monitor: Endpoint) -> HTTPServer:
    """Bind ``host:port`` (0: any free port); ``SupervisorError`` if it cannot."""
    cls = _Server6 if ":" in host else HTTPServer
    try:
        server = cls((host, port), _Handler)
    except OSError as exc:
        raise SupervisorError(
            f"monitor: cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; "
            "choose another monitor.port (0: any free port) or set monitor.enabled: false"
        ) from exc
    server.monitor = monitor
    return server


class _Handler(BaseHTTPRequestHandler):
    """``GET /metrics``, ``GET /status``, ``POST /control/<stage>/<command>``."""

    server: HTTPServer
    server_version = "posewire-monitor"
    protocol_version = "HTTP/1.1"

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
                b"POST /control/<stage>/<command> (loopback)\n",
                "text/plain; charset=utf-8",
            )
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "control":
            self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")
            return
        if not is_loopback(str(self.client_address[0])):
            self._error(HTTPStatus.FORBIDDEN, "control is accepted from loopback clients only")
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
        if length > 65536:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body larger than 64 KiB")
            return
        raw = self.rfile.read(length) if length else b""
        try:
            args = json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}")
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
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.client_address[0], *args)


_QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))


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
    ex.add("posewire_transport_switches_total", c["transport"]["switches"])
    ex.add("posewire_transport_switch_rate", c["transport"]["switch_rate"])
    for n, a in alerts.alerts.items():
        ex.add("posewire_alert_active", 1 if a.active else 0, alert=n)
        ex.add("posewire_alert_value", a.value, alert=n)
        ex.add("posewire_alert_threshold", a.threshold, alert=n)
        ex.add("posewire_alerts_raised_total", a.raised, alert=n)
    return ex.render()
