"""The encode stage: poses ring -> pose codec -> packets ring.

Reads :class:`~pipeline.model.pose.PoseFrame` records in order (a bounded queue),
encodes each with the stateful :class:`~pipeline.codec.Encoder`, and
queues the packet for the transmit stage with the capture timestamp. The
``feedback`` ring brings acknowledgements and keyframe requests back from the
transmit stage; the supervisor's ``keyframe`` command forces one too. After a
restart the encoder starts with a keyframe (it has no reference any more).

A detector may place a landmark far outside the picture (MediaPipe puts
hidden heels below small frames); such values are clamped to the codec's
ranges (:mod:`pipeline.codec.ranges`) and counted
(``landmarks_clamped_total``) rather than losing the whole frame.
NaN and infinities are still refused by the codec, and counted.

The ``degrade`` command (the supervisor's degradation ladder, :mod:`pipeline.runtime.ladder`)
sets a level: frames over the level's rate are skipped before they are encoded
(``degradation_skipped_total``: no reference is lost), and a coarser ``precision_px``
rebuilds the encoder, whose next packet is a keyframe carrying the new quantization.
Metrics ``degradation_level``, ``degradation_steps_{down,up}_total``, ``precision_px``.

The default stream id is derived from the run id and kept below 2**14, so
that it costs two bytes per packet (a one-byte id, below 128, saves one
more: set ``encode.stream_id`` when you control the room's publishers).

``encode.references`` chooses what delta packets predict from
(:attr:`~pipeline.codec.CodecConfig.references`); ``auto`` is ``anchor`` when
``transmit.primary`` or ``transmit.fallback`` is webrtc (the unordered, lossy pose
channel: every third delta is an anchor that must arrive, the others decode from the
latest anchor or keyframe and may be lost; docs/codec.md), else ``previous``. The
start log line and the ``references_keyframe`` / ``references_anchor`` metrics (1 or
0) show the mode in use.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Literal

from pipeline.codec import HISTORY, CodecConfig, Encoder, feedback, peek_header, warm_kernels
from pipeline.codec.ranges import clamp_image
from pipeline.config import Config, TransportKind
from pipeline.errors import ProtocolError, WouldBlock
from pipeline.model.pose import PoseFrame
from pipeline.model.stats import Rate, Window
from pipeline.runtime.ladder import Degrader
from pipeline.runtime.stage import StageContext

RAW_FLOAT32_BYTES = 33 * 4 * 4


def stream_id_for(ctx: StageContext) -> int:
    """The configured stream id, else one derived from the run id (stable across restarts)."""
    sid = ctx.config.encode.stream_id
    return sid if sid is not None else zlib.crc32(ctx.spec.run_id.encode()) & 0x3FFF


def references_for(config: Config) -> Literal["previous", "keyframe", "anchor"]:
    """The codec's reference mode: ``encode.references``, with ``auto`` resolved to
    ``anchor`` when the transmit stage may use webrtc, else ``previous``."""
    mode = config.encode.references
    if mode != "auto":
        return mode
    tx = config.transmit
    webrtc = TransportKind.WEBRTC in (tx.primary, tx.fallback)
    return "anchor" if webrtc else "previous"


def clamp_to_codec_range(frame: PoseFrame) -> int:
    """Clamp image landmarks into the codec's range in place; return how many moved."""
    if not frame.present:
        return 0
    frame.image, outside = clamp_image(frame.image)
    return outside


def prepare() -> None:
    """Load the codec's compiled kernels before the first heartbeat, so that the
    detect stage, started after it, never waits on it."""
    warm_kernels()


def run(ctx: StageContext) -> int:
    cfg = ctx.config.encode
    references = references_for(ctx.config)
    codec = CodecConfig(
        precision_px=cfg.precision_px,
        reference_width_px=cfg.reference_width_px,
        keyframe_interval=cfg.keyframe_interval,
        world=cfg.world_landmarks,
        references=references,
    )
    encoder = Encoder(codec, stream_id_for(ctx))
    ladder = Degrader(ctx.config.transmit)
    precision = cfg.precision_px
    interval = codec.effective_keyframe_interval()
    ctx.log.info(
        "delta packets predict from the %s (encode.references: %s), keyframe every %d frames%s",
        {"keyframe": "latest keyframe", "anchor": "latest anchor"}.get(
            references, "previous packet"
        ),
        cfg.references,
        interval,
        f" (keyframe_interval {cfg.keyframe_interval} clamped: decoders keep {HISTORY} frames)"
        if interval != cfg.keyframe_interval
        else "",
    )
    ctx.metrics["references_keyframe"] = float(references == "keyframe")
    ctx.metrics["references_anchor"] = float(references == "anchor")
    poses = ctx.ring("poses")
    packets = ctx.ring("packets")
    fb = ctx.ring("feedback")
    ctx.on("keyframe", lambda args: encoder.request_keyframe())
    ctx.on("degrade", ladder.on_degrade)
    ctx.metrics.update(ladder.metrics())  # the supervisor's ladder finds its stage by it
    encode_us = Window()
    sizes = Window()
    rate = Rate()
    encoded = rejected = keyframes = acks = clamped = 0
    bytes_total = 0
    while not ctx.stopping:
        ctx.tick()  # runs the "keyframe" handler registered above
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
        if not ladder.keep(frame.capture_ts_ns):
            ctx.metrics.update(ladder.metrics())
            continue
        wanted = ladder.setting.precision_px or cfg.precision_px
        if wanted != precision:  # a new quantization starts with a keyframe (same epoch)
            precision = wanted
            codec = dataclasses.replace(codec, precision_px=precision)
            encoder = Encoder(codec, encoder.stream_id, epoch=encoder.epoch)
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
                "references_keyframe": float(references == "keyframe"),
                "references_anchor": float(references == "anchor"),
                **encode_us.summary("encode_us"),
                **ladder.metrics(),
                "precision_px": precision,
            }
        )
    return 0


def _is_keyframe(packet: bytes) -> bool:
    try:
        return peek_header(packet).keyframe
    except ProtocolError:
        return False
