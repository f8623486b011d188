// A subscribing room member: the member WebSocket (docs/room-protocol.md) and, where it can
// work, WebRTC data channels (docs/webrtc.md) with the WebSocket as the fallback.
//
// new Member({url, room, token, name, rtc, rtcConfig, on}) then start(). `on` has
// packet(bytes, via), control(obj), state(snapshot), members(list). `rtc`: "auto" (WebRTC
// unless the server is on a loopback address: aioice offers no loopback candidates),
// "off", or "force". The member WebSocket stays open for the whole membership; pose
// packets flow over it until both data channels are open and again as soon as the
// channels fall silent for deadAfterMs (heartbeat, docs/webrtc.md "Heartbeat").

const RETRY_CODES = new Set([1000, 1001, 1006, 1011, 1012, 1013, 1014, 4001, 4007, 4010, 4011,
  4012, 4013]);
const CLOSE_REASONS = {
  4002: "malformed_message", 4003: "unknown_message_type", 4004: "bad_packet",
  4005: "stream_spoof", 4006: "not_joined", 4008: "too_many_streams",
  4009: "message_too_large", 4014: "room_closed", 4015: "room_not_found", 4016: "kicked",
  4017: "stale_packet", 4018: "bad_signaling", 4101: "token expired",
  4102: "token not yet valid", 4103: "token for another room", 4104: "bad token signature",
  4105: "bad token algorithm", 4106: "token lacks a permission", 4107: "token kicked",
  4108: "malformed token",
};

// non-closing refusals of an offer: the member stays on the WebSocket
const RTC_REFUSALS = new Set(["webrtc_disabled", "too_many_peers"]);

export const HEARTBEAT_MS = 200;
export const DEAD_AFTER_MS = 250;
const TICK_MS = 20;
const STALL_MS = 100; // a tick this late: the page itself stalled
const CONFIRM_MS = 5; // a dead path is confirmed after the pending messages ran
const CLOCK_SAMPLES = 8;
const CLOCK_INTERVAL_MS = 5000;
const RTC_OPEN_TIMEOUT_MS = 5000;

const nowNs = () => BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e6));

function isLoopback(host) {
  return host === "localhost" || host.startsWith("127.") || host === "[::1]" || host === "::1";
}

export class Member {
  constructor({ url, room, token, name = "viewer", rtc = "auto", rtcConfig = {}, on = {} }) {
    this.url = url; // ws://host:port/ws
    this.room = room;
    this.token = token;
    this.name = name;
    this.rtcMode = rtc;
    this.rtcConfig = { iceServers: [], ...rtcConfig };
    this.on = on;
    this.memberId = null;
    this.ws = null;
    this.stopped = false;
    this.backoffMs = 250;
    this.pings = new Map();
    this.nextPing = 1;
    this.clock = []; // [rttNs, offsetNs] samples, newest last
    this.snap = {
      phase: "connecting", transport: "websocket", error: null, note: null,
      memberId: null, reconnects: 0, rtcOpens: 0, rtcDeaths: 0, rtcLocalCandidates: 0,
      clockOffsetNs: null,
      clockRttMs: null,
    };
    this.rtc = null; // {pc, pose, control, session, lastRecv, lastSent, open}
    this.session = 0;
    this.rtcBackoffMs = 1000;
    this.rtcRetryTimer = null;
    this.ticker = null;
    this.lastTick = performance.now();
    this.clockTimer = null;
  }

  get clockOffsetNs() {
    return this.snap.clockOffsetNs;
  }

  start() {
    this.ticker = setInterval(() => this._tick(), TICK_MS);
    this._connect();
  }

  stop() {
    this.stopped = true;
    clearInterval(this.ticker);
    clearInterval(this.clockTimer);
    clearTimeout(this.rtcRetryTimer);
    this._rtcDrop("stopped", false);
    if (this.ws) this.ws.close(1000);
  }

  /** Ask for what a packet of `streamId` lacks: `refSeq` (BigInt), its missing reference,
   * which the server sends again from its history (a NACK), else a keyframe. */
  requestKeyframe(streamId, refSeq = null) {
    const msg = { type: "keyframe_request", stream_id: streamId };
    if (refSeq !== null && refSeq <= BigInt(Number.MAX_SAFE_INTEGER)) msg.ref_seq = Number(refSeq);
    this._sendWs(msg);
  }

  _state(update) {
    Object.assign(this.snap, update);
    if (this.on.state) this.on.state({ ...this.snap });
  }

  _sendWs(obj) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(obj));
  }

  // ---------------------------------------------------------------- the member WebSocket

  _connect() {
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    let lastError = null;
    ws.onopen = () => {
      const join = { type: "join", token: this.token, room: this.room, publish: false,
        subscribe: true, name: this.name };
      if (this.memberId) join.resume = this.memberId;
      ws.send(JSON.stringify(join));
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        let obj;
        try {
          obj = JSON.parse(ev.data);
        } catch {
          this._state({ note: "the server sent a message that is not JSON: ignored" });
          return;
        }
        if (obj && obj.type === "error") lastError = obj;
        this._onText(obj, "websocket");
      } else {
        this._packet(ev.data, "websocket");
      }
    };
    ws.onclose = (ev) => this._onClose(ws, ev, lastError);
  }

  _onClose(ws, ev, lastError) {
    if (ws !== this.ws) return;
    this._rtcDrop("the member WebSocket closed", false);
    if (this.stopped) {
      this._state({ phase: "closed" });
      return;
    }
    const reason = CLOSE_REASONS[ev.code] || (lastError && lastError.reason) || `code ${ev.code}`;
    const detail = (lastError && lastError.message) || ev.reason || "";
    if (RETRY_CODES.has(ev.code)) {
      const delay = this.backoffMs;
      this.backoffMs = Math.min(this.backoffMs * 2, 5000);
      this._state({ phase: "reconnecting", transport: "websocket",
        reconnects: this.snap.reconnects + 1,
        note: `connection lost (${reason}): reconnecting in ${delay} ms` });
      setTimeout(() => this._connect(), delay);
      return;
    }
    this._state({ phase: "failed", error: `${reason}${detail ? ": " + detail : ""}` });
  }

  _onText(obj, via) {
    if (!obj || typeof obj.type !== "string") return;
    switch (obj.type) {
      case "welcome":
        this.memberId = obj.member_id;
        this.backoffMs = 250;
        this.clock = [];
        this._state({ phase: "joined", memberId: obj.member_id, error: null, note: null });
        if (this.on.members) this.on.members(obj.members || [], true);
        this._clockBurst(CLOCK_SAMPLES, true);
        this._maybeOfferRtc(obj.webrtc && obj.webrtc.enabled);
        break;
      case "presence":
        if (this.on.presence) this.on.presence(obj.event, obj.member);
        break;
      case "pong":
        this._onPong(obj);
        break;
      case "rtc_answer":
        this._onAnswer(obj);
        break;
      case "rtc_state":
        this._onRtcState(obj);
        break;
      case "hb":
        break;
      case "error":
        if (RTC_REFUSALS.has(obj.reason) && this.rtc) {
          // a refused offer (docs/webrtc.md): the membership goes on over the WebSocket
          const retry = obj.reason === "too_many_peers";
          this._rtcDrop(`WebRTC refused by the server (${obj.reason})`, retry, false);
          break;
        }
        if (this.on.control) this.on.control(obj, via);
        break;
      default:
        if (this.on.control) this.on.control(obj, via);
    }
  }

  _packet(data, via) {
    if (this.on.packet) this.on.packet(new Uint8Array(data), via);
  }

  // ---------------------------------------------------------------- clock (NTP-style)

  _clockBurst(count, report) {
    let left = count;
    const one = () => {
      if (left-- <= 0) {
        if (report && this.snap.clockOffsetNs !== null) {
          this._sendWs({ type: "clock", offset_ns: Number(this.snap.clockOffsetNs),
            rtt_ns: Math.round(this.snap.clockRttMs * 1e6) });
        }
        return;
      }
      const id = this.nextPing++;
      const t0 = nowNs();
      this.pings.set(id, { t0, done: one });
      this._sendWs({ type: "ping", id, t0: Number(t0) });
    };
    one();
    if (report) {
      clearInterval(this.clockTimer);
      this.clockTimer = setInterval(() => this._clockBurst(1, false), CLOCK_INTERVAL_MS);
    }
  }

  _onPong(obj) {
    const t3 = nowNs();
    const p = this.pings.get(obj.id);
    if (!p) return;
    this.pings.delete(obj.id);
    if ([obj.t1, obj.t2].every((v) => Number.isSafeInteger(v) || typeof v === "number")) {
      // server times beyond 2**53 arrive rounded to 256 ns by JSON: far below a millisecond
      const t1 = BigInt(Math.round(obj.t1));
      const t2 = BigInt(Math.round(obj.t2));
      let rtt = t3 - p.t0 - (t2 - t1);
      if (rtt < 0n) rtt = 0n;
      const offset = (t1 - p.t0 + (t2 - t3)) / 2n;
      this.clock.push([rtt, offset]);
      if (this.clock.length > 32) this.clock.shift();
      const best = this.clock.reduce((a, b) => (b[0] < a[0] ? b : a));
      this.snap.clockOffsetNs = best[1];
      this.snap.clockRttMs = Number(best[0]) / 1e6;
    }
    p.done();
  }

  // ---------------------------------------------------------------- WebRTC

  _maybeOfferRtc(enabled) {
    if (this.rtcMode === "off" || typeof RTCPeerConnection === "undefined") {
      this._state({ transport: "websocket", note: "WebRTC off" });
      return;
    }
    if (!enabled) {
      this._state({ transport: "websocket", note: "the server takes no WebRTC offers" });
      return;
    }
    const host = new URL(this.url).hostname;
    if (this.rtcMode === "auto" && isLoopback(host)) {
      this._state({ transport: "websocket",
        note: "server on a loopback address: WebRTC cannot reach it" });
      return;
    }
    this._offer().catch((err) => this._rtcDrop(`offer failed: ${err.message}`, true));
  }

  async _offer() {
    clearTimeout(this.rtcRetryTimer);
    this._rtcDrop("new offer", false);
    const session = ++this.session;
    const pc = new RTCPeerConnection(this.rtcConfig);
    const pose = pc.createDataChannel("pose", { negotiated: true, id: 0, ordered: false,
      maxRetransmits: 0 });
    const control = pc.createDataChannel("control", { negotiated: true, id: 1 });
    pose.binaryType = control.binaryType = "arraybuffer";
    const link = { pc, pose, control, session, lastRecv: performance.now(),
      lastSent: performance.now(), open: false, started: performance.now() };
    this.rtc = link;
    const recv = (via) => (ev) => {
      link.lastRecv = performance.now();
      if (typeof ev.data === "string") {
        let obj = null;
        try {
          obj = JSON.parse(ev.data);
        } catch {
          return;
        }
        this._onText(obj, via);
      } else {
        this._packet(ev.data, via);
      }
    };
    pose.onmessage = recv("webrtc-pose");
    control.onmessage = recv("webrtc-control");
    const opened = () => {
      if (pose.readyState === "open" && control.readyState === "open" && !link.open) {
        link.open = true;
        link.lastRecv = performance.now();
        this.rtcBackoffMs = 1000;
        this._state({ transport: "webrtc", rtcOpens: this.snap.rtcOpens + 1, note: null });
      }
    };
    pose.onopen = control.onopen = opened;
    pc.onicecandidate = (ev) => {
      if (ev.candidate && ev.candidate.candidate) this.snap.rtcLocalCandidates++;
    };
    this._state({ note: "WebRTC connecting (websocket meanwhile)" });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, 2000);
    if (this.rtc !== link) return;
    this._sendWs({ type: "rtc_offer", session, sdp: pc.localDescription.sdp });
  }

  async _onAnswer(obj) {
    const link = this.rtc;
    if (!link || obj.session !== link.session) return;
    try {
      await link.pc.setRemoteDescription({ type: "answer", sdp: obj.sdp });
    } catch (err) {
      this._rtcDrop(`answer refused: ${err.message}`, true);
    }
  }

  _onRtcState(obj) {
    const link = this.rtc;
    if (!link || obj.session !== link.session) return;
    if (obj.state === "closed") {
      this._rtcDrop(`server closed WebRTC (${obj.reason || "?"})`, true, false);
    }
  }

  /** Leave the peer connection; back to the WebSocket; offer again later when retry. */
  _rtcDrop(why, retry, tellServer = true) {
    const link = this.rtc;
    if (!link) return;
    this.rtc = null;
    if (tellServer) this._sendWs({ type: "rtc_close", session: link.session });
    for (const ch of [link.pose, link.control]) ch.onmessage = ch.onopen = null;
    link.pc.close();
    this._state({ transport: "websocket", note: why });
    if (retry && !this.stopped) {
      const delay = this.rtcBackoffMs;
      this.rtcBackoffMs = Math.min(this.rtcBackoffMs * 2, 30000);
      this.rtcRetryTimer = setTimeout(() => {
        if (!this.stopped && this.ws && this.ws.readyState === WebSocket.OPEN) {
          this._offer().catch((err) => this._rtcDrop(`offer failed: ${err.message}`, true));
        }
      }, delay);
    }
  }

  _tick() {
    const now = performance.now();
    const stalled = now - this.lastTick > STALL_MS; // this page did not run: not the path
    this.lastTick = now;
    const link = this.rtc;
    if (!link) return;
    if (!link.open) {
      if (now - link.started > RTC_OPEN_TIMEOUT_MS) this._rtcDrop("WebRTC did not connect", true);
      return;
    }
    if (stalled) link.lastRecv = Math.max(link.lastRecv, now - TICK_MS);
    if (now - link.lastRecv > DEAD_AFTER_MS && !link.confirming) {
      // let the messages that arrived meanwhile run first (a busy page is not a dead path)
      link.confirming = true;
      setTimeout(() => {
        link.confirming = false;
        const silent = performance.now() - link.lastRecv;
        if (this.rtc === link && silent > DEAD_AFTER_MS) {
          this.snap.rtcDeaths++;
          this._rtcDrop(`WebRTC path dead (${Math.round(silent)} ms silent)`, true);
        }
      }, CONFIRM_MS);
      return;
    }
    if (now - link.lastSent >= HEARTBEAT_MS && link.pose.readyState === "open") {
      link.pose.send('{"type":"hb"}');
      link.lastSent = now;
    }
  }
}

/** Resolves when ICE gathering is complete (the offer then holds every candidate). */
function gathered(pc, limitMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, limitMs);
  });
}
