"""The room server: rooms, tokens, the member WebSocket relay, rooms API and metrics.

Run it with ``python -m pipeline serve`` or embedded under the supervisor
(``server.embedded: true``, stage ``stages/server.py``). Modules:
:mod:`~pipeline.server.app` (aiohttp application, wire messages, ``serve``),
:mod:`~pipeline.server.rooms` (rooms, members, relay rules),
:mod:`~pipeline.server.tokens` (JWT), :mod:`~pipeline.server.limits` (close
codes, rate limiter), :mod:`~pipeline.server.metrics` (Prometheus text).
"""
