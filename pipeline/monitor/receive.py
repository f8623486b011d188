"""The ``receive`` command's monitor: one receiver's ``/metrics``, and its time series.

``python -m pipeline receive ... --metrics-port PORT`` serves, on ``--metrics-host``
(default 127.0.0.1), from the receiver's own event loop:

* ``GET /metrics``: Prometheus text, the families of :data:`RECEIVE_METRICS`
  (``posewire_receive_*``): frames received/decoded/lost, capture-to-decode latency of
  the last second, transport, reconnects, and per audio stream the frames received,
  played, FEC-recovered, concealed and late, the jitter buffer's delay and depth,
  mouth-to-ear latency and |pose/audio skew| of the last second;
* ``GET /status``: the receive report as ``--report`` writes it at the end.

:class:`ReceiveSeries` samples the receiver once a second into the report's
``series`` (``t_s`` plus one list per figure, the layout of the run report's series),
which ``python -m pipeline report`` draws (``latency.png``, ``audio.png``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.model.prometheus import Exposition
from pipeline.model.stats import percentiles

if TYPE_CHECKING:
    from aiohttp import web

    from pipeline.client.receiver import Receiver

#: one sample per second, at most this many (6 h): older samples go first
MAX_POINTS = 6 * 3600

#: figures of one sample: name -> what it is (docs/monitoring.md lists them too)
SERIES_FIELDS: dict[str, str] = {
    "fps": "poses decoded per second (live and backfill, every stream)",
    "latency_p50_ms": "capture-to-decode p50 of the live poses of the last second",
    "latency_p95_ms": "capture-to-decode p95 of the live poses of the last second",
    "lost": "poses lost in the last second (sequence gaps)",
    "audio_received": "audio packets received in the last second (every stream)",
    "audio_concealed": "audio frames concealed (PLC) in the last second",
    "audio_delay_ms": "the jitter buffer's playout delay (first audio stream)",
    "audio_mouth_to_ear_p95_ms": "capture to playout p95 of the last second",
    "audio_abs_skew_p95_ms": "|pose/audio skew| p95 of the last second",
}

RECEIVE_METRICS: dict[str, tuple[str, str]] = {
    "posewire_receive_up": ("gauge", "1 while the receiver runs."),
    "posewire_receive_uptime_seconds": ("gauge", "Seconds since the receiver joined."),
    "posewire_receive_connected": ("gauge", "1 while the transport is connected."),
    "posewire_receive_transport_info": ("gauge", "The transport in use (label kind)."),
    "posewire_receive_reconnects_total": ("counter", "Reconnects of the transport."),
    "posewire_receive_frames_total": (
        "counter",
        "Pose packets received, decoded, decoded live, and lost (label kind).",
    ),
    "posewire_receive_latency_ms": (
        "gauge",
        "Capture-to-decode latency of the live poses of the last second (label quantile).",
    ),
    "posewire_receive_audio_frames_total": (
        "counter",
        "Audio frames per stream: received, played, fec, concealed, late, bad (label kind).",
    ),
    "posewire_receive_audio_delay_ms": ("gauge", "The jitter buffer's playout delay."),
    "posewire_receive_audio_jitter_buffer_frames": ("gauge", "Frames in the jitter buffer."),
    "posewire_receive_audio_mouth_to_ear_ms": (
        "gauge",
        "Audio capture to playout of the last second (label quantile).",
    ),
    "posewire_receive_audio_abs_skew_ms": (
        "gauge",
        "|pose/audio skew| of the last second (label quantile).",
    ),
}

_QUANTILES = ((50, "0.5"), (95, "0.95"), (99, "0.99"))


def _pcts(values: Sequence[float], qs: Sequence[int]) -> list[float | None]:
    if not values:
        return [None] * len(qs)
    return [float(v) for v in percentiles(values, qs)]


class ReceiveSeries:
    """Once-a-second samples of one :class:`~pipeline.client.receiver.Receiver`."""

    def __init__(self, receiver: Receiver) -> None:
        self.rx = receiver
        self.t0 = time.monotonic()
        self.points: dict[str, list[float | None]] = {"t_s": []}
        for name in SERIES_FIELDS:
            self.points[name] = []
        self._t_last = self.t0
        self._decoded = 0
        self._lost = 0
        self._lat_seen: dict[int, int] = {}  # stream -> live latencies already sampled
        self._audio_seen: dict[int, tuple[int, int, int, int]] = {}
        self.window: dict[str, list[float]] = {"latency": [], "mouth_to_ear": [], "abs_skew": []}
        """The raw values of the latest sample's second (``/metrics`` reads them)."""

    def started(self) -> None:
        """The series counts from now (the join): its time axis and the first sample's
        rates."""
        self.t0 = self._t_last = time.monotonic()

    def sample(self) -> dict[str, float | None]:
        """Take one sample (call it about once a second)."""
        now = time.monotonic()
        dt = max(now - self._t_last, 1e-6)
        self._t_last = now
        rx = self.rx
        lat: list[float] = []
        for sid, s in rx.streams.items():
            seen = self._lat_seen.get(sid, 0)
            lat.extend(s.latencies_ms[seen:])
            self._lat_seen[sid] = len(s.latencies_ms)
        lost = sum(s.lost for s in rx.streams.values())
        p50, p95 = _pcts(lat, (50, 95))
        point: dict[str, float | None] = {
            "fps": (rx.decoded - self._decoded) / dt,
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "lost": float(lost - self._lost),
        }
        self._decoded, self._lost = rx.decoded, lost
        audio, m2e, skew = self._audio()
        point.update(audio)
        self.window = {"latency": lat, "mouth_to_ear": m2e, "abs_skew": skew}
        self.points["t_s"].append(round(now - self.t0, 3))
        for name in SERIES_FIELDS:
            self.points[name].append(point.get(name))
        if len(self.points["t_s"]) > MAX_POINTS:
            for values in self.points.values():
                del values[0]
        return point

    def _audio(self) -> tuple[dict[str, float | None], list[float], list[float]]:
        """The audio figures of the last second, and its mouth-to-ear and |skew| values."""
        player = self.rx.audio
        if player is None or not player.playouts:
            return {}, [], []
        received = concealed = 0
        m2e: list[float] = []
        skew: list[float] = []
        for sid, p in player.playouts.items():
            st = p.stats
            r0, c0, m0, s0 = self._audio_seen.get(sid, (0, 0, 0, 0))
            received += st.received - r0
            concealed += st.concealed - c0
            m2e.extend(st.mouth_to_ear_ms[m0:])
            skew.extend(abs(x) for x in st.skew_ms[s0:])
            self._audio_seen[sid] = (
                st.received,
                st.concealed,
                len(st.mouth_to_ear_ms),
                len(st.skew_ms),
            )
        first = next(iter(player.playouts.values()))
        (m2e95,) = _pcts(m2e, (95,))
        (skew95,) = _pcts(skew, (95,))
        point: dict[str, float | None] = {
            "audio_received": float(received),
            "audio_concealed": float(concealed),
            "audio_delay_ms": first.delay / 1e6,
            "audio_mouth_to_ear_p95_ms": m2e95,
            "audio_abs_skew_p95_ms": skew95,
        }
        return point, m2e, skew

    def report(self) -> dict[str, list[float | None]]:
        return {k: list(v) for k, v in self.points.items()}


def receive_exposition(rx: Receiver, series: ReceiveSeries) -> str:
    """The ``/metrics`` text of ``rx`` now (windowed figures from the last sample)."""
    ex = Exposition(RECEIVE_METRICS)
    stats = rx.transport.statistics()
    ex.add("posewire_receive_up", 1)
    ex.add("posewire_receive_uptime_seconds", time.monotonic() - series.t0)
    ex.add("posewire_receive_connected", 1 if stats.connected else 0)
    ex.add("posewire_receive_transport_info", 1, kind=stats.kind)
    ex.add("posewire_receive_reconnects_total", stats.reconnects)
    streams = rx.streams.values()
    for kind, value in (
        ("received", sum(s.received for s in streams)),
        ("decoded", rx.decoded),
        ("live", sum(len(s.latencies_ms) for s in streams)),
        ("lost", sum(s.lost for s in streams)),
    ):
        ex.add("posewire_receive_frames_total", value, kind=kind)
    qs = [q for q, _ in _QUANTILES]
    for (_, label), v in zip(_QUANTILES, _pcts(series.window["latency"], qs), strict=True):
        ex.add("posewire_receive_latency_ms", v, quantile=label)
    player = rx.audio
    if player is not None:
        for sid, p in sorted(player.playouts.items()):
            st, stream = p.stats, str(sid)
            counts = {"received": st.received, "played": st.played, "fec": st.fec,
                      "concealed": st.concealed, "late": st.late, "bad": st.bad}  # fmt: skip
            for kind, n in counts.items():
                ex.add("posewire_receive_audio_frames_total", n, stream=stream, kind=kind)
            ex.add("posewire_receive_audio_delay_ms", p.delay / 1e6, stream=stream)
            ex.add("posewire_receive_audio_jitter_buffer_frames", len(p.buffer), stream=stream)
        for (_, label), v in zip(_QUANTILES, _pcts(series.window["mouth_to_ear"], qs), strict=True):
            ex.add("posewire_receive_audio_mouth_to_ear_ms", v, quantile=label)
        for (_, label), v in zip(_QUANTILES, _pcts(series.window["abs_skew"], qs), strict=True):
            ex.add("posewire_receive_audio_abs_skew_ms", v, quantile=label)
    return ex.render()


async def serve_metrics(
    rx: Receiver, series: ReceiveSeries, host: str, port: int
) -> tuple[web.AppRunner, str]:
    """Start ``/metrics`` and ``/status`` on ``host:port`` (0: any free port) in this
    loop; returns the runner (``await runner.cleanup()`` stops it) and the base URL.
    A port that is taken raises :class:`OSError`."""
    from aiohttp import web

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=receive_exposition(rx, series), content_type="text/plain")

    async def status(_: web.Request) -> web.Response:
        body = {**rx.report(), "series": series.report()}
        return web.Response(
            text=json.dumps(body, default=_jsonable), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)
