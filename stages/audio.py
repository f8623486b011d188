"""The audio stage: a source -> Opus -> the ``audio`` ring (a second head of the topology).

Reads 20 ms chunks of 48 kHz mono PCM from the configured source
(:mod:`pipeline.audio.sources`: ``tone``, ``file``, ``speech``, ``microphone``), encodes
each with Opus (:class:`~pipeline.audio.opus.OpusEncoder`: ``audio.bitrate_kbps``,
in-band FEC, optional DTX) and queues the audio packet (:mod:`pipeline.codec.audio`)
for the transmit stage, which sends it beside the pose packets on the same connection.
The packet's stream id is the pose stream's (``encode.stream_id`` or the one derived
from the run id), so a receiver pairs the two; its capture timestamp is the wall-clock
time of the packet's first sample, the clock of the pose packets.

A missing microphone is one log line and the run goes on without audio (the stage
stays up, idle); a file without an audio stream, an unreadable or unsupported file, or
no espeak-ng for ``speech`` stops the run with one message naming the field.

Commands: ``set`` ``{"bitrate_kbps": N}`` (16-64): the degradation ladder's audio step
(issue 13) plugs in here; the encoder is rebuilt at the next frame.

Metrics: ``audio_frames_captured_total``, ``audio_packets_encoded_total``,
``audio_bytes_encoded_total``, ``audio_bitrate_kbps``, ``audio_encode_us_p50/p95/p99``,
``audio_dropped_total`` (the ring's oldest dropped: transmit too slow), ``audio_source_ok``.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.audio.opus import OpusEncoder
from pipeline.audio.sources import FRAME_NS, open_source
from pipeline.codec.audio import SAMPLE_RATE, pack_audio
from pipeline.errors import CommandError, ConfigError
from pipeline.model.stats import Window
from pipeline.runtime.stage import StageContext
from stages.encode import stream_id_for


def run(ctx: StageContext) -> int:
    cfg = ctx.config.audio
    stream_id = stream_id_for(ctx)
    state: dict[str, Any] = {"bitrate": cfg.bitrate_kbps, "rebuild": False}

    def on_set(args: dict[str, Any]) -> dict[str, Any]:
        if "bitrate_kbps" not in args:
            return {}
        kbps = args["bitrate_kbps"]
        if not isinstance(kbps, int) or not 16 <= kbps <= 64:
            raise CommandError("set: bitrate_kbps must be an integer 16..64")
        state["bitrate"], state["rebuild"] = kbps, True
        return {"bitrate_kbps": kbps}

    ctx.on("set", on_set)
    try:
        source = open_source(cfg, ctx.config.base_dir, lambda: ctx.stopping)
        encoder = OpusEncoder(cfg.bitrate_kbps, fec=cfg.fec, dtx=cfg.dtx)
    except ConfigError as exc:
        if cfg.source in ("microphone", "mic"):
            ctx.log.warning("%s", exc)
            ctx.metrics["audio_source_ok"] = 0.0
            while not ctx.stopping:
                ctx.sleep(0.2)
            return 0
        return ctx.refuse(str(exc))
    ring = ctx.ring("audio")
    ctx.log.info(
        "audio: %s, Opus %d kbit/s, FEC %s, DTX %s, stream %d",
        cfg.source, cfg.bitrate_kbps, "on" if cfg.fec else "off", "on" if cfg.dtx else "off",
        stream_id,
    )  # fmt: skip
    encode_us = Window()
    captured = encoded = nbytes = 0
    t_first = 0

    for chunk in source:
        ctx.tick()
        if ctx.paused:
            continue
        if captured == 0:
            t_first = chunk.capture_ts_ns
        captured += 1
        if state["rebuild"]:
            state["rebuild"] = False
            encoder = OpusEncoder(state["bitrate"], fec=cfg.fec, dtx=cfg.dtx)
            t_first = chunk.capture_ts_ns
        t0 = time.perf_counter_ns()
        out = encoder.encode(chunk.pcm)
        encode_us.add((time.perf_counter_ns() - t0) / 1000)
        for pts, payload in out:
            ts = t_first + pts * 1_000_000_000 // SAMPLE_RATE
            # the frame counter on the capture clock: increases across encoder rebuilds
            # and stage restarts, one per 20 ms (docs/protocol.md, "Audio packets")
            seq = (ts + FRAME_NS // 2) // FRAME_NS
            packet = pack_audio(stream_id, seq, ts, 960, payload)
            ring.send(packet, ts_ns=ts, meta=seq)
            encoded += 1
            nbytes += len(packet)
        ctx.metrics.update(
            {
                "audio_source_ok": 1.0,
                "audio_frames_captured_total": captured,
                "audio_packets_encoded_total": encoded,
                "audio_bytes_encoded_total": nbytes,
                "audio_bitrate_kbps": state["bitrate"],
                "audio_dropped_total": ring.statistics().dropped,
                **encode_us.summary("audio_encode_us"),
            }
        )
    return 0
