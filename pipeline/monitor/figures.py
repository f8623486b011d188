"""The performance monitor: figures, alerts, ``/metrics``, live status and report data.

The supervisor is the one process that sees the whole pipeline: every stage's
heartbeat carries its metrics, the rings' counters live in shared memory the
supervisor owns, and psutil sees every stage process. About once a second
(``monitor.sample_interval_s``) the supervisor's loop hands the
:class:`Monitor` what it knows (:meth:`Monitor.observe`), and the monitor

* derives the pipeline's figures: fps per stage, latency per hop and from
  capture to send (p50/p95/p99), detection and encoding time, skip and drop
  rates, ring occupancy, bytes per frame and compression ratio against raw
  float32 landmarks (:data:`RAW_FLOAT32_BYTES`), bandwidth, transport switch
  rate, CPU % and RSS per process;
* evaluates the alerts (:data:`ALERTS`): an alert is *entered* when its value
  exceeds its threshold and *cleared* once the value stayed at or under the
  threshold for ``monitor.alert_hold_s``; each transition is logged once and
  every episode is kept for the run report;
* renders the Prometheus text exposition that the HTTP thread serves on
  ``/metrics`` (every family is listed in :data:`METRICS`, names
  ``posewire_*``);
* appends one point to the time series the report renderer plots
  (``python -m pipeline report``), thinned by halving past
  ``monitor.series_max_points``;
* redraws the live status table (rich) when stdout is a terminal.

The HTTP server (stdlib :class:`~http.server.ThreadingHTTPServer`, in a
daemon thread) also accepts ``POST /control/<stage>/<command>`` with a JSON
object of arguments from loopback clients only. The request is queued; the
supervisor's loop takes it (:meth:`Monitor.take_commands`), sends it to the
stage on its own thread (ZeroMQ sockets are not thread-safe) and the HTTP
answer carries the command id (the stage's reply is logged by the
supervisor).

Stage metric conventions the monitor reads (numbers only, ``*_total`` are
counters summed over restarts by the supervisor): ``fps`` (every stage);
transmit ``packets_sent_total``, ``bytes_sent_total``,
``latency_ms_p50/p95/p99`` (capture to send), optionally
``transport_switches_total`` and ``transport_active_<kind>`` (1.0 for the
transport in use; without it the configured primary is reported); detect
``detect_ms_p50/p95``, ``capture_to_detect_ms``; encode
``encode_us_p50/p95/p99``, ``packets_encoded_total``, ``bytes_encoded_total``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import psutil

from pipeline.config import MonitorConfig
from pipeline.errors import SupervisorError
from pipeline.runtime import control

log = logging.getLogger("posewire.monitor")

#: raw float32 landmarks of one pose: 33 landmarks x (x, y, z, visibility) x 4 bytes
RAW_FLOAT32_BYTES = 33 * 4 * 4

#: alert name -> what its value is (README documents the same)
ALERTS: dict[str, str] = {
    "latency": "capture-to-send latency in ms (monitor.alert_latency_percentile of the "
    "transmit stage's rolling window)",
    "drop_rate": "frames dropped / frames captured over monitor.alert_window_s",
    "switch_rate": "transport switches / packets sent over monitor.alert_window_s",
    "compression_ratio": "bytes per frame on the wire / 528 (raw float32) over "
    "monitor.alert_window_s",
}

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

#: the counters that give each stage's output for the fps fallback and the status table
_STAGE_OUTPUT = {
    "capture": "frames_captured_total",
    "detect": "frames_detected_total",
    "encode": "packets_encoded_total",
    "transmit": "packets_sent_total",
}
_QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))


class StageView(Protocol):
    """What the monitor reads of a stage (the supervisor's ``StageState``)."""

    proc: BaseProcess | None
    restarts: int
    hung: int
    state: str

    def all_metrics(self) -> dict[str, float]:
        """The last heartbeat's metrics with ``*_total`` counters summed over restarts."""
        ...


# --------------------------------------------------------------------------- alerts


@dataclass
class AlertEpisode:
    """One time an alert was raised (and perhaps cleared)."""

    name: str
    threshold: float
    value: float
    """The worst value seen while the alert was raised."""
    entered_at: float
    """Wall clock (Unix seconds)."""
    entered_after_s: float
    """Seconds since the run started."""
    cleared_at: float | None = None
    cleared_after_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _round(self.value),
            "threshold": self.threshold,
            "entered_at": round(self.entered_at, 3),
            "entered_after_s": round(self.entered_after_s, 3),
            "cleared_at": None if self.cleared_at is None else round(self.cleared_at, 3),
            "cleared_after_s": (
                None if self.cleared_after_s is None else round(self.cleared_after_s, 3)
            ),
            "active_at_exit": self.cleared_at is None,
        }


@dataclass
class _Alert:
    name: str
    threshold: float
    value: float | None = None
    episode: AlertEpisode | None = None
    below_since: float | None = None
    raised: int = 0

    @property
    def active(self) -> bool:
        return self.episode is not None


class AlertBook:
    """The alerts' state machine: enter above the threshold, clear after a quiet hold."""

    def __init__(self, thresholds: Mapping[str, float], hold_s: float) -> None:
        self.hold_s = hold_s
        self.alerts = {name: _Alert(name, t) for name, t in thresholds.items()}
        self.episodes: list[AlertEpisode] = []

    def update(self, name: str, value: float | None, mono: float, since_start: float) -> None:
        """Feed the alert's current value; ``None`` (no data) changes nothing."""
        a = self.alerts[name]
        a.value = value
        if value is None or not math.isfinite(value):
            return
        if value > a.threshold:
            a.below_since = None
            if a.episode is None:
                a.episode = AlertEpisode(name, a.threshold, value, time.time(), since_start)
                a.raised += 1
                self.episodes.append(a.episode)
                log.warning(
                    "alert %s raised: %s = %.4g exceeds %.4g", name, name, value, a.threshold
                )
            else:
                a.episode.value = max(a.episode.value, value)
            return
        if a.episode is None:
            return
        if a.below_since is None:
            a.below_since = mono
        if mono - a.below_since >= self.hold_s:
            a.episode.cleared_at = time.time()
            a.episode.cleared_after_s = since_start
            log.info(
                "alert %s cleared: %s = %.4g within %.4g (worst %.4g)",
                name,
                name,
                value,
                a.threshold,
                a.episode.value,
            )
            a.episode = None
            a.below_since = None

    def active(self) -> list[str]:
        return [n for n, a in self.alerts.items() if a.active]


# --------------------------------------------------------------------------- exposition


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class Exposition:
    """Prometheus text format 0.0.4, families in :data:`METRICS` order."""

    def __init__(self) -> None:
        self._samples: dict[str, list[tuple[dict[str, str], float]]] = {}

    def add(self, name: str, value: float | None, **labels: str) -> None:
        if name not in METRICS:
            raise KeyError(f"metric {name} is not declared in METRICS")
        if value is None:
            return
        self._samples.setdefault(name, []).append((labels, float(value)))

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text) in METRICS.items():
            samples = self._samples.get(name)
            if not samples:
                continue
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                if labels:
                    inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
                    lines.append(f"{name}{{{inner}}} {_number(value)}")
                else:
                    lines.append(f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"


def parse_exposition(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse the samples of a text exposition (enough for tests and tools; no escapes in
    label values beyond ``\\"``)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        labels: dict[str, str] = {}
        name = head
        if "{" in head:
            name, _, rest = head.partition("{")
            body = rest.rstrip("}")
            for part in _split_labels(body):
                k, _, v = part.partition("=")
                labels[k] = v.strip('"').replace('\\"', '"').replace("\\\\", "\\")
        out[(name, frozenset(labels.items()))] = float(value)
    return out


def _split_labels(body: str) -> Iterable[str]:
    part, quoted, escaped = "", False, False
    for ch in body:
        if escaped:
            part += ch
            escaped = False
        elif ch == "\\":
            part += ch
            escaped = True
        elif ch == '"':
            part += ch
            quoted = not quoted
        elif ch == "," and not quoted:
            yield part
            part = ""
        else:
            part += ch
    if part:
        yield part


# --------------------------------------------------------------------------- time series


class _Series:
    """Columnar time series with ``None`` for missing values, thinned by halving."""

    def __init__(self, max_points: int) -> None:
        self.max_points = max_points
        self.every = 1
        self._calls = 0
        self.t: list[float] = []
        self.cols: dict[str, list[float | None]] = {}

    def append(self, t: float, values: Mapping[str, float | None]) -> None:
        self._calls += 1
        if (self._calls - 1) % self.every:
            return
        n = len(self.t)
        self.t.append(round(t, 3))
        for key, v in values.items():
            col = self.cols.get(key)
            if col is None:
                col = self.cols[key] = [None] * n
            col.append(_round(v))
        for col in self.cols.values():
            if len(col) < n + 1:
                col.append(None)
        if len(self.t) > self.max_points:
            self.t = self.t[::2]
            for key in self.cols:
                self.cols[key] = self.cols[key][::2]
            self.every *= 2

    def as_dict(self, interval_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {"interval_s": interval_s * self.every, "t_s": list(self.t)}
        for key, col in sorted(self.cols.items()):
            group, _, leaf = key.partition(".")
            if leaf:
                out.setdefault(group, {})[leaf] = list(col)
            else:
                out[group] = list(col)
        return out


def _round(v: float | None, digits: int = 4) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}") if abs(v) < 1e6 else round(v, 1)


# --------------------------------------------------------------------------- processes


class _ProcessSampler:
    """CPU % (since the previous sample) and RSS of processes by pid (psutil)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pid: int) -> tuple[float | None, float | None]:
        """``(cpu_percent, rss_bytes)``; cpu is ``None`` on a pid's first sample."""
        proc = self._procs.get(pid)
        first = proc is None
        try:
            if proc is None:
                proc = psutil.Process(pid)
                self._procs[pid] = proc
            with proc.oneshot():
                cpu = proc.cpu_percent(None)
                rss = float(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            return None, None
        return (None if first else cpu), rss

    def forget_except(self, pids: set[int]) -> None:
        for pid in [p for p in self._procs if p not in pids]:
            del self._procs[pid]


# --------------------------------------------------------------------------- control requests


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


# --------------------------------------------------------------------------- the monitor


@dataclass
class _Window:
    """Counters at one sample, for rates over a window."""

    mono: float
    counters: dict[str, float]


class Monitor:
    """Aggregates the pipeline's figures; serves ``/metrics``; keeps alerts and series.

    Use: :meth:`start` (binds the HTTP port when ``cfg.enabled``, starts the
    live status when wanted), :meth:`observe` from the supervisor's loop when
    :meth:`due`, :meth:`take_commands` on every loop turn, :meth:`report_section`
    at the end, :meth:`close` on every exit path.
    """

    def __init__(
        self,
        cfg: MonitorConfig,
        *,
        primary_transport: str = "file",
        run_dir: Path | None = None,
        run_id: str = "",
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = run_id
        self.primary_transport = primary_transport
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self.alerts = AlertBook(
            {
                "latency": cfg.alert_latency_ms,
                "drop_rate": cfg.alert_drop_rate,
                "switch_rate": cfg.alert_switch_rate,
                "compression_ratio": cfg.alert_compression_ratio,
            },
            cfg.alert_hold_s,
        )
        self.current: dict[str, Any] = {}
        """The figures of the last sample (also ``GET /status``)."""
        self.samples = 0
        self._next_due = 0.0
        self._series = _Series(cfg.series_max_points)
        self._window: deque[_Window] = deque()
        self._prev: _Window | None = None
        self._procs = _ProcessSampler()
        self._proc_hist: dict[str, dict[str, list[float]]] = {}
        self._fps_hist: dict[str, list[float]] = {}
        self._c2d_samples: list[float] = []
        self._p99_max: dict[str, float] = {}
        self._bandwidth_peak = 0.0
        self._stage_names: frozenset[str] = frozenset()
        first = Exposition()
        first.add("posewire_up", 1)  # served before the first sample
        self._exposition = first.render()
        self._status_json = b"{}"
        self._commands: queue.SimpleQueue[ControlRequest] = queue.SimpleQueue()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._live: _LiveStatus | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the metrics server, when it listens."""
        if self._server is None:
            return None
        addr = self._server.server_address
        host = addr[0].decode() if isinstance(addr[0], bytes) else str(addr[0])
        port = int(addr[1])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def start(self) -> None:
        """Bind the metrics port (``SupervisorError`` if it cannot) and start the status."""
        if self.cfg.enabled:
            self._server = _make_server(self.cfg.host, self.cfg.port, self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name="monitor-http",
                daemon=True,
            )
            self._thread.start()
            log.info("monitor: %s/metrics", self.url)
            if self.run_dir is not None:
                with contextlib.suppress(OSError):
                    (self.run_dir / "monitor.url").write_text(f"{self.url}\n", encoding="utf-8")
        want = self.cfg.status
        if want == "on" or (want == "auto" and sys.stdout.isatty()):
            self._live = _LiveStatus()

    def close(self) -> None:
        """Stop the status display and the HTTP server (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.stop(self)
            self._live = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        while True:  # nobody will send these any more
            try:
                self._commands.get_nowait().done.set()
            except queue.Empty:
                break

    # -- called by the supervisor's loop ------------------------------------------

    def due(self, now: float | None = None) -> bool:
        """Whether the next sample is due (monotonic clock)."""
        return (time.monotonic() if now is None else now) >= self._next_due

    def take_commands(self) -> list[ControlRequest]:
        """Control requests received over HTTP since the last call."""
        out: list[ControlRequest] = []
        while True:
            try:
                out.append(self._commands.get_nowait())
            except queue.Empty:
                return out

    def observe(
        self,
        stages: Mapping[str, StageView],
        frames: Mapping[str, int],
        rings: Mapping[str, Mapping[str, int]],
        now: float | None = None,
    ) -> None:
        """Take one sample: figures, alerts, exposition, time series, status."""
        mono = time.monotonic() if now is None else now
        self._next_due = mono + self.cfg.sample_interval_s
        since = mono - self.started_mono
        self.samples += 1
        self._stage_names = frozenset(stages)
        metrics = {name: st.all_metrics() for name, st in stages.items()}
        tx = metrics.get("transmit", {})

        # processes
        procs: dict[str, dict[str, Any]] = {}
        live_pids: set[int] = set()
        for name, st in stages.items():
            pid = st.proc.pid if st.proc is not None else None
            cpu = rss = None
            if pid is not None:
                live_pids.add(pid)
                cpu, rss = self._procs.sample(pid)
            procs[name] = {"pid": pid, "cpu_percent": cpu, "rss_bytes": rss}
        own = os.getpid()
        live_pids.add(own)
        cpu, rss = self._procs.sample(own)
        procs["supervisor"] = {"pid": own, "cpu_percent": cpu, "rss_bytes": rss}
        self._procs.forget_except(live_pids)
        for name, p in procs.items():
            hist = self._proc_hist.setdefault(name, {"cpu": [], "rss": []})
            if p["cpu_percent"] is not None:
                hist["cpu"].append(p["cpu_percent"])
            if p["rss_bytes"] is not None:
                hist["rss"].append(p["rss_bytes"])

        # fps
        fps: dict[str, float | None] = {}
        for name, st in stages.items():
            value = metrics[name].get("fps") if st.proc is not None else None
            fps[name] = value
            if value is not None and st.state == "running":
                self._fps_hist.setdefault(name, []).append(value)

        # latency per hop
        latency = _latency(metrics)
        for hop, q in latency.items():
            p99 = q.get("p99")
            if p99 is not None:
                self._p99_max[hop] = max(self._p99_max.get(hop, 0.0), p99)
        c2d = metrics.get("detect", {}).get("capture_to_detect_ms")
        if c2d is not None and stages.get("detect") is not None:
            self._c2d_samples.append(c2d)

        # windows
        counters = {f"frames.{k}": float(v) for k, v in frames.items()}
        counters["packets_sent"] = tx.get("packets_sent_total", 0.0)
        counters["bytes_sent"] = tx.get("bytes_sent_total", 0.0)
        counters["switches"] = tx.get("transport_switches_total", 0.0)
        snap = _Window(mono, counters)
        self._window.append(snap)
        while len(self._window) > 2 and mono - self._window[1].mono >= self.cfg.alert_window_s:
            self._window.popleft()
        first = self._window[0]

        def delta(key: str, base: _Window | None = first) -> float:
            if base is None:
                return 0.0
            return max(0.0, counters.get(key, 0.0) - base.counters.get(key, 0.0))

        d_captured = delta("frames.captured")
        drop_rate = delta("frames.dropped") / d_captured if d_captured > 0 else 0.0
        skip_rate = delta("frames.skipped") / d_captured if d_captured > 0 else 0.0
        d_packets = delta("packets_sent")
        bytes_per_frame = delta("bytes_sent") / d_packets if d_packets > 0 else None
        if bytes_per_frame is None and len(self._window) < 2:
            bytes_per_frame = _mean_size(tx)
        compression = None if bytes_per_frame is None else bytes_per_frame / RAW_FLOAT32_BYTES
        switch_rate = delta("switches") / d_packets if d_packets > 0 else 0.0
        prev = self._prev
        bandwidth = None
        if prev is not None and mono > prev.mono:
            bandwidth = delta("bytes_sent", prev) * 8 / (mono - prev.mono)
            self._bandwidth_peak = max(self._bandwidth_peak, bandwidth)
        self._prev = snap

        # alerts
        lat_alert = latency.get("capture_to_send", {}).get(self.cfg.alert_latency_percentile)
        self.alerts.update("latency", lat_alert, mono, since)
        self.alerts.update("drop_rate", drop_rate if d_captured > 0 else None, mono, since)
        self.alerts.update("switch_rate", switch_rate if d_packets > 0 else None, mono, since)
        self.alerts.update("compression_ratio", compression, mono, since)

        transport = self._transport(tx)
        self.current = {
            "t_s": round(since, 3),
            "stages": {
                name: {
                    "state": st.state if st.proc is not None else "down",
                    "pid": procs[name]["pid"],
                    "fps": _round(fps[name]),
                    "cpu_percent": _round(procs[name]["cpu_percent"]),
                    "rss_mb": _mb(procs[name]["rss_bytes"]),
                    "restarts": st.restarts,
                    "hung": st.hung,
                }
                for name, st in stages.items()
            },
            "supervisor": {
                "pid": own,
                "cpu_percent": _round(procs["supervisor"]["cpu_percent"]),
                "rss_mb": _mb(procs["supervisor"]["rss_bytes"]),
            },
            "frames": dict(frames),
            "latency_ms": latency,
            "drop_rate": _round(drop_rate),
            "skip_rate": _round(skip_rate),
            "bytes_per_frame": _round(bytes_per_frame),
            "compression_ratio": _round(compression),
            "bandwidth_kbps": _round(None if bandwidth is None else bandwidth / 1000),
            "transport": {
                "active": transport,
                "switches": int(counters["switches"]),
                "switch_rate": _round(switch_rate),
            },
            "rings": {r: dict(s) | {"occupancy": _occupancy(s)} for r, s in rings.items()},
            "alerts": {
                n: {"active": a.active, "value": _round(a.value), "threshold": a.threshold}
                for n, a in self.alerts.alerts.items()
            },
        }

        # time series
        point: dict[str, float | None] = {
            "bytes_per_frame": bytes_per_frame,
            "compression_ratio": compression,
            "bandwidth_kbps": None if bandwidth is None else bandwidth / 1000,
            "drop_rate": drop_rate,
            "skip_rate": skip_rate,
        }
        for name in stages:
            point[f"fps.{name}"] = fps[name]
        for name, p in procs.items():
            point[f"cpu_percent.{name}"] = p["cpu_percent"]
            point[f"rss_mb.{name}"] = _mb(p["rss_bytes"])
        for hop, q in latency.items():
            for k, v in q.items():
                point[f"latency_ms.{hop}_{k}"] = v
        for r, s in rings.items():
            point[f"ring_occupancy.{r}"] = float(_occupancy(s))
        for n, a in self.alerts.alerts.items():
            point[f"alerts_active.{n}"] = 1.0 if a.active else 0.0
        self._series.append(since, point)

        self._exposition = self._render_exposition(stages, metrics, procs, rings, bandwidth)
        self._status_json = json.dumps(self.current).encode()
        if self._live is not None:
            self._live.update(self)

    # -- the report -----------------------------------------------------------

    def report_section(
        self,
        stages: Mapping[str, StageView],
        frames: Mapping[str, int],
        rings: Mapping[str, Mapping[str, int]],
    ) -> dict[str, Any]:
        """The monitor's part of the run report (merged into the supervisor's)."""
        metrics = {name: st.all_metrics() for name, st in stages.items()}
        tx = metrics.get("transmit", {})
        duration = max(time.monotonic() - self.started_mono, 1e-9)
        stage_out: dict[str, Any] = {}
        for name in stages:
            hist = self._proc_hist.get(name, {"cpu": [], "rss": []})
            fps_hist = self._fps_hist.get(name, [])
            stage_out[name] = {
                "cpu_percent": _round(_mean(hist["cpu"])),
                "cpu_percent_max": _round(max(hist["cpu"], default=None)),
                "rss_mb": _mb(hist["rss"][-1] if hist["rss"] else None),
                "rss_mb_max": _mb(max(hist["rss"], default=None)),
                "fps": _round(_mean(fps_hist)),
                "fps_max": _round(max(fps_hist, default=None)),
            }
        sup = self._proc_hist.get("supervisor", {"cpu": [], "rss": []})
        latency: dict[str, dict[str, float | None]] = {}
        for hop, q in _latency(metrics).items():
            latency[hop] = {
                "p50": q.get("p50"),
                "p95": q.get("p95"),
                "p99": q.get("p99"),
                "p99_max": _round(self._p99_max.get(hop)),
            }
        if self._c2d_samples:
            p50, p95, p99 = _percentiles(self._c2d_samples, (50, 95, 99))
            latency["capture_to_detect"] = {
                "p50": _round(p50),
                "p95": _round(p95),
                "p99": _round(p99),
                "p99_max": _round(max(self._c2d_samples)),
            }
        sent = tx.get("packets_sent_total", 0.0)
        nbytes = tx.get("bytes_sent_total", 0.0)
        mean_bpf = nbytes / sent if sent > 0 else None
        captured = frames.get("captured", 0)
        switches = int(tx.get("transport_switches_total", 0.0))
        return {
            "stages": stage_out,
            "supervisor": {
                "cpu_percent": _round(_mean(sup["cpu"])),
                "rss_mb": _mb(sup["rss"][-1] if sup["rss"] else None),
                "rss_mb_max": _mb(max(sup["rss"], default=None)),
            },
            "latency_ms": latency,
            "bytes_per_frame": {
                "mean": _round(mean_bpf, 8),
                "packets": int(sent),
                "bytes": int(nbytes),
                "raw_float32": RAW_FLOAT32_BYTES,
                "compression_ratio": _round(
                    None if mean_bpf is None else mean_bpf / RAW_FLOAT32_BYTES
                ),
            },
            "bandwidth_kbps": {
                "mean": _round(nbytes * 8 / 1000 / duration),
                "peak": _round(self._bandwidth_peak / 1000),
            },
            "rates": {
                "skip": _round(frames.get("skipped", 0) / captured if captured else 0.0),
                "drop": _round(frames.get("dropped", 0) / captured if captured else 0.0),
            },
            "transport": {
                "active": self._transport(tx),
                "primary": self.primary_transport,
                "switches": switches,
                "switch_rate": _round(switches / sent if sent > 0 else 0.0),
            },
            "rings": {r: {"occupancy": _occupancy(s)} for r, s in rings.items()},
            "alerts": [e.as_dict() for e in self.alerts.episodes],
            "alert_thresholds": {n: a.threshold for n, a in self.alerts.alerts.items()},
            "monitor": {
                "url": self.url,
                "samples": self.samples,
                "alert_window_s": self.cfg.alert_window_s,
                "alert_hold_s": self.cfg.alert_hold_s,
                "latency_percentile": self.cfg.alert_latency_percentile,
            },
            "series": self._series.as_dict(self.cfg.sample_interval_s),
        }

    # -- served by the HTTP thread ----------------------------------------------

    def exposition(self) -> str:
        """The last rendered ``/metrics`` text."""
        return self._exposition

    def status_json(self) -> bytes:
        return self._status_json

    def stage_names(self) -> frozenset[str]:
        return self._stage_names

    def submit(self, req: ControlRequest) -> None:
        self._commands.put(req)

    # -- internals ------------------------------------------------------------

    def _transport(self, tx: Mapping[str, float]) -> str:
        for key, value in tx.items():
            if key.startswith("transport_active_") and value >= 1.0:
                return key.removeprefix("transport_active_")
        return self.primary_transport

    def _render_exposition(
        self,
        stages: Mapping[str, StageView],
        metrics: Mapping[str, Mapping[str, float]],
        procs: Mapping[str, Mapping[str, Any]],
        rings: Mapping[str, Mapping[str, int]],
        bandwidth: float | None,
    ) -> str:
        c = self.current
        ex = Exposition()
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
            ex.add("posewire_ring_occupancy", _occupancy(s), ring=r)
            ex.add("posewire_ring_peak_occupancy", s.get("peak_occupancy"), ring=r)
            ex.add("posewire_ring_slots", s.get("slots"), ring=r)
            for event in ("written", "read", "skipped", "dropped"):
                ex.add("posewire_ring_items_total", s.get(event), ring=r, event=event)
        tx = metrics.get("transmit", {})
        ex.add("posewire_packets_sent_total", tx.get("packets_sent_total", 0.0))
        ex.add("posewire_bytes_sent_total", tx.get("bytes_sent_total", 0.0))
        ex.add("posewire_bytes_per_frame", c["bytes_per_frame"])
        ex.add("posewire_compression_ratio", c["compression_ratio"])
        ex.add("posewire_bandwidth_bits_per_second", bandwidth)
        ex.add("posewire_transport_active", 1, transport=c["transport"]["active"])
        ex.add("posewire_transport_switches_total", c["transport"]["switches"])
        ex.add("posewire_transport_switch_rate", c["transport"]["switch_rate"])
        for n, a in self.alerts.alerts.items():
            ex.add("posewire_alert_active", 1 if a.active else 0, alert=n)
            ex.add("posewire_alert_value", a.value, alert=n)
            ex.add("posewire_alert_threshold", a.threshold, alert=n)
            ex.add("posewire_alerts_raised_total", a.raised, alert=n)
        return ex.render()


def _latency(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    """Latency per hop in ms from the stages' rolling-window gauges."""
    out: dict[str, dict[str, float | None]] = {}
    tx = metrics.get("transmit", {})
    if "latency_ms_p50" in tx:
        out["capture_to_send"] = {k: _round(tx.get(f"latency_ms_{k}")) for k, _ in _QUANTILES}
    det = metrics.get("detect", {})
    if "capture_to_detect_ms" in det:
        v = _round(det["capture_to_detect_ms"])
        out["capture_to_detect"] = {"p50": v, "p95": None, "p99": None}
    if "detect_ms_p50" in det:
        out["detect"] = {k: _round(det.get(f"detect_ms_{k}")) for k, _ in _QUANTILES}
    enc = metrics.get("encode", {})
    if "encode_us_p50" in enc:
        out["encode"] = {
            k: _round(enc[f"encode_us_{k}"] / 1000) if f"encode_us_{k}" in enc else None
            for k, _ in _QUANTILES
        }
    return out


def _occupancy(s: Mapping[str, int]) -> int:
    return max(
        0,
        int(s.get("written", 0))
        - int(s.get("read", 0))
        - int(s.get("skipped", 0))
        - int(s.get("dropped", 0)),
    )


def _mean_size(tx: Mapping[str, float]) -> float | None:
    sent = tx.get("packets_sent_total", 0.0)
    return tx.get("bytes_sent_total", 0.0) / sent if sent > 0 else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / (1024 * 1024), 2)


def _percentiles(values: list[float], qs: tuple[float, ...]) -> list[float]:
    ordered = sorted(values)
    out = []
    for q in qs:
        pos = (len(ordered) - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


def merge_report(base: dict[str, Any], section: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``section`` into ``base`` (dicts merge, anything else replaces); returns
    ``base``."""
    for key, value in section.items():
        mine = base.get(key)
        if isinstance(mine, dict) and isinstance(value, Mapping):
            merge_report(mine, value)
        else:
            base[key] = value
    return base


# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    monitor: Monitor


class _Server6(_Server):
    address_family = socket.AF_INET6


def _make_server(host: str, port: int, monitor: Monitor) -> _Server:
    cls = _Server6 if ":" in host else _Server
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

    server: _Server
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
        if not _is_loopback(self.client_address[0]):
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


def _is_loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


# --------------------------------------------------------------------------- live status


class _LiveStatus:
    """A rich table redrawn at every sample; the supervisor's log lines print above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=sys.stdout)
        self.live = Live(
            console=self.console,
            auto_refresh=False,
            redirect_stdout=True,
            redirect_stderr=True,
            transient=False,
        )
        self.live.start()
        # The supervisor's log handler holds the real stderr: route it through the live
        # console's proxy so log lines appear above the table instead of tearing it.
        self._rerouted: list[tuple[logging.StreamHandler[Any], Any]] = []
        if sys.stderr is not sys.__stderr__:
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__:
                    self._rerouted.append((h, h.setStream(sys.stderr)))

    def update(self, mon: Monitor) -> None:
        self.live.update(render_status(mon.current), refresh=True)

    def stop(self, mon: Monitor) -> None:
        if mon.current:
            self.live.update(render_status(mon.current), refresh=True)
        for h, old in self._rerouted:
            h.setStream(old)
        self.live.stop()


def render_status(current: Mapping[str, Any]) -> Any:
    """The live status table of one sample (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"posewire  t={current.get('t_s', 0):.0f}s", expand=False)
    for col, justify in (
        ("stage", "left"),
        ("state", "left"),
        ("pid", "right"),
        ("fps", "right"),
        ("cpu %", "right"),
        ("rss MB", "right"),
        ("restarts", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, s in current.get("stages", {}).items():
        table.add_row(
            name,
            str(s.get("state")),
            _cell(s.get("pid"), "{}"),
            _cell(s.get("fps"), "{:.1f}"),
            _cell(s.get("cpu_percent"), "{:.0f}"),
            _cell(s.get("rss_mb"), "{:.0f}"),
            str(s.get("restarts", 0)),
        )
    f = current.get("frames", {})
    lat = current.get("latency_ms", {}).get("capture_to_send", {})
    tr = current.get("transport", {})
    active = [n for n, a in current.get("alerts", {}).items() if a.get("active")]
    summary = (
        f"frames captured {f.get('captured', 0)}  sent {f.get('sent', 0)}  "
        f"skipped {f.get('skipped', 0)}  dropped {f.get('dropped', 0)} "
        f"(rate {_cell(current.get('drop_rate'), '{:.1%}')})\n"
        f"latency capture->send p50 {_cell(lat.get('p50'), '{:.1f}')} "
        f"p95 {_cell(lat.get('p95'), '{:.1f}')} p99 {_cell(lat.get('p99'), '{:.1f}')} ms   "
        f"transport {tr.get('active', '-')} ({tr.get('switches', 0)} switches)   "
        f"{_cell(current.get('bytes_per_frame'), '{:.1f}')} B/frame   "
        f"{_cell(current.get('bandwidth_kbps'), '{:.1f}')} kbit/s\n"
        + ("[bold red]ALERTS: " + ", ".join(active) + "[/]" if active else "[green]no alerts[/]")
    )
    return Group(table, Text.from_markup(summary))


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value)
