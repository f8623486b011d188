"""Two connections of one publisher (a hot standby pair) publish one stream (issue 13).

docs/room-protocol.md: two live connections of one subject that both joined with
``pair: true`` share their streams: the partner publishes into the owner's stream without
taking it over, nobody is closed, and a packet one path already delivered is dropped as
late on the other (also over the WebSocket, where a replay is otherwise ``stale_packet``).
Without ``pair`` the old rule holds (tests/security/test_rooms.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeline.config import TransportKind, parse_config
from pipeline.errors import ConfigError
from tests.security.test_rooms import join_as, rejections, wait_type
from tests.test_server_support import PoseSource, running_server


def test_a_pair_shares_one_stream_and_duplicates_are_late(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(data_dir=tmp_path) as srv:
            rx, _ = await join_as(srv.port, "A", "subscriber", "viewer")
            a, _ = await join_as(srv.port, "A", "publisher", "cam", publish=True, pair=True)
            b, _ = await join_as(srv.port, "A", "publisher", "cam", publish=True, pair=True)
            src = PoseSource(7)
            first, second, third = src.next(), src.next(), src.next()
            a.send_bytes(first)
            await wait_type(a, "ack")
            b.send_bytes(first)  # the same packet on the other path: late, not a replay
            b.send_bytes(second)  # the stream goes on over b
            assert (await wait_type(b, "ack"))["stream_id"] == 7
            a.send_bytes(second)  # and back: a duplicate again
            a.send_bytes(third)
            await wait_type(a, "ack")
            await asyncio.sleep(0.2)
            assert srv.state.metrics.late_packets == 2
            assert rejections(srv, "stream_spoof") == 0
            assert rejections(srv, "stale_packet") == 0
            got: list[bytes] = []
            async with asyncio.timeout(5.0):
                while len(got) < 3:
                    op, payload = await rx.read_frame()
                    if op == 0x2:
                        got.append(payload)
            assert got == [first, second, third]  # each once, in order
            for ws in (rx, a, b):
                ws.close()

    asyncio.run(main())


def test_fallback_is_a_room_transport_other_than_the_primary() -> None:
    cfg = parse_config("transmit: {primary: webrtc, fallback: websocket, hold_s: 2}\n")
    assert cfg.transmit.fallback == TransportKind.WEBSOCKET and cfg.transmit.hold_s == 2
    for bad, needle in (
        ("{primary: webrtc, fallback: webrtc}", "must differ"),
        ("{primary: file, fallback: websocket}", "room transports"),
        ("{primary: webrtc, max_switches_per_min: 0}", "max_switches_per_min"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_config(f"transmit: {bad}\n")
