// The posewire pose decoder (wire protocol version 1), written from docs/protocol.md.
//
// decode(packet) returns {kind: "decoded", header, image, world} or
// {kind: "need_keyframe", streamId, seq, missingRef}; bad bytes throw ProtocolError
// (UnsupportedVersionError for another version) and nothing else. Sequence numbers and
// timestamps are BigInt (they reach 2**63); image is a Float32Array [n][33][4]
// (x, y, z, visibility), world a Float32Array [n][33][3] or null.

export const PROTOCOL_VERSION = 1;
export const MAX_PACKET_BYTES = 1100;
export const MIN_PACKET_BYTES = 11;
export const HISTORY = 32;
export const MAX_POSES = 8;
export const NUM_LANDMARKS = 33;

const L = NUM_LANDMARKS;
const DEPTH = 3;
const ZERO_GROUP = 15;
const CHECKSUM_BYTES = 4;
const MAX_STREAM_ID = 2n ** 32n - 1n;
const MAX_SEQ = 2n ** 63n - 1n;
const TS_LIMIT = 2n ** 62n;
const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = "ProtocolError";
  }
}

export class UnsupportedVersionError extends ProtocolError {
  constructor(message) {
    super(message);
    this.name = "UnsupportedVersionError";
  }
}

// ------------------------------------------------------------------ CRC32C, varints

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** CRC32C (Castagnoli) of bytes[start:end]. */
export function crc32c(bytes, start = 0, end = bytes.length) {
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** A canonical LEB128 varint of at most 10 bytes at pos: [BigInt value, next pos]. */
export function varint(buf, pos, end, what) {
  if (pos < end && buf[pos] < 0x80) return [BigInt(buf[pos]), pos + 1];
  let value = 0n;
  let shift = 0n;
  const start = pos;
  for (;;) {
    if (pos >= end) throw new ProtocolError(`packet truncated inside the ${what} field`);
    const byte = buf[pos++];
    value |= BigInt(byte & 0x7f) << shift;
    if (byte < 0x80) {
      if (byte === 0 && pos - start > 1) {
        throw new ProtocolError(`non-canonical varint in the ${what} field`);
      }
      return [value, pos];
    }
    shift += 7n;
    if (shift >= 70n) throw new ProtocolError(`varint longer than 10 bytes in the ${what} field`);
  }
}

const unzigzag = (v) => (v & 1n ? -((v + 1n) >> 1n) : v >> 1n);

function asBytes(packet) {
  if (packet instanceof Uint8Array) return packet;
  if (packet instanceof ArrayBuffer) return new Uint8Array(packet);
  if (ArrayBuffer.isView(packet)) {
    return new Uint8Array(packet.buffer, packet.byteOffset, packet.byteLength);
  }
  throw new ProtocolError(`packet must be bytes, not ${packet === null ? "null" : typeof packet}`);
}

// ------------------------------------------------------------------ header

/** Validate a packet's framing; returns the raw fields (docs/protocol.md, "Packet"). */
function parseHeader(buf) {
  const n = buf.length;
  if (n < MIN_PACKET_BYTES) {
    throw new ProtocolError(
      `packet too short: ${n} bytes, a packet has at least ${MIN_PACKET_BYTES}`,
    );
  }
  if (n >= MAX_PACKET_BYTES) {
    throw new ProtocolError(`packet too long: ${n} bytes, must be under ${MAX_PACKET_BYTES}`);
  }
  const b0 = buf[0];
  if (b0 >> 4 !== 0xb) throw new ProtocolError(`not a posewire packet (first byte ${b0})`);
  let version = b0 & 0x0f;
  let pos = 1;
  if (version === 0x0f) {
    version = buf[1];
    pos = 2;
    if (version < 0x0f) throw new ProtocolError(`non-canonical version byte ${version} after 0xBF`);
  }
  if (version !== PROTOCOL_VERSION) {
    throw new UnsupportedVersionError(
      `packet has protocol version ${version}, ` +
        `this build supports only version ${PROTOCOL_VERSION}`,
    );
  }
  const end = n - CHECKSUM_BYTES;
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(end, true) !== crc32c(buf, 0, end)) {
    throw new ProtocolError("checksum mismatch: the packet is corrupt");
  }
  const flags = buf[pos++];
  const numPoses = (flags >> 2) & 0x0f;
  if (numPoses > MAX_POSES) throw new ProtocolError(`${numPoses} poses in the flags, at most 8`);
  let sid, seq, refSeq, tsField, refDelta, zz, payloadLen;
  [sid, pos] = varint(buf, pos, end, "stream id");
  if (sid > MAX_STREAM_ID) throw new ProtocolError(`stream id ${sid} out of range`);
  [seq, pos] = varint(buf, pos, end, "sequence");
  if (seq > MAX_SEQ) throw new ProtocolError(`sequence number ${seq} out of range`);
  const keyframe = (flags & 1) !== 0;
  if (keyframe) {
    if (pos + 8 > end) throw new ProtocolError("packet truncated inside the timestamp field");
    tsField = dv.getBigInt64(pos, true);
    pos += 8;
    refSeq = null;
  } else {
    [refDelta, pos] = varint(buf, pos, end, "reference");
    const most = seq < MAX_STREAM_ID ? seq : MAX_STREAM_ID;
    if (refDelta < 1n || refDelta > most) {
      throw new ProtocolError(`reference delta ${refDelta} invalid for sequence ${seq}`);
    }
    refSeq = seq - refDelta;
    [zz, pos] = varint(buf, pos, end, "timestamp");
    tsField = unzigzag(zz);
    if (tsField <= -TS_LIMIT || tsField >= TS_LIMIT) {
      throw new ProtocolError("timestamp residual out of range");
    }
  }
  [payloadLen, pos] = varint(buf, pos, end, "payload length");
  if (payloadLen !== BigInt(end - pos)) {
    throw new ProtocolError(
      `payload length field says ${payloadLen} bytes, the packet holds ${end - pos}`,
    );
  }
  return {
    version, keyframe, hasWorld: (flags & 2) !== 0, numPoses, epoch: (flags >> 6) & 3,
    streamId: Number(sid), seq, refSeq, tsField, start: pos, end,
  };
}

function header(f, captureTsNs) {
  return {
    streamId: f.streamId, seq: f.seq, captureTsNs, refSeq: f.refSeq, keyframe: f.keyframe,
    hasWorld: f.hasWorld, numPoses: f.numPoses, payloadLen: f.end - f.start,
    version: f.version, tsResidualUs: f.keyframe ? null : f.tsField, headerLen: f.start,
    epoch: f.epoch,
  };
}

/** The validated header without decoding the payload (captureTsNs null for a delta). */
export function peekHeader(packet) {
  const f = parseHeader(asBytes(packet));
  return header(f, f.keyframe ? f.tsField : null);
}

// ------------------------------------------------------------------ quantization

const IMAGE_LO = [-1, -1, -4, 0];
const IMAGE_HI = [2, 2, 4, 1];

function parseQuant(buf, pos, end) {
  let nxy, nz, nw;
  [nxy, pos] = varint(buf, pos, end, "x/y step");
  [nz, pos] = varint(buf, pos, end, "z step");
  [nw, pos] = varint(buf, pos, end, "world step");
  if (pos >= end) throw new ProtocolError("packet truncated inside the visibility levels field");
  const levels = buf[pos] + 1;
  if (nxy < 1n || nxy > 16384n) throw new ProtocolError(`x/y quantization ${nxy} not in 1..16384`);
  if (nz < 1n || nz > 4096n) throw new ProtocolError(`z quantization ${nz} not in 1..4096`);
  if (nw < 1n || nw > 4096n) throw new ProtocolError(`world quantization ${nw} not in 1..4096`);
  if (levels < 2) throw new ProtocolError(`${levels} visibility levels, must be 2..256`);
  return [quantParams(Number(nxy), Number(nz), Number(nw), levels), pos + 1];
}

const quantCache = new Map();

/** Per image component (x, y, z, visibility): steps, inverse, valid quantized range. */
function quantParams(nxy, nz, nw, levels) {
  const key = `${nxy},${nz},${nw},${levels}`;
  let q = quantCache.get(key);
  if (q === undefined) {
    const scale = [nxy, nxy, nz, levels - 1];
    q = {
      scale,
      inv: scale.map((s) => 1 / s),
      lo: scale.map((s, c) => Math.floor(IMAGE_LO[c] * s)),
      hi: scale.map((s, c) => Math.ceil(IMAGE_HI[c] * s)),
      root: [Math.floor(nxy / 2), Math.floor(nxy / 2), 0, levels - 1],
      invW: 1 / nw, wlo: Math.floor(-8 * nw), whi: Math.ceil(8 * nw),
    };
    if (quantCache.size > 64) quantCache.clear();
    quantCache.set(key, q);
  }
  return q;
}

// ------------------------------------------------------------------ prediction model

const PARENT = [
  -1, 0, 1, 2, 0, 4, 5, 3, 6, 0, 9,
  0, 11, 11, 12, 13, 14, 15, 16, 15, 16, 15, 16,
  11, 23, 23, 24, 25, 26, 27, 28, 27, 28,
];
const RIGID = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [15, 17, 19, 21], [16, 18, 20, 22],
  [27, 29, 31], [28, 30, 32], [11, 12], [23, 24],
];
// class -> depth -> [a_2..a_d], [b_1..b_d], [c_2..c_d], in 1/256
const COEFS = {
  xy: {
    1: [[], [0], []], 2: [[88], [321, -317], [-144]], 3: [[74, 23], [282, -204, -75], [33, -113]],
  },
  z: { 1: [[], [115], []], 2: [[89], [94, -19], [113]], 3: [[65, 67], [121, 16, -81], [85, 51]] },
  world: {
    1: [[], [0], []], 2: [[76], [295, -293], [-118]], 3: [[71, 7], [250, -185, -63], [30, -101]],
  },
};
const sum = (xs) => xs.reduce((a, b) => a + b, 0);

/** Integer weights (units 2**-16) of landmark j's prediction: [[frame i, landmark k, w]...]. */
function predictorRows(cls, depth) {
  const groupOf = new Map();
  for (const g of RIGID) for (const j of g) groupOf.set(j, g);
  const rows = [];
  for (let j = 0; j < L; j++) {
    const w = new Map(); // i * L + k -> weight
    const add = (i, k, v) => w.set(i * L + k, (w.get(i * L + k) || 0) + v);
    if (cls === "vis") {
      add(0, j, 65536);
    } else {
      const [a, b, c] = COEFS[cls][depth];
      const g = groupOf.get(j);
      if (g === undefined) {
        const own = [256 - sum(c), ...c];
        for (let i = 0; i < depth; i++) add(i, j, own[i] * 256);
      } else {
        const own = [256 - sum(a) - sum(b), ...a];
        for (let i = 0; i < depth; i++) {
          add(i, j, own[i] * 256);
          const share = Math.floor((2 * b[i] * 256 + g.length) / (2 * g.length));
          for (const k of g) add(i, k, share);
        }
      }
    }
    const cols = [];
    const vals = [];
    for (const [col, v] of w) {
      if (v !== 0) {
        cols.push(col);
        vals.push(v);
      }
    }
    rows.push([Int32Array.from(cols), Float64Array.from(vals)]);
  }
  return rows;
}

// PRED[world ? 1 : 0][depth][component][j] = [cols, weights]
const PRED = [["xy", "xy", "z", "vis"], ["world", "world", "world"]].map((classes) => {
  const byDepth = [null];
  for (let d = 1; d <= DEPTH; d++) byDepth.push(classes.map((cls) => predictorRows(cls, d)));
  return byDepth;
});

// ------------------------------------------------------------------ payload

// A frame's history: per pose, 7 channels (x, y, z, vis, wx, wy, wz) of 3 * 33 quantized
// values (the frame's own, its reference's, that one's), then the channel's group code
// and (in channels 0 and 4) the predictor depth of the image / world groups.
const CH = 7;
const WORLD = 4;
const COL_CODE = DEPTH * L;
const COL_DEPTH = COL_CODE + 1;
const WIDTH = COL_DEPTH + 1;
const at = (p, ch, col) => (p * CH + ch) * WIDTH + col;

class Bits {
  constructor(buf, start, end) {
    this.buf = buf;
    this.start = start;
    this.nBits = 8 * (end - start);
    this.bit = 0;
  }
  one() {
    const b = this.bit++;
    return (this.buf[this.start + (b >> 3)] >> (7 - (b & 7))) & 1;
  }
}

/** Decode the payload bits of n poses against ref (null: keyframe); returns the history,
 * the image and world values, or throws ProtocolError. */
function decodePayload(buf, start, end, n, hasWorld, q, ref) {
  const per = hasWorld ? 7 : 4;
  const nGroups = n * per;
  const hist = new Int32Array(Math.max(n, 1) * CH * WIDTH);
  const refN = ref === null ? 0 : ref.n;
  const refWorld = ref !== null && ref.world;
  if (nGroups === 0) {
    if (end !== start) {
      throw new ProtocolError(`${end - start} payload bytes where none are expected`);
    }
    return { hist, image: new Float32Array(0), world: hasWorld ? new Float32Array(0) : null };
  }
  const r = new Bits(buf, start, end);
  const codes = new Int32Array(nGroups);
  let nVals = 0;
  let remBits = 0;
  for (let p = 0; p < n; p++) {
    for (let ch = 0; ch < per; ch++) {
      const inRef = p < refN && (ch < WORLD || refWorld);
      const rc = inRef ? ref.hist[at(p, ch, COL_CODE)] : ZERO_GROUP;
      let ones = 0;
      while (ones < 3) {
        if (r.bit >= r.nBits) throw new ProtocolError("payload truncated inside the group codes");
        if (!r.one()) break;
        ones++;
      }
      let c;
      if (ones === 0) c = rc;
      else if (ones === 1) c = rc + 1;
      else if (ones === 2) c = rc - 1;
      else {
        if (r.bit + 4 > r.nBits) {
          throw new ProtocolError("payload truncated inside the group codes");
        }
        c = 0;
        for (let i = 0; i < 4; i++) c = (c << 1) | r.one();
      }
      if (c < 0 || c > ZERO_GROUP) throw new ProtocolError(`group code ${c} out of range`);
      codes[p * per + ch] = c;
      hist[at(p, ch, COL_CODE)] = c;
      if (c !== ZERO_GROUP) {
        nVals += L;
        remBits += c * L;
      }
    }
  }
  const checkPadding = (used) => {
    const pad = r.nBits - used;
    if (pad < 0) throw new ProtocolError("payload truncated inside the remainders");
    if (pad >= 8 || (buf[end - 1] & ((1 << pad) - 1)) !== 0) {
      throw new ProtocolError("payload has trailing bytes or non-zero padding");
    }
  };
  if (nVals === 0) checkPadding(r.bit);
  // unary parts: q zero bits then a one, per value of every non-zero group (a byte at a
  // time: the zeros of the byte's unread bits, then Math.clz32 finds the one)
  const u = new Float64Array(nGroups * L);
  let bit = r.bit;
  const nBits = r.nBits;
  for (let g = 0; g < nGroups; g++) {
    const k = codes[g];
    if (k === ZERO_GROUP) continue;
    const scale = 2 ** k;
    for (let i = g * L; i < g * L + L; i++) {
      let zeros = 0;
      for (;;) {
        if (bit >= nBits) throw new ProtocolError("payload truncated inside the unary codes");
        const off = bit & 7;
        const rest = (buf[start + (bit >> 3)] << off) & 0xff; // unread bits, at the top
        if (rest === 0) {
          zeros += 8 - off;
          bit += 8 - off;
          continue;
        }
        const z = Math.clz32(rest) - 24;
        zeros += z;
        bit += z + 1;
        break;
      }
      u[i] = zeros * scale;
    }
  }
  checkPadding(bit + remBits);
  // remainders: the low k bits (k <= 14) of each value, most significant first; the
  // section lies inside the payload (checked above), so 3 bytes from its bit hold them
  for (let g = 0; g < nGroups; g++) {
    const k = codes[g];
    if (k === ZERO_GROUP || k === 0) continue;
    const mask = (1 << k) - 1;
    for (let i = g * L; i < g * L + L; i++) {
      const at0 = start + (bit >> 3);
      const w = (buf[at0] << 16) | ((buf[at0 + 1] | 0) << 8) | (buf[at0 + 2] | 0);
      u[i] += (w >>> (24 - (bit & 7) - k)) & mask;
      bit += k;
    }
  }
  // reconstruction: prediction + unzigzagged residual, checked against the ranges
  let worldBad = false;
  for (let p = 0; p < n; p++) {
    for (let ch = 0; ch < per; ch++) {
      const isWorld = ch >= WORLD;
      const c = isWorld ? ch - WORLD : ch;
      const inter = p < refN && (!isWorld || refWorld);
      const d = inter ? ref.hist[at(p, isWorld ? WORLD : 0, COL_DEPTH)] : 0;
      const rows = inter ? PRED[isWorld ? 1 : 0][d][c] : null;
      const base = (p * per + ch) * L;
      for (let j = 0; j < L; j++) {
        let pred;
        if (inter) {
          const [cols, vals] = rows[j];
          let acc = 0;
          const rbase = at(p, ch, 0);
          for (let e = 0; e < cols.length; e++) acc += vals[e] * ref.hist[rbase + cols[e]];
          pred = Math.floor((acc + 32768) / 65536);
        } else if (j === 0) {
          pred = isWorld ? 0 : q.root[c];
        } else {
          pred = hist[at(p, ch, PARENT[j])];
        }
        const z = u[base + j];
        let v = pred + (z % 2 === 1 ? -(z + 1) / 2 : z / 2);
        if (isWorld) {
          if (!(q.wlo <= v && v <= q.whi)) {
            worldBad = true;
            v = 0;
          }
        } else if (!(q.lo[c] <= v && v <= q.hi[c])) {
          throw new ProtocolError("decoded image landmarks out of range: corrupt payload");
        }
        hist[at(p, ch, j)] = v;
      }
    }
  }
  if (worldBad) throw new ProtocolError("decoded world landmarks out of range: corrupt payload");
  const image = new Float32Array(n * L * 4);
  const world = hasWorld ? new Float32Array(n * L * 3) : null;
  for (let p = 0; p < n; p++) {
    for (let j = 0; j < L; j++) {
      for (let c = 0; c < 4; c++) image[(p * L + j) * 4 + c] = hist[at(p, c, j)] * q.inv[c];
      if (hasWorld) {
        for (let c = 0; c < 3; c++) world[(p * L + j) * 3 + c] = hist[at(p, WORLD + c, j)] * q.invW;
      }
    }
  }
  stackHistory(hist, n, ref, refN, refWorld, hasWorld);
  return { hist, image, world };
}

/** The reference part of a new frame's history: its reference's newest two frames follow
 * its own values, and the depths grow by one (at most 3) where the pose was inter coded. */
function stackHistory(hist, n, ref, refN, refWorld, hasWorld) {
  for (let p = 0; p < n; p++) {
    const inter = p < refN;
    hist[at(p, 0, COL_DEPTH)] = inter ? Math.min(DEPTH, ref.hist[at(p, 0, COL_DEPTH)] + 1) : 1;
    if (hasWorld) {
      const winter = inter && refWorld;
      hist[at(p, WORLD, COL_DEPTH)] = winter
        ? Math.min(DEPTH, ref.hist[at(p, WORLD, COL_DEPTH)] + 1)
        : 1;
    }
    if (!inter) continue;
    const last = hasWorld && refWorld ? WORLD + 3 : WORLD;
    for (let ch = 0; ch < last; ch++) {
      for (let col = L; col < DEPTH * L; col++) hist[at(p, ch, col)] = ref.hist[at(p, ch, col - L)];
    }
  }
}

// ------------------------------------------------------------------ decoder

/** Decodes the packets of any number of publisher streams (docs/protocol.md, "Decoder"). */
export class Decoder {
  constructor({ maxStreams = 256, maxPoses = MAX_POSES } = {}) {
    this.maxStreams = maxStreams;
    this.maxPoses = maxPoses;
    this.streams = new Map(); // streamId -> {entries: Map(seq -> entry), epoch, maxSeq}
    this.stats = { decoded: 0, needKeyframe: 0, errors: 0 };
  }

  decode(packet) {
    try {
      return this._decode(asBytes(packet));
    } catch (err) {
      this.stats.errors++;
      if (err instanceof ProtocolError) throw err;
      // defence in depth: every malformed input is meant to be refused above
      throw new ProtocolError(`malformed packet: ${err && err.message}`);
    }
  }

  _decode(buf) {
    const f = parseHeader(buf);
    if (f.numPoses > this.maxPoses) {
      throw new ProtocolError(
        `${f.numPoses} poses in a packet, this decoder accepts ${this.maxPoses}`,
      );
    }
    let st = this.streams.get(f.streamId);
    let ref = null;
    let q, pos, ts, stepUs;
    if (f.keyframe) {
      [q, pos] = parseQuant(buf, f.start, f.end);
      ts = f.tsField;
      stepUs = 0n;
    } else {
      ref = st === undefined ? undefined : st.entries.get(f.refSeq);
      if (ref === undefined || ref.epoch !== f.epoch) {
        this.stats.needKeyframe++;
        return { kind: "need_keyframe", streamId: f.streamId, seq: f.seq, missingRef: f.refSeq };
      }
      q = ref.q;
      pos = f.start;
      const gap = f.seq - f.refSeq;
      const dUs = f.tsField + ref.stepUs * gap;
      ts = ref.ts + dUs * 1000n;
      if (ts < I64_MIN || ts > I64_MAX) throw new ProtocolError("capture timestamp out of range");
      stepUs = floorDiv(dUs, gap);
    }
    const out = decodePayload(buf, pos, f.end, f.numPoses, f.hasWorld, q, ref);
    // the packet is good: update the stream state
    if (st === undefined) {
      st = { entries: new Map(), epoch: f.epoch, maxSeq: -1n };
      this.streams.set(f.streamId, st);
      while (this.streams.size > this.maxStreams) {
        this.streams.delete(this.streams.keys().next().value);
      }
    } else {
      this.streams.delete(f.streamId); // least recently used first out
      this.streams.set(f.streamId, st);
    }
    if (ref === null) {
      if (f.epoch !== st.epoch) {
        st.entries.clear(); // another encoder instance: forget the old frames
        st.epoch = f.epoch;
      } else if (f.seq <= st.maxSeq) {
        for (const s of [...st.entries.keys()]) if (s >= f.seq) st.entries.delete(s);
        st.maxSeq = f.seq;
      }
    }
    st.entries.delete(f.seq);
    st.entries.set(f.seq, {
      ts, stepUs, epoch: f.epoch, q, n: f.numPoses, hist: out.hist, world: f.hasWorld,
    });
    while (st.entries.size > HISTORY) st.entries.delete(st.entries.keys().next().value);
    if (f.seq > st.maxSeq) st.maxSeq = f.seq;
    this.stats.decoded++;
    return { kind: "decoded", header: header(f, ts), image: out.image, world: out.world };
  }

  /** Drop a stream's state (its publisher left). */
  forget(streamId) {
    this.streams.delete(streamId);
  }
}

function floorDiv(a, b) {
  const q = a / b; // BigInt division truncates toward zero
  return (a % b !== 0n && (a < 0n) !== (b < 0n)) ? q - 1n : q;
}
