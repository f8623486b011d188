"""VMC protocol output (OSC over UDP) and a plain OSC landmark stream.

:class:`VmcSender` turns each received :class:`~pipeline.model.pose.PoseFrame`
into one OSC bundle for a VMC performer receiver (VSeeFace, EVMC4U in Unity,
VMC-compatible tools; they listen on UDP 39539)::

    /VMC/Ext/Root/Pos  "root"  px py pz  qx qy qz qw
    /VMC/Ext/Bone/Pos  <HumanBodyBones name>  px py pz  qx qy qz qw   (one per bone)
    /VMC/Ext/OK        1
    /VMC/Ext/T         <seconds since the sender started>

The rotations are local (relative to the parent bone), Unity's left-handed
convention, solved by :mod:`pipeline.client.skeleton`. With ``landmarks=True``
it also sends ``/posewire/<member>/landmarks`` with 33 x (x, y, z, visibility)
floats (the image landmarks of the first person) for TouchDesigner-style tools.

The ``receive`` command calls ``VmcSender(host, port).send(frame, member)`` per
received frame. UDP sends to a host nobody listens on do not fail; a host name
that does not resolve or a bad port raises :class:`~pipeline.errors.TransportError`
(one clear message) at construction.
"""

from __future__ import annotations

import re
import socket
import time

import numpy as np
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

from pipeline.client.skeleton import BONES, F64, SkeletonSolver
from pipeline.errors import TransportError
from pipeline.model.pose import NUM_LANDMARKS, PoseFrame

VMC_PORT = 39539

__all__ = ["VMC_PORT", "VmcSender", "landmark_address", "parse_target"]


def parse_target(text: str, default_port: int = VMC_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[v6addr]:PORT`` for IPv6) -> (host, port); TransportError if bad."""
    host, port_s = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_s = text.split(":")
    if not host:
        raise TransportError(f"--vmc {text!r}: no host (expected HOST:PORT)")
    if not port_s:
        return host, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise TransportError(f"--vmc {text!r}: port must be a number from 1 to 65535")
    return host, int(port_s)


def landmark_address(member: str | None) -> str:
    """``/posewire/<member>/landmarks``, the member id made a valid OSC address part
    (characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``)."""
    return f"/posewire/{re.sub(r'[^A-Za-z0-9_.-]', '_', member or 'unknown')}/landmarks"


def _message(address: str, args: list[tuple[str | int | float, str]]) -> OscMessageBuilder:
    m = OscMessageBuilder(address)
    for value, tag in args:
        m.add_arg(value, tag)
    return m


class VmcSender:
    """Send VMC bundles (and optionally the landmark stream) to ``host:port`` over UDP.

    ``member``: only this member drives the avatar; ``None``: the first member
    that sends a pose with world landmarks does (one avatar, one performer).
    """

    def __init__(
        self,
        host: str,
        port: int = VMC_PORT,
        *,
        landmarks: bool = False,
        member: str | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise TransportError(f"VMC port {port} is not in 1..65535")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise TransportError(f"VMC host {host!r} cannot be resolved: {exc}") from None
        family, _, _, _, addr = infos[0]
        self.address = addr
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self.landmarks = landmarks
        self.member = member
        self._solvers: dict[str | None, SkeletonSolver] = {}
        self._t0 = time.monotonic()
        self.bundles_sent = 0
        self.send_errors = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> VmcSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, self.address)
        except OSError:  # e.g. ICMP port unreachable reported on a later send: not fatal
            self.send_errors += 1

    def bundle(self, rotations: F64, t: float) -> bytes:
        """The VMC bundle for local rotations ``[len(BONES), 4]`` (x, y, z, w)."""
        b = OscBundleBuilder(IMMEDIATELY)
        zero = [(0.0, "f")] * 3
        b.add_content(
            _message(
                "/VMC/Ext/Root/Pos",
                [("root", "s"), *zero, (0.0, "f"), (0.0, "f"), (0.0, "f"), (1.0, "f")],
            ).build()
        )
        for name, q in zip(BONES, rotations.tolist(), strict=True):
            b.add_content(
                _message(
                    "/VMC/Ext/Bone/Pos", [(name, "s"), *zero, *((float(c), "f") for c in q)]
                ).build()
            )
        b.add_content(_message("/VMC/Ext/OK", [(1, "i")]).build())
        b.add_content(_message("/VMC/Ext/T", [(float(t), "f")]).build())
        return b.build().dgram

    def send(self, frame: PoseFrame, member: str | None = None) -> bool:
        """Send what ``frame`` (from ``member``) gives; True if a VMC bundle went out.

        A frame without a person or without world landmarks sends no bundle (the
        avatar keeps its last pose)."""
        if frame.num_poses == 0:
            return False
        if self.landmarks:
            lm = np.asarray(frame.image[0], np.float32).reshape(NUM_LANDMARKS * 4)
            msg = _message(landmark_address(member), [(float(v), "f") for v in lm.tolist()])
            self._send(msg.build().dgram)
        if frame.world is None:
            return False
        if self.member is None:
            self.member = member
        if member != self.member:
            return False
        solver = self._solvers.setdefault(member, SkeletonSolver())
        rotations = solver.solve(frame.world[0], frame.image[0, :, 3])
        self._send(self.bundle(rotations, time.monotonic() - self._t0))
        self.bundles_sent += 1
        return True
