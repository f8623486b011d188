"""TLS (https/wss) and the client's list of server URLs, with real ``serve`` processes.

The certificate is self-signed, made here with ``cryptography`` (an aiortc
dependency). Failover runs two plain ``serve`` processes without Redis, each with
its own data directory: a node does not know the other's member-id bindings, so a
member that moves rejoins with a fresh id (the same-id resume across nodes needs the
shared Redis store: tests/test_cluster.py).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.cli import main as cli_main
from pipeline.client import Client, PoseEvent
from pipeline.config import parse_config, server_section
from pipeline.errors import CertificateError, ConfigError, TransportError
from pipeline.model.tls import client_context
from pipeline.transports.base import Packet, StateChange
from pipeline.transports.endpoints import Endpoints, server_urls
from pipeline.transports.websocket import WebSocketTransport
from tests import procutil
from tests.procutil import trace_source, write_config
from tests.test_receive import _ReceiveProc
from tests.test_server_support import ROOT, SECRET, PoseSource, ServeProcess, free_port, token


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def make_cert(directory: Path, name: str = "posewire test", ips: tuple[str, ...] = ()) -> Cert:
    """A self-signed certificate (its own CA) for localhost, 127.0.0.1 and ``ips``, and
    its key."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName("localhost")]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", *ips)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    out = Cert(directory / "cert.pem", directory / "key.pem")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(cert: Cert) -> Any:
    srv = ServeProcess(0, "--certfile", str(cert.cert), "--keyfile", str(cert.key))
    yield srv
    assert srv.stop() == 0


async def _members(url: str, room: str, ca: ssl.SSLContext | None) -> list[dict[str, Any]]:
    mod = {"Authorization": f"Bearer {token('*', 'moderator', subject='admin')}"}
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{url}/api/rooms/{room}", headers=mod, ssl=ca or True)
        return [] if r.status == 404 else list((await r.json())["members"])


async def _until_members(url: str, room: str, n: int, ca: ssl.SSLContext | None) -> None:
    """Wait for ``n`` members in ``room`` (processes start slowly on a loaded machine)."""
    t_end = time.monotonic() + 30.0
    while len(await _members(url, room, ca)) < n:
        assert time.monotonic() < t_end, f"room {room} never had {n} members"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- TLS


def test_wss_transmit_stage_receive_and_python_client_with_the_ca_file(
    tls_server: ServeProcess, cert: Cert, tmp_path: Path
) -> None:
    """``serve --certfile --keyfile``; the pipeline's transmit stage publishes over wss
    (``transmit.servers``, ``transmit.ca_file`` relative to the YAML); ``receive
    --ca-file`` and a Python :class:`Client` with ``ca_file`` decode the poses."""
    assert tls_server.url.startswith("https://127.0.0.1:")
    report = tmp_path / "report.json"
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.pem").write_bytes(cert.cert.read_bytes())
    config = write_config(
        tmp_path,
        f"""
{trace_source()}transmit:
  primary: websocket
  servers: [{tls_server.url}]
  room: T
  ca_file: tls/ca.pem
supervisor:
  run_dir: {tmp_path / "run"}
monitor:
  enabled: false
""",
    )

    async def scenario() -> list[PoseEvent]:
        ca = client_context(cert.cert)
        rx = await _ReceiveProc.start(
            "--server", tls_server.url, "--ca-file", str(cert.cert), "--room", "T",
            "--token", token("T", "subscriber"), "--report", str(report),
            "--transport", "websocket",
        )  # fmt: skip
        await _until_members(tls_server.url, "T", 1, ca)
        proc = procutil.start(config, env={"POSEWIRE_SECRET": SECRET})
        poses: list[PoseEvent] = []
        sub = token("T", "subscriber", subject="api")
        opts: dict[str, Any] = {"transport": "websocket", "connect_timeout_s": 10.0}
        try:
            async with Client(tls_server.url, "T", sub, ca_file=cert.cert, **opts) as client:
                async with asyncio.timeout(60):
                    async for event in client.events():
                        if isinstance(event, PoseEvent) and not event.backfill:
                            poses.append(event)
                            if len(poses) >= 15:
                                break
        finally:
            rc, _, err = await asyncio.to_thread(procutil.stop, proc)
        assert rc == 0, err
        rc, out, err = await rx.finish(terminate=True)
        assert rc == 0, err
        assert "joined room T" in out
        return poses

    poses = asyncio.run(scenario())
    assert len(poses) == 15 and len({p.stream_id for p in poses}) == 1
    rep = json.loads(report.read_text())
    (s,) = rep["publishers"].values()
    assert s["decoded"] >= 15 and s["decoded"] == s["received"], s
    assert s["lost"] == 0 and s["need_keyframe"] == 0


def test_an_unverified_certificate_is_one_precise_error(
    tls_server: ServeProcess, cert: Cert
) -> None:
    async def scenario() -> tuple[int, str, str]:
        # in process: the error at once (no retrying until the connect timeout)
        t = WebSocketTransport(tls_server.url, "A", token("A", "subscriber"))
        with pytest.raises(CertificateError) as info:
            await t.connect()
        assert str(info.value) == "certificate verify failed for 127.0.0.1: self-signed certificate"
        # the receive command: exit 1, one line, no traceback
        rx = await _ReceiveProc.start(
            "--server", tls_server.url, "--room", "A", "--token", token("A", "subscriber"),
        )  # fmt: skip
        return await rx.finish()

    rc, _, err = asyncio.run(scenario())
    assert rc == 1, err
    assert "error: certificate verify failed for 127.0.0.1: self-signed certificate" in err
    assert "Traceback" not in err


def test_bad_certificate_or_key_configuration_names_the_field(
    cert: Cert, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_cert(tmp_path / "other")

    def serve(certfile: Path, keyfile: Path | None = None) -> str:
        key = f"\n    keyfile: {keyfile}" if keyfile is not None else ""
        path = tmp_path / "bad.yaml"
        path.write_text(f"server:\n  tls:\n    certfile: {certfile}{key}\n", encoding="utf-8")
        assert cli_main(["serve", "--port", "0", "--config", str(path)]) == 2
        return capsys.readouterr().err

    err = serve(tmp_path / "missing.pem", cert.key)
    assert "server.tls.certfile (line 3): certificate file not found" in err
    assert "server.tls.certfile: not a PEM certificate" in serve(cert.key, cert.key)
    assert "server.tls.keyfile (line 2): Field required" in serve(cert.cert)
    err = serve(cert.cert, other.key)
    assert "server.tls.keyfile:" in err and "does not match the certificate of" in err
    # the embedded server stage and serve --config: paths relative to the YAML file
    (tmp_path / "c.pem").write_bytes(cert.cert.read_bytes())
    (tmp_path / "k.pem").write_bytes(cert.key.read_bytes())
    cfg = parse_config("server:\n  tls: {certfile: c.pem, keyfile: k.pem}\n", base_dir=tmp_path)
    tls = server_section(cfg).tls
    assert tls is not None and tls.certfile == tmp_path / "c.pem" and tls.keyfile.is_absolute()
    # the CLI options: named as given; both or neither
    assert cli_main(["serve", "--certfile", str(cert.cert)]) == 2
    assert "--certfile and --keyfile go together" in capsys.readouterr().err
    # a process: exit 2, one message, no traceback, nothing listening
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "serve", "--port", "0",
         "--certfile", str(cert.cert), "--keyfile", str(other.key)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--keyfile:" in proc.stderr and "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout


def test_client_options_are_checked_before_connecting(cert: Cert, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"transmit.ca_file \(line 3\): CA file not found"):
        parse_config("transmit:\n  primary: websocket\n  ca_file: nope.pem\n", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"transmit.servers \(line 2\): .*'ftp://b' is not"):
        parse_config("transmit:\n  servers: [http://a:1, 'ftp://b']\n")
    with pytest.raises(ConfigError, match="give server_url or servers, not both"):
        parse_config("transmit:\n  server_url: http://a:1\n  servers: [http://b:1]\n")
    cfg = parse_config("transmit:\n  servers: [https://a:1, 'wss://b:2/ws']\n").transmit
    assert cfg.urls == ["https://a:1", "wss://b:2/ws"]
    assert server_urls(["http://a:1,https://b:2", "ws://c:3"]) == [
        "ws://a:1/ws", "wss://b:2/ws", "ws://c:3/ws",
    ]  # fmt: skip
    with pytest.raises(TransportError, match="must be http"):
        server_urls("ftp://a:1")
    with pytest.raises(ConfigError, match="ca_file: CA file not found"):
        Endpoints("https://a:1", ca_file=tmp_path / "x.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="ca_file: not a PEM certificate file"):
        Endpoints("https://a:1", ca_file=tmp_path / "junk.pem")


def test_the_order_and_backoff_rule() -> None:
    ep = Endpoints(["http://a:1", "http://b:2", "http://c:3"])
    assert ep.current == "ws://a:1/ws"
    assert not ep.failed(TransportError("refused")) and ep.current == "ws://b:2/ws"
    assert not ep.failed(TransportError("refused")) and ep.current == "ws://c:3/ws"
    assert ep.failed(TransportError("refused"))  # a whole round: back off
    assert ep.current == "ws://a:1/ws"
    ep.joined()
    ep.lost()  # lost on a: the next round starts at b
    assert ep.current == "ws://b:2/ws"
    # a certificate failure moves on; only when every URL failed on it, it is final
    bad = CertificateError("b", "self-signed certificate")
    assert not ep.failed(bad) and not ep.failed(TransportError("refused"))
    assert ep.failed(bad)
    assert not ep.failed(bad) and not ep.failed(bad)
    with pytest.raises(CertificateError):
        ep.failed(bad)


# --------------------------------------------------------------------------- failover


def _node(tmp_path: Path, name: str) -> ServeProcess:
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"server:\n  data_dir: {tmp_path / name}\n", encoding="utf-8")
    return ServeProcess(0, "--config", str(config))


@pytest.mark.timing
def test_members_fail_over_to_the_next_server_when_a_node_is_killed(tmp_path: Path) -> None:
    a, b = _node(tmp_path, "a"), _node(tmp_path, "b")
    urls = [f"http://127.0.0.1:{free_port()}", a.url, b.url]  # the first: nothing listens
    try:
        times = asyncio.run(_failover(a, urls))
    finally:
        a.stop()
        assert b.stop() == 0
    print(f"\nfailover after kill -9 (no Redis): {times}")
    # a fresh member id on the other node; back well within the 1.5 s
    assert times["subscriber_back_ms"] < 1500 and times["first_packet_ms"] < 1500


async def _failover(a: ServeProcess, urls: list[str]) -> dict[str, float]:
    def member(role: str, **kw: Any) -> WebSocketTransport:
        return WebSocketTransport(
            urls, "F", token("F", role, subject=role), reconnect_max_s=0.2, **kw
        )

    pub = member("publisher", publish=True, subscribe=False)
    sub = member("subscriber")
    await pub.connect()
    await sub.connect()
    a_ws = server_urls(a.url)[0]
    assert pub.url == a_ws and sub.url == a_ws  # the dead first URL was skipped
    old_ids = (pub.member_id, sub.member_id)
    src = PoseSource(7)
    stop = asyncio.Event()

    async def publish() -> None:  # a keyframe after a (re)join, as the transmit stage does
        keyframe = True
        while not stop.is_set():
            while (item := pub.recv_nowait()) is not None:
                keyframe |= isinstance(item, StateChange) and item.connected
            await pub.send(src.next(keyframe=keyframe))
            keyframe = False
            await asyncio.sleep(1 / 30)

    task = asyncio.create_task(publish())
    try:
        got = 0
        async with asyncio.timeout(10):
            while got < 10:  # the stream flows on node a
                got += isinstance(await sub.recv(), Packet)
        t_kill = time.monotonic()
        a.kill9()
        back: float | None = None
        async with asyncio.timeout(10):
            while True:
                item = await sub.recv()
                if isinstance(item, StateChange) and item.connected:
                    back = time.monotonic()
                if isinstance(item, Packet) and back is not None:
                    first = time.monotonic()
                    break
    finally:
        stop.set()
        await task
    b_ws = urls[2].replace("http://", "ws://") + "/ws"
    assert sub.url == b_ws and pub.url == b_ws
    assert sub.welcome["resumed"] is False and sub.member_id not in old_ids
    assert pub.member_id not in old_ids
    await pub.close()
    await sub.close()
    assert back is not None
    return {
        "subscriber_back_ms": round((back - t_kill) * 1000, 1),
        "first_packet_ms": round((first - t_kill) * 1000, 1),
    }
