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


class ProtocolError(PosewireError):
    """Bytes that are not a valid posewire packet, or a value the codec cannot encode."""


class UnsupportedVersionError(ProtocolError):
    """A packet of a protocol version this build does not know."""


class RingError(PosewireError):
    """Base of shared-memory ring errors."""


class ClosedResourceError(RingError):
    """You closed this end (or the ring) and then used it (like trio's)."""


class BrokenResourceError(RingError):
    """The other side is gone or the segment vanished (like trio's)."""


class WouldBlock(RingError):
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


class TransportError(PosewireError):
    """A transport failed to connect or broke while sending."""
