"""The configuration: one pydantic tree mirroring ``pipeline.yaml``.

Every model forbids unknown keys, every field is constrained and described.
:func:`load_config` reports *every* problem at once, each with its YAML path
and line (``source.fps (line 4): Input should be greater than 0``), and raises
:class:`~pipeline.errors.ConfigError`; nothing starts on an invalid file.

The ``source`` and ``detect`` sections are plugin sections (their base models
and registries are in :mod:`pipeline.settings`): ``kind`` / ``backend``
selects the settings model the section is validated with.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from pipeline.degrade_config import DegradeConfig
from pipeline.degrade_config import EncodeConfig as EncodeConfig
from pipeline.errors import ConfigError
from pipeline.netconfig import IceServer as IceServer
from pipeline.netconfig import RtcConfig as RtcConfig
from pipeline.netconfig import ServerRtcConfig as ServerRtcConfig
from pipeline.netconfig import TlsConfig as TlsConfig
from pipeline.settings import (
    DEFAULT_DETECTOR,
    DEFAULT_SOURCE,
    DETECTORS,
    SOURCES,
    ConfigModel,
    DetectorSettings,
    FrameSourceSettings,
    SourceSettings,
    missing_path,
    plugin_section,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACES_ENV = "POSEWIRE_TRACES"


def traces_dir() -> Path:
    """The CMU pose traces vendored in ``data/pose-traces``; ``$POSEWIRE_TRACES`` overrides."""
    env = os.environ.get(TRACES_ENV)
    return Path(env) if env else REPO_ROOT / "data" / "pose-traces"


class TransportKind(StrEnum):
    FILE = "file"
    WEBSOCKET = "websocket"
    WEBRTC = "webrtc"


class TransmitConfig(ConfigModel):
    """Where packets go (the transmit stage) and the transport policy."""

    primary: TransportKind = Field(TransportKind.FILE, description="First-choice transport.")
    fallback: TransportKind | None = Field(None, description="Transport used when primary fails.")
    file: Path = Field(
        Path("posewire-packets.bin"), description="File sink (transport file): length-prefixed."
    )
    server_url: str = Field("http://127.0.0.1:8765", description="Room server base URL.")
    servers: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Room server URLs tried in turn (a lost connection moves to the next: "
        "README 'Deployment'); instead of server_url.",
    )
    ca_file: Path | None = Field(
        None, description="PEM CA certificate(s) to verify wss/https servers; default: system CAs."
    )
    room: str = Field("demo", min_length=1, max_length=64, description="Room to publish into.")
    token: str | None = Field(
        None, description="Access token; default: $POSEWIRE_TOKEN, or minted with the secret."
    )
    max_latency_ms: float = Field(
        150.0,
        gt=0,
        le=10000,
        description="Switch to the fallback when the primary's ack RTT (median of per-0.5 s "
        "minima) over window_s exceeds this.",
    )
    switch_threshold: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Switch to the fallback when the primary's failure rate (send failures / "
        "sends over window_s) exceeds this.",
    )
    recovery_interval_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="After switching away, wait this long before the primary may be judged "
        "for a switch back.",
    )
    window_s: float = Field(
        2.0, gt=0, le=60, description="Window of the per-transport health figures."
    )
    hold_s: float = Field(
        3.0,
        ge=0,
        le=3600,
        description="The primary must stay healthy this long (after recovery_interval_s) "
        "before the stream switches back to it.",
    )
    max_switches_per_min: int = Field(
        6,
        ge=1,
        le=600,
        description="Automatic switches allowed per minute (the dead-path failover "
        "included); past it the stream stays where it is.",
    )
    reconnect_initial_s: float = Field(
        0.05, gt=0, le=60, description="WebSocket: first reconnect delay (doubles per failure)."
    )
    reconnect_max_s: float = Field(
        0.25, gt=0, le=600, description="WebSocket: cap of the exponential reconnect backoff."
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, le=600, description="WebSocket: give up the first connection after this long."
    )
    max_bandwidth_kbps: float | None = Field(
        None,
        gt=0,
        le=10_000_000,
        description="Cap of the send rate in kbit/s (token bucket: packets wait); none: no cap. "
        "Settable at run time with the set command (0 or null lifts it).",
    )
    ice_servers: list[IceServer] = Field(
        default_factory=list,
        max_length=8,
        description="WebRTC STUN/TURN servers; empty (default): host candidates only, nothing "
        "asked of servers outside (aiortc would otherwise ask a public STUN server).",
    )
    webrtc: RtcConfig = Field(
        default_factory=lambda: RtcConfig.model_validate({}),
        description="WebRTC transport: heartbeat, dead-path detection, flow control.",
    )
    send_queue: int = Field(
        16, ge=1, le=4096, description="Packets the sender's priority queue holds (then drops)."
    )
    degrade: DegradeConfig = Field(
        default_factory=lambda: DegradeConfig.model_validate({}),
        description="Degradation ladder: fewer frames, then coarser precision.",
    )

    @field_validator("server_url", "servers")
    @classmethod
    def _server_urls(cls, value: str | list[str]) -> str | list[str]:
        for url in [value] if isinstance(value, str) else value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
                raise ValueError(f"{url!r} is not an http(s):// or ws(s)://HOST:PORT URL")
        return value

    @property
    def urls(self) -> list[str]:
        """The server URLs in the order tried: ``servers``, else ``[server_url]``."""
        return list(self.servers) or [self.server_url]

    @model_validator(mode="after")
    def _one_address(self) -> TransmitConfig:
        if self.servers and "server_url" in self.model_fields_set:
            raise ValueError("transmit.servers: give server_url or servers, not both")
        return self

    @model_validator(mode="after")
    def _fallback_valid(self) -> TransmitConfig:
        if self.fallback is None:
            return self
        rooms = (TransportKind.WEBSOCKET, TransportKind.WEBRTC)
        if self.fallback not in rooms or self.primary not in rooms:
            raise ValueError(
                "transmit.fallback: switching works between the room transports "
                "(websocket, webrtc); primary and fallback must both be one of them"
            )
        if self.fallback == self.primary:
            raise ValueError(
                f"transmit.fallback: must differ from transmit.primary ({self.primary.value})"
            )
        return self


SPEECH_TEXT = "The quick brown fox jumps over the lazy dog. Raise your left arm slowly, and hold."


class AudioConfig(ConfigModel):
    """Audio beside the pose (docs/audio.md): Opus, 48 kHz mono, 20 ms frames."""

    enabled: bool = Field(False, description="Run the audio stage (a second head of the topology).")
    source: Literal["tone", "file", "speech", "microphone", "mic"] = Field(
        "tone", description="tone (clicks at capture times), file, speech (espeak-ng), mic."
    )
    path: Path | None = Field(None, description="Audio file (source=file), anything PyAV reads.")
    loop: bool = Field(True, description="Start the file again at its end (file, speech).")
    text: str = Field(SPEECH_TEXT, min_length=1, max_length=2000, description="What speech says.")
    bitrate_kbps: int = Field(32, ge=16, le=64, description="Opus bitrate, 16-64 kbit/s.")
    fec: bool = Field(True, description="Opus in-band forward error correction.")
    dtx: bool = Field(False, description="Opus discontinuous transmission (silence not sent).")
    frame_ms: Literal[20] = Field(20, description="Frame duration (fixed: 20 ms).")
    tone_hz: float = Field(440.0, gt=20, lt=20000, description="Tone frequency (source=tone).")
    click_interval_ms: int = Field(250, ge=40, le=10000, description="Tone clicks this apart.")

    @model_validator(mode="after")
    def _path_needed(self) -> AudioConfig:
        if self.enabled and self.source == "file" and self.path is None:
            raise ValueError("audio.path: source 'file' needs a path")
        return self


class RedisConfig(ConfigModel):
    """Room-server nodes sharing rooms through Redis (``docs/scaling.md``)."""

    url: str = Field(pattern=r"^(redis|unix)://\S+$", description="redis://HOST:PORT/DB")
    node_id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="This node's id, unique in the cluster."
    )
    key_prefix: str = Field(
        "posewire", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Prefix of every key/channel."
    )
    node_ttl_s: float = Field(
        3.0, ge=0.3, le=600, description="A node silent this long is dead: its members leave."
    )


class ServerConfig(ConfigModel):
    """The room server."""

    embedded: bool = Field(False, description="The supervisor runs the server as a stage.")
    host: str = Field("127.0.0.1", description="Listen address.")
    port: int = Field(8765, ge=1, le=65535, description="Listen port.")
    secret: str | None = Field(
        None,
        min_length=32,
        description="Token secret (HS256 key, at least 32 characters); $POSEWIRE_SECRET "
        "takes precedence.",
    )
    dev: bool = Field(False, description="Mint tokens for local demos (loopback only).")
    tls: TlsConfig | None = Field(None, description="Serve https/wss with this certificate.")
    max_rooms: int = Field(100, ge=1, le=100000, description="Rooms per server.")
    max_members_per_room: int = Field(50, ge=1, le=10000, description="Members per room.")
    max_connections: int = Field(1000, ge=1, le=100000, description="Connections per server.")
    max_message_bytes: int = Field(
        65536, ge=1100, le=16 * 1024 * 1024, description="Largest accepted message."
    )
    max_messages_per_s: float = Field(
        200.0, gt=0, le=100000, description="Messages per second per connection."
    )
    subscriber_queue: int = Field(64, ge=1, le=100000, description="Per-subscriber queue size.")
    empty_room_grace_s: float = Field(30.0, ge=0, le=86400, description="Empty room lifetime.")
    auto_create_rooms: bool = Field(True, description="Create a room on first join.")
    history_packets: int = Field(
        100,
        ge=1,
        le=10000,
        description="Per publisher stream: the latest keyframe and the packets after it, "
        "at most this many in all, sent to late joiners.",
    )
    auth_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A new connection must send its join within this time."
    )
    heartbeat_s: float = Field(
        10.0, gt=0, le=3600, description="WebSocket ping interval; a silent peer is dropped."
    )
    token_leeway_s: float = Field(
        2.0, ge=0, le=300, description="Clock skew tolerated on token exp/nbf/iat."
    )
    data_dir: Path | None = Field(
        None,
        description="Where the server keeps what must survive a restart (revoked tokens, "
        "closed rooms); default: $XDG_STATE_HOME/posewire or ~/.local/state/posewire.",
    )
    header_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="An HTTP request (its line and headers) must arrive within this time, "
        "else the connection is closed (slow clients before the WebSocket upgrade).",
    )
    max_pending_connections: int = Field(
        200,
        ge=1,
        le=100000,
        description="Connections accepted but not yet a joined member or an answered "
        "request; past this, new connections are closed at once.",
    )
    ice_servers: list[IceServer] = Field(
        default_factory=list,
        max_length=8,
        description="WebRTC STUN/TURN servers; empty (default): host candidates only, nothing "
        "asked of servers outside (aiortc would otherwise ask a public STUN server).",
    )
    webrtc: ServerRtcConfig = Field(
        default_factory=lambda: ServerRtcConfig.model_validate({}),
        description="WebRTC members (data-channel SFU): on/off, limits, heartbeat.",
    )
    redis: RedisConfig | None = Field(
        None, description="Share rooms with other nodes through Redis; none: a single node."
    )


class SupervisorConfig(ConfigModel):
    """Process supervision (Erlang/OTP one_for_one)."""

    run_dir: Path | None = Field(
        None, description="Private run directory (sockets); default $XDG_RUNTIME_DIR or /tmp."
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]{1,24}$",
        description="Run id (segment prefix); default: random. Two supervisors cannot share one.",
    )
    heartbeat_interval_ms: int = Field(200, ge=10, le=10000, description="Stage heartbeat period.")
    heartbeat_timeout_ms: int = Field(
        3000, ge=100, le=600000, description="Silent this long: the stage is hung."
    )
    startup_timeout_ms: int = Field(
        20000, ge=100, le=600000, description="Allowed silence before a stage's first heartbeat."
    )
    kill_grace_s: float = Field(1.0, gt=0, le=60, description="SIGTERM to SIGKILL grace.")
    max_restarts: int = Field(5, ge=0, le=1000, description="Restart intensity: restarts ...")
    period_s: float = Field(30.0, gt=0, le=86400, description="... within this many seconds.")
    shutdown_timeout_s: float = Field(4.0, gt=0, le=60, description="Orderly shutdown deadline.")

    @model_validator(mode="after")
    def _timeouts(self) -> SupervisorConfig:
        if self.heartbeat_timeout_ms <= 2 * self.heartbeat_interval_ms:
            raise ValueError(
                "supervisor.heartbeat_timeout_ms must exceed twice heartbeat_interval_ms"
            )
        return self


class MonitorConfig(ConfigModel):
    """Metrics, alerts and the live status."""

    enabled: bool = Field(True, description="Serve /metrics.")
    host: str = Field("127.0.0.1", description="Metrics listen address.")
    port: int = Field(9108, ge=0, le=65535, description="Metrics port (0: any free port).")
    max_connections: int = Field(
        16, ge=1, le=1024, description="Concurrent HTTP connections to the metrics endpoint."
    )
    request_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A metrics HTTP request must arrive within this time."
    )
    status: Literal["auto", "on", "off"] = Field(
        "auto", description="Live status table: auto = when stdout is a terminal."
    )
    alert_latency_ms: float = Field(200.0, gt=0, description="Alert: capture-to-send latency.")
    alert_drop_rate: float = Field(0.10, ge=0, le=1, description="Alert: frames dropped.")
    alert_switch_rate: float = Field(0.05, ge=0, le=1, description="Alert: transport switches.")
    alert_compression_ratio: float = Field(
        0.30, gt=0, le=1, description="Alert: bytes per frame over raw float32 above this."
    )
    alert_latency_percentile: Literal["p50", "p95", "p99"] = Field(
        "p95", description="Alert: which capture-to-send percentile alert_latency_ms applies to."
    )
    alert_window_s: float = Field(
        10.0, gt=0, le=3600, description="Window of the rate alerts (drops, switches, size)."
    )
    alert_hold_s: float = Field(
        3.0,
        ge=0,
        le=3600,
        description="An alert clears after staying under its threshold this long.",
    )
    sample_interval_s: float = Field(
        1.0, ge=0.1, le=60, description="Sampling period: live status, /metrics, report series."
    )
    series_max_points: int = Field(
        3600, ge=10, le=1_000_000, description="Report time series: at most this many points."
    )


class RingConfig(ConfigModel):
    """One shared-memory ring."""

    slots: int = Field(4, ge=2, le=4096, description="Preallocated slots.")


class RingsConfig(ConfigModel):
    """The three rings between the stages."""

    frames: RingConfig = Field(
        default_factory=lambda: RingConfig(slots=4), description="capture -> detect, latest-wins."
    )
    poses: RingConfig = Field(
        default_factory=lambda: RingConfig(slots=64), description="detect -> encode, bounded queue."
    )
    packets: RingConfig = Field(
        default_factory=lambda: RingConfig(slots=256),
        description="encode -> transmit, bounded queue.",
    )
    max_frame_width: int = Field(1920, ge=16, le=7680, description="Frame slot size: width.")
    max_frame_height: int = Field(1080, ge=16, le=4320, description="Frame slot size: height.")

    @model_validator(mode="after")
    def _memory(self) -> RingsConfig:
        frame_bytes = self.max_frame_width * self.max_frame_height * 3 * self.frames.slots
        if frame_bytes > 2 * 1024**3:
            raise ValueError(
                f"rings.frames needs {frame_bytes / 1024**3:.1f} GiB of shared memory "
                "(slots x max_frame_width x max_frame_height x 3); at most 2 GiB allowed"
            )
        return self


class Config(ConfigModel):
    """The whole of ``pipeline.yaml``."""

    source: SerializeAsAny[SourceSettings] = Field(default_factory=dict)  # type: ignore[assignment]
    detect: SerializeAsAny[DetectorSettings] = Field(default_factory=dict)  # type: ignore[assignment]
    encode: EncodeConfig = Field(default_factory=EncodeConfig)  # type: ignore[arg-type]
    transmit: TransmitConfig = Field(default_factory=TransmitConfig)  # type: ignore[arg-type]
    audio: AudioConfig = Field(default_factory=AudioConfig)  # type: ignore[arg-type]
    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)  # type: ignore[arg-type]
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)  # type: ignore[arg-type]
    rings: RingsConfig = Field(default_factory=RingsConfig)  # type: ignore[arg-type]

    base_dir: Path = Field(
        Path("."), exclude=True, description="Directory relative paths resolve against."
    )

    @field_validator("source", mode="wrap")
    @classmethod
    def _source(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return plugin_section(
            value,
            handler,
            registry=SOURCES,
            key="kind",
            default=DEFAULT_SOURCE,
            base=FrameSourceSettings,
        )

    @field_validator("detect", mode="wrap")
    @classmethod
    def _detect(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return plugin_section(
            value,
            handler,
            registry=DETECTORS,
            key="backend",
            default=DEFAULT_DETECTOR,
            base=DetectorSettings,
        )

    @model_validator(mode="after")
    def _degrade_coarser(self) -> Config:
        steps = self.transmit.degrade.precision_px
        if steps and steps[0] <= self.encode.precision_px:
            raise ValueError(
                f"transmit.degrade.precision_px: every level must be coarser than "
                f"encode.precision_px ({self.encode.precision_px:g}), got {steps}"
            )
        return self


# ---------------------------------------------------------------------------
# Loading with YAML line numbers


def _line_index(
    node: yaml.Node, path: tuple[str | int, ...], out: dict[tuple[Any, ...], int]
) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            out[(*path, k)] = key.start_mark.line + 1
            _line_index(value, (*path, k), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), out)


def _where(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> str:
    path = ".".join(str(p) for p in loc) or "(top level)"
    probe = tuple(loc)
    while probe and probe not in lines:
        probe = probe[:-1]
    line = lines.get(probe)
    return f"{path} (line {line})" if line is not None else path


def _file_problems(cfg: Config, lines: dict[tuple[Any, ...], int]) -> list[str]:
    """Checks that need the file system: paths that must exist."""
    problems: list[str] = []
    for section, settings in (("source", cfg.source), ("detect", cfg.detect)):
        for name, message in settings.file_problems(cfg.base_dir):
            problems.append(f"{_where((section, name), lines)}: {message}")
    if cfg.audio.enabled and cfg.audio.source == "file":
        missing = missing_path(cfg.base_dir, cfg.audio.path, "audio file")
        if missing:
            problems.append(f"{_where(('audio', 'path'), lines)}: {missing}")
    tls = cfg.server.tls
    for loc, path, what in (
        (("server", "tls", "certfile"), tls and tls.certfile, "certificate file"),
        (("server", "tls", "keyfile"), tls and tls.keyfile, "key file"),
        (("transmit", "ca_file"), cfg.transmit.ca_file, "CA file"),
    ):
        if path and (missing := missing_path(cfg.base_dir, path, what)):
            problems.append(f"{_where(loc, lines)}: {missing}")
    if cfg.supervisor.run_dir is not None:
        rd = cfg.supervisor.run_dir
        probe = rd
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            problems.append(
                f"{_where(('supervisor', 'run_dir'), lines)}: run directory not writable: {rd}"
            )
    return problems


def parse_config(text: str, *, name: str = "<config>", base_dir: Path | None = None) -> Config:
    """Parse and validate YAML text; raise :class:`ConfigError` listing every problem."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(
            [f"{name}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"]
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{name}: the top level must be a mapping of sections"])
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _line_index(node, (), lines)
    data = dict(data)
    if "base_dir" in data:
        raise ConfigError([f"{_where(('base_dir',), lines)}: Extra inputs are not permitted"])
    data["base_dir"] = base_dir or Path(".")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            problems.append(f"{_where(loc, lines)}: {err['msg']}")
        raise ConfigError(problems) from exc
    problems = _file_problems(cfg, lines)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: Path | str) -> Config:
    """Read and validate a YAML file; raise :class:`ConfigError` listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError([f"{p}: no such configuration file"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {exc}"]) from exc
    return parse_config(text, name=str(p), base_dir=p.resolve().parent)


def resolve_path(cfg: Config, p: Path) -> Path:
    """A config path made absolute against the config file's directory."""
    return p if p.is_absolute() else (cfg.base_dir / p).resolve()


def server_section(cfg: Config) -> ServerConfig:
    """The ``server`` section with its paths (``data_dir``, ``tls``) made absolute."""
    server, tls = cfg.server, cfg.server.tls
    update: dict[str, Any] = {}
    if server.data_dir is not None:
        update["data_dir"] = resolve_path(cfg, server.data_dir)
    if tls is not None:
        files = {
            "certfile": resolve_path(cfg, tls.certfile),
            "keyfile": resolve_path(cfg, tls.keyfile),
        }
        update["tls"] = tls.model_copy(update=files)
    return server.model_copy(update=update)
