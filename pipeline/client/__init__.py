"""Client side of a room: the reusable members built on the transports.

:mod:`~pipeline.client.receiver` (:class:`~pipeline.client.receiver.Receiver`:
join, decode every publisher, report live latency and backfill apart).
"""
