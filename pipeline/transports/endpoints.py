"""Where a room member connects: the server URLs it tries in turn, and TLS.

A member (:class:`~pipeline.transports.websocket.WebSocketTransport`, and so the
WebRTC transport, whose signaling is that WebSocket) is given one server URL or
a list of them (``transmit.servers``, ``--server`` repeated or a comma list), each
``http(s)://HOST:PORT`` or ``ws(s)://HOST:PORT[/ws]``. ``https``/``wss`` URLs
speak TLS: the server's certificate and host name are verified, against the CA
file given (``transmit.ca_file``, ``--ca-file``) or the system's CAs, and a
certificate that fails is :class:`~pipeline.errors.CertificateError`
(``certificate verify failed for HOST: WHY``).

Order and backoff (:class:`Endpoints`), the rule every member follows:

* The first connection tries the URLs from the first one on.
* An attempt that fails in a way a retry may fix (refused, reset, timed out,
  HTTP 502/503/504, a server closing with a retryable code) moves on to the next
  URL at once, round-robin. When a whole round (every URL once) has failed, the
  member waits the backoff delay before the next round: ``reconnect_initial_s``,
  doubled per failed round up to ``reconnect_max_s``, with +-20 % jitter on a
  reconnect. The first connection gives up after ``connect_timeout_s`` in all.
* A lost connection starts the next round at the URL *after* the one that was
  lost (the node is likely dead: a killed process or host), after
  ``reconnect_initial_s``; the member then stays where it got in (no fail-back).
  Each attempt is bounded by ``connect_timeout_s`` (at least 1 s), so an address
  that swallows packets costs that long, not aiohttp's five minutes.
* A certificate that fails verification on one URL moves on like a failure;
  when every URL of a round failed on its certificate the member ends with that
  :class:`~pipeline.errors.CertificateError` (retrying cannot fix it). A refusal
  of the member itself (token refused, kicked, room closed) ends it at once,
  whichever the node.

On the new node the member joins with ``resume`` = its member id; the node gives
the same id back only when its store knows the binding (nodes sharing a Redis
store do), else a fresh one (``welcome.resumed`` false).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from pipeline.errors import BrokenResourceError, CertificateError, TokenError, TransportError
from pipeline.model.tls import SECURE_SCHEMES, certificate_error, client_context

log = logging.getLogger("posewire.transport.websocket")


def ws_url(url: str) -> str:
    """``http(s)://host:port[/ws]`` or ``ws(s)://...`` -> the member WebSocket URL."""
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise TransportError(f"server URL must be http(s):// or ws(s)://host:port, got {url!r}")
    path = parts.path.rstrip("/")
    if not path:
        path = "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def server_urls(urls: str | Sequence[str]) -> list[str]:
    """The member WebSocket URLs of one URL, a comma list, or a sequence of either
    (:class:`TransportError` naming a bad one; an empty list is one too)."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [ws_url(u) for item in items for u in str(item).split(",") if u.strip()]
    if not out:
        raise TransportError("no server URL given")
    return out


class Endpoints:
    """The server URLs of one member, which one is current, and the TLS context
    (the order and backoff rule is in the module docstring)."""

    def __init__(self, urls: str | Sequence[str], ca_file: Path | None = None) -> None:
        self.urls = server_urls(urls)
        self.index = 0
        secure = any(urlsplit(u).scheme in SECURE_SCHEMES for u in self.urls)
        self.ssl: ssl.SSLContext | None = (
            client_context(ca_file, field="ca_file") if secure or ca_file is not None else None
        )
        self._failed = 0  # attempts failed in a row, this round
        self._certificate_failures = 0

    @property
    def current(self) -> str:
        return self.urls[self.index]

    @property
    def host(self) -> str:
        return urlsplit(self.current).hostname or self.current

    def lost(self) -> None:
        """The connection to :attr:`current` was lost: the next round starts after it."""
        self._advance()
        self._failed = self._certificate_failures = 0

    def failed(self, exc: TransportError | TokenError) -> bool:
        """An attempt on :attr:`current` failed with ``exc``: move to the next URL. True
        when that completed a round of failures (then back off). Raises ``exc`` when
        no retry can help: a refusal of the member (:class:`TokenError`,
        :class:`BrokenResourceError`), or a :class:`CertificateError` on every URL of
        the round."""
        if isinstance(exc, (TokenError, BrokenResourceError)) and not isinstance(
            exc, CertificateError
        ):
            raise exc
        if len(self.urls) > 1:
            log.info("cannot join at %s (%s); trying the next server", self.current, exc)
        self._failed += 1
        if isinstance(exc, CertificateError):
            self._certificate_failures += 1
        self._advance()
        if self._failed < len(self.urls):
            return False
        all_certificates = self._certificate_failures == len(self.urls)
        self._failed = self._certificate_failures = 0
        if all_certificates:
            raise exc
        return True

    def joined(self) -> None:
        """Connected and joined on :attr:`current`."""
        self._failed = self._certificate_failures = 0

    def _advance(self) -> None:
        self.index = (self.index + 1) % len(self.urls)

    async def open(
        self, session: aiohttp.ClientSession, *, heartbeat: float, max_msg_size: int
    ) -> aiohttp.ClientWebSocketResponse:
        """The WebSocket to :attr:`current` (no join yet).

        Raises :class:`CertificateError`, :class:`BrokenResourceError` (not a posewire
        server) or a plain :class:`TransportError` when a retry may help. The caller
        bounds the time (``asyncio.timeout``).
        """
        url = self.current
        try:
            return await session.ws_connect(
                url,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                heartbeat=heartbeat,
                max_msg_size=max_msg_size,
                compress=0,
                autoping=True,
                ssl=self.ssl if self.ssl is not None else True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (502, 503, 504):
                raise TransportError(f"HTTP {exc.status} {exc.message}") from exc
            raise BrokenResourceError(
                f"{url} is not a posewire server: HTTP {exc.status}", reason="not_a_server"
            ) from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            cert = certificate_error(self.host, exc)
            raise cert or TransportError(str(exc)) from exc
        except aiohttp.ClientSSLError as exc:  # e.g. wrong version number: a plain server
            why = f"TLS handshake failed: {exc.os_error} (is it an https server?)"
            raise TransportError(f"cannot connect to {exc.host}:{exc.port}: {why}") from exc
        except aiohttp.ClientConnectorError as exc:  # its text shows the SSL context's repr
            reason = exc.os_error.strerror or str(exc.os_error)
            raise TransportError(f"cannot connect to {exc.host}:{exc.port}: {reason}") from exc
        except aiohttp.ServerDisconnectedError as exc:
            hint = " (a TLS server? then use https://)" if self.ssl is None else ""
            why = f"the server closed the connection before answering{hint}"
            raise TransportError(why) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc


__all__ = ["Endpoints", "server_urls", "ws_url"]
