"""WebRTC members: the room server as a data-channel SFU (``docs/webrtc.md``).

A member stays anchored on its WebSocket (identity, ``join``, signaling); this
module gives it, on request, one :class:`~pipeline.rtc.link.PeerLink` (an aiortc
peer connection with the ``pose`` and ``control`` channels) per *session*:

* ``rtc_offer`` -> checks (``server.webrtc.enabled``: else a non-closing
  ``webrtc_disabled`` error; ``server.webrtc.max_peers``: ``too_many_peers``),
  the SDP applied, ``rtc_answer`` on the WebSocket. A newer session replaces the
  member's link; a message about an older session is ignored.
* ``rtc_candidate`` -> added to the session's link; ``rtc_close`` -> link dropped.
* When both channels open: ``rtc_state open`` on the WebSocket, then the member's
  output moves to the link (:attr:`Member.link <pipeline.server.rooms.Member.link>`:
  the writer picks the sink per message) and the late-join snapshot of every
  stream is sent again on ``control`` (the member may be re-offering after a
  dead path).
* Input from the channels goes through the member protocol's own handlers
  (:func:`pipeline.server.members.handle_binary` / ``handle_text``, wired in by
  the app: this module does not import the member protocol), through one bounded
  inbox per session (aiortc's callbacks are synchronous); a full inbox closes the
  member with ``rate_limited``. Any violation (bad SDP or candidate, an in-band
  channel, text on ``pose``, an oversized message, a bad packet...) closes the
  member: its WebSocket with the close code, and with it the link.
* Liveness: one task per server (:meth:`RtcHub._ticker`, started with the first
  link) ticks every link every :data:`TICK_S` (heartbeat when idle, dead after
  ``server.webrtc.dead_after_ms``); a dead link is closed, ``rtc_state closed``
  goes on the WebSocket and the member's output goes back to it.

aiortc (~0.5 s to import) is imported at the first offer, not at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from pipeline.config import ServerConfig
from pipeline.errors import ProtocolError, RefusedError
from pipeline.server.metrics import ServerMetrics
from pipeline.server.rooms import Member
from pipeline.wire import messages
from pipeline.wire.close import CloseCode, close_code, refusal

if TYPE_CHECKING:
    from pipeline.rtc.link import PeerLink

log = logging.getLogger("posewire.server")

#: how often the liveness task ticks every link (heartbeat 80 ms, dead after 1 s)
TICK_S: Final = 0.02
#: messages from one member's channels waiting for their handler; past it: rate_limited
INBOX_MAX: Final = 256

BinaryHandler = Callable[[Member, bytes], Awaitable[None]]
TextHandler = Callable[[Member, str], Awaitable[None]]


def violation_code(reason: str) -> CloseCode:
    """The close code of a :class:`PeerLink` violation (its ``on_violation`` reason)."""
    if reason.startswith("unexpected data channel"):
        return CloseCode.BAD_SIGNALING
    if reason.startswith("text message on the pose channel"):
        return CloseCode.BAD_PACKET
    if "message of" in reason:  # "pose-channel message of N bytes", "control-channel ..."
        return CloseCode.MESSAGE_TOO_LARGE
    return CloseCode.BAD_SIGNALING


class RtcSession:
    """One peer connection of one member (a ``session`` number chosen by the client)."""

    def __init__(self, hub: RtcHub, member: Member, session: int) -> None:
        from pipeline.rtc.link import PeerLink  # aiortc: imported at the first offer

        self.hub = hub
        self.member = member
        self.session = session
        self.open = False
        self.ended = False
        self.inbox: deque[str | bytes] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        cfg = hub.config
        self.link: PeerLink = PeerLink(
            cfg.ice_servers,
            cfg.webrtc,
            on_pose=self._push,
            on_control=self._push,
            on_violation=self._violation,
        )

    # aiortc callbacks (synchronous)

    def _push(self, message: str | bytes) -> None:
        if self.ended or self.member.closed:
            return
        if len(self.inbox) >= INBOX_MAX:
            self.ended = True
            self.member.abort(
                CloseCode.RATE_LIMITED,
                f"more than {INBOX_MAX} data-channel messages waiting to be handled",
            )
            return
        self.inbox.append(message)
        self.wake.set()

    def _violation(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.member.abort(violation_code(reason), f"WebRTC session {self.session}: {reason}")

    # the session's task: wait for the channels, then handle what they bring

    async def run(self) -> None:
        hub = self.hub
        member = self.member
        try:
            async with asyncio.timeout(hub.config.webrtc.connect_timeout_s):
                await self.link.opened.wait()
        except TimeoutError:
            await hub.end(self, "the channels did not open in time")
            return
        self.open = True
        hub.metrics.rtc_open += 1
        hub.metrics.rtc_peers += 1
        member.post_ws({"type": "rtc_state", "session": self.session, "state": "open"})
        member.link = self.link
        if member.subscribe:
            member.post_snapshot(member.room.snapshot_for(member))
        hub.start_ticker()
        log.info("member %s: WebRTC session %d open", member.id, self.session)
        await self._consume()

    async def _consume(self) -> None:
        member = self.member
        inbox = self.inbox
        while not self.ended and not member.closed:
            await self.wake.wait()
            self.wake.clear()
            while inbox and not self.ended and not member.closed:
                message = inbox.popleft()
                try:
                    if isinstance(message, bytes):
                        await self.hub.on_binary(member, message)
                    else:
                        await self.hub.on_text(member, message)
                except RefusedError as exc:
                    self.ended = True
                    code = close_code(exc.code or 0) or CloseCode.MALFORMED_MESSAGE
                    member.abort(code, str(exc))
                    return


class RtcHub:
    """Every WebRTC session of one server, the liveness task and the peer limit."""

    def __init__(
        self,
        config: ServerConfig,
        metrics: ServerMetrics,
        *,
        on_binary: BinaryHandler,
        on_text: TextHandler,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.on_binary = on_binary
        self.on_text = on_text
        self.sessions: dict[Member, RtcSession] = {}
        self._ticker_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ signaling

    async def signal(self, member: Member, obj: dict[str, Any]) -> None:
        """One signaling message (validated by :func:`pipeline.wire.messages.parse`)."""
        kind = obj["type"]
        session: int = obj["session"]
        current = self.sessions.get(member)
        if kind == "rtc_offer":
            await self._offer(member, session, obj["sdp"], current)
        elif current is None or session > current.session:
            if kind == "rtc_candidate":
                raise refusal(
                    CloseCode.BAD_SIGNALING, f"rtc_candidate for session {session} before its offer"
                )
        elif session < current.session:
            return  # about an older session: ignored
        elif kind == "rtc_candidate":
            try:
                await current.link.add_candidate(
                    obj["candidate"], obj.get("sdpMid"), obj.get("sdpMLineIndex")
                )
            except ProtocolError as exc:
                raise refusal(CloseCode.BAD_SIGNALING, str(exc)) from exc
        elif kind == "rtc_close":
            await self.end(current, "rtc_close")

    async def _offer(
        self, member: Member, session: int, sdp: object, current: RtcSession | None
    ) -> None:
        self.metrics.rtc_offers += 1
        webrtc = self.config.webrtc
        if not webrtc.enabled:
            member.post_ws(
                messages.error(None, "webrtc_disabled", "this server takes no WebRTC offers")
            )
            return
        if current is not None:
            if session <= current.session:
                return  # an older (or repeated) session: ignored
            await self.end(current, f"replaced by session {session}")
        if len(self.sessions) >= webrtc.max_peers:
            member.post_ws(
                messages.error(
                    None,
                    "too_many_peers",
                    f"server has {webrtc.max_peers} WebRTC peers, the maximum",
                )
            )
            return
        sess = RtcSession(self, member, session)
        self.sessions[member] = sess
        try:
            answer = await sess.link.accept_offer(sdp)
        except ProtocolError as exc:
            await self._drop(sess)
            raise refusal(CloseCode.BAD_SIGNALING, str(exc)) from exc
        if sess.ended or self.sessions.get(member) is not sess:
            return  # the member left (or was closed) while the answer was made
        member.post_ws({"type": "rtc_answer", "session": session, "sdp": answer})
        sess.task = self._spawn(sess.run(), f"posewire-rtc-{member.id}-{session}")

    # ------------------------------------------------------------------ ending

    async def _drop(self, sess: RtcSession) -> bool:
        """Forget and close a session; True if it was still current."""
        member = sess.member
        current = self.sessions.get(member) is sess
        if current:
            del self.sessions[member]
        sess.ended = True
        if member.link is sess.link:
            member.link = None
        if sess.open:
            sess.open = False
            self.metrics.rtc_peers -= 1
        task = sess.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        await sess.link.close()
        return current

    async def end(self, sess: RtcSession, reason: str) -> None:
        """Close a session; the member goes on over its WebSocket (``rtc_state closed``)."""
        if sess.ended and self.sessions.get(sess.member) is not sess:
            return
        await self._drop(sess)
        member = sess.member
        if not member.closed:
            member.post_ws(
                {"type": "rtc_state", "session": sess.session, "state": "closed", "reason": reason}
            )
        log.info("member %s: WebRTC session %d closed: %s", member.id, sess.session, reason)

    async def member_left(self, member: Member) -> None:
        """The member's WebSocket ended: its link goes with it."""
        sess = self.sessions.get(member)
        if sess is not None:
            await self._drop(sess)

    # ------------------------------------------------------------------ liveness

    def start_ticker(self) -> None:
        if self._ticker_task is None or self._ticker_task.done():
            self._ticker_task = asyncio.get_running_loop().create_task(
                self._ticker(), name="posewire-rtc-liveness"
            )

    async def _ticker(self) -> None:
        """Tick every open link (heartbeat, dead path); ends when no session is left."""
        while self.sessions:
            await asyncio.sleep(TICK_S)
            for sess in list(self.sessions.values()):
                if not sess.open or sess.ended:
                    continue
                reason = sess.link.tick()
                if reason is not None:
                    self.metrics.rtc_dead += 1
                    sess.ended = True
                    self._spawn(self.end(sess, f"dead: {reason}"), "posewire-rtc-dead")

    async def shutdown(self) -> None:
        """Close every link (server shutdown)."""
        for sess in list(self.sessions.values()):
            await self.end(sess, "server shutting down")
        if self._ticker_task is not None:
            self._ticker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker_task
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
