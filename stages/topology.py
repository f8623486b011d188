"""The pose pipeline's topology: THE declaration of its stages and rings.

::

    capture ──frames (latest-wins)──► detect ──poses (queue)──► encode ──packets (queue)──► transmit
                                                                  ▲                            │
                                                                  └──── feedback (queue) ◄──────┘
    audio ──audio (queue)──► transmit         (audio.enabled: a second head, same sink)
    server (when server.embedded; beside the data path)

A source of poses (``cfg.source.produces == "poses"``, the trace replay) needs
no detector: capture writes pose records straight into the ``poses`` ring and
there is no ``frames`` ring and no detect stage.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.runtime.topology import Count, Latency, RingDecl, StageDecl, Topology

#: the frame figures of the run report, in order
FRAME_KINDS = ("captured", "detected", "skipped", "encoded", "sent", "dropped")

#: feedback ring transmit -> encode (acks, keyframe requests): small messages
FEEDBACK_SLOT_BYTES = 256
FEEDBACK_SLOTS = 64
#: audio ring audio -> transmit: 25 Opus packets, half a second (oldest dropped when full)
AUDIO_SLOTS = 25


def pose_topology(cfg: Config) -> Topology:
    """The stages and rings ``cfg`` runs."""
    from pipeline.codec import MAX_PACKET_BYTES
    from pipeline.model.frame import frame_slot_size
    from pipeline.model.pose import pose_record_size

    r = cfg.rings
    pose_source = cfg.source.produces == "poses"
    rings = [
        RingDecl("poses", "queue", r.poses.slots, pose_record_size()),
        RingDecl("packets", "queue", r.packets.slots, MAX_PACKET_BYTES),
        RingDecl("feedback", "queue", FEEDBACK_SLOTS, FEEDBACK_SLOT_BYTES),
    ]
    stages: list[StageDecl] = []
    if pose_source:
        stages.append(
            StageDecl(
                "capture",
                "stages.capture",
                outputs=("poses",),
                head=True,
                output_metric="frames_captured_total",
                counts=(
                    Count("captured", ring="poses"),
                    Count("detected", ring="poses"),
                    Count("dropped", ring="poses", field="dropped"),
                ),
            )
        )
    else:
        rings.insert(
            0,
            RingDecl(
                "frames",
                "latest",
                r.frames.slots,
                frame_slot_size(r.max_frame_width, r.max_frame_height),
            ),
        )
        stages.append(
            StageDecl(
                "capture",
                "stages.capture",
                outputs=("frames",),
                head=True,
                output_metric="frames_captured_total",
                counts=(Count("captured", ring="frames"),),
            )
        )
        stages.append(
            StageDecl(
                "detect",
                "stages.detect",
                inputs=("frames",),
                outputs=("poses",),
                output_metric="frames_detected_total",
                counts=(
                    Count("detected", ring="poses"),
                    Count("skipped", ring="frames", field="skipped"),
                    Count("dropped", ring="poses", field="dropped"),
                ),
                latency=(
                    Latency("capture_to_detect", "capture_to_detect_ms", quantiles=False),
                    Latency("detect", "detect_ms"),
                ),
            )
        )
    stages.append(
        StageDecl(
            "encode",
            "stages.encode",
            inputs=("poses", "feedback"),
            outputs=("packets",),
            output_metric="packets_encoded_total",
            counts=(
                Count("encoded", ring="packets"),
                Count("dropped", ring="packets", field="dropped"),
            ),
            latency=(Latency("encode", "encode_us", scale_to_ms=0.001),),
        )
    )
    audio = cfg.audio.enabled
    if audio:
        rings.append(RingDecl("audio", "queue", AUDIO_SLOTS, MAX_PACKET_BYTES))
        stages.append(
            StageDecl(
                "audio",
                "stages.audio",
                outputs=("audio",),
                head=True,
                output_metric="audio_packets_encoded_total",
                latency=(Latency("audio_encode", "audio_encode_us", scale_to_ms=0.001),),
            )
        )
    stages.append(
        StageDecl(
            "transmit",
            "stages.transmit",
            inputs=("packets", "audio") if audio else ("packets",),
            outputs=("feedback",),
            feedback=("feedback",),
            output_metric="packets_sent_total",
            counts=(
                Count("sent", metric="packets_sent_total"),
                Count("dropped", metric="packets_dropped_total"),
            ),
            latency=(Latency("capture_to_send", "latency_ms", end_to_end=True),),
            egress=True,
        )
    )
    if cfg.server.embedded:
        stages.append(StageDecl("server", "stages.server", on_data_path=False))
    return Topology(tuple(stages), tuple(rings), frame_kinds=FRAME_KINDS)
