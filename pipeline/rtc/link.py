"""One WebRTC peer connection with posewire's two data channels (``docs/webrtc.md``).

Both ends use this class: the room server terminates one per WebRTC member
(:mod:`pipeline.server.rtc`), a client holds one (:mod:`pipeline.transports.webrtc`).

Channels (negotiated: both sides create them with the same id, no in-band
open message):

* ``pose`` (id :data:`POSE_ID`): ``ordered=False, maxRetransmits=0``. Binary
  messages: delta pose packets; the one text message is the heartbeat. A lost
  message is never retransmitted, so no later pose waits behind it.
* ``control`` (id :data:`CONTROL_ID`): reliable and ordered. Text messages are
  the member protocol's JSON control messages (plus ``hb``); binary messages
  are pose packets that must arrive (keyframes, late-join backfill).

The far side opening any other channel (an in-band ``datachannel`` event) is
a protocol violation (:attr:`PeerLink.violation`).

Liveness: :meth:`PeerLink.tick` (called every few tens of milliseconds by the
owner) sends ``{"type":"hb"}`` on the *pose* channel when nothing was sent on it
for ``heartbeat_ms`` (the one text message allowed there: unordered, it never
waits behind a retransmission on the reliable channel, so loss cannot pass for a
dead path) and reports the path dead when nothing at all was received for
``dead_after_ms``. ICE's own consent freshness would take about 30 s.

Flow control of the lossy channel: :meth:`PeerLink.send_pose` drops (and
counts) a packet instead of queueing it when the channel already holds more
than ``watermark_ms`` of pose data (``bufferedAmount`` against the recent send
rate), so a slow path never builds a backlog of stale poses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.sdp import candidate_from_sdp

from pipeline.config import IceServer, RtcConfig
from pipeline.errors import ProtocolError

log = logging.getLogger("posewire.rtc")

POSE_ID: Final = 0
CONTROL_ID: Final = 1
POSE_LABEL: Final = "pose"
CONTROL_LABEL: Final = "control"
#: Longest SDP accepted from the far side, in characters.
MAX_SDP_CHARS: Final = 7000
#: Longest ICE candidate line accepted from the far side.
MAX_CANDIDATE_CHARS: Final = 512
#: Largest message accepted on either channel, in bytes (pose packets are < 1100;
#: control text is bounded by the member protocol's MAX_CONTROL_CHARS).
MAX_MESSAGE_BYTES: Final = 8192
HEARTBEAT: Final = '{"type":"hb"}'
#: Smallest watermark of the lossy channel (two full-size packets).
MIN_WATERMARK_BYTES: Final = 2200
#: Delayed SACK (RFC 4960 section 6.2): acknowledge every second packet, or after this
#: long, and at once when a packet is missing or duplicated.
SACK_DELAY_S: Final = 0.05


def delay_sacks(pc: RTCPeerConnection) -> bool:
    """Make aiortc's SCTP acknowledge every second packet instead of every one.

    aiortc 1.16 sends a SACK for every packet it receives; RFC 4960 (6.2) lets a
    receiver acknowledge every second packet within 200 ms, and browsers (usrsctp)
    do. Each SACK costs its sender's peer a DTLS decryption and a parse in Python:
    for the room server relaying to many members, receiving SACKs was about half
    its CPU. A gap or a duplicate is still acknowledged at once (fast loss
    recovery). Returns False, changing nothing, when this aiortc lacks the
    internals it relies on (then every packet is acknowledged, as before).
    """
    sctp = pc.sctp
    send_now = getattr(sctp, "_send_sack", None)
    if sctp is None or send_now is None or not hasattr(sctp, "_sack_misordered"):
        return False
    state = {"pending": 0}
    timer: list[asyncio.TimerHandle] = []
    flushes: set[asyncio.Task[None]] = set()

    async def flush() -> None:
        if getattr(sctp, "_sack_needed", False):
            state["pending"] = 0
            with contextlib.suppress(ConnectionError):  # closed meanwhile
                await send_now()

    def later() -> None:
        timer.clear()
        task = asyncio.ensure_future(flush())
        flushes.add(task)
        task.add_done_callback(flushes.discard)

    async def delayed() -> None:
        if sctp._sack_misordered or sctp._sack_duplicates or state["pending"] >= 1:
            state["pending"] = 0
            for handle in timer:
                handle.cancel()
            timer.clear()
            await send_now()
            return
        state["pending"] += 1
        if not timer:
            timer.append(asyncio.get_running_loop().call_later(SACK_DELAY_S, later))

    sctp._send_sack = delayed  # type: ignore[method-assign]
    return True


def ice_configuration(servers: Sequence[IceServer], policy: str = "all") -> RTCConfiguration:
    """aiortc's configuration for ``servers`` (an explicit list: empty means none at all)."""
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in servers
        ],
        iceTransportPolicy=(
            RTCIceTransportPolicy.RELAY if policy == "relay" else RTCIceTransportPolicy.ALL
        ),
    )


def check_sdp(sdp: object, kind: str) -> str:
    """An SDP from the far side, checked for size and shape before aiortc parses it."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise ProtocolError(f"{kind}: 'sdp' must be a non-empty string")
    if len(sdp) > MAX_SDP_CHARS:
        raise ProtocolError(f"{kind}: SDP of {len(sdp)} characters (at most {MAX_SDP_CHARS})")
    if not sdp.startswith("v=0"):
        raise ProtocolError(f"{kind}: SDP must start with 'v=0'")
    media = [line for line in sdp.splitlines() if line.startswith("m=")]
    if len(media) != 1 or "webrtc-datachannel" not in media[0]:
        raise ProtocolError(
            f"{kind}: SDP must have exactly one media section, "
            f"'m=application ... webrtc-datachannel' (found {len(media)})"
        )
    return sdp


@dataclass
class LinkStats:
    """Counters of one :class:`PeerLink`."""

    pose_sent: int = 0
    pose_bytes_sent: int = 0
    pose_dropped_stale: int = 0
    """Pose packets not sent because the lossy channel held more than the watermark."""
    pose_received: int = 0
    pose_bytes_received: int = 0
    control_sent: int = 0
    control_bytes_sent: int = 0
    control_received: int = 0
    control_bytes_received: int = 0
    heartbeats_sent: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class PeerLink:
    """One ``RTCPeerConnection`` with the ``pose`` and ``control`` channels.

    ``on_pose(data)`` gets every binary message of the pose channel,
    ``on_control(message)`` every message of the control channel (``str``: JSON
    text, ``bytes``: a reliable pose packet). Heartbeats are consumed here.
    Build it inside the running event loop (aiortc binds futures to it).
    """

    def __init__(
        self,
        ice_servers: Sequence[IceServer],
        config: RtcConfig,
        *,
        on_pose: Callable[[bytes], None],
        on_control: Callable[[str | bytes], None],
        on_violation: Callable[[str], None],
    ) -> None:
        self.config = config
        self.pc = RTCPeerConnection(ice_configuration(ice_servers, config.ice_transport_policy))
        self.pose: RTCDataChannel = self.pc.createDataChannel(
            POSE_LABEL, ordered=False, maxRetransmits=0, negotiated=True, id=POSE_ID
        )
        self.control: RTCDataChannel = self.pc.createDataChannel(
            CONTROL_LABEL, negotiated=True, id=CONTROL_ID
        )
        self.delayed_sacks = delay_sacks(self.pc)
        self.stats = LinkStats()
        self.opened = asyncio.Event()
        self.opened_ns: int | None = None
        self.closed = False
        self.dead_reason: str | None = None
        now = time.monotonic()
        self.last_rx = now
        self.last_tx = now
        self.last_pose_tx = now
        self._on_pose = on_pose
        self._on_control = on_control
        self._on_violation = on_violation
        self._rate_bytes = 0.0
        """Recent send rate of the pose channel, bytes per second (EWMA)."""
        self._rate_t = now
        self._hb_interval = config.heartbeat_ms / 1000.0
        self._dead_after = config.dead_after_ms / 1000.0
        self._watermark_s = config.watermark_ms / 1000.0
        for channel in (self.pose, self.control):
            channel.on("open", self._check_open)
        self.pose.on("message", self._pose_message)
        self.control.on("message", self._control_message)
        self.pc.on("datachannel", self._unexpected_channel)
        self.pc.on("connectionstatechange", self._state_change)

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        return (
            not self.closed and self.pose.readyState == "open" and self.control.readyState == "open"
        )

    def _check_open(self) -> None:
        if self.is_open and not self.opened.is_set():
            self.opened_ns = time.time_ns()
            self.last_rx = self.last_tx = self.last_pose_tx = time.monotonic()
            self.opened.set()

    def _state_change(self) -> None:
        state = self.pc.connectionState
        if state in ("failed", "closed") and self.dead_reason is None and not self.closed:
            self.dead_reason = f"connection {state}"

    def _unexpected_channel(self, channel: RTCDataChannel) -> None:
        self._on_violation(f"unexpected data channel {str(channel.label)[:64]!r}")
        with contextlib.suppress(Exception):  # aiortc raises its own assorted errors here
            channel.close()

    # ------------------------------------------------------------------ signaling

    async def create_offer(self) -> str:
        """The offer (every candidate included: aiortc gathers before returning)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept_offer(self, sdp: object) -> str:
        """Apply the far side's offer and return the answer; :class:`ProtocolError`
        for an SDP that is too large, of the wrong shape or not parseable."""
        await self._set_remote(check_sdp(sdp, "offer"), "offer")
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return str(self.pc.localDescription.sdp)

    async def accept_answer(self, sdp: object) -> None:
        await self._set_remote(check_sdp(sdp, "answer"), "answer")

    async def _set_remote(self, sdp: str, kind: str) -> None:
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
            raise ProtocolError(f"{kind}: unusable SDP: {exc}") from exc
        except Exception as exc:
            raise ProtocolError(f"{kind}: unusable SDP: {type(exc).__name__}: {exc}") from exc

    async def add_candidate(self, line: object, mid: object, index: object) -> None:
        """A trickled remote candidate (``a=candidate`` value without ``a=``); an empty
        line ends the candidates. :class:`ProtocolError` when malformed."""
        if not isinstance(line, str) or len(line) > MAX_CANDIDATE_CHARS:
            raise ProtocolError("candidate: 'candidate' must be a string of <= 512 characters")
        if not line:
            return
        try:
            cand = candidate_from_sdp(line.removeprefix("candidate:"))
        except (ValueError, IndexError) as exc:
            raise ProtocolError(f"candidate: malformed line: {exc}") from exc
        cand.sdpMid = mid if isinstance(mid, str) else None
        cand.sdpMLineIndex = index if isinstance(index, int) else 0
        try:
            await self.pc.addIceCandidate(cand)
        except (ValueError, KeyError) as exc:
            raise ProtocolError(f"candidate: refused: {exc}") from exc

    # ------------------------------------------------------------------ sending

    def watermark_bytes(self) -> int:
        return max(int(self._rate_bytes * self._watermark_s), MIN_WATERMARK_BYTES)

    def send_pose(self, data: bytes) -> bool:
        """Send a pose packet on the lossy channel; False when not open or dropped
        because the channel already holds more than the watermark."""
        if not self.is_open:
            return False
        now = time.monotonic()
        dt = now - self._rate_t
        if dt > 0:
            alpha = min(dt / 1.0, 1.0)  # a one-second average
            self._rate_bytes += alpha * (len(data) / max(dt, 1e-3) - self._rate_bytes)
            self._rate_t = now
        if self.pose.bufferedAmount > self.watermark_bytes():
            self.stats.pose_dropped_stale += 1
            return False
        self.pose.send(data)
        self.last_tx = self.last_pose_tx = now
        self.stats.pose_sent += 1
        self.stats.pose_bytes_sent += len(data)
        return True

    def send_control(self, message: str | bytes) -> bool:
        """Send on the reliable channel (JSON text, or a pose packet that must arrive)."""
        if not self.is_open:
            return False
        self.control.send(message)
        self.last_tx = time.monotonic()
        self.stats.control_sent += 1
        self.stats.control_bytes_sent += len(message)
        return True

    # ------------------------------------------------------------------ receiving

    def _pose_message(self, message: str | bytes) -> None:
        self.last_rx = time.monotonic()
        if message == HEARTBEAT:
            return
        if not isinstance(message, bytes):
            self._on_violation("text message on the pose channel")
            return
        if len(message) > MAX_MESSAGE_BYTES:
            self._on_violation(f"pose-channel message of {len(message)} bytes")
            return
        self.stats.pose_received += 1
        self.stats.pose_bytes_received += len(message)
        self._on_pose(message)

    def _control_message(self, message: str | bytes) -> None:
        self.last_rx = time.monotonic()
        if len(message) > MAX_MESSAGE_BYTES:
            self._on_violation(f"control-channel message of {len(message)} bytes")
            return
        self.stats.control_received += 1
        self.stats.control_bytes_received += len(message)
        if message == HEARTBEAT:
            return
        self._on_control(message)

    # ------------------------------------------------------------------ liveness

    def tick(self, now: float | None = None) -> str | None:
        """Heartbeat and liveness check; returns why the path is dead, or None.

        Call it every ``heartbeat_ms / 2`` or more often while open.
        """
        if self.dead_reason is not None:
            return self.dead_reason
        if not self.is_open:
            return None
        t = time.monotonic() if now is None else now
        silent = t - self.last_rx
        if silent > self._dead_after:
            self.dead_reason = f"nothing received for {silent * 1000:.0f} ms"
            return self.dead_reason
        if t - self.last_pose_tx >= self._hb_interval:
            # on the unordered channel: a heartbeat never waits behind a retransmission
            self.pose.send(HEARTBEAT)
            self.last_tx = self.last_pose_tx = t
            self.stats.heartbeats_sent += 1
        return None

    def info(self) -> dict[str, Any]:
        """State and counters (for metrics and the member record)."""
        return {
            "connection": self.pc.connectionState,
            "ice": self.pc.iceConnectionState,
            "open": self.is_open,
            "pose_buffered_bytes": self.pose.bufferedAmount,
            **self.stats.as_dict(),
        }

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await self.pc.close()
