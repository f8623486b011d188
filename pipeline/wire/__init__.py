"""The room vocabulary client and server share: close codes, member messages, tokens.

:mod:`~pipeline.wire.close` (close codes and their meaning),
:mod:`~pipeline.wire.messages` (member WebSocket message types, their fields
and validation), :mod:`~pipeline.wire.tokens` (token claims, roles,
permissions, minting). Neither side imports the other: the server
(:mod:`pipeline.server`) and the clients (:mod:`pipeline.transports`,
:mod:`pipeline.client`) both build on this package. The protocol is
described in ``docs/room-protocol.md``.
"""
