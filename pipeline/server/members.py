"""The member WebSocket (``GET /ws[?room=R]``): join, then packets and control messages.

The token travels in the first message (browsers cannot set headers on a
WebSocket; a query string would end up in access logs); an
``Authorization: Bearer`` header on the upgrade request is accepted too.
The messages are those of :mod:`pipeline.wire.messages` (described in
``docs/room-protocol.md``): a member sends ``join`` first and once, then
``ping``, ``clock``, ``keyframe_request``, ``ack`` (accepted and ignored: the
server is the acknowledging party), ``broadcast``, ``kick``, ``leave``.

Binary messages are pose packets (:mod:`pipeline.codec`) and audio packets
(:mod:`pipeline.codec.audio`, first byte ``0xA1``: relayed lossy, never stored,
``publish_audio`` needed) in both directions: the server validates each header
(``peek_header``, ``parse_audio``) and relays the bytes unchanged; the stream id in
the header identifies the publisher (``streams`` in its member record). The relay rules are in
:mod:`pipeline.server.rooms`.

Checks, all before anything acts on a message: a text message is at most
:data:`~pipeline.wire.messages.MAX_CONTROL_CHARS` characters and goes through
:func:`pipeline.wire.messages.parse` (nesting depth, finite numbers, every
field's type and range: the one validation, shared with the clients);
``broadcast`` needs the ``moderate`` permission (as the REST route does),
carries at most ``MAX_BROADCAST_BYTES`` of data and at most
:data:`~pipeline.server.rooms.BROADCASTS_PER_S` per second; a packet's sequence
number must be after its stream's last one (``stale_packet``); a stream id and a
member id (``resume``) belong to the token's subject (:meth:`Room.claim
<pipeline.server.rooms.Room.claim>`, :meth:`RoomManager.new_member_id
<pipeline.server.rooms.RoomManager.new_member_id>`).

Every violation closes that connection with a close code of
:mod:`pipeline.wire.close`: it is raised as a
:class:`~pipeline.errors.RefusedError` carrying the code, and the handler
sends the ``error`` message and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from pipeline.codec import peek_header
from pipeline.codec.audio import is_audio, parse_audio
from pipeline.errors import ProtocolError, RefusedError, TokenError
from pipeline.server.limits import RateLimiter
from pipeline.server.rooms import BROADCASTS_PER_S, Member, close_ws
from pipeline.server.state import STATE, ServerState, bearer
from pipeline.server.streams import StoredPacket, StreamState
from pipeline.wire import messages
from pipeline.wire.close import (
    MAX_STREAMS_PER_MEMBER,
    TOKEN_CLOSE_CODES,
    CloseCode,
    close_code,
    refusal,
)
from pipeline.wire.tokens import MODERATE, PUBLISH_AUDIO, PUBLISH_POSE, SUBSCRIBE

log = logging.getLogger("posewire.server")

CLOSE_TIMEOUT_S = 2.0
WEBSOCKET = "websocket"
WEBRTC = "webrtc"
#: the signaling messages (``docs/webrtc.md``): on the WebSocket only, after join
SIGNALING = frozenset({"rtc_offer", "rtc_candidate", "rtc_close"})
#: a WebRTC member's keyframe repairs, at most one per stream this often
REPAIR_INTERVAL_S = 0.1
#: a NACK repair of one packet to one member at most this often (the member asks again
#: while the packet is missing: the copy on the lossy channel may be lost too)
NACK_INTERVAL_S = 0.05
MAX_NACKS_KEPT = 64


class MemberSocket(web.WebSocketResponse):
    """A WebSocketResponse that closes oversized messages with 4009 instead of 1009."""

    too_large = False
    max_message_bytes = 0

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            self.too_large = True
            cc = CloseCode.MESSAGE_TOO_LARGE
            code = cc
            message = cc.reason.encode()
            error = messages.error(
                cc, cc.reason, f"message larger than {self.max_message_bytes} bytes"
            )
            with contextlib.suppress(ConnectionError):
                await self.send_str(messages.dumps(error))
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                return await super().close(code=code, message=message, drain=drain)
        except TimeoutError:
            return True


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws", ws_handler)


def repair_keyframe(
    state: ServerState, member: Member, stream_id: int, ref_seq: int | None = None
) -> None:
    """A ``keyframe_request`` from a member on an open WebRTC link.

    With ``ref_seq`` (the missing reference of the packet that did not decode) and that
    packet in the stream's history, the packet is sent again on the lossy channel (a
    NACK repair: an anchor delayed by the reliable channel's retransmission, or lost;
    at most every :data:`NACK_INTERVAL_S` per member and packet). Otherwise: keyframes
    and the packets later ones predict from travel on the reliable channel, so a member
    that was sent the stream's latest keyframe will have it: the request came from a
    delta that overtook it on the lossy channel, and is ignored (counted). Otherwise the
    stored keyframe and its chained history are re-sent on ``control`` (a
    ``backfill``), at most every :data:`REPAIR_INTERVAL_S` per stream; the publisher is
    asked only when nothing is stored (or over the WebSocket)."""
    room = member.room
    stream = room.streams.get(stream_id) or room.remote.get(stream_id)  # remote: a cluster
    if not member.on_link or stream is None or stream.owner is member or stream.keyframe is None:
        room.request_keyframe(stream_id)
        return
    now = time.monotonic()
    if ref_seq is not None and (pkt := stream.stored(ref_seq)) is not None:
        key = (stream_id, ref_seq)
        if not _nack_due(member, key, now):
            return
        if member.repair(pkt):
            state.metrics.nack_repairs += 1
            return
    if stream.anchored and member.holds_keyframe(stream.keyframe):
        # it went on the reliable channel: the delta that asked raced ahead of it
        state.metrics.keyframe_repairs_skipped += 1
        return
    if now - member.repaired.get(stream_id, -1e9) < REPAIR_INTERVAL_S:
        return
    member.repaired[stream_id] = now
    state.metrics.keyframe_repairs += 1
    member.post_snapshot(stream.snapshot())


def _nack_due(member: Member, key: tuple[int, int], now: float) -> bool:
    """Whether packet ``key`` (stream, seq) may be asked for or repaired again for
    ``member`` (at most every :data:`NACK_INTERVAL_S`); records it when so."""
    if now - member.nacked.get(key, -1e9) < NACK_INTERVAL_S:
        return False
    member.nacked[key] = now
    while len(member.nacked) > MAX_NACKS_KEPT:
        del member.nacked[next(iter(member.nacked))]
    return True


def _nack_publisher(state: ServerState, member: Member, stream_id: int, seq: int | None) -> None:
    """Ask a WebRTC publisher for packet ``seq`` again (a delta that predicts from it came
    first), at most every :data:`NACK_INTERVAL_S` per packet."""
    if seq is None:
        return
    now = time.monotonic()
    if not _nack_due(member, (stream_id, seq), now):
        return
    state.metrics.nacks_sent += 1
    member.post_text(messages.nack(stream_id, seq))


async def _reject(state: ServerState, ws: web.WebSocketResponse, code: int, message: str) -> None:
    cc = close_code(code)
    reason = cc.reason if cc is not None else str(code)
    state.metrics.reject(reason)
    log.info("closing connection: %s (%d): %s", reason, code, message)
    await close_ws(ws, code, message)


async def ws_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    cfg = state.config
    if not state.ready or (state.cluster is not None and not state.cluster.loaded):
        return web.json_response(
            {"error": "not_ready", "message": "server is not accepting members"}, status=503
        )
    ws = MemberSocket(
        max_msg_size=cfg.max_message_bytes + 1,
        heartbeat=cfg.heartbeat_s,
        compress=False,
        timeout=CLOSE_TIMEOUT_S,
    )
    ws.max_message_bytes = cfg.max_message_bytes
    await ws.prepare(request)
    manager = state.manager
    manager.connections += 1
    state.metrics.connections_total += 1
    try:
        if manager.connections > cfg.max_connections:
            await _reject(
                state,
                ws,
                CloseCode.TOO_MANY_CONNECTIONS,
                f"server has {cfg.max_connections} connections, the maximum",
            )
            return ws
        limiter = RateLimiter(cfg.max_messages_per_s)
        member = await _join(state, ws, request, limiter)
        if member is None:
            return ws
        try:
            await _member_loop(state, member)
        except RefusedError as exc:
            await _reject(state, ws, exc.code or CloseCode.MALFORMED_MESSAGE, str(exc))
        finally:
            member.room.remove(member)
            await state.rtc.member_left(member)
            await member.stop_writer()
            if not ws.closed:
                await close_ws(ws, 1000)
    finally:
        manager.connections -= 1
    return ws


async def _join(
    state: ServerState, ws: MemberSocket, request: web.Request, limiter: RateLimiter
) -> Member | None:
    cfg = state.config
    try:
        async with asyncio.timeout(cfg.auth_timeout_s):
            msg = await ws.receive()
    except TimeoutError:
        await _reject(
            state, ws, CloseCode.AUTH_TIMEOUT, f"no join message within {cfg.auth_timeout_s}s"
        )
        return None
    size = len(msg.data) if isinstance(msg.data, (str, bytes)) else 0
    state.metrics.count_in(WEBSOCKET, size)
    limiter.allow()
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
        return None
    if msg.type == WSMsgType.ERROR:
        if ws.too_large:
            state.metrics.reject(CloseCode.MESSAGE_TOO_LARGE.reason)
        return None
    try:
        if msg.type != WSMsgType.TEXT:
            raise refusal(CloseCode.NOT_JOINED, "the first message must be a join (JSON text)")
        obj = messages.parse(msg.data, max_chars=messages.MAX_CONTROL_CHARS)
        if obj["type"] in SIGNALING:
            raise refusal(CloseCode.BAD_SIGNALING, f"{obj['type']!r} before join")
        if obj["type"] != "join":
            raise refusal(CloseCode.NOT_JOINED, f"{obj['type']!r} before join")
        join = messages.Join.parse(obj)
        token = join.token if join.token is not None else bearer(request)
        if token is None:
            raise refusal(CloseCode.TOKEN_MALFORMED, "join: no token (field 'token')")
        q_room = request.query.get("room")
        room_name = join.room if "room" in obj else q_room
        if room_name is None:
            raise refusal(CloseCode.MALFORMED_MESSAGE, "join: 'room' must be a string")
        if q_room is not None and q_room != room_name:
            raise refusal(CloseCode.MALFORMED_MESSAGE, "join: room differs from ?room=")
        required = ([PUBLISH_POSE] if join.publish else []) + (
            [SUBSCRIBE] if join.subscribe else []
        )
        try:
            claims = state.verifier.verify(token, room=room_name, require=required)
        except TokenError as exc:
            raise refusal(TOKEN_CLOSE_CODES[exc.reason], str(exc)) from exc
        room = state.manager.room_for_join(room_name)
        if state.cluster is not None:
            await state.cluster.synced(room, subscriber=join.subscribe)
    except RefusedError as exc:
        await _reject(state, ws, exc.code or CloseCode.MALFORMED_MESSAGE, str(exc))
        return None
    member_id, resumed = state.manager.new_member_id(room, join.resume, claims)
    transport = request.transport
    member = Member(
        state.manager,
        room,
        ws,
        transport if isinstance(transport, asyncio.Transport) else None,
        claims,
        member_id=member_id,
        publish=join.publish,
        subscribe=join.subscribe,
        name=join.name,
        limiter=limiter,
        pair=join.pair,
    )
    member.post(
        {
            "type": "welcome",
            "member_id": member_id,
            "room": room.name,
            "resumed": resumed,
            "role": claims.role,
            "perms": sorted(claims.perms),
            "members": room.member_infos(),
            "server_time_ns": time.time_ns(),
            "limits": {
                "max_message_bytes": cfg.max_message_bytes,
                "max_messages_per_s": cfg.max_messages_per_s,
                "subscriber_queue": cfg.subscriber_queue,
            },
            "webrtc": {"enabled": cfg.webrtc.enabled},
        }
    )
    if join.subscribe:
        member.post_snapshot(room.snapshot_for(member))
    room.add(member)
    log.info(
        "member %s (%s, %s) joined room %s%s",
        member_id,
        claims.subject,
        claims.role,
        room.name,
        " (resumed)" if resumed else "",
    )
    return member


async def _member_loop(state: ServerState, member: Member) -> None:
    ws = member.ws
    assert isinstance(ws, MemberSocket)
    while True:
        msg = await ws.receive()
        kind = msg.type
        if kind == WSMsgType.BINARY:
            await handle_binary(state, member, msg.data, WEBSOCKET)
        elif kind == WSMsgType.TEXT:
            await handle_text(state, member, msg.data, time.time_ns(), WEBSOCKET)
        elif kind == WSMsgType.ERROR:
            if ws.too_large:
                state.metrics.reject(CloseCode.MESSAGE_TOO_LARGE.reason)
            return
        else:  # CLOSE, CLOSING, CLOSED; PING/PONG are handled by aiohttp
            return
        if member.closed:
            return


def count_in(state: ServerState, member: Member, size: int, transport: str) -> None:
    """Count one message from ``member`` and take it from its rate limit (WebSocket and
    data channels share one limiter); :class:`RefusedError` ``rate_limited`` past it."""
    state.metrics.count_in(transport, size)
    if not member.limiter.allow():
        raise refusal(
            CloseCode.RATE_LIMITED,
            f"more than {state.config.max_messages_per_s:g} messages per second",
        )


async def handle_binary(
    state: ServerState, member: Member, data: bytes, transport: str, *, counted: bool = False
) -> None:
    """One binary message (a pose packet) from ``member``, over the WebSocket or a data
    channel (``transport``: ``websocket``, ``webrtc``); ``counted``: already taken from
    the rate limit. Violations raise :class:`RefusedError`."""
    if not counted:
        count_in(state, member, len(data), transport)
    await _on_packet(state, member, data, ordered=transport == WEBSOCKET)


async def handle_text(
    state: ServerState,
    member: Member,
    text: str,
    t_recv: int,
    transport: str,
    *,
    counted: bool = False,
) -> None:
    """One JSON text message from ``member`` (WebSocket or the ``control`` channel)."""
    if not counted:
        count_in(state, member, len(text), transport)
    obj = messages.parse(text, max_chars=messages.MAX_CONTROL_CHARS)
    if transport != WEBSOCKET and obj["type"] in SIGNALING:
        raise refusal(CloseCode.BAD_SIGNALING, f"{obj['type']!r} belongs on the WebSocket")
    await _on_control(state, member, obj, t_recv)


def _own_stream(member: Member, stream_id: int) -> StreamState[Member]:
    """The stream ``stream_id`` of ``member`` (its own, its hot-standby partner's, or newly
    claimed); :class:`RefusedError` when it may not publish on it."""
    room = member.room
    stream = room.streams.get(stream_id)
    if stream is not None and stream.owner is not member and room.paired(stream.owner, member):
        stream.shared = True  # the hot-standby partner of its owner: one stream, no takeover
    elif stream is None or stream.owner is not member:
        if len(member.streams) >= MAX_STREAMS_PER_MEMBER:
            raise refusal(
                CloseCode.TOO_MANY_STREAMS, f"at most {MAX_STREAMS_PER_MEMBER} streams per member"
            )
        member.publish = True
        stream = room.claim(member, stream_id)
    return stream


async def _on_audio(state: ServerState, member: Member, data: bytes) -> None:
    """An audio packet: checked, then relayed like a lossy delta; never stored (a late
    joiner gets pose history, audio only from now on)."""
    t_recv = time.monotonic_ns()
    try:
        a = parse_audio(data)
    except ProtocolError as exc:
        state.metrics.audio_bad_packets += 1
        raise refusal(CloseCode.BAD_PACKET, f"not an audio packet: {exc}") from exc
    if PUBLISH_AUDIO not in member.claims.perms:
        raise refusal(CloseCode.TOKEN_MISSING_PERMISSION, "publishing audio needs 'publish_audio'")
    stream = _own_stream(member, a.stream_id)
    if a.seq <= stream.audio_last_seq:  # late, or sent again after a switch: dropped
        state.metrics.audio_late_packets += 1
        return
    stream.audio_last_seq = a.seq
    state.metrics.audio_packets_in += 1
    pkt = StoredPacket(a.stream_id, a.seq, None, False, data, 0, t_recv, lossy=True, audio=True)
    await member.room.relay(member, pkt)


async def _on_packet(state: ServerState, member: Member, data: bytes, *, ordered: bool) -> None:
    if is_audio(data):
        await _on_audio(state, member, data)
        return
    t_recv = time.monotonic_ns()
    try:
        h = peek_header(data)
    except ProtocolError as exc:
        raise refusal(CloseCode.BAD_PACKET, f"not a pose packet: {exc}") from exc
    if PUBLISH_POSE not in member.claims.perms:
        raise refusal(CloseCode.TOKEN_MISSING_PERMISSION, "publishing needs 'publish_pose'")
    room = member.room
    stream = _own_stream(member, h.stream_id)
    if ordered and not stream.shared:
        why = stream.stale(h.seq, h.epoch, h.keyframe, time.monotonic())
        if why is not None:
            raise refusal(CloseCode.STALE_PACKET, f"stream {h.stream_id}: {why}")
    elif stream.unordered(h.seq, h.epoch, h.keyframe, time.monotonic()) is not None:
        state.metrics.late_packets += 1
        return
    pkt = StoredPacket(h.stream_id, h.seq, h.ref_seq, h.keyframe, data, h.epoch, t_recv)
    if not ordered:
        stream.presume_anchored()  # a WebRTC publisher: keyframe references (docs/webrtc.md)
    if not ordered and stream.lacks(h.ref_seq):
        pkt.early = True
        _nack_publisher(state, member, h.stream_id, h.ref_seq)
    stream.add(pkt)
    state.metrics.packets_in += 1
    member.post_text(messages.ack(h.stream_id, h.seq))
    if stream.keyframe is None:
        room.request_keyframe(h.stream_id)
    await room.relay(member, pkt)


async def _on_control(state: ServerState, member: Member, obj: dict[str, Any], t_recv: int) -> None:
    kind = obj["type"]
    room = member.room
    if kind == "ping":
        member.post(
            {"type": "pong", "id": obj.get("id"), "t0": obj.get("t0"), "t1": t_recv,
             "t2": time.time_ns()}
        )  # fmt: skip
    elif kind == "clock":
        member.clock_offset_ns = obj["offset_ns"]  # in range: messages.validate
        room.broadcast(
            {"type": "presence", "event": "update", "member": member.info()}, exclude=member
        )
    elif kind == "keyframe_request":
        repair_keyframe(state, member, obj["stream_id"], obj.get("ref_seq"))
    elif kind in SIGNALING:
        await state.rtc.signal(member, obj)
    elif kind == "hb":
        pass  # liveness of the data channels; the link notes every arrival
    elif kind == "ack":
        pass  # the server is the acknowledging party over WebSocket (see pipeline.server.rooms)
    elif kind == "broadcast":
        if MODERATE not in member.claims.perms:
            raise refusal(
                CloseCode.TOKEN_MISSING_PERMISSION, "broadcasting needs the 'moderate' permission"
            )
        if not member.broadcasts.allow():
            raise refusal(
                CloseCode.RATE_LIMITED,
                f"more than {BROADCASTS_PER_S:g} broadcasts per second",
            )
        room.broadcast(
            {"type": "broadcast", "from": member.id, "data": obj.get("data")}, exclude=member
        )
    elif kind == "kick":
        target = obj["member"]
        if MODERATE not in member.claims.perms:
            member.post(
                messages.error(
                    None, "missing_permission", "kicking needs the 'moderate' permission"
                )
            )
        elif state.manager.kick(room, target, member.claims.subject):
            member.post({"type": "kicked", "member": target})
        else:
            member.post(messages.error(None, "member_not_found", f"no member {target!r}"))
    elif kind == "leave":
        member.closed = True
    elif kind == "join":
        raise refusal(CloseCode.NOT_JOINED, "already joined")
