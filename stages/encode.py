"""The encode stage: poses ring -> pose codec -> packets ring.

Reads :class:`~pipeline.pose.PoseFrame` records in order (a bounded queue),
encodes each with the stateful :class:`~pipeline.protocol.Encoder`, and
queues the packet for the transmit stage with the capture timestamp. The
``feedback`` ring brings acknowledgements and keyframe requests back from the
transmit stage; the supervisor's ``keyframe`` command forces one too. After a
restart the encoder starts with a keyframe (it has no reference any more).
"""

from __future__ import annotations

import time
import zlib

from pipeline import feedback
from pipeline.errors import ProtocolError, WouldBlock
from pipeline.pose import PoseFrame
from pipeline.protocol import CodecConfig, Encoder
from pipeline.stage import StageContext
from pipeline.stats import Rate, Window

RAW_FLOAT32_BYTES = 33 * 4 * 4


def stream_id_for(ctx: StageContext) -> int:
    """The configured stream id, else one derived from the run id (stable across restarts)."""
    sid = ctx.config.encode.stream_id
    return sid if sid is not None else zlib.crc32(ctx.spec.run_id.encode()) & 0xFFFF


def run(ctx: StageContext) -> int:
    cfg = ctx.config.encode
    encoder = Encoder(
        CodecConfig(
            precision_px=cfg.precision_px,
            reference_width_px=cfg.reference_width_px,
            keyframe_interval=cfg.keyframe_interval,
            world=cfg.world_landmarks,
        ),
        stream_id_for(ctx),
    )
    poses = ctx.ring("poses")
    packets = ctx.ring("packets")
    fb = ctx.ring("feedback")
    ctx.on("keyframe", lambda args: encoder.request_keyframe())
    encode_us = Window()
    sizes = Window()
    rate = Rate()
    encoded = rejected = keyframes = acks = 0
    bytes_total = 0
    while not ctx.stopping:
        ctx.tick()
        if ctx.keyframe_requested:
            ctx.keyframe_requested = False
            encoder.request_keyframe()
        while True:
            try:
                kind, seq = feedback.parse(fb.recv(timeout=0).data)
            except WouldBlock:
                break
            except ProtocolError as exc:
                ctx.log.warning("bad feedback message: %s", exc)
                continue
            if kind == "ack":
                encoder.on_ack(seq)
                acks += 1
            else:
                encoder.request_keyframe()
        if ctx.paused:
            time.sleep(0.05)
            continue
        try:
            item = poses.recv(timeout=0.1)
        except WouldBlock:
            continue
        frame = PoseFrame.from_bytes(item.data)
        t0 = time.perf_counter_ns()
        try:
            packet = encoder.encode(frame)
        except ProtocolError as exc:
            rejected += 1
            ctx.log.warning("pose of frame %d not encodable: %s", frame.seq, exc)
            continue
        encode_us.add((time.perf_counter_ns() - t0) / 1000)
        packets.send(packet, ts_ns=frame.capture_ts_ns, meta=frame.seq)
        encoded += 1
        bytes_total += len(packet)
        sizes.add(len(packet))
        keyframes += bool(packet and _is_keyframe(packet))
        rate.tick()
        ctx.metrics.update(
            {
                "packets_encoded_total": encoded,
                "poses_rejected_total": rejected,
                "keyframes_total": keyframes,
                "acks_total": acks,
                "bytes_encoded_total": bytes_total,
                "bytes_per_frame": sizes.mean(),
                "compression_ratio": sizes.mean() / RAW_FLOAT32_BYTES,
                "fps": rate.per_second(),
                **encode_us.summary("encode_us"),
            }
        )
    return 0


def _is_keyframe(packet: bytes) -> bool:
    from pipeline.protocol import peek_header

    try:
        return peek_header(packet).keyframe
    except ProtocolError:
        return False
