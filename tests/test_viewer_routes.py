"""The viewer's HTTP routes (pipeline/server/viewer.py), without a browser: what is served,
with which headers, and what is refused."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.test_server_support import member, running_server


def test_viewer_routes_pages_static_files_and_refusals() -> None:
    async def main() -> None:
        async with running_server(dev=True) as srv, aiohttp.ClientSession() as http:
            pub = member(srv, "lobby-1", publish=True)
            await pub.connect()
            async with http.get(f"{srv.url}/") as r:
                assert r.status == 200 and r.content_type == "text/html"
                assert "default-src 'none'" in r.headers["Content-Security-Policy"]
                assert '<a href="/room/lobby-1">lobby-1</a>' in await r.text()
            async with http.get(f"{srv.url}/room/lobby-1") as r:
                page = await r.text()
                assert r.status == 200
                assert 'data-room="lobby-1" data-dev="1"' in page
                assert '<script type="module" src="/static/room.js">' in page
            for name in ("decoder.js", "transport.js", "viewer.js", "audio.js", "room.js"):
                async with http.get(f"{srv.url}/static/{name}") as r:
                    assert r.status == 200 and r.content_type == "text/javascript", name
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
            for path in ("/static/nope.js", "/static/room.html", "/static/..%2Fviewer.py",
                         "/room/no%20such%20room", "/room/%3Cscript%3E"):  # fmt: skip
                async with http.get(f"{srv.url}{path}") as r:
                    assert r.status == 404, path
                    assert "<script>" not in await r.text()
            await pub.close()
        async with running_server() as srv, aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/") as r:  # no dev mode: no room list
                assert "for moderators" in await r.text()
            async with http.get(f"{srv.url}/room/x") as r:
                assert 'data-dev="0"' in await r.text()

    asyncio.run(main())
