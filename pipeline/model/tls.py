"""TLS contexts of the room server and its clients, and their one-line errors.

The server presents a PEM certificate chain and its key (``server.tls``,
``serve --certfile/--keyfile``): :func:`server_context`. Every client verifies
the server's certificate, against the system's CAs or a CA file of its own
(``transmit.ca_file``, ``--ca-file``): :func:`client_context`. Both speak TLS 1.2
or newer. A user mistake (a file missing, unreadable, not PEM, a key that does
not match its certificate, a key with a passphrase) is a
:class:`~pipeline.errors.ConfigError` naming the field; a certificate the client
cannot verify is :class:`CertificateError` with the message
``certificate verify failed for HOST: WHY``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

from pipeline.errors import CertificateError, ConfigError

#: the oldest protocol version either side accepts
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2
#: URL schemes that use TLS
SECURE_SCHEMES: Final = frozenset({"https", "wss"})


class _Encrypted(Exception):
    """Raised by the password callback: the key file asks for a passphrase."""


def _no_password() -> str:
    raise _Encrypted


def _readable(path: Path, field: str, what: str) -> str | None:
    """A problem reading ``path`` (named ``field``), or None."""
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        return f"{field}: {what} not found: {path}"
    except IsADirectoryError:
        return f"{field}: {what} is a directory: {path}"
    except OSError as exc:
        return f"{field}: cannot read the {what} {path}: {exc.strerror or exc}"
    return None


def _why(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()


#: the names of the two files in the configuration
TLS_FIELDS: Final = ("server.tls.certfile", "server.tls.keyfile")


def server_context(
    certfile: Path, keyfile: Path, *, fields: tuple[str, str] = TLS_FIELDS
) -> ssl.SSLContext:
    """The server's context: ``certfile`` (PEM chain, leaf first) and its ``keyfile``.

    Raises :class:`ConfigError` naming the field (``fields``: the names of the two)
    when a file is missing, unreadable, not PEM, encrypted or the pair does not match.
    """
    cert_field, key_field = fields
    problems = [
        p
        for p in (
            _readable(certfile, cert_field, "certificate file"),
            _readable(keyfile, key_field, "key file"),
        )
        if p is not None
    ]
    if problems:
        raise ConfigError(problems)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(certfile))
    except ssl.SSLError as exc:
        raise ConfigError(
            [f"{cert_field}: not a PEM certificate: {certfile} ({_why(exc)})"]
        ) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile), password=_no_password)
    except _Encrypted:
        raise ConfigError(
            [f"{key_field}: the key is encrypted (a passphrase is not supported): {keyfile}"]
        ) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            message = f"does not match the certificate of {cert_field} ({certfile})"
        else:
            message = "not a PEM private key (unencrypted PKCS#8, PKCS#1 or SEC1)"
        raise ConfigError([f"{key_field}: {keyfile}: {message}"]) from None
    return ctx


def client_context(ca_file: Path | None = None, *, field: str = "ca_file") -> ssl.SSLContext:
    """A client's context: verifies the server's certificate and host name against
    ``ca_file`` (PEM, one or more CA certificates: they replace the system's CAs) or,
    without one, the system's CAs.

    Raises :class:`ConfigError` naming ``field`` when the file cannot be used.
    """
    if ca_file is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        problem = _readable(ca_file, field, "CA file")
        if problem is not None:
            raise ConfigError([problem])
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        except ssl.SSLError as exc:
            raise ConfigError(
                [f"{field}: not a PEM certificate file: {ca_file} ({_why(exc)})"]
            ) from None
    ctx.minimum_version = MINIMUM_VERSION
    return ctx


def certificate_error(host: str, exc: BaseException) -> CertificateError | None:
    """The :class:`CertificateError` when ``exc`` (or what it wraps) is a failed
    certificate verification, else None."""
    seen: BaseException | None = exc
    for _ in range(8):  # a bounded walk down the chain of causes
        if seen is None:
            break
        seen = getattr(seen, "certificate_error", None) or seen  # aiohttp's wrapper
        if isinstance(seen, ssl.SSLCertVerificationError):
            why = seen.verify_message or _why(seen)
            return CertificateError(host, str(why))
        seen = seen.__cause__ or seen.__context__
    return None


__all__ = [
    "MINIMUM_VERSION",
    "SECURE_SCHEMES",
    "certificate_error",
    "client_context",
    "server_context",
]
