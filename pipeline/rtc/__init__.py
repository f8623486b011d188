"""WebRTC data channels, the part both ends share (room server and client transport).

:class:`~pipeline.rtc.link.PeerLink` is one aiortc ``RTCPeerConnection`` with
the two negotiated data channels of ``docs/webrtc.md`` (``pose``: unordered,
no retransmission; ``control``: reliable, ordered), the application heartbeat
that notices a dead path within a few hundred milliseconds (aiortc's ICE
consent checks take about 30 s), the ``bufferedAmount`` watermark of the
lossy channel, and the checks of what the far side sends (SDP size and shape,
unexpected channels, oversized messages). The server
(:mod:`pipeline.server.rtc`) and the client transport
(:mod:`pipeline.transports.webrtc`) are built on it.
"""

from pipeline.rtc.link import CONTROL_ID, POSE_ID, LinkStats, PeerLink, ice_configuration

__all__ = ["CONTROL_ID", "POSE_ID", "LinkStats", "PeerLink", "ice_configuration"]
