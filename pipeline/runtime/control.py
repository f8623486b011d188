"""The control plane: small, typed, versioned messages over ZeroMQ.

The supervisor binds a ROUTER socket on ``ipc://<run_dir>/control.sock``; each
stage connects a DEALER whose identity is its stage name. On the wire a
message is one ZeroMQ frame of UTF-8 JSON (the ROUTER adds the identity
frame): ``{"v": 1, "type": ..., ...}``. Unknown versions and malformed
messages raise :class:`~pipeline.errors.ControlError`, never anything else.

Stage -> supervisor
    ``heartbeat`` (stage, pid, metrics, state), ``reply`` (to a command).
Supervisor -> stage
    ``command`` (id, cmd in :data:`COMMANDS`, args).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.errors import ControlError

CONTROL_VERSION = 1

CommandName = Literal[
    "set", "pause", "resume", "stop", "switch_transport", "keyframe", "pin", "unpin", "degrade"
]
COMMANDS: frozenset[str] = frozenset(
    {"set", "pause", "resume", "stop", "switch_transport", "keyframe", "pin", "unpin", "degrade"}
)
STATES: frozenset[str] = frozenset({"starting", "running", "paused", "stopping"})


@dataclass
class Heartbeat:
    """A stage is alive; carries its metrics (numbers only)."""

    stage: str
    pid: int
    state: str = "running"
    metrics: dict[str, float] = field(default_factory=dict)
    type: Literal["heartbeat"] = "heartbeat"


@dataclass
class Command:
    """A command from the supervisor; the stage answers with a :class:`Reply`."""

    id: int
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    type: Literal["command"] = "command"


@dataclass
class Reply:
    """A stage's answer to :class:`Command` ``id``."""

    id: int
    ok: bool
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    type: Literal["reply"] = "reply"


Message = Heartbeat | Command | Reply


def encode(msg: Message) -> bytes:
    """One message as a JSON frame."""
    body = asdict(msg)
    body["v"] = CONTROL_VERSION
    return json.dumps(body, separators=(",", ":")).encode()


def _need(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ControlError(f"control message field {key!r} missing or not {kind}")
    return value


def decode(frame: bytes) -> Message:
    """Parse and validate one JSON frame; raise :class:`ControlError` on anything wrong."""
    if len(frame) > 1 << 20:
        raise ControlError(f"control message too large: {len(frame)} bytes")
    try:
        body = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"control message is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ControlError("control message is not a JSON object")
    version = body.get("v")
    if version != CONTROL_VERSION:
        raise ControlError(
            f"control message version {version!r} not supported (this build: {CONTROL_VERSION})"
        )
    kind = body.get("type")
    if kind == "heartbeat":
        metrics = body.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) for k, v in metrics.items()
        ):
            raise ControlError("heartbeat metrics must map names to numbers")
        state = _need(body, "state", str)
        if state not in STATES:
            raise ControlError(f"unknown stage state {state!r}")
        return Heartbeat(
            stage=_need(body, "stage", str),
            pid=_need(body, "pid", int),
            state=state,
            metrics={k: float(v) for k, v in metrics.items()},
        )
    if kind == "command":
        cmd = _need(body, "cmd", str)
        if cmd not in COMMANDS:
            raise ControlError(f"unknown command {cmd!r}; known: {', '.join(sorted(COMMANDS))}")
        return Command(id=_need(body, "id", int), cmd=cmd, args=_need(body, "args", dict))
    if kind == "reply":
        error = body.get("error")
        if error is not None and not isinstance(error, str):
            raise ControlError("reply error must be a string")
        return Reply(
            id=_need(body, "id", int),
            ok=_need(body, "ok", bool),
            error=error,
            result=_need(body, "result", dict),
        )
    raise ControlError(f"unknown control message type {kind!r}")
