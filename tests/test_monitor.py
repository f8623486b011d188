"""The performance monitor with real processes: report figures against the receiver's own
counts, a forced alert raised and cleared (report and ``/metrics``), the HTTP control
endpoint, the live status, a taken port; plus the exposition and alert state machine."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import MonitorConfig
from pipeline.errors import SupervisorError
from pipeline.model.prometheus import Exposition, parse_exposition
from pipeline.monitor.alerts import ALERTS, AlertBook
from pipeline.monitor.figures import RAW_FLOAT32_BYTES, Monitor
from pipeline.monitor.http import METRICS
from tests.procutil import ROOT, TRACE, start, stop, trace_config, wait_for

needs_trace = pytest.mark.skipif(not TRACE.exists(), reason=f"pose trace missing: {TRACE}")


def _config(tmp_path: Path, monitor: str, extra: str = "") -> Path:
    return trace_config(tmp_path, monitor=monitor, extra=extra)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


def _post(url: str, body: Any, token: str = "") -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "X-Posewire-Control-Token": token}
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _sample(text: str, name: str, **labels: str) -> float | None:
    return parse_exposition(text).get((name, frozenset(labels.items())))


# --------------------------------------------------------------------------- real pipeline


@needs_trace
def test_report_figures_agree_with_the_receiver(tmp_path: Path) -> None:
    """A few seconds of pipeline: the report's counts and sizes are the packet file's own."""
    from pipeline.codec import Decoded, Decoder, peek_header
    from pipeline.transports.file import read_packets

    report = tmp_path / "report.json"
    cfg = _config(tmp_path, "  enabled: false\n  status: 'off'")
    proc = start(cfg, "--duration", "4", "--report", str(report))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    data = json.loads(report.read_text())

    packets = list(read_packets(tmp_path / "packets.bin"))
    assert len(packets) > 10, "no packets flowing"
    decoder = Decoder()
    decoded = [decoder.decode(p) for p in packets]
    assert all(isinstance(d, Decoded) for d in decoded), decoder.stats
    seqs = [peek_header(p).seq for p in packets]
    assert seqs == sorted(set(seqs))

    # frames sent vs received, bytes per frame
    assert data["frames"]["sent"] == len(packets)
    bpf = data["bytes_per_frame"]
    assert bpf["packets"] == len(packets)
    assert bpf["bytes"] == sum(len(p) for p in packets)
    mean = sum(len(p) for p in packets) / len(packets)
    assert bpf["mean"] == pytest.approx(mean, rel=1e-6)
    assert bpf["raw_float32"] == RAW_FLOAT32_BYTES == 528
    assert bpf["compression_ratio"] == pytest.approx(mean / 528, rel=1e-3)
    assert data["frames"]["encoded"] >= data["frames"]["sent"]
    assert data["frames"]["captured"] >= data["frames"]["encoded"]
    assert data["frames"]["dropped"] == 0

    # the schema the README documents
    assert data["duration_s"] > 0
    for name in ("capture", "encode", "transmit"):
        st = data["stages"][name]
        assert st["restarts"] == 0
        assert st["cpu_percent"] is not None and st["cpu_percent"] >= 0
        assert st["rss_mb"] > 0
        assert st["fps"] > 0
    assert data["supervisor"]["rss_mb"] > 0
    lat = data["latency_ms"]["capture_to_send"]
    assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"]
    assert set(data["latency_ms"]["encode"]) >= {"p50", "p95", "p99"}
    assert data["transport"] == {
        "active": "file",
        "primary": "file",
        "switches": 0,
        "switch_rate": 0.0,
    }
    assert data["rates"] == {"skip": 0.0, "drop": 0.0}
    assert data["bandwidth_kbps"]["mean"] > 0
    assert isinstance(data["alerts"], list)
    assert set(data["alert_thresholds"]) == set(ALERTS)
    assert data["monitor"]["url"] is None  # monitor.enabled: false serves nothing

    series = data["series"]
    n = len(series["t_s"])
    assert n >= 2
    assert series["t_s"] == sorted(series["t_s"])
    columns = [series["bytes_per_frame"], series["drop_rate"], series["bandwidth_kbps"]]
    for group in ("fps", "latency_ms", "cpu_percent", "rss_mb", "ring_occupancy"):
        assert series[group], group
        columns.extend(series[group].values())
    assert all(len(col) == n for col in columns)
    assert set(series["fps"]) == {"capture", "encode", "transmit"}
    assert any(v for v in series["latency_ms"]["capture_to_send_p50"])


@needs_trace
def test_forced_alert_is_raised_and_cleared_in_metrics_and_report(tmp_path: Path) -> None:
    """A bandwidth cap set at run time backs packets up (drops); lifting it clears the alert."""
    run_id = f"alert{int(time.time() * 1000) % 10**8}"
    report = tmp_path / "report.json"
    cfg = _config(
        tmp_path,
        "  port: 0\n  status: 'on'\n  alert_window_s: 2\n  alert_hold_s: 1",
        "rings:\n  packets:\n    slots: 8\n",
    )
    proc = start(cfg, "--run-id", run_id, "--report", str(report))
    try:
        url_file = tmp_path / "run" / run_id / "monitor.url"
        assert wait_for(url_file.exists, 30), "monitor did not start"
        base = url_file.read_text().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base), base
        secret = (url_file.parent / "control.token").read_text().strip()
        metrics = f"{base}/metrics"
        assert wait_for(
            lambda: (_sample(_get(metrics), "posewire_packets_sent_total") or 0) > 20, 30
        ), "no packets flowing"
        first = _get(metrics)
        assert _sample(first, "posewire_alert_active", alert="drop_rate") == 0

        # bad control requests are refused with a reason
        assert _post(f"{base}/control/nosuch/set", {}, secret)[0] == 404
        assert _post(f"{base}/control/transmit/explode", {}, secret)[0] == 400
        assert _post(f"{base}/control/transmit/set", b"[1, 2]", secret)[0] == 400
        assert _post(f"{base}/control/transmit/set", b"{not json", secret)[0] == 400

        status, body = _post(f"{base}/control/transmit/set", {"max_bandwidth_kbps": 0.5}, secret)
        assert status == 202 and body["id"] > 0, body
        raised: list[str] = []

        def alert_is(value: float) -> bool:
            text = _get(metrics)
            if _sample(text, "posewire_alert_active", alert="drop_rate") == value:
                raised.append(text)
                return True
            return False

        assert wait_for(lambda: alert_is(1), 30, 0.2), "drop_rate alert never raised"
        during = raised[-1]
        assert (_sample(during, "posewire_drop_rate") or 0) > 0.1
        assert _sample(during, "posewire_alert_threshold", alert="drop_rate") == 0.1
        assert _sample(during, "posewire_alerts_raised_total", alert="drop_rate") == 1
        limit = _sample(
            during, "posewire_stage_metric", stage="transmit", metric="bandwidth_limit_kbps"
        )
        assert limit == 0.5

        status, _ = _post(f"{base}/control/transmit/set", {"max_bandwidth_kbps": 0}, secret)
        assert status == 202
        assert wait_for(lambda: alert_is(0), 30, 0.2), "drop_rate alert never cleared"
        after = raised[-1]
        assert _sample(after, "posewire_alerts_raised_total", alert="drop_rate") == 1
        status_json = json.loads(_get(f"{base}/status"))
        assert set(status_json["stages"]) == {"capture", "encode", "transmit"}
    finally:
        code, out, err = stop(proc)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    assert err.count("alert drop_rate raised") == 1, err[-3000:]
    assert err.count("alert drop_rate cleared") == 1, err[-3000:]
    data = json.loads(report.read_text())
    episodes = [a for a in data["alerts"] if a["name"] == "drop_rate"]
    assert len(episodes) == 1, data["alerts"]
    ep = episodes[0]
    assert ep["threshold"] == 0.1 and ep["value"] > 0.1
    assert ep["cleared_at"] is not None and ep["cleared_at"] >= ep["entered_at"]
    assert ep["cleared_after_s"] >= ep["entered_after_s"]
    assert ep["active_at_exit"] is False
    assert data["frames"]["dropped"] > 0
    assert data["rings"]["packets"]["dropped"] > 0
    assert max(v for v in data["series"]["alerts_active"]["drop_rate"] if v is not None) == 1
    # the live status (status: on) drew its table on stdout
    assert "transmit" in out and "latency capture->send" in out


@needs_trace
def test_taken_metrics_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = start(_config(tmp_path, f"  port: {port}\n  status: 'off'"), "--duration", "5")
        _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in err and "monitor.port" in err


# --------------------------------------------------------------------------- in process


def test_monitor_start_on_taken_port_raises_supervisor_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        mon = Monitor(MonitorConfig(port=s.getsockname()[1], status="off"))
        with pytest.raises(SupervisorError, match=r"monitor\.port"):
            mon.start()
        mon.close()


def test_monitor_serves_metrics_on_a_free_port_and_closes() -> None:
    mon = Monitor(MonitorConfig(port=0, status="off"))
    mon.start()
    try:
        assert mon.url is not None
        text = _get(f"{mon.url}/metrics")
        assert _sample(text, "posewire_up") == 1
        with pytest.raises(urllib.error.HTTPError):
            _get(f"{mon.url}/nothing")
    finally:
        mon.close()
    assert mon.url is None


def test_exposition_round_trips_and_escapes_labels() -> None:
    ex = Exposition(METRICS)
    ex.add("posewire_alert_active", 1, alert='we"ird\\name')
    ex.add("posewire_bytes_per_frame", 41.5)
    ex.add("posewire_drop_rate", None)  # no value: no sample
    text = ex.render()
    assert "# TYPE posewire_alert_active gauge" in text
    assert "posewire_drop_rate" not in text
    parsed = parse_exposition(text)
    assert parsed[("posewire_bytes_per_frame", frozenset())] == 41.5
    assert parsed[("posewire_alert_active", frozenset({("alert", 'we"ird\\name')}))] == 1
    with pytest.raises(KeyError):
        ex.add("posewire_undeclared", 1)


def test_alert_is_logged_once_when_entered_and_once_when_cleared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = AlertBook({"drop_rate": 0.1}, hold_s=2.0)
    caplog.set_level("INFO", logger="posewire.monitor")
    book.update("drop_rate", 0.05, 0.0, 0.0)
    assert book.active() == []
    for t, v in ((1.0, 0.5), (2.0, 0.9), (3.0, 0.3)):
        book.update("drop_rate", v, t, t)
    assert book.active() == ["drop_rate"]
    book.update("drop_rate", 0.0, 4.0, 4.0)  # under the threshold, hold not yet over
    book.update("drop_rate", None, 5.0, 5.0)  # no data changes nothing
    assert book.active() == ["drop_rate"]
    book.update("drop_rate", 0.0, 6.0, 6.0)
    assert book.active() == []
    raised = [r for r in caplog.records if "raised" in r.getMessage()]
    cleared = [r for r in caplog.records if "cleared" in r.getMessage()]
    assert len(raised) == 1 and len(cleared) == 1
    (ep,) = book.episodes
    assert ep.as_dict()["value"] == 0.9
    assert ep.entered_after_s == 1.0 and ep.cleared_after_s == 6.0


def test_every_metric_and_alert_is_documented_in_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    from pipeline.monitor.receive import RECEIVE_METRICS

    missing = [name for name in [*METRICS, *RECEIVE_METRICS] if f"`{name}`" not in readme]
    assert not missing, f"README does not document: {missing}"
    missing_alerts = [name for name in ALERTS if f"`{name}`" not in readme]
    assert not missing_alerts, f"README does not document alerts: {missing_alerts}"
