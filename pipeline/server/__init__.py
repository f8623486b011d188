"""The room server: rooms, tokens, the member WebSocket relay, rooms API and metrics.

Run it with ``python -m pipeline serve`` or embedded under the supervisor
(``server.embedded: true``, stage ``stages/server.py``). Modules:
:mod:`~pipeline.server.app` (application factory, health, ``/metrics``, ``serve``),
:mod:`~pipeline.server.state` (what requests share),
:mod:`~pipeline.server.api` (rooms REST API, dev tokens),
:mod:`~pipeline.server.members` (the member WebSocket protocol),
:mod:`~pipeline.server.rooms` (rooms, members, relay rules, late-join backfill),
:mod:`~pipeline.server.tokens` (token verification, kick list),
:mod:`~pipeline.server.limits` (rate limiter), :mod:`~pipeline.server.metrics`
(counters, Prometheus text). The vocabulary shared with clients (close codes,
messages, token claims) is :mod:`pipeline.wire`.
"""
