// Audio playback per member (docs/viewer.md, "Audio"): parses audio packets
// (docs/protocol.md, "Audio packets"), decodes Opus with WebCodecs `AudioDecoder` (one per
// stream), and plays every frame through the page's one AudioContext at
// capture time + the stream's target delay, on the server's clock; the viewer draws that
// stream's poses at the same target (presentAt), so pose and sound captured together are
// presented together.

import { ProtocolError, crc32c, varint } from "./decoder.js";

export const AUDIO_FIRST_BYTE = 0xa1;
export const SAMPLE_RATE = 48000;
const MIN_AUDIO_BYTES = 19;
const MAX_PACKET_BYTES = 1100;
const MIN_DURATION = 120;
const MAX_DURATION = 5760;
const MAX_OPUS_BYTES = 1275;
const MAX_STREAM_ID = 2n ** 32n - 1n;
const MAX_SEQ = 2n ** 63n - 1n;
const MIN_TARGET_MS = 20;
const MAX_TARGET_MS = 400;
const START_TARGET_MS = 60; // before any transit is known
const MARGIN_MS = 10; // above the largest transit: decoding and scheduling take a few ms
const TRANSIT_WINDOW_MS = 2000;
const FALL_MS_PER_S = 100; // the target rises at once, falls at most this fast
const LEAD_S = 0.003; // a frame must be scheduled at least this far ahead of the output
const ACTIVE_MS = 1000; // a stream is "with audio" for this long after its last frame
const KEEP = 200; // scheduled frames remembered per stream (4 s of 20-ms frames)
const MAX_SKEW = 20000;

/** `audio` true when the packet's first byte says "audio packet" (magic nibble 0xA). */
export const isAudio = (bytes) => bytes.length > 0 && bytes[0] >> 4 === 0xa;

/** Parse and check an audio packet; ProtocolError on anything wrong (as parse_audio). */
export function parseAudio(buf) {
  const n = buf.length;
  if (n < MIN_AUDIO_BYTES) {
    throw new ProtocolError(`audio packet of ${n} bytes is shorter than ${MIN_AUDIO_BYTES}`);
  }
  if (n >= MAX_PACKET_BYTES) {
    throw new ProtocolError(`audio packet of ${n} bytes is not under ${MAX_PACKET_BYTES}`);
  }
  if (buf[0] >> 4 !== 0xa) throw new ProtocolError(`not an audio packet (first byte ${buf[0]})`);
  if ((buf[0] & 0x0f) !== 1) {
    throw new ProtocolError(
      `audio packet has version ${buf[0] & 0x0f}, this build supports only version 1`);
  }
  const end = n - 4;
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(end, true) !== crc32c(buf, 0, end)) {
    throw new ProtocolError("audio packet checksum mismatch");
  }
  if (buf[1] !== 0) throw new ProtocolError(`audio packet flags ${buf[1]}: every bit is reserved`);
  let [streamId, pos] = varint(buf, 2, end, "audio stream id");
  if (streamId > MAX_STREAM_ID) throw new ProtocolError(`audio stream id ${streamId} too large`);
  let seq;
  [seq, pos] = varint(buf, pos, end, "audio seq");
  if (seq > MAX_SEQ) throw new ProtocolError(`audio seq ${seq} too large`);
  if (pos + 8 > end) throw new ProtocolError("audio packet truncated inside the capture time field");
  const captureTsNs = dv.getBigInt64(pos, true);
  let duration;
  [duration, pos] = varint(buf, pos + 8, end, "audio duration");
  if (duration < MIN_DURATION || duration > MAX_DURATION) {
    throw new ProtocolError(`audio duration ${duration} outside ${MIN_DURATION}..${MAX_DURATION}`);
  }
  let length;
  [length, pos] = varint(buf, pos, end, "audio payload length");
  if (length < 1n || length > MAX_OPUS_BYTES) {
    throw new ProtocolError(`opus payload length ${length} outside 1..${MAX_OPUS_BYTES}`);
  }
  if (pos + Number(length) !== end) {
    throw new ProtocolError(
      `audio payload length ${length} does not match the ${end - pos} bytes present`);
  }
  return { streamId: Number(streamId), seq, captureTsNs, duration: Number(duration),
    payload: buf.slice(pos, end) };
}

const quantile = (xs, f) => {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(f * s.length))];
};

/** One stream's audio: its decoder, its target delay, what was scheduled when. */
class AudioStream {
  constructor(streamId) {
    this.streamId = streamId;
    this.decoder = null;
    this.targetMs = START_TARGET_MS;
    this.received = 0;
    this.decoded = 0;
    this.played = 0; // scheduled on time on the AudioContext
    this.late = 0; // decoded after its presentation time: dropped
    this.bad = 0;
    this.decodeErrors = 0;
    this.lastSeq = null;
    this.lastSeen = -1e9;
    this.scheduled = []; // [capture ms (server clock), duration ms, context start s]
    this.skews = []; // |pose presented - audio of its capture time presented|, ms
    this.unpaired = 0; // poses drawn with no scheduled audio covering their capture time
    this.ages = []; // audio arrival - capture of the last KEEP frames, ms (server clock)
    this.transits = []; // [arrival ms, transit ms] of audio and poses, last 2 s
    this.updated = null; // when the target last changed (ms, performance clock)
    this.end = null; // context time the last scheduled frame ends
    this.dropped = 0; // frames skipped to bring the delay down to a lower target
  }
}

export class AudioPlayer {
  /** `clock()`: {mineNs, theirsNs(streamId)} offsets to the server's clock (or null). */
  constructor(clock, onError) {
    this.clock = clock;
    this.onError = onError;
    this.streams = new Map();
    this.ctx = null;
    this.supported = typeof AudioDecoder === "function" && typeof AudioContext === "function";
    this.errors = 0;
  }

  context() {
    if (!this.ctx) {
      this.ctx = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
      if (this.ctx.state === "suspended") {
        // autoplay policy: the page resumes the context on the first click
        const resume = () => this.ctx.resume().catch(() => {});
        addEventListener("pointerdown", resume, { once: true });
        addEventListener("keydown", resume, { once: true });
      }
    }
    return this.ctx;
  }

  stream(streamId) {
    let s = this.streams.get(streamId);
    if (!s) {
      s = new AudioStream(streamId);
      this.streams.set(streamId, s);
    }
    return s;
  }

  /** Server-clock ms -> this page's wall-clock ms (null before the clock is known). */
  serverToWall(serverMs) {
    const mine = this.clock.mineNs();
    return mine === null ? null : serverMs - Number(mine) / 1e6;
  }

  /** Capture time (publisher clock, ns) -> the server clock, ms. */
  captureServerMs(streamId, captureTsNs) {
    return Number(captureTsNs) / 1e6 + this.clock.theirsNs(streamId) / 1e6;
  }

  /** AudioContext time <-> page wall-clock ms, through the output's timestamp. */
  mapping() {
    const ts = this.ctx.getOutputTimestamp();
    if (!ts.performanceTime && !ts.contextTime) {
      // the output has not started yet: the context time at the current moment
      return { ctx: this.ctx.currentTime, wall: performance.timeOrigin + performance.now() };
    }
    return { ctx: ts.contextTime, wall: performance.timeOrigin + ts.performanceTime };
  }

  /** How far ahead of the output the context renders (ms): a frame must be scheduled at
   * least this far ahead (plus LEAD_S) to be played at its time. */
  outputLatencyMs() {
    if (!this.ctx || this.ctx.state !== "running") return 0;
    const ts = this.ctx.getOutputTimestamp();
    const ahead = ts.performanceTime ? this.ctx.currentTime - ts.contextTime : 0;
    const declared = (this.ctx.baseLatency || 0) + (this.ctx.outputLatency || 0);
    return (Math.max(ahead, declared) + LEAD_S) * 1000;
  }

  /** An audio packet of the connection (bytes): parsed, decoded, scheduled. */
  packet(bytes) {
    let p;
    try {
      p = parseAudio(bytes);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      this.errors++;
      this.onError(`bad audio packet (${bytes.length} bytes) ignored: ${err.message}`);
      return null;
    }
    const s = this.stream(p.streamId);
    s.received++;
    s.lastSeen = performance.now();
    if (!this.supported) return p.streamId;
    if (s.lastSeq !== null && p.seq <= s.lastSeq) return p.streamId; // a duplicate or stale
    s.lastSeq = p.seq;
    const server = this.captureServerMs(p.streamId, p.captureTsNs);
    const age = this.transit(s, p.captureTsNs);
    if (age !== null) {
      s.ages.push(age);
      if (s.ages.length > KEEP) s.ages.shift();
    }
    if (!s.decoder) s.decoder = this.makeDecoder(s);
    if (s.decoder.state !== "configured") return p.streamId;
    // WebCodecs timestamps are microseconds: the server-clock capture time
    s.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: Math.round(server * 1000),
      data: p.payload }));
    return p.streamId;
  }

  /** A pose of the stream arrived (captured at `captureTsNs`): the audio waits for the
   * slower of the two paths, so its transit counts in the target too. */
  poseArrived(streamId, captureTsNs) {
    if (this.active(streamId)) this.transit(this.streams.get(streamId), captureTsNs);
  }

  /** Record a transit (arrival - capture, server clock) and move the target delay: the
   * largest transit of the last 2 s + a margin, bounded; up at once, down slowly (as the
   * Python receiver's jitter buffer, docs/audio.md). The transit in ms, or null. */
  transit(s, captureTsNs) {
    const wall = this.serverToWall(this.captureServerMs(s.streamId, captureTsNs));
    if (wall === null) return null;
    const now = performance.now();
    const age = performance.timeOrigin + now - wall;
    s.transits.push([now, age]);
    while (s.transits[0][0] < now - TRANSIT_WINDOW_MS) s.transits.shift();
    // what the output adds: audio handed to the context now is heard this much later
    const most = Math.max(...s.transits.map((t) => t[1])) + this.outputLatencyMs();
    const want = Math.min(MAX_TARGET_MS, Math.max(MIN_TARGET_MS, most + MARGIN_MS));
    if (want > s.targetMs || s.updated === null) {
      s.targetMs = want;
    } else {
      s.targetMs = Math.max(want, s.targetMs - (FALL_MS_PER_S * (now - s.updated)) / 1000);
    }
    s.updated = now;
    return age;
  }

  makeDecoder(s) {
    const dec = new AudioDecoder({
      output: (data) => this.output(s, data),
      error: (err) => {
        s.decodeErrors++;
        this.onError(`audio decoder of stream ${s.streamId}: ${err.message}`);
        s.decoder = null; // a fresh one for the next packet
      },
    });
    dec.configure({ codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 });
    return dec;
  }

  /** A decoded frame: played at capture + target when that is still ahead, else late. */
  output(s, data) {
    try {
      s.decoded++;
      const ctx = this.context();
      const serverMs = data.timestamp / 1000;
      const wall = this.serverToWall(serverMs + s.targetMs);
      if (wall === null || ctx.state !== "running") {
        s.late++;
        return;
      }
      const map = this.mapping();
      const frames = data.numberOfFrames;
      const dur = frames / data.sampleRate;
      let when = map.ctx + (wall - map.wall) / 1000;
      if (s.end !== null && when < s.end) {
        // the target fell (or timing jitter): play right after the frame before, or skip
        // this frame when that would put it more than half a frame behind its time
        if (when < s.end - dur / 2) {
          s.dropped++;
          return;
        }
        when = s.end;
      }
      if (when < ctx.currentTime + LEAD_S) {
        s.late++;
        return;
      }
      const buf = ctx.createBuffer(1, frames, data.sampleRate);
      const pcm = new Float32Array(frames);
      data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
      buf.copyToChannel(pcm, 0);
      const src = ctx.createBufferSource();
      src.buffer = buf;
      src.connect(ctx.destination);
      src.start(when);
      s.end = when + dur;
      s.played++;
      s.scheduled.push([serverMs, (frames * 1000) / data.sampleRate, when]);
      if (s.scheduled.length > KEEP) s.scheduled.shift();
    } finally {
      data.close();
    }
  }

  /** Whether the stream had audio lately (its poses then wait for the audio's target). */
  active(streamId) {
    const s = this.streams.get(streamId);
    return !!s && this.supported && performance.now() - s.lastSeen < ACTIVE_MS;
  }

  /** Wall-clock ms at which the audio sample of capture time `c` (server ms) is heard, when
   * its frame is scheduled (else null). */
  heardAt(s, c) {
    if (!this.ctx) return null;
    const f = s.scheduled.findLast(([start, dur]) => start <= c && c < start + dur);
    if (!f) return null;
    const map = this.mapping();
    return map.wall + (f[2] + (c - f[0]) / 1000 - map.ctx) * 1000;
  }

  /** Wall-clock ms at which a pose of `streamId` captured at `captureTsNs` is presented:
   * when the sound captured with it is heard (its frame scheduled), else at capture + the
   * target delay; null when the stream has no audio (draw now). Asked again when that
   * time comes (the target may have moved, the frame may have been scheduled). */
  presentAt(streamId, captureTsNs) {
    if (!this.active(streamId)) return null;
    const s = this.streams.get(streamId);
    const c = this.captureServerMs(streamId, captureTsNs);
    const heard = this.heardAt(s, c);
    return heard !== null ? heard : this.serverToWall(c + s.targetMs);
  }

  /** A pose of the stream was presented at wall ms `shownMs`: its skew to the audio sample
   * of the same capture time (as scheduled on the AudioContext). */
  posePresented(streamId, captureTsNs, shownMs) {
    const s = this.streams.get(streamId);
    if (!s) return;
    const heard = this.heardAt(s, this.captureServerMs(streamId, captureTsNs));
    if (heard === null) s.unpaired++;
    else if (s.skews.length < MAX_SKEW) s.skews.push(Math.abs(shownMs - heard));
  }

  figures(streamId) {
    const s = this.streams.get(streamId);
    if (!s) return null;
    return {
      received: s.received, decoded: s.decoded, played: s.played, late: s.late,
      dropped: s.dropped, output_latency_ms: this.outputLatencyMs(),
      decode_errors: s.decodeErrors, target_ms: s.targetMs, unpaired: s.unpaired,
      skew_p50_ms: quantile(s.skews, 0.5), skew_p95_ms: quantile(s.skews, 0.95),
      skew_count: s.skews.length, arrival_p50_ms: quantile(s.ages, 0.5),
      arrival_max_ms: quantile(s.ages, 1),
    };
  }

  forget(streamId) {
    const s = this.streams.get(streamId);
    if (s && s.decoder && s.decoder.state !== "closed") s.decoder.close();
    this.streams.delete(streamId);
  }

  stop() {
    for (const sid of [...this.streams.keys()]) this.forget(sid);
    if (this.ctx) this.ctx.close().catch(() => {});
  }
}
