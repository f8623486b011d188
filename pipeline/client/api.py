"""The public Python client API: :class:`Client`, one member of a room (docs/client-api.md).

A :class:`Client` joins a room with a token, over the WebRTC transport, the
WebSocket, or whichever works (``transport="auto"``: WebRTC where the server takes
offers and this host can reach it, else the WebSocket). It publishes the
application's own poses (:meth:`Client.publish`: a
:class:`~pipeline.model.pose.PoseFrame` or a MediaPipe result object of either
API) and yields what happens in the room (:meth:`Client.events`): decoded poses
per member and stream, presence, connection state.

It is built from the same parts as the pipeline, not copies of them:

* the transport, its connecting, refusals and feedback pump are a
  :class:`~pipeline.transports.sender.Sender` (the transmit stage's); the server's
  acks and keyframe requests go to this client's :class:`~pipeline.codec.Encoder`
  (one per client: one publisher stream), whose deltas predict from the latest
  keyframe when the transport is WebRTC (the lossy pose channel);
* every item the transport yields goes on to a
  :class:`~pipeline.client.receiver.Receiver` (the ``receive`` command's):
  decoding per stream, keyframe requests, loss and latency accounting.

Switching (``transport="auto"`` on a publishing client): the client keeps a **hot
standby** like the transmit stage (the WebSocket connected beside WebRTC, a pair on
the server) and runs the supervisor's :class:`~pipeline.runtime.policy.TransportPolicy`
in its own event loop every :data:`POLICY_STEP_S`: a dead path fails over at once, a
latency over ``max_latency_ms`` or a failure rate over ``switch_threshold`` moves the
stream to the WebSocket, and it returns once WebRTC stayed healthy (``policy``: the
``transmit`` switching fields). Each switch is a :class:`ConnectionEvent` with
``switched`` set, and :meth:`Client.metrics` lists the decisions. A subscribe-only
client has no standby: its member's own WebSocket carries the room's packets while
its WebRTC path is dead (``docs/webrtc.md``), and it reopens the peer connection.

Priority (:data:`Priority`) of a published pose:

* ``"normal"``: encoded as the stream goes (a delta between keyframes); waits for
  the bandwidth cap (``max_bandwidth_kbps``) when there is one;
* ``"high"``: encoded as a keyframe (decodable on its own, and on WebRTC carried
  by the reliable control channel) and sent at once even when the cap would make
  it wait (the cap's bucket goes into debt: the next normal poses wait longer);
* ``"low"``: dropped (``publish`` returns False) instead of waiting for the cap.

Errors (:mod:`pipeline.errors`): a bad URL, transport name or option is a
:class:`~pipeline.errors.ConfigError` (or :class:`~pipeline.errors.TransportError`
for the URL); a server that cannot be reached within ``connect_timeout_s`` a
:class:`~pipeline.errors.TransportError`; explicit ``transport="webrtc"`` where
WebRTC cannot work a :class:`~pipeline.errors.TransportUnavailable`; a refused
token a :class:`~pipeline.errors.TokenError`; a closed or missing room, a kick, a
stream id of another member a :class:`~pipeline.errors.BrokenResourceError`
(``reason``: ``room_closed``, ``room_not_found``, ``kicked``...). After joining, a
room that is closed is retried in the background (``publish`` returns False and
the events say so); a final refusal (kicked, token revoked) is raised by the next
``publish`` and ends :meth:`Client.events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import psutil

from pipeline.client.events import ConnectionEvent, Event, PoseEvent, PresenceEvent
from pipeline.client.options import transmit_config
from pipeline.client.receiver import (
    TRANSPORT_CHOICES,
    ReceivedPose,
    Receiver,
    latency_summary,
    warm,
)
from pipeline.codec import CodecConfig, Encoder, feedback
from pipeline.codec.ranges import clamp_image
from pipeline.config import IceServer, RtcConfig, TransportKind
from pipeline.errors import (
    ClosedResourceError,
    CommandError,
    ConfigError,
    ProtocolError,
    TransportError,
)
from pipeline.model.landmarks import frame_from_result
from pipeline.model.pose import PoseFrame
from pipeline.runtime.policy import TransportPolicy
from pipeline.transports.base import Control, Received, StateChange, TransportContext
from pipeline.transports.sender import FALLBACK_OF, Sender, WhenThrottled
from pipeline.transports.websocket import WebSocketTransport

log = logging.getLogger("posewire.client")

Priority = Literal["low", "normal", "high"]
_THROTTLED: dict[str, WhenThrottled] = {"low": "drop", "normal": "wait", "high": "send"}
#: capture-to-send latencies kept for :meth:`Client.metrics` (the most recent)
PUBLISH_LATENCY_SAMPLES = 10_000
#: how often :meth:`Client.events` looks at the refusal state while nothing arrives
STATE_POLL_S = 0.1
#: how often a client with a hot standby judges its paths (the supervisor: per heartbeat)
POLICY_STEP_S = 0.25


class Client:
    """One member of a room (see the module docstring).

    ``await Client.connect(...)`` returns a joined client; ``async with Client(...)``
    joins on entry and leaves on exit.
    """

    def __init__(
        self,
        server_url: str | Sequence[str],
        room: str,
        token: str,
        *,
        transport: str = "auto",
        name: str | None = None,
        publish: bool = False,
        subscribe: bool = True,
        ice_servers: Sequence[IceServer | Mapping[str, Any]] = (),
        rtc: RtcConfig | None = None,
        stream_id: int | None = None,
        codec: CodecConfig | None = None,
        max_bandwidth_kbps: float | None = None,
        connect_timeout_s: float = 5.0,
        max_events: int = 4096,
        ca_file: str | Path | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> None:
        if transport not in TRANSPORT_CHOICES:
            raise ConfigError([f"transport must be one of {', '.join(TRANSPORT_CHOICES)}, "
                               f"not {transport!r}"])  # fmt: skip
        if not (publish or subscribe):
            raise ConfigError(["a client must publish, subscribe, or both"])
        self.requested = transport
        kind = TransportKind.WEBSOCKET if transport == "websocket" else TransportKind.WEBRTC
        self.room = room
        self.name = name or ("publisher" if publish else "subscriber")
        self.publishing = publish
        self.subscribing = subscribe
        self.stream_id = secrets.randbelow(0x3FFF) + 1 if stream_id is None else stream_id
        """The stream id of this client's poses (random by default, below 2**14)."""
        self.codec = codec or CodecConfig(world=True)
        self.max_events = max_events
        self._cfg = transmit_config(
            kind,
            server_url,
            room,
            ice_servers=ice_servers,
            rtc=rtc,
            connect_timeout_s=connect_timeout_s,
            max_bandwidth_kbps=max_bandwidth_kbps,
            ca_file=ca_file,
            fallback=TransportKind.WEBSOCKET if transport == "auto" and publish else None,
            policy=policy,
        )
        context = TransportContext(
            token=lambda: token, name=self.name, publish=publish, subscribe=subscribe
        )
        self._sender = Sender(
            self._cfg,
            context,
            on_feedback=self._on_feedback,
            on_received=self._on_received,
            fallback=FALLBACK_OF if transport == "auto" else {},
            log=log,
        )
        self._token = token
        self._encoder: Encoder | None = None
        self._receiver: Receiver | None = None
        self._events: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._seq = 0
        self._attempts = 0
        self._publish_latency: deque[float] = deque(maxlen=PUBLISH_LATENCY_SAMPLES)
        self._refused_seen: str | None = None
        self._process = psutil.Process()
        self.events_dropped = 0
        """Events dropped because nobody read :meth:`events` fast enough (oldest first)."""
        self.connected_at: float | None = None
        self.closed = False
        self.policy: TransportPolicy | None = None
        """The switching policy of a publishing ``auto`` client (module docstring)."""
        self._policy_task: asyncio.Task[None] | None = None
        self._switch_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(
        cls, server_url: str | Sequence[str], room: str, token: str, **options: Any
    ) -> Client:
        """A joined client (the keyword options are those of the constructor)."""
        client = cls(server_url, room, token, **options)
        await client.open()
        return client

    async def open(self) -> None:
        """Join the room: raises the precise error (module docstring) instead of retrying."""
        if self.closed:
            raise ClosedResourceError("this client was closed")
        warm()  # the codec kernels, before the first packet
        self._process.cpu_percent(None)  # the start of the first CPU measurement
        self._wake = asyncio.Event()  # bound to the running loop
        try:
            await self._sender.activate(self._cfg.primary, retry=False)
        except BaseException:
            await self._sender.close()
            raise
        self.connected_at = time.monotonic()
        kind = self._sender.kind
        refs: Literal["previous", "keyframe"] = (
            "keyframe" if kind == TransportKind.WEBRTC else "previous"
        )
        self._encoder = Encoder(dataclasses.replace(self.codec, references=refs), self.stream_id)
        self._rx().started()
        log.info("joined room %s over %s as %s", self.room, kind.value, self.member_id)
        if self._cfg.fallback is not None:
            self.policy = TransportPolicy(self._cfg, self._command)
            self._policy_task = asyncio.get_running_loop().create_task(
                self._judge_paths(kind), name="posewire-client-policy"
            )

    async def close(self) -> None:
        """Leave the room (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for task in (self._policy_task, *self._switch_tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._sender.close()
        if self._receiver is not None:
            await self._receiver.close()  # only stops its clock: the transport is closed
        self._wake.set()

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ switching

    async def _judge_paths(self, kind: TransportKind) -> None:
        """The policy over the sender's path figures, as the supervisor does for the
        transmit stage; a switch (the policy's, or the sender's own failover on a dead
        path) becomes a :class:`ConnectionEvent`."""
        assert self.policy is not None
        while not self.closed:
            await asyncio.sleep(POLICY_STEP_S)
            self.policy.step(self.name, self._sender.metrics())
            if self._sender.kind != kind:
                old, kind = kind, self._sender.kind
                reason = self._last_switch_reason()
                log.info("switched %s -> %s (%s)", old.value, kind.value, reason)
                self._push(ConnectionEvent(True, kind.value, reason, switched=True))

    def _last_switch_reason(self) -> str:
        at = self._sender.switched_at
        return max(at, key=lambda r: at[r]) if at else "switched"

    def _command(self, stage: str, command: str, args: dict[str, Any]) -> int:
        """The policy's ``switch_transport``, carried out in this loop."""
        assert command == "switch_transport", command
        task = asyncio.get_running_loop().create_task(
            self._switch(TransportKind(args["to"]), str(args["reason"]))
        )
        self._switch_tasks.add(task)
        task.add_done_callback(self._switch_tasks.discard)
        return 1

    async def _switch(self, kind: TransportKind, reason: str) -> None:
        try:
            await self._sender.switch(kind, reason, auto=True)
        except (CommandError, TransportError) as exc:
            log.warning("no switch to %s (%s): %s", kind.value, reason, exc)

    # ------------------------------------------------------------------ state

    @property
    def transport(self) -> str:
        """The transport kind in use (``webrtc`` or ``websocket``)."""
        return self._sender.kind.value

    @property
    def member_id(self) -> str | None:
        t = self._sender.transport
        return t.member_id if isinstance(t, WebSocketTransport) else None

    @property
    def members(self) -> dict[str, Mapping[str, Any]]:
        """The other members of the room by id (their records), kept current by presence."""
        t = self._sender.transport
        if not isinstance(t, WebSocketTransport):
            return {}
        return {k: v for k, v in t.members.items() if k != t.member_id}

    @property
    def error(self) -> BaseException | None:
        """The refusal in force (None while accepted)."""
        ref = self._sender.refused
        return None if ref is None else ref.error

    # ------------------------------------------------------------------ publishing

    def to_frame(self, pose: PoseFrame | Any, capture_ts_ns: int | None = None) -> PoseFrame:
        """``pose`` as the next frame of this stream: this client's sequence number, the
        capture time given (else the frame's, else now); a MediaPipe result (either API)
        is converted; image landmarks are clamped into the codec's range."""
        seq = self._seq
        if isinstance(pose, PoseFrame):
            ts = capture_ts_ns or pose.capture_ts_ns or time.time_ns()
            image, world = pose.image, pose.world
        else:
            ts = capture_ts_ns or time.time_ns()
            f = frame_from_result(pose, seq, ts, world=self.codec.world)
            image, world = f.image, f.world
        view = image.view()
        view.flags.writeable = False  # clamp into a copy: never change the caller's arrays
        image, _ = clamp_image(view)
        return PoseFrame(seq, ts, image, world)

    async def publish(
        self,
        pose: PoseFrame | Any,
        *,
        priority: Priority = "normal",
        capture_ts_ns: int | None = None,
    ) -> bool:
        """Encode and send one pose; True when it was handed to the transport.

        False: not sent (reconnecting, the room closed meanwhile, ``low`` priority
        under the bandwidth cap). Raises :class:`ProtocolError` for a pose the codec
        cannot encode (NaN, not a pose), the final refusal in force, and
        :class:`ClosedResourceError` after :meth:`close` or on a subscribe-only client.
        """
        if priority not in _THROTTLED:
            raise ValueError(f"priority must be one of {', '.join(get_args(Priority))}")
        if self.closed:
            raise ClosedResourceError("this client was closed")
        if not self.publishing or self._encoder is None:
            raise ClosedResourceError("this client does not publish (connect with publish=True)")
        frame = self.to_frame(pose, capture_ts_ns)
        packet = self._encoder.encode(frame, keyframe=priority == "high")
        self._seq += 1
        self._attempts += 1
        ok = await self._sender.send(packet, throttled=_THROTTLED[priority])
        if ok:
            self._publish_latency.append((time.time_ns() - frame.capture_ts_ns) / 1e6)
        return ok

    def _on_feedback(self, message: bytes) -> None:
        enc = self._encoder
        if enc is None:
            return  # before the first frame: it is a keyframe anyway
        try:
            kind, seq = feedback.parse(message)
        except ProtocolError:  # the Sender makes these: cannot happen
            return
        if kind == "ack":
            enc.on_ack(seq)
        else:
            enc.request_keyframe()

    # ------------------------------------------------------------------ receiving

    def _rx(self) -> Receiver:
        """The receiver, on the active transport (made on first use)."""
        t = self._sender.transport
        if not isinstance(t, WebSocketTransport):
            raise TransportError("not connected")
        rx = self._receiver
        if rx is None:
            rx = self._receiver = Receiver(
                self._cfg.urls,
                self.room,
                self._token,
                transport=t,
                transport_kind=self.requested,
                warm=False,
                keep_events=False,
                on_pose=self._on_pose,
                on_item=self._on_item,
            )
        elif rx.transport is not t:  # a switch or a reconnect after a refusal
            rx.transport = t
        return rx

    async def _on_received(self, item: Received) -> None:
        await self._rx().handle(item)

    def _push(self, event: Event) -> None:
        if len(self._events) >= self.max_events:
            self._events.popleft()
            self.events_dropped += 1
        self._events.append(event)
        self._wake.set()

    def _on_pose(self, pose: ReceivedPose) -> None:
        self._push(
            PoseEvent(pose.member_id, pose.stream_id, pose.frame, pose.latency_ms, pose.backfill)
        )

    def _on_item(self, item: Received) -> None:
        if isinstance(item, StateChange):
            self._push(ConnectionEvent(item.connected, self.transport, item.reason, item.code))
        elif isinstance(item, Control) and item.type == "presence":
            member = item.body.get("member")
            kind = item.body.get("event")
            if isinstance(member, Mapping) and kind in ("join", "leave", "update"):
                mid = str(member.get("id"))
                if mid != self.member_id:
                    self._push(PresenceEvent(kind, mid, dict(member)))

    def _poll_refusal(self) -> None:
        """A refusal (or its end) as a connection event, once each."""
        ref = self._sender.refused
        key = None if ref is None else ref.reason
        if key == self._refused_seen:
            return
        self._refused_seen = key
        if ref is None:
            self._push(ConnectionEvent(True, self.transport, "accepted again"))
        else:
            code = getattr(ref.error, "code", None)
            self._push(ConnectionEvent(False, self.transport, ref.reason, code, True, ref.final))

    def poll(self) -> list[Event]:
        """Every event waiting now (never waits)."""
        self._poll_refusal()
        out = list(self._events)
        self._events.clear()
        self._wake.clear()
        return out

    async def events(self) -> AsyncIterator[Event]:
        """Received poses, presence and connection events, in order of arrival. Ends
        after :meth:`close` (once drained) and after a final refusal."""
        while True:
            self._poll_refusal()
            if self._events:
                event = self._events.popleft()
                yield event
                if isinstance(event, ConnectionEvent) and event.final:
                    return
                continue
            if self.closed:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATE_POLL_S):
                    await self._wake.wait()

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, Any]:
        """The original design's figures (docs/client-api.md lists the fields)."""
        s = self._sender
        rx = self._receiver
        streams = list(rx.streams.values()) if rx is not None else []
        received = sum(x.received for x in streams)
        decoded = sum(x.decoded for x in streams)
        lost = sum(x.lost for x in streams)
        live = sum(len(x.latencies_ms) for x in streams)
        undecodable = sum(x.need_keyframe + x.bad_packets for x in streams)
        attempts = self._attempts
        lat = latency_summary(rx.live_latencies() if rx is not None else [])
        pub = latency_summary(list(self._publish_latency))
        mem = self._process.memory_info()
        stats = s.transport.statistics() if s.transport is not None else None

        def rate(n: int, d: int) -> float | None:
            return n / d if d else None

        return {
            "room": self.room,
            "member_id": self.member_id,
            "transport": self.transport,
            "connected": bool(s.transport is not None and s.transport.connected and not s.refused),
            "refused": None if s.refused is None else s.refused.reason,
            "uptime_s": 0.0 if self.connected_at is None else time.monotonic() - self.connected_at,
            "latency_ms": _figures(lat),
            "publish_latency_ms": _figures(pub),
            "cpu_percent": self._process.cpu_percent(None),
            "memory_rss_mb": mem.rss / 2**20,
            "sent": {
                "published": attempts,
                "packets": s.sent,
                "bytes": s.bytes_sent,
                "acked": s.acks,
                "failed": s.failed,
                "refused": s.dropped_refused,
                "throttle_dropped": s.throttle_dropped,
                "skipped_for_keyframe": s.skipped_for_keyframe,
            },
            "received": {
                "packets": received,
                "decoded": decoded,
                "live": live,
                "lost": lost,
                "undecodable": undecodable,
                "keyframe_requests": sum(x.keyframe_requests for x in streams),
            },
            "success_rate": {
                "send": rate(s.sent, attempts),
                "ack": rate(s.acks, s.sent),
                "decode": rate(decoded, received),
            },
            "error_rate": {
                "send": rate(attempts - s.sent, attempts),
                "loss": rate(lost, live + lost),
                "undecodable": rate(undecodable, received),
            },
            "events_dropped": self.events_dropped,
            "clock_offset_ns": None if stats is None else stats.clock_offset_ns,
            "reconnects": 0 if stats is None else stats.reconnects,
            "ack_rtt_ms": None if stats is None else stats.ack_rtt_ms,
            "standby": None
            if s.standby is None or s.standby_kind is None or not s.standby.connected
            else s.standby_kind.value,
            "switches": s.switches,
            "switch_decisions": [] if self.policy is None else list(self.policy.decisions),
        }


def _figures(summary: Mapping[str, float | None]) -> dict[str, float | None]:
    """A latency summary with the original design's names (avg, p95, p99) plus p50, max."""
    return {
        "avg": summary["mean"],
        "p50": summary["p50"],
        "p95": summary["p95"],
        "p99": summary["p99"],
        "max": summary["max"],
    }
