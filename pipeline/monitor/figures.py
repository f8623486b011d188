"""The performance monitor: the pipeline's figures, sampled about once a second.

The supervisor sees the whole pipeline (every stage's heartbeat carries its metrics,
the rings' counters live in its shared memory, psutil sees every process). About once a
second (``monitor.sample_interval_s``) it hands the :class:`Monitor` what it knows
(:meth:`Monitor.observe`), and the monitor

* derives the pipeline's figures: fps per stage, latency per hop (p50/p95/p99),
  skip and drop rates, ring occupancy, bytes per frame and compression ratio
  against raw float32 landmarks (:data:`RAW_FLOAT32_BYTES`), bandwidth (pose and
  audio), transport switch rate, CPU % and RSS per process;
* evaluates the alerts (:mod:`pipeline.monitor.alerts`);
* renders the Prometheus text exposition that the HTTP thread serves on
  ``/metrics`` (:mod:`pipeline.monitor.http`, every family listed in
  :data:`~pipeline.monitor.http.METRICS`);
* appends one point to the time series the report renderer plots
  (``python -m pipeline report``), thinned by halving past
  ``monitor.series_max_points``;
* redraws the live status table (:mod:`pipeline.monitor.live`) on a terminal.

What it reads is declared by the :class:`~pipeline.runtime.topology.Topology`,
never by stage name: the frame figures come from the topology's counts (the
supervisor passes them in), each stage's ``fps`` metric (else the rate of its
declared ``output_metric``), the latency hops its stages declare, and the wire
figures from its *egress* stages, which publish ``packets_sent_total``,
``bytes_sent_total`` and optionally ``transport_switches_total`` and
``transport_active_<kind>`` (1.0 for the transport in use; without it the
configured primary is reported). Numbers only; ``*_total`` are counters summed
over restarts by the supervisor.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import MonitorConfig
from pipeline.model.prometheus import Exposition
from pipeline.model.stats import percentiles
from pipeline.monitor.alerts import ALERTS, TRANSPORT_REFUSED_THRESHOLD, AlertBook, round_figure
from pipeline.monitor.http import (
    METRICS,
    ControlRequest,
    HTTPServer,
    make_server,
    new_control_token,
    publish_endpoint,
    render_exposition,
)
from pipeline.monitor.live import LiveStatus
from pipeline.monitor.samples import (
    ProcessSampler,
    Series,
    StageView,
    mb,
    mean,
    occupancy,
)
from pipeline.runtime.topology import Latency, Topology

__all__ = [
    "ALERTS",
    "METRICS",
    "RAW_FLOAT32_BYTES",
    "ControlRequest",
    "Monitor",
    "StageView",
]

log = logging.getLogger("posewire.monitor")

#: raw float32 landmarks of one pose: 33 landmarks x (x, y, z, visibility) x 4 bytes
RAW_FLOAT32_BYTES = 33 * 4 * 4

_QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
_round = round_figure


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
        topology: Topology | None = None,
        *,
        primary_transport: str = "file",
        run_dir: Path | None = None,
        run_id: str = "",
    ) -> None:
        self.cfg = cfg
        self.topology = topology
        """What the figures are read from; ``None``: per-stage figures only."""
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
                "transport_refused": TRANSPORT_REFUSED_THRESHOLD,
            },
            cfg.alert_hold_s,
        )
        self.current: dict[str, Any] = {}
        """The figures of the last sample (also ``GET /status``)."""
        self.samples = 0
        self._next_due = 0.0
        self._series = Series(cfg.series_max_points)
        self._window: deque[_Window] = deque()
        self._prev: _Window | None = None
        self._procs = ProcessSampler()
        self._proc_hist: dict[str, dict[str, list[float]]] = {}
        self._fps_hist: dict[str, list[float]] = {}
        self._gauge_samples: dict[str, list[float]] = {}
        """Per-sample values of the latency hops a stage publishes as one gauge."""
        self._p99_max: dict[str, float] = {}
        self._outputs: dict[str, tuple[float, float]] = {}
        """Stage -> (time, output counter) at the previous sample, for the fps fallback."""
        self._bandwidth_peak = 0.0
        self._stage_names: frozenset[str] = frozenset()
        first = Exposition(METRICS)
        first.add("posewire_up", 1)  # served before the first sample
        self._exposition = first.render()
        self._status_json = b"{}"
        self._commands: queue.SimpleQueue[ControlRequest] = queue.SimpleQueue()
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._live: LiveStatus | None = None
        self._closed = False
        self.control_token = new_control_token()
        """The run's control secret (``<run_dir>/control.token``)."""

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
            self._server = make_server(
                self.cfg.host,
                self.cfg.port,
                self,
                max_connections=self.cfg.max_connections,
                request_timeout_s=self.cfg.request_timeout_s,
                control_token=self.control_token,
            )
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name="monitor-http",
                daemon=True,
            )
            self._thread.start()
            log.info("monitor: %s/metrics", self.url)
            if self.run_dir is not None:
                publish_endpoint(self.run_dir, str(self.url), self.control_token)
        want = self.cfg.status
        if want == "on" or (want == "auto" and sys.stdout.isatty()):
            self._live = LiveStatus()

    def close(self) -> None:
        """Stop the status display and the HTTP server (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.stop(self.current, self.end_to_end_hop)
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
        tx = self._egress(metrics)

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
            value = self._fps(name, metrics[name], mono) if st.proc is not None else None
            fps[name] = value
            if value is not None and st.state == "running":
                self._fps_hist.setdefault(name, []).append(value)

        # latency per hop
        latency = self._latency(metrics)
        for hop, q in latency.items():
            p99 = q.get("p99")
            if p99 is not None:
                self._p99_max[hop] = max(self._p99_max.get(hop, 0.0), p99)
        for stage, lat in self._hops():
            gauge = metrics.get(stage, {}).get(lat.metric)
            if not lat.quantiles and gauge is not None and stage in stages:
                self._gauge_samples.setdefault(lat.hop, []).append(gauge * lat.scale_to_ms)

        # windows
        counters = {f"frames.{k}": float(v) for k, v in frames.items()}
        counters["packets_sent"] = tx.get("packets_sent_total", 0.0)
        counters["bytes_sent"] = tx.get("bytes_sent_total", 0.0)
        counters["audio_bytes_sent"] = tx.get("audio_bytes_sent_total", 0.0)
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
        bandwidth = audio_bw = None
        if prev is not None and mono > prev.mono:
            bandwidth = delta("bytes_sent", prev) * 8 / (mono - prev.mono)
            audio_bw = delta("audio_bytes_sent", prev) * 8 / (mono - prev.mono)
            self._bandwidth_peak = max(self._bandwidth_peak, bandwidth)
        self._prev = snap

        # alerts
        e2e = self.end_to_end_hop
        lat_alert = (
            latency.get(e2e, {}).get(self.cfg.alert_latency_percentile) if e2e is not None else None
        )
        self.alerts.update("latency", lat_alert, mono, since)
        self.alerts.update("drop_rate", drop_rate if d_captured > 0 else None, mono, since)
        self.alerts.update("switch_rate", switch_rate if d_packets > 0 else None, mono, since)
        self.alerts.update("compression_ratio", compression, mono, since)
        self.alerts.update("transport_refused", tx.get("transport_refused"), mono, since)

        transport = self._transport(tx)
        self.current = {
            "t_s": round(since, 3),
            "stages": {
                name: {
                    "state": st.state if st.proc is not None else "down",
                    "pid": procs[name]["pid"],
                    "fps": _round(fps[name]),
                    "cpu_percent": _round(procs[name]["cpu_percent"]),
                    "rss_mb": mb(procs[name]["rss_bytes"]),
                    "restarts": st.restarts,
                    "hung": st.hung,
                }
                for name, st in stages.items()
            },
            "supervisor": {
                "pid": own,
                "cpu_percent": _round(procs["supervisor"]["cpu_percent"]),
                "rss_mb": mb(procs["supervisor"]["rss_bytes"]),
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
            "rings": {r: dict(s) | {"occupancy": occupancy(s)} for r, s in rings.items()},
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
            "audio_kbps": None if audio_bw is None else audio_bw / 1000,
            "drop_rate": drop_rate,
            "skip_rate": skip_rate,
        }
        for name in stages:
            point[f"fps.{name}"] = fps[name]
        for name, p in procs.items():
            point[f"cpu_percent.{name}"] = p["cpu_percent"]
            point[f"rss_mb.{name}"] = mb(p["rss_bytes"])
        for hop, q in latency.items():
            for k, v in q.items():
                point[f"latency_ms.{hop}_{k}"] = v
        for r, s in rings.items():
            point[f"ring_occupancy.{r}"] = float(occupancy(s))
        for n, a in self.alerts.alerts.items():
            point[f"alerts_active.{n}"] = 1.0 if a.active else 0.0
        self._series.append(since, point)

        self._exposition = render_exposition(
            self.current, stages, metrics, procs, rings, tx, bandwidth, self.alerts
        )
        self._status_json = json.dumps(self.current).encode()
        if self._live is not None:
            self._live.update(self.current, self.end_to_end_hop)

    # -- the report -----------------------------------------------------------

    def report_section(
        self,
        stages: Mapping[str, StageView],
        frames: Mapping[str, int],
        rings: Mapping[str, Mapping[str, int]],
    ) -> dict[str, Any]:
        """The monitor's part of the run report (merged into the supervisor's)."""
        metrics = {name: st.all_metrics() for name, st in stages.items()}
        tx = self._egress(metrics)
        mono = time.monotonic()
        # a refusal that ended the run may have come after the last sample
        self.alerts.update(
            "transport_refused", tx.get("transport_refused"), mono, mono - self.started_mono
        )
        duration = max(mono - self.started_mono, 1e-9)
        stage_out: dict[str, Any] = {}
        for name in stages:
            hist = self._proc_hist.get(name, {"cpu": [], "rss": []})
            fps_hist = self._fps_hist.get(name, [])
            stage_out[name] = {
                "cpu_percent": _round(mean(hist["cpu"])),
                "cpu_percent_max": _round(max(hist["cpu"], default=None)),
                "rss_mb": mb(hist["rss"][-1] if hist["rss"] else None),
                "rss_mb_max": mb(max(hist["rss"], default=None)),
                "fps": _round(mean(fps_hist)),
                "fps_max": _round(max(fps_hist, default=None)),
            }
        sup = self._proc_hist.get("supervisor", {"cpu": [], "rss": []})
        latency: dict[str, dict[str, float | None]] = {}
        for hop, q in self._latency(metrics).items():
            latency[hop] = {
                "p50": q.get("p50"),
                "p95": q.get("p95"),
                "p99": q.get("p99"),
                "p99_max": _round(self._p99_max.get(hop)),
            }
        for hop, samples in self._gauge_samples.items():
            if samples:
                p50, p95, p99 = percentiles(samples, (50, 95, 99))
                latency[hop] = {
                    "p50": _round(p50),
                    "p95": _round(p95),
                    "p99": _round(p99),
                    "p99_max": _round(max(samples)),
                }
        sent = tx.get("packets_sent_total", 0.0)
        nbytes = tx.get("bytes_sent_total", 0.0)
        mean_bpf = nbytes / sent if sent > 0 else None
        captured = frames.get("captured", 0)
        switches = int(tx.get("transport_switches_total", 0.0))
        return {
            "stages": stage_out,
            "supervisor": {
                "cpu_percent": _round(mean(sup["cpu"])),
                "rss_mb": mb(sup["rss"][-1] if sup["rss"] else None),
                "rss_mb_max": mb(max(sup["rss"], default=None)),
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
            "audio": {
                "packets_sent": int(tx.get("audio_packets_sent_total", 0.0)),
                "bytes_sent": int(tx.get("audio_bytes_sent_total", 0.0)),
                "kbps_mean": _round(tx.get("audio_bytes_sent_total", 0.0) * 8 / 1000 / duration),
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
            "rings": {r: {"occupancy": occupancy(s)} for r, s in rings.items()},
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

    @property
    def end_to_end_hop(self) -> str | None:
        """The latency hop the ``latency`` alert and the live table watch."""
        for _, lat in self._hops():
            if lat.end_to_end:
                return lat.hop
        return None

    def _hops(self) -> list[tuple[str, Latency]]:
        """Declared latency hops, the end-to-end ones first."""
        if self.topology is None:
            return []
        hops = list(self.topology.latency_hops())
        return [h for h in hops if h[1].end_to_end] + [h for h in hops if not h[1].end_to_end]

    def _latency(
        self, metrics: Mapping[str, Mapping[str, float]]
    ) -> dict[str, dict[str, float | None]]:
        """Latency per declared hop in ms from the stages' gauges (hops without data left out)."""
        out: dict[str, dict[str, float | None]] = {}
        for stage, lat in self._hops():
            m = metrics.get(stage, {})
            if lat.quantiles:
                if f"{lat.metric}_p50" not in m:
                    continue
                out[lat.hop] = {
                    k: _round(m[f"{lat.metric}_{k}"] * lat.scale_to_ms)
                    if f"{lat.metric}_{k}" in m
                    else None
                    for k, _ in _QUANTILES
                }
            elif lat.metric in m:
                v = _round(m[lat.metric] * lat.scale_to_ms)
                out[lat.hop] = {"p50": v, "p95": None, "p99": None}
        return out

    def _egress(self, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """The egress stages' metrics: counters summed, ``transport_active_*`` the largest."""
        out: dict[str, float] = {}
        for name in self.topology.egress() if self.topology is not None else ():
            for key, value in metrics.get(name, {}).items():
                if key.startswith("transport_active_"):
                    out[key] = max(out.get(key, 0.0), value)
                else:
                    out[key] = out.get(key, 0.0) + value
        return out

    def _fps(self, name: str, m: Mapping[str, float], mono: float) -> float | None:
        """The stage's own ``fps``, else the rate of its declared output counter."""
        decl = (
            self.topology.stage(name)
            if self.topology is not None and name in self.topology.stage_names
            else None
        )
        metric = decl.output_metric if decl is not None else None
        value = m.get("fps")
        if metric is not None and metric in m:
            prev = self._outputs.get(name)
            self._outputs[name] = (mono, m[metric])
            if value is None and prev is not None and mono > prev[0]:
                value = max(0.0, m[metric] - prev[1]) / (mono - prev[0])
        return value

    def _transport(self, tx: Mapping[str, float]) -> str:
        for key, value in tx.items():
            if key.startswith("transport_active_") and value >= 1.0:
                return key.removeprefix("transport_active_")
        return self.primary_transport


def _mean_size(tx: Mapping[str, float]) -> float | None:
    sent = tx.get("packets_sent_total", 0.0)
    return tx.get("bytes_sent_total", 0.0) / sent if sent > 0 else None
