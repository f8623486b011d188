// The room viewer: joins a room as a subscriber, decodes every publisher's packets and
// draws each skeleton on its own canvas layer the moment it is decoded (no frame queue, no
// smoothing: nothing adds latency). docs/viewer.md describes the page.

import { Decoder, ProtocolError } from "./decoder.js";
import { Member } from "./transport.js";
import { AudioPlayer, isAudio } from "./audio.js";

// MediaPipe Pose's 33-landmark connections (POSE_CONNECTIONS)
export const CONNECTIONS = [
  [0, 1], [1, 2], [2, 3], [3, 7], [0, 4], [4, 5], [5, 6], [6, 8], [9, 10],
  [11, 12], [11, 13], [13, 15], [15, 17], [15, 19], [15, 21], [17, 19],
  [12, 14], [14, 16], [16, 18], [16, 20], [16, 22], [18, 20],
  [11, 23], [12, 24], [23, 24], [23, 25], [24, 26], [25, 27], [26, 28],
  [27, 29], [28, 30], [29, 31], [30, 32], [27, 31], [28, 32],
];
export const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
  "#f032e6", "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000",
  "#aaffc3", "#808000", "#ffd8b1", "#000075", "#a9a9a9", "#ffe119"];
export const WIDTH = 960;
export const HEIGHT = 540;
const VISIBLE = 0.5;
// room around the landmarks' bounding box: dots and lines, the name above right of the head
const ROOM = { left: 8, up: 64, down: 8 }; // right: 16 px + the name's width
const NACK_MS = 50; // at most one keyframe request (NACK) per stream in this time
const HOLD_MS = 200; // a packet waits this long for its missing reference
const MAX_HELD = 64; // packets held per stream
const WINDOW_MS = 1000;
const MAX_RECORD = 20000;

const wallMs = () => performance.timeOrigin + performance.now();
const $ = (id) => document.getElementById(id);

class StreamView {
  constructor(streamId, stage) {
    this.streamId = streamId;
    // the layer covers only the skeleton's bounding box (it grows when needed, never
    // shrinks) and moves with it: compositing 20 full-stage layers cost Chromium a
    // quarter of a core more (bench viewer, 20 publishers)
    this.canvas = document.createElement("canvas");
    this.canvas.width = 1;
    this.canvas.height = 1;
    this.canvas.className = "layer";
    this.canvas.dataset.stream = String(streamId);
    stage.appendChild(this.canvas);
    this.ctx = this.canvas.getContext("2d", { willReadFrequently: true });
    this.ox = 0; // the layer's position on the stage
    this.oy = 0;
    this.colour = PALETTE[0];
    this.label = `stream ${streamId}`;
    this.received = 0;
    this.rendered = 0;
    this.renderedLive = 0;
    this.lost = 0;
    this.needKeyframe = 0;
    this.bad = 0;
    this.backfillLeft = 0;
    this.lastLiveSeq = null;
    this.lastDrawn = null; // seq and epoch of the pose on screen
    this.lastEpoch = null;
    this.stale = 0; // decoded, older than the pose on screen: not drawn
    this.held = new Map(); // missing reference (BigInt) -> packets waiting for it
    this.heldCount = 0;
    this.released = 0; // decoded after waiting for their reference
    this.lastRequest = -1e9;
    this.times = []; // render times (ms) of the last second: fps
    this.latencies = []; // [render time ms, latency ms] of the last second
    this.via = "-";
    this.byVia = {}; // frames drawn per path (websocket, webrtc-pose, webrtc-control)
    this.firstLive = null; // render time (ms) of the first and the last live frame
    this.lastLive = null;
  }

  draw(image, n) {
    const { ctx, canvas } = this;
    const vis = (o, j) => image[o + j * 4 + 3] >= VISIBLE;
    let x0 = Infinity;
    let y0 = Infinity;
    let x1 = -Infinity;
    let y1 = -Infinity;
    for (let o = 0; o < n * 33 * 4; o += 4) {
      if (image[o + 3] < VISIBLE) continue;
      x0 = Math.min(x0, image[o] * WIDTH);
      x1 = Math.max(x1, image[o] * WIDTH);
      y0 = Math.min(y0, image[o + 1] * HEIGHT);
      y1 = Math.max(y1, image[o + 1] * HEIGHT);
    }
    if (x0 === Infinity) {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      return;
    }
    // dots (7 px) and lines; the name above the head, to its right
    const ox = Math.max(0, Math.floor(x0 - ROOM.left));
    const oy = Math.max(0, Math.floor(y0 - ROOM.up));
    const w = Math.min(WIDTH, Math.ceil(x1 + this.labelRoom())) - ox;
    const h = Math.min(HEIGHT, Math.ceil(y1 + ROOM.down)) - oy;
    if (w > canvas.width || h > canvas.height) {
      canvas.width = Math.min(WIDTH, Math.max(w, canvas.width) + 32); // clears it too
      canvas.height = Math.min(HEIGHT, Math.max(h, canvas.height) + 32);
    } else {
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.clearRect(0, 0, canvas.width, canvas.height);
    }
    if (ox !== this.ox || oy !== this.oy) {
      canvas.style.transform = `translate(${ox}px, ${oy}px)`;
      this.ox = ox;
      this.oy = oy;
    }
    ctx.setTransform(1, 0, 0, 1, -ox, -oy);
    ctx.strokeStyle = ctx.fillStyle = this.colour;
    ctx.lineWidth = 3;
    ctx.font = "16px sans-serif";
    for (let p = 0; p < n; p++) {
      const o = p * 33 * 4;
      const x = (j) => image[o + j * 4] * WIDTH;
      const y = (j) => image[o + j * 4 + 1] * HEIGHT;
      if (vis(o, 0)) ctx.fillText(this.label, x(0) + 12, y(0) - 40);
      for (const [a, b] of CONNECTIONS) {
        // one path per bone: Chromium's software raster strokes these faster than one
        // path of 35 crossing subpaths (100 against 137 us per skeleton, measured)
        if (vis(o, a) && vis(o, b)) {
          ctx.beginPath();
          ctx.moveTo(x(a), y(a));
          ctx.lineTo(x(b), y(b));
          ctx.stroke();
        }
      }
      // the landmarks: 7-px squares on whole pixels, in one path (no anti-aliased edges to
      // rasterize: a fifth of the cost of round dots in Chromium's software canvas)
      ctx.beginPath();
      for (let j = 0; j < 33; j++) {
        if (vis(o, j)) ctx.rect(Math.round(x(j)) - 3, Math.round(y(j)) - 3, 7, 7);
      }
      ctx.fill();
    }
    // the canvas records draw calls and rasterizes them later (at the next frame at the
    // latest); reading one pixel makes it rasterize now, so the render time taken after
    // this is when the pixels are in the canvas
    ctx.getImageData(0, 0, 1, 1);
  }

  /** Room to the right of the landmarks: the name and a margin (measured once per name). */
  labelRoom() {
    if (this.measured !== this.label) {
      this.ctx.font = "16px sans-serif";
      this.labelWidth = this.ctx.measureText(this.label).width;
      this.measured = this.label;
    }
    return Math.max(8, 16 + this.labelWidth);
  }

  /** RGBA at stage pixels [[x, y]...] (transparent outside the layer). */
  pixels(points) {
    return points.map(([x, y]) => {
      const [lx, ly] = [x - this.ox, y - this.oy];
      const { width, height } = this.canvas;
      if (lx < 0 || ly < 0 || lx >= width || ly >= height) return [0, 0, 0, 0];
      return Array.from(this.ctx.getImageData(lx, ly, 1, 1).data);
    });
  }

  /** Drop held packets whose wait ended by `now` (or the `limit` oldest); how many. */
  expire(now, limit = Infinity) {
    let n = 0;
    if (!this.heldCount) return 0;
    const all = [...this.held].flatMap(([ref, group]) => group.map((h) => [ref, h]));
    all.sort((x, y) => x[1].until - y[1].until);
    for (const [ref, h] of all) {
      if (n >= limit || (h.until > now && limit === Infinity)) break;
      const group = this.held.get(ref);
      group.splice(group.indexOf(h), 1);
      if (!group.length) this.held.delete(ref);
      this.heldCount--;
      n++;
    }
    return n;
  }

  figures(now) {
    while (this.times.length && this.times[0] < now - WINDOW_MS) this.times.shift();
    while (this.latencies.length && this.latencies[0][0] < now - WINDOW_MS) this.latencies.shift();
    const span = this.lastLive - this.firstLive;
    const lat = this.latencies.map((l) => l[1]).sort((a, b) => a - b);
    const q = (f) => {
      if (!lat.length) return null;
      return lat[Math.min(lat.length - 1, Math.floor(f * lat.length))];
    };
    return {
      stream: this.streamId, name: this.label, colour: this.colour, fps: this.times.length,
      fps_mean: span > 0 ? ((this.renderedLive - 1) * 1000) / span : null,
      latency_p50_ms: q(0.5), latency_p95_ms: q(0.95), transport: this.via,
      received: this.received, rendered: this.rendered, rendered_live: this.renderedLive,
      lost: this.lost, need_keyframe: this.needKeyframe, bad_packets: this.bad, stale: this.stale,
      by_transport: { ...this.byVia }, held: this.heldCount, released: this.released,
    };
  }
}

export class Viewer {
  constructor({ room, token, url, rtc = "auto", rtcConfig = {}, record = false }) {
    this.room = room;
    this.decoder = new Decoder();
    this.streams = new Map(); // streamId -> StreamView
    this.members = new Map(); // memberId -> record
    this.colours = new Map(); // memberId -> colour
    this.record = record ? [] : null;
    this.latencyLog = [];
    this.errors = [];
    this.work = { packets: 0, decode_ms: 0, draw_ms: 0 }; // main-thread time of the frames
    this.audio = new AudioPlayer({
      mineNs: () => this.member.clockOffsetNs,
      theirsNs: (sid) => {
        const m = this.owner(sid);
        return m && Number.isSafeInteger(m.clock_offset_ns) ? m.clock_offset_ns : 0;
      },
    }, (text) => this.showError(text));
    this.member = new Member({
      url, room, token, rtc, rtcConfig, name: "viewer",
      on: {
        packet: (bytes, via) => this.onPacket(bytes, via),
        control: (obj) => this.onControl(obj),
        state: (s) => this.onState(s),
        members: (list) => this.onMembers(list),
        presence: (event, m) => this.onPresence(event, m),
      },
    });
    this.hud = setInterval(() => this.renderHud(), 250);
  }

  start() {
    this.member.start();
  }

  // ------------------------------------------------------------ members and colours

  onMembers(list) {
    // a (re)join: the welcome's list is the room now; streams of members gone meanwhile go
    this.members.clear();
    for (const v of this.streams.values()) v.needKeyframe += v.expire(Infinity); // a new session
    for (const m of list) this.onPresence("join", m);
    for (const sid of [...this.streams.keys()]) if (!this.owner(sid)) this.dropStream(sid);
  }

  onPresence(event, m) {
    if (!m || typeof m.id !== "string") return;
    if (event === "leave") {
      const old = this.members.get(m.id);
      this.members.delete(m.id);
      for (const sid of (old && old.streams) || []) this.dropStream(sid);
      return;
    }
    this.members.set(m.id, m);
    if (!this.colours.has(m.id)) {
      this.colours.set(m.id, PALETTE[this.colours.size % PALETTE.length]);
    }
    for (const sid of m.streams || []) {
      const view = this.streams.get(sid);
      if (view) this.label(view);
    }
  }

  owner(streamId) {
    for (const m of this.members.values()) if ((m.streams || []).includes(streamId)) return m;
    return null;
  }

  label(view) {
    const m = this.owner(view.streamId);
    if (m) {
      view.colour = this.colours.get(m.id);
      view.label = m.name || m.subject || m.id;
      view.memberId = m.id;
    }
  }

  dropStream(sid) {
    const view = this.streams.get(sid);
    if (!view) return;
    view.canvas.remove();
    this.streams.delete(sid);
    this.decoder.forget(sid);
    this.audio.forget(sid);
  }

  view(streamId) {
    let v = this.streams.get(streamId);
    if (!v) {
      v = new StreamView(streamId, $("stage"));
      this.streams.set(streamId, v);
      this.label(v);
    }
    return v;
  }

  // ------------------------------------------------------------ packets

  onControl(obj) {
    if (obj.type === "backfill" && Number.isSafeInteger(obj.stream_id)) {
      const v = this.view(obj.stream_id);
      v.backfillLeft = Number.isSafeInteger(obj.count) ? obj.count : 0;
    } else if (obj.type === "error") {
      this.showError(`server: ${obj.reason || "error"}${obj.message ? ": " + obj.message : ""}`);
    }
  }

  onPacket(bytes, via) {
    if (isAudio(bytes)) {
      const sid = this.audio.packet(bytes);
      if (sid !== null) this.view(sid);
      return;
    }
    const t0 = performance.now();
    let res;
    try {
      res = this.decoder.decode(bytes);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      const sid = bytes.length > 2 && bytes[2] < 0x80 ? bytes[2] : null;
      const v = sid !== null ? this.streams.get(sid) : null;
      if (v) v.bad++;
      this.showError(`bad packet (${bytes.length} bytes) ignored: ${err.message}`);
      return;
    }
    const v = this.view(res.kind === "decoded" ? res.header.streamId : res.streamId);
    v.received++;
    const backfill = v.backfillLeft > 0;
    if (backfill) v.backfillLeft--;
    const now = performance.now();
    this.work.decode_ms += now - t0;
    v.needKeyframe += v.expire(now);
    if (res.kind === "need_keyframe") {
      this.hold(v, { bytes, seq: res.seq, until: now + HOLD_MS, backfill, via }, res.missingRef);
      if (now - v.lastRequest >= NACK_MS) {
        // the missing reference: the server sends it again from its history when it has
        // it (a NACK), else a keyframe (docs/webrtc.md, "Loss repair")
        v.lastRequest = now;
        this.member.requestKeyframe(res.streamId, res.missingRef);
      }
      return;
    }
    this.frame(v, res, via, backfill);
    this.release(v, res.header.seq);
  }

  /** Keep a packet whose reference is missing (at most MAX_HELD per stream). */
  hold(v, item, missingRef) {
    if (v.heldCount >= MAX_HELD) {
      v.expire(Infinity, 1); // the oldest goes
      v.needKeyframe++;
    }
    const group = v.held.get(missingRef);
    if (group) group.push(item);
    else v.held.set(missingRef, [item]);
    v.heldCount++;
  }

  /** Decode what waited for frame `seq`, in sequence order, then what waited for those. */
  release(v, seq) {
    const todo = [seq];
    while (todo.length && v.heldCount) {
      const key = todo.pop();
      const group = v.held.get(key);
      if (!group) continue;
      v.held.delete(key);
      v.heldCount -= group.length;
      group.sort((x, y) => (x.seq < y.seq ? -1 : x.seq > y.seq ? 1 : 0));
      for (const h of group) {
        let r;
        try {
          r = this.decoder.decode(h.bytes);
        } catch (err) {
          if (!(err instanceof ProtocolError)) throw err;
          v.bad++;
          continue;
        }
        if (r.kind === "need_keyframe") {
          this.hold(v, h, r.missingRef);
          continue;
        }
        v.released++;
        this.frame(v, r, h.via, h.backfill);
        todo.push(r.header.seq);
      }
    }
  }

  /** A decoded frame: recorded, drawn when newer than the pose on screen, counted. */
  frame(v, res, via, backfill) {
    const h = res.header;
    const seq = Number(h.seq);
    if (this.record && this.record.length < MAX_RECORD) {
      this.record.push({ stream: h.streamId, seq: String(h.seq), ts: String(h.captureTsNs),
        backfill, via, image: Array.from(res.image) });
    }
    if (v.lastDrawn !== null && seq <= v.lastDrawn && h.epoch === v.lastEpoch) {
      // older than the pose on screen (a late packet of the unordered channel, a repair
      // backfill): history for the decoder, not drawn
      v.stale++;
      return;
    }
    v.lastDrawn = seq;
    v.lastEpoch = h.epoch;
    if (!backfill) this.audio.poseArrived(h.streamId, h.captureTsNs);
    // with audio, the pose waits for the sound captured with it (docs/viewer.md, "Audio")
    if (backfill) this.show(v, res, via, backfill, false);
    else this.present(v, res, via);
  }

  /** Draw a live pose now, or when the audio of its capture time is heard (asked again
   * when the timer fires: the audio's target delay may have moved meanwhile). */
  present(v, res, via, waited = false) {
    if (this.streams.get(v.streamId) !== v) return; // the stream went
    const h = res.header;
    const at = this.audio.presentAt(v.streamId, h.captureTsNs);
    const wait = at === null ? 0 : at - wallMs();
    if (wait > 1) {
      setTimeout(() => this.present(v, res, via, true), wait);
    } else if (waited && v.shown && h.epoch === v.shown[1] && h.seq < v.shown[0]) {
      v.stale++; // a newer pose came due first (the target delay moved): not drawn back
    } else {
      v.shown = [h.seq, h.epoch];
      this.show(v, res, via, false, at !== null || waited);
    }
  }

  show(v, res, via, backfill, synced) {
    const h = res.header;
    const seq = Number(h.seq);
    v.via = via;
    const t1 = performance.now();
    v.draw(res.image, h.numPoses);
    const rendered = wallMs();
    if (synced) this.audio.posePresented(h.streamId, h.captureTsNs, rendered);
    this.work.packets++;
    this.work.draw_ms += performance.now() - t1;
    v.rendered++;
    v.byVia[via] = (v.byVia[via] || 0) + 1;
    v.times.push(rendered);
    if (!backfill) {
      v.renderedLive++;
      if (v.firstLive === null) v.firstLive = rendered;
      v.lastLive = rendered;
      if (v.lastLiveSeq !== null && seq > v.lastLiveSeq + 1) v.lost += seq - v.lastLiveSeq - 1;
      if (v.lastLiveSeq === null || seq > v.lastLiveSeq) v.lastLiveSeq = seq;
      const latency = this.latencyMs(h, v, rendered);
      if (latency !== null) {
        v.latencies.push([rendered, latency]);
        if (this.latencyLog.length < MAX_RECORD) this.latencyLog.push([h.streamId, seq, latency]);
      }
    }
  }

  /** Capture -> render on the server's clock: (render + my offset) - (capture + publisher's). */
  latencyMs(h, v, renderedMs) {
    const mine = this.member.clockOffsetNs;
    if (mine === null) return null;
    const m = v.memberId ? this.members.get(v.memberId) : null;
    const theirs = m && Number.isSafeInteger(m.clock_offset_ns) ? m.clock_offset_ns : 0;
    const captureMs = Number(h.captureTsNs) / 1e6;
    return renderedMs + Number(mine) / 1e6 - (captureMs + theirs / 1e6);
  }

  // ------------------------------------------------------------ page state

  onState(s) {
    $("state").textContent = s.phase;
    $("state").dataset.phase = s.phase;
    $("transport").textContent = s.transport;
    $("note").textContent = s.note ? `(${s.note})` : "";
    if (s.error) this.showError(s.error);
  }

  showError(text) {
    this.errors.push(text);
    const el = $("error");
    el.textContent = text;
    el.hidden = false;
  }

  /** RGBA of a stream's layer at stage pixels [[x, y]...] (tests). */
  pixels(streamId, points) {
    const v = this.streams.get(streamId);
    return v ? v.pixels(points) : points.map(() => [0, 0, 0, 0]);
  }

  stats() {
    const now = wallMs();
    return {
      connection: { ...this.member.snap, clockOffsetNs: String(this.member.snap.clockOffsetNs) },
      streams: [...this.streams.values()].map((v) => ({
        ...v.figures(now), audio: this.audio.figures(v.streamId) })),
      errors: this.errors.slice(-20),
      work: { ...this.work },
    };
  }

  renderHud() {
    const rows = this.stats().streams.map((s) => {
      const lat = s.latency_p95_ms === null
        ? "-"
        : `${s.latency_p50_ms.toFixed(1)} / ${s.latency_p95_ms.toFixed(1)}`;
      const tr = document.createElement("tr");
      const a = s.audio;
      const audio = a === null ? "-" : `${a.played} played, ${a.late} late, target `
        + `${a.target_ms.toFixed(0)} ms, skew p95 `
        + `${a.skew_p95_ms === null ? "-" : a.skew_p95_ms.toFixed(1)} ms`;
      for (const text of [s.name, `${s.fps}`, lat, s.transport, `${s.lost}`, audio]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      }
      tr.firstChild.style.color = s.colour;
      return tr;
    });
    $("members").replaceChildren(...rows);
  }
}

// ------------------------------------------------------------ page bootstrap

async function devToken(room) {
  const r = await fetch("/api/dev/token", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ room, role: "subscriber", ttl: 3600 }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.message || `dev token refused (${r.status})`);
  return body.token;
}

export async function main() {
  const body = document.body;
  const room = body.dataset.room;
  const params = new URLSearchParams(location.search);
  let token = params.get("token") || "";
  const form = $("token-form");
  if (!token && body.dataset.dev === "1") {
    try {
      token = await devToken(room);
    } catch (err) {
      $("error").textContent = `no dev token: ${err.message}`;
      $("error").hidden = false;
    }
  }
  if (!token) {
    form.hidden = false;
    $("state").textContent = "needs a token";
    return;
  }
  let rtcConfig = {};
  if (params.get("rtc_config")) {
    try {
      rtcConfig = JSON.parse(params.get("rtc_config"));
    } catch {
      $("error").textContent = "rtc_config is not JSON: ignored";
      $("error").hidden = false;
    }
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const viewer = new Viewer({
    room, token, url: `${scheme}//${location.host}/ws`, rtc: params.get("rtc") || "auto",
    rtcConfig, record: params.get("record") === "1",
  });
  window.posewire = viewer;
  viewer.start();
}
