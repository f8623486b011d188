"""Client side of a room: the public client API and the reusable members it is built on.

Public API (docs/client-api.md): :class:`~pipeline.client.api.Client` (async: join a
room, publish poses, iterate over events, metrics), its events
(:mod:`pipeline.client.events`) and the blocking
:class:`~pipeline.client.sync.SyncClient` with the original design's method names.

:mod:`~pipeline.client.receiver` (:class:`~pipeline.client.receiver.Receiver`:
join, decode every publisher, report live latency and backfill apart) is the
receiving half the ``receive`` command and the client share.
"""

from pipeline.client.api import Client, Priority
from pipeline.client.events import ConnectionEvent, Event, PoseEvent, PresenceEvent
from pipeline.client.sync import SyncClient
from pipeline.model.pose import PoseFrame

__all__ = [
    "Client",
    "ConnectionEvent",
    "Event",
    "PoseEvent",
    "PoseFrame",
    "PresenceEvent",
    "Priority",
    "SyncClient",
]
