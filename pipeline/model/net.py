"""Network address helpers shared by the server, the monitor and the clients."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import termios


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and for loopback addresses (IPv4, IPv6, IPv4-mapped IPv6).

    ``host`` may carry IPv6 brackets (``[::1]``) or a zone (``fe80::1%eth0``); a
    name other than ``localhost`` is not loopback (no DNS lookup is made).
    """
    h = host.strip()
    if h.lower() == "localhost":
        return True
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.partition("%")[0]
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def unsent_bytes(sock: socket.socket | None) -> int:
    """Bytes written to a TCP socket but not yet sent (``TIOCOUTQ``); 0 when unknown."""
    if sock is None:
        return 0
    try:
        buf = bytearray(4)
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        return int.from_bytes(buf, "little")
    except (OSError, ValueError):
        return 0
