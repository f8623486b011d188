"""``python -m pipeline report FILE.json --out DIR``: render a run report as PNG plots and HTML.

Reads the JSON the supervisor writes with ``--report`` and draws, with
matplotlib's Agg backend (no display needed):

* ``latency.png``: capture-to-send latency p50/p95/p99 over time, the alert
  threshold, and the time spans when any alert was raised;
* ``latency_distribution.png``: the distribution of the per-second p50 and
  p99 samples over the run, with the end-of-run window's percentiles marked;
* ``fps.png``: fps per stage over time;
* ``bytes_per_frame.png``: bytes per frame over time, with the raw float32 size
  and the compression-ratio alert line, and the bandwidth beside it;
* ``resources.png``: CPU % and RSS per process over time;

and ``index.html`` with a summary (frames, stages, latency, transport,
alerts) that embeds them. A ``receive`` report (``python -m pipeline receive
--report``) renders as ``latency.png`` (capture-to-decode p50/p95 and poses
decoded per second), ``audio.png`` (the jitter buffer's playout delay,
mouth-to-ear p95 and |pose/audio skew| p95 per second) and its own ``index.html``.
A report without time series (a run that failed at start) still renders: each plot
then says it has no data.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import PosewireError

HELP = "Render a run report (--report FILE.json) as PNG plots and an index.html."

PLOTS = (
    ("latency.png", "Capture-to-send latency over time"),
    ("latency_distribution.png", "Latency distribution"),
    ("fps.png", "Frames per second per stage"),
    ("bytes_per_frame.png", "Bytes per frame and bandwidth"),
    ("resources.png", "CPU and memory per process"),
)


RECEIVE_PLOTS = (
    ("latency.png", "Capture-to-decode latency and poses decoded per second"),
    ("audio.png", "Audio: playout delay, mouth-to-ear p95, |pose/audio skew| p95"),
)


def is_receive_report(report: Mapping[str, Any]) -> bool:
    """A report of ``python -m pipeline receive`` (not of a pipeline run)."""
    return "publishers" in report and "stages" not in report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", type=Path, help="run report JSON (python -m pipeline --report)")
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default: next to the report, <name>-report/)",
    )


def main(args: argparse.Namespace) -> int:
    report = load_report(args.report)
    out = args.out if args.out is not None else args.report.with_name(args.report.stem + "-report")
    files = render(report, out)
    print(f"wrote {len(files)} files to {out}: {', '.join(p.name for p in files)}")
    return 0


def load_report(path: Path) -> dict[str, Any]:
    """The report as a dict; :class:`PosewireError` with a clear message when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PosewireError(f"{path}: no such report") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PosewireError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PosewireError(f"{path}: not JSON (line {exc.lineno}): {exc.msg}") from exc
    if not isinstance(data, dict):
        raise PosewireError(f"{path}: not a run report (the top level is not an object)")
    return data


def render(report: Mapping[str, Any], out: Path) -> list[Path]:
    """Write the PNGs and ``index.html`` into ``out``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PosewireError(f"cannot create output directory {out}: {exc}") from exc
    series = _dict(report.get("series"))
    receive = is_receive_report(report)
    written: list[Path] = []
    for name, title in RECEIVE_PLOTS if receive else PLOTS:
        fig = (_RECEIVE_FIGURES if receive else _FIGURES)[name](report, series, title)
        path = out / name
        try:
            fig.savefig(path, dpi=100)
        except OSError as exc:
            raise PosewireError(f"cannot write {path}: {exc}") from exc
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
        written.append(path)
    index = out / "index.html"
    try:
        index.write_text(
            render_receive_html(report) if receive else render_html(report), encoding="utf-8"
        )
    except OSError as exc:
        raise PosewireError(f"cannot write {index}: {exc}") from exc
    written.append(index)
    return written


# --------------------------------------------------------------------------- plots


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _xy(t: Sequence[Any], ys: Any) -> tuple[list[float], list[float]]:
    """Pairs of (t, y) where both are numbers."""
    xs_out: list[float] = []
    ys_out: list[float] = []
    if not isinstance(ys, list):
        return xs_out, ys_out
    for x, y in zip(t, ys, strict=False):
        if isinstance(x, int | float) and isinstance(y, int | float) and math.isfinite(y):
            xs_out.append(float(x))
            ys_out.append(float(y))
    return xs_out, ys_out


def _figure(title: str, ncols: int = 1) -> tuple[Any, list[Any]]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 3.8), squeeze=False)
    fig.suptitle(title)
    return fig, list(axes[0])


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this report", ha="center", va="center")
    ax.set_axis_off()


def _finish(fig: Any, ax: Any, ylabel: str) -> None:
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()


_ALERT_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink")


def _alert_spans(ax: Any, report: Mapping[str, Any], end: float) -> None:
    """Shade the time spans when alerts were raised, one colour per alert."""
    colors: dict[str, str] = {}
    for a in report.get("alerts") or []:
        if not isinstance(a, dict) or not isinstance(a.get("entered_after_s"), int | float):
            continue
        name = str(a.get("name"))
        label = None
        if name not in colors:
            colors[name] = _ALERT_COLORS[len(colors) % len(_ALERT_COLORS)]
            label = f"alert {name}"
        stop = a.get("cleared_after_s")
        stop = stop if isinstance(stop, int | float) else end
        ax.axvspan(a["entered_after_s"], stop, color=colors[name], alpha=0.12, label=label)


def _decision_lines(ax: Any, report: Mapping[str, Any]) -> None:
    """A vertical line at each transport switch and each degradation step, at its time
    point (seconds since the run started, as the series)."""
    t0 = report.get("started_at")
    if not isinstance(t0, int | float):
        return
    events = [
        (d.get("t_wall"), f"switch to {d.get('to')} ({d.get('reason')})", "tab:green")
        for d in _dict(report.get("transport_policy")).get("decisions") or []
        if isinstance(d, dict)
    ] + [
        (
            d.get("t_wall"),
            f"ladder {d.get('from')} -> {d.get('to')} ({d.get('reason')})",
            "tab:brown",
        )
        for d in _dict(report.get("degradation")).get("steps") or []
        if isinstance(d, dict)
    ]
    for t_wall, text, color in events:
        if isinstance(t_wall, int | float):
            ax.axvline(t_wall - t0, color=color, ls="-.", lw=1, label=text)


def _plot_latency(report: Mapping[str, Any], series: Mapping[str, Any], title: str) -> Any:
    fig, (ax,) = _figure(title)
    t = series.get("t_s") or []
    lat = _dict(series.get("latency_ms"))
    drawn = False
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        xs, ys = _xy(t, lat.get(f"capture_to_send_{q}"))
        if xs:
            ax.plot(xs, ys, style, label=f"capture->send {q}")
            drawn = True
    if not drawn:
        _no_data(ax, "capture-to-send latency")
        return fig
    threshold = _dict(report.get("alert_thresholds")).get("latency")
    if isinstance(threshold, int | float):
        pct = _dict(report.get("monitor")).get("latency_percentile", "p95")
        ax.axhline(threshold, color="tab:red", lw=1, label=f"alert threshold ({pct})")
    _alert_spans(ax, report, float(t[-1]) if t else 0.0)
    _decision_lines(ax, report)
    ax.set_ylim(bottom=0)
    _finish(fig, ax, "latency (ms)")
    return fig


def _plot_latency_distribution(
    report: Mapping[str, Any], series: Mapping[str, Any], title: str
) -> Any:
    fig, (ax,) = _figure(title)
    t = series.get("t_s") or []
    lat = _dict(series.get("latency_ms"))
    samples = {q: _xy(t, lat.get(f"capture_to_send_{q}"))[1] for q in ("p50", "p99")}
    values = [v for ys in samples.values() for v in ys]
    if not values:
        _no_data(ax, "capture-to-send latency")
        return fig
    lo, hi = min(values), max(values)
    nbins = min(40, max(5, len(values) // 2))
    if lo > 0 and hi / lo > 20:  # spans orders of magnitude: log bins
        ratio = (hi / lo) ** (1 / nbins)
        bins = [lo * ratio**i for i in range(nbins + 1)]
        ax.set_xscale("log")
    else:
        step = (hi - lo) / nbins or 1.0
        bins = [lo + step * i for i in range(nbins + 1)]
    for q, color in (("p50", "tab:blue"), ("p99", "tab:orange")):
        if samples[q]:
            ax.hist(samples[q], bins=bins, alpha=0.6, color=color, label=f"per-second {q}")
    final = _dict(_dict(report.get("latency_ms")).get("capture_to_send"))
    for q, color in (("p50", "tab:blue"), ("p95", "tab:green"), ("p99", "tab:orange")):
        v = final.get(q)
        if isinstance(v, int | float):
            ax.axvline(v, color=color, ls="--", lw=1, label=f"{q} at end of run: {v:.1f} ms")
    ax.set_title("per-second p50 / p99 samples of capture-to-send latency", fontsize="small")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("seconds of the run")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _plot_fps(report: Mapping[str, Any], series: Mapping[str, Any], title: str) -> Any:
    fig, (ax,) = _figure(title)
    t = series.get("t_s") or []
    drawn = False
    for stage, ys in sorted(_dict(series.get("fps")).items()):
        xs, vs = _xy(t, ys)
        if xs:
            ax.plot(xs, vs, label=stage)
            drawn = True
    if not drawn:
        _no_data(ax, "fps")
        return fig
    ax.set_ylim(bottom=0)
    _finish(fig, ax, "fps")
    return fig


def _plot_bytes(report: Mapping[str, Any], series: Mapping[str, Any], title: str) -> Any:
    fig, (ax, ax_bw) = _figure(title, 2)
    t = series.get("t_s") or []
    xs, ys = _xy(t, series.get("bytes_per_frame"))
    if xs:
        ax.plot(xs, ys, label="bytes per frame (alert window)")
        bpf = _dict(report.get("bytes_per_frame"))
        raw = bpf.get("raw_float32", 528)
        ratio = _dict(report.get("alert_thresholds")).get("compression_ratio")
        if isinstance(raw, int | float) and isinstance(ratio, int | float):
            ax.axhline(
                raw * ratio, color="tab:red", lw=1, label=f"alert: {ratio:.0%} of raw {raw} B"
            )
        mean = bpf.get("mean")
        if isinstance(mean, int | float):
            ax.axhline(mean, color="tab:gray", ls="--", lw=1, label=f"run mean {mean:.1f} B")
        ax.set_ylim(bottom=0)
        _finish(fig, ax, "bytes per frame")
    else:
        _no_data(ax, "bytes per frame")
    xs, ys = _xy(t, series.get("bandwidth_kbps"))
    if xs:
        ax_bw.plot(xs, ys, color="tab:purple", label="pose send rate")
        axs, ays = _xy(t, series.get("audio_kbps"))
        if any(ays):
            ax_bw.plot(axs, ays, color="tab:orange", label="audio send rate")
        ax_bw.set_ylim(bottom=0)
        _finish(fig, ax_bw, "kbit/s")
    else:
        _no_data(ax_bw, "bandwidth")
    return fig


def _plot_resources(report: Mapping[str, Any], series: Mapping[str, Any], title: str) -> Any:
    fig, (ax_cpu, ax_rss) = _figure(title, 2)
    t = series.get("t_s") or []
    for ax, key, label in ((ax_cpu, "cpu_percent", "CPU %"), (ax_rss, "rss_mb", "RSS (MB)")):
        drawn = False
        for proc, ys in sorted(_dict(series.get(key)).items()):
            xs, vs = _xy(t, ys)
            if xs:
                ax.plot(xs, vs, label=proc)
                drawn = True
        if drawn:
            ax.set_ylim(bottom=0)
            _finish(fig, ax, label)
        else:
            _no_data(ax, label)
    return fig


_FIGURES = {
    "latency.png": _plot_latency,
    "latency_distribution.png": _plot_latency_distribution,
    "fps.png": _plot_fps,
    "bytes_per_frame.png": _plot_bytes,
    "resources.png": _plot_resources,
}


# --------------------------------------------------------------------------- HTML


_STYLE = (
    "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
    "td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}figure{margin:1em 0}"
)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Mapping[str, Any]) -> str:
    """``index.html``: the summary tables and the plots (same directory)."""
    parts: list[str] = []
    run_id = html.escape(str(report.get("run_id", "?")))
    parts.append(f"<h1>posewire run {run_id}</h1>")
    summary = [
        ("exit", f"{report.get('exit_reason')} (code {report.get('exit_code')})"),
        ("message", report.get("message")),
        ("duration (s)", report.get("duration_s")),
    ]
    parts.append(_table(["", ""], summary))

    frames = _dict(report.get("frames"))
    parts.append("<h2>Frames</h2>")
    parts.append(_table(list(frames), [list(frames.values())]))
    rates = _dict(report.get("rates"))
    if rates:
        parts.append(
            f"<p>skip rate {_fmt(rates.get('skip'), 3)}, drop rate {_fmt(rates.get('drop'), 3)}</p>"
        )

    parts.append("<h2>Stages</h2>")
    rows = []
    for name, st in _dict(report.get("stages")).items():
        st = _dict(st)
        rows.append(
            [
                name,
                st.get("fps"),
                st.get("cpu_percent"),
                st.get("rss_mb"),
                st.get("restarts"),
                st.get("hung"),
                st.get("last_error"),
            ]
        )
    sup = _dict(report.get("supervisor"))
    if sup:
        rows.append(["supervisor", None, sup.get("cpu_percent"), sup.get("rss_mb"), None, None])
    parts.append(
        _table(["stage", "fps", "CPU %", "RSS MB", "restarts", "hung", "last error"], rows)
    )

    parts.append("<h2>Latency (ms)</h2>")
    lat_rows = [
        [
            hop,
            _dict(q).get("p50"),
            _dict(q).get("p95"),
            _dict(q).get("p99"),
            _dict(q).get("p99_max"),
        ]
        for hop, q in _dict(report.get("latency_ms")).items()
    ]
    parts.append(_table(["hop", "p50", "p95", "p99", "worst p99"], lat_rows))

    bpf = _dict(report.get("bytes_per_frame"))
    tr = _dict(report.get("transport"))
    bw = _dict(report.get("bandwidth_kbps"))
    au = _dict(report.get("audio"))
    parts.append("<h2>Wire</h2>")
    parts.append(
        _table(
            ["", ""],
            [
                ("bytes per frame (mean)", bpf.get("mean")),
                ("compression ratio vs raw float32", bpf.get("compression_ratio")),
                ("packets / bytes sent", f"{bpf.get('packets')} / {bpf.get('bytes')}"),
                (
                    "bandwidth mean / peak (kbit/s)",
                    f"{_fmt(bw.get('mean'))} / {_fmt(bw.get('peak'))}",
                ),
                ("transport", f"{tr.get('active')} (primary {tr.get('primary')})"),
                ("transport switches", tr.get("switches")),
                (
                    "audio packets / bytes sent, mean kbit/s",
                    f"{au.get('packets_sent', 0)} / {au.get('bytes_sent', 0)}, "
                    f"{_fmt(au.get('kbps_mean'))}",
                ),
            ],
        )
    )

    parts.append("<h2>Alerts</h2>")
    alerts = [a for a in report.get("alerts") or [] if isinstance(a, dict)]
    if alerts:
        parts.append(
            _table(
                ["alert", "worst value", "threshold", "raised at (s)", "cleared at (s)"],
                [
                    [
                        a.get("name"),
                        a.get("value"),
                        a.get("threshold"),
                        a.get("entered_after_s"),
                        a.get("cleared_after_s")
                        if a.get("cleared_after_s") is not None
                        else "still raised at exit",
                    ]
                    for a in alerts
                ],
            )
        )
    else:
        parts.append("<p>No alert was raised.</p>")

    parts.append("<h2>Plots</h2>")
    for name, title in PLOTS:
        parts.append(
            f'<figure><img src="{name}" alt="{html.escape(title)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>posewire run {run_id}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------- receive reports


def _lines(ax: Any, series: Mapping[str, Any], keys: Sequence[tuple[str, str, str]]) -> bool:
    """Plot ``(key, label, style)`` of ``series`` against its ``t_s``; False: nothing."""
    t = series.get("t_s") or []
    drawn = False
    for key, label, style in keys:
        xs, ys = _xy(t, series.get(key))
        if xs:
            ax.plot(xs, ys, style, label=label)
            drawn = True
    return drawn


def _plot_receive_latency(report: Mapping[str, Any], series: Mapping[str, Any], title: str) -> Any:
    fig, (ax,) = _figure(title)
    keys = [("latency_p50_ms", "capture->decode p50", "-"),
            ("latency_p95_ms", "capture->decode p95", "--")]  # fmt: skip
    if not _lines(ax, series, keys):
        _no_data(ax, "capture-to-decode latency")
        return fig
    ax.set_ylim(bottom=0)
    fps = ax.twinx()
    _lines(fps, series, [("fps", "poses decoded / s", ":")])
    fps.set_ylabel("poses decoded per second")
    fps.set_ylim(bottom=0)
    _finish(fig, ax, "latency (ms)")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = fps.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, fontsize="small")  # both axes' lines
    return fig


def _plot_receive_audio(report: Mapping[str, Any], series: Mapping[str, Any], title: str) -> Any:
    fig, (ax,) = _figure(title)
    keys = [("audio_delay_ms", "playout delay (jitter buffer)", "-"),
            ("audio_mouth_to_ear_p95_ms", "mouth-to-ear p95", "--"),
            ("audio_abs_skew_p95_ms", "|pose/audio skew| p95", ":")]  # fmt: skip
    if not _lines(ax, series, keys):
        _no_data(ax, "audio")
        return fig
    ax.set_ylim(bottom=0)
    _finish(fig, ax, "ms")
    return fig


_RECEIVE_FIGURES = {"latency.png": _plot_receive_latency, "audio.png": _plot_receive_audio}


def render_receive_html(report: Mapping[str, Any]) -> str:
    """``index.html`` of a receive report: the summary and the plots."""
    lat = _dict(report.get("latency_ms"))
    tr = _dict(report.get("transport"))
    room = html.escape(str(report.get("room", "?")))
    parts = [f"<h1>posewire receiver in room {room}</h1>"]
    parts.append(_table(["", ""], [
        ("member", report.get("member_id")),
        ("transport", tr.get("kind")),
        ("duration (s)", report.get("duration_s")),
        ("poses received / decoded / lost", f"{report.get('frames_received')} / "
         f"{report.get('frames_decoded')} / {report.get('frames_lost')}"),
        ("capture->decode p50 / p95 / p99 (ms)",
         " / ".join(_fmt(lat.get(q), 2) for q in ("p50", "p95", "p99"))),
        ("reconnects", report.get("reconnects")),
    ]))  # fmt: skip
    audio = _dict(report.get("audio"))
    if audio:
        parts.append("<h2>Audio</h2>")
        rows = []
        for sid, a in audio.items():
            a = _dict(a)
            rows.append([sid, a.get("frames_received"), a.get("frames_played"),
                         a.get("frames_fec"), a.get("frames_concealed"), a.get("late"),
                         _dict(a.get("mouth_to_ear_ms")).get("p95"),
                         _dict(a.get("abs_skew_ms")).get("p95")])  # fmt: skip
        parts.append(_table(["stream", "received", "played", "FEC", "concealed", "late",
                             "mouth-to-ear p95 ms", "|skew| p95 ms"], rows))  # fmt: skip
    parts.append("<h2>Plots</h2>")
    for name, title in RECEIVE_PLOTS:
        parts.append(
            f'<figure><img src="{name}" alt="{html.escape(title)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>posewire receiver {room}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
