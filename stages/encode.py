"""The encode stage: poses ring -> pose codec -> packets ring.

Reads :class:`~pipeline.model.pose.PoseFrame` records in order (a bounded queue),
encodes each with the stateful :class:`~pipeline.codec.protocol.Encoder`, and
queues the packet for the transmit stage with the capture timestamp. The
``feedback`` ring brings acknowledgements and keyframe requests back from the
transmit stage; the supervisor's ``keyframe`` command forces one too. After a
restart the encoder starts with a keyframe (it has no reference any more).

A detector may place a landmark far outside the picture (MediaPipe puts
hidden heels at y = 2.01 on small frames); such values are clamped to the
codec's range (x, y in [-1, 2], z in [-4, 4], visibility in [0, 1]) and
counted (``landmarks_clamped_total``) rather than losing the whole frame.
NaN and infinities are still refused by the codec, and counted.

The default stream id is derived from the run id and kept below 2**14, so
that it costs two bytes per packet (a one-byte id, below 128, saves one
more: set ``encode.stream_id`` when you control the room's publishers).
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from pipeline.codec import feedback
from pipeline.codec.protocol import (
    VISIBILITY_RANGE,
    XY_RANGE,
    Z_RANGE,
    CodecConfig,
    Encoder,
    warm_kernels,
)
from pipeline.errors import ProtocolError, WouldBlock
from pipeline.model.pose import PoseFrame
from pipeline.model.stats import Rate, Window
from pipeline.runtime.stage import StageContext

RAW_FLOAT32_BYTES = 33 * 4 * 4


def stream_id_for(ctx: StageContext) -> int:
    """The configured stream id, else one derived from the run id (stable across restarts)."""
    sid = ctx.config.encode.stream_id
    return sid if sid is not None else zlib.crc32(ctx.spec.run_id.encode()) & 0x3FFF


_LO = np.array([XY_RANGE[0], XY_RANGE[0], Z_RANGE[0], VISIBILITY_RANGE[0]], np.float32)
_HI = np.array([XY_RANGE[1], XY_RANGE[1], Z_RANGE[1], VISIBILITY_RANGE[1]], np.float32)


def clamp_to_codec_range(frame: PoseFrame) -> int:
    """Clamp image landmarks into the codec's range in place; return how many moved."""
    if not frame.present:
        return 0
    img = frame.image
    outside = int(np.count_nonzero((img < _LO) | (img > _HI)))
    if outside:
        if not img.flags.writeable:
            frame.image = img = img.copy()
        np.clip(img, _LO, _HI, out=img)
    return outside


def prepare() -> None:
    """Load the codec's compiled kernels (about 0.35 s) before the first heartbeat, so
    that the detect stage, started after it, never waits on it."""
    warm_kernels()


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
    encoded = rejected = keyframes = acks = clamped = 0
    bytes_total = 0
    while not ctx.stopping:
        ctx.tick()
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
        clamped += clamp_to_codec_range(frame)
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
                "landmarks_clamped_total": clamped,
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
    from pipeline.codec.protocol import peek_header

    try:
        return peek_header(packet).keyframe
    except ProtocolError:
        return False
