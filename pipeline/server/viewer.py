"""The browser viewer's routes: ``/`` (rooms), ``/room/{name}`` (the viewer), ``/static/...``.

The pages and their ES modules live in ``pipeline/server/static/`` (package data, no
build step, nothing from the internet). ``/room/{name}`` is ``room.html`` with the room
name and whether this server mints dev tokens written into ``<body data-...>``: on a
``--dev`` (loopback) server the page asks ``POST /api/dev/token`` for a subscriber token
itself; otherwise the token comes from ``?token=`` or a field in the page. ``/`` lists the
open rooms on a dev server only (elsewhere the room names are a moderator's business,
``GET /api/rooms``) and offers a form for a room name and a token. docs/viewer.md has
the details.

Every answer carries a Content-Security-Policy allowing only this origin (scripts,
styles, connections), so the page runs no inline or foreign code.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Final

from aiohttp import web

from pipeline.server.state import STATE
from pipeline.wire import messages

#: content types of the files in static/ (anything else there is not served)
CONTENT_TYPES: Final = {
    ".js": "text/javascript",
    ".html": "text/html",
    ".css": "text/css",
    ".png": "image/png",
}
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


StaticFiles = dict[str, tuple[bytes, str]]
"""file name -> (bytes, content type)"""


def load_static() -> StaticFiles:
    """Every servable file of ``static/``: name -> (bytes, content type)."""
    files: StaticFiles = {}
    for entry in resources.files("pipeline.server").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        ctype = CONTENT_TYPES.get(suffix)
        if ctype is not None and entry.is_file():
            files[entry.name] = (entry.read_bytes(), ctype)
    return files


BAD_ROOM: Final = (
    "not a room name: room names are 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit\n"
)
STATIC: Final = web.AppKey("posewire_viewer_static", StaticFiles)


def add_routes(app: web.Application) -> None:
    app[STATIC] = load_static()
    app.router.add_get("/", index)
    app.router.add_get("/room/{name}", room_page)
    app.router.add_get("/static/{file}", static_file)


def _files(request: web.Request) -> StaticFiles:
    return request.app[STATIC]


def _page(request: web.Request, name: str, fields: dict[str, str]) -> web.Response:
    body, ctype = _files(request)[name]
    text = body.decode()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
    return web.Response(text=text, content_type=ctype, charset="utf-8", headers=HEADERS)


async def index(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.dev:
        rooms = sorted(state.manager.rooms.items())
        items = "".join(
            f'<li><a href="/room/{html.escape(n)}">{html.escape(n)}</a> '
            f"({len(r.members)} members, {len(r.streams)} streams)</li>"
            for n, r in rooms
            if not r.closed
        )
        listing = f"<ul id='rooms'>{items}</ul>" if items else "<p id='rooms'>no open room</p>"
    else:
        listing = "<p id='rooms'>the room list is for moderators (GET /api/rooms)</p>"
    body, ctype = _files(request)["index.html"]
    text = body.decode().replace("{{ROOMS}}", listing)
    return web.Response(text=text, content_type=ctype, charset="utf-8", headers=HEADERS)


async def room_page(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not messages.valid_room_name(name):
        return web.Response(status=404, text=BAD_ROOM, headers=HEADERS)
    dev = "1" if request.app[STATE].dev else "0"
    return _page(request, "room.html", {"ROOM": name, "DEV": dev})


async def static_file(request: web.Request) -> web.Response:
    found = _files(request).get(request.match_info["file"])
    if found is None or found[1] == "text/html":
        return web.Response(status=404, text="not found\n", headers=HEADERS)
    body, ctype = found
    return web.Response(body=body, content_type=ctype, headers=HEADERS)


__all__ = ["add_routes"]
