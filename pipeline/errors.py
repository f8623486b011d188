"""The typed error vocabulary of posewire.

Few types, each with a precise meaning, so that callers can tell a user's
mistake (report it, exit non-zero, no traceback) from a bug (let it raise).
Wrap lower-level exceptions with ``raise ... from exc``.
"""

from __future__ import annotations


class PosewireError(Exception):
    """Base of every error posewire raises on purpose."""


class ConfigError(PosewireError):
    """The configuration is invalid. ``problems`` lists every bad field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) if self.problems else "invalid configuration")


class SourceError(PosewireError):
    """A video source that cannot exist (no such file/camera, bad scheme, undecodable)."""


class RecordingError(PosewireError):
    """A recording that cannot be read or written, or a request it cannot satisfy (no such
    file, another format, nothing to export). The commands exit 2 on it."""

    exit_code = 2


class ProtocolError(PosewireError):
    """Bytes that are not a valid posewire packet, or a value the codec cannot encode."""


class UnsupportedVersionError(ProtocolError):
    """A packet of a protocol version this build does not know."""


class PacketTooLargeError(ProtocolError):
    """A frame cannot be coded under the packet size limit (the encoder state is unchanged)."""


class JsonInputError(PosewireError):
    """Untrusted JSON refused: not JSON, too deeply nested, or a number out of range."""


class RegistryError(PosewireError):
    """A plugin registered twice, or a key no plugin has."""


class RingError(PosewireError):
    """Base of shared-memory ring errors."""


class TransportError(PosewireError):
    """Base of transport errors; raised itself when a transport cannot connect (yet)."""


# The channel vocabulary (like trio's), shared by rings and transports: each of the
# three is both a RingError and a TransportError, so code that catches the category
# of the channel it uses (``except RingError`` around a ring, ``except TransportError``
# around a transport) catches them, and code that cares about the meaning catches
# the meaning, whichever the channel.


class ClosedResourceError(RingError, TransportError):
    """You closed this end (a ring, a transport) and then used it."""


class BrokenResourceError(RingError, TransportError):
    """The other side is gone or refused us for good: a ring's segment vanished, a
    server closed the connection with a final close code.

    ``code`` and ``reason`` carry the far side's close code and its short reason
    (see :mod:`pipeline.wire.close`) when there is one.
    """

    def __init__(self, message: str, *, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(message)


class CertificateError(BrokenResourceError):
    """The server's TLS certificate failed verification (self-signed and no ``--ca-file``,
    unknown CA, wrong host name, expired): retrying the same server cannot help. ``host``
    is the server's host as its URL names it."""

    def __init__(self, host: str, why: str) -> None:
        self.host = host
        super().__init__(f"certificate verify failed for {host}: {why}", reason="certificate")


class TransportUnavailable(TransportError):
    """A transport that cannot work here at all (retrying cannot help), e.g. WebRTC to a
    server on loopback (aioice offers no loopback candidates); the message says why."""


class WouldBlock(RingError, TransportError):
    """A non-blocking operation found nothing to do."""


class ControlError(PosewireError):
    """A malformed or unexpected control-plane message."""


class CommandError(PosewireError):
    """A control command a stage refuses: a bad argument, or a command it does not handle."""


class SupervisorError(PosewireError):
    """The supervisor cannot start or must stop (run dir, duplicate run id, ...)."""


class TokenError(PosewireError):
    """An access token was refused; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class RefusedError(PosewireError):
    """The room server refuses a member's or a REST client's request.

    ``reason`` is the short machine-readable code (the reason of a close code,
    see :mod:`pipeline.wire.close`), ``code`` the WebSocket close code the
    member is closed with (None for a REST-only refusal), ``status`` the HTTP
    status of the REST API's answer.
    """

    def __init__(
        self, reason: str, message: str, *, code: int | None = None, status: int = 400
    ) -> None:
        self.reason = reason
        self.code = code
        self.status = status
        super().__init__(message)
