async ({streams, full}) => {
  // The browser side of tests/test_viewer_decoder.py, run by page.evaluate: decode every
  // packet of every stream with pipeline/server/static/decoder.js; return per stream the
  // SHA-256 of its result lines and of its float32 values (or both in full for the streams
  // named in `full`).
  const m = await import('/static/decoder.js');
  const hex = async (bytes) => {
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
    return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
  };
  const out = {};
  for (const [tag, b64, lens] of streams) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const dec = new m.Decoder();
    const lines = [];
    const parts = [];
    let size = 0;
    let off = 0;
    for (const n of lens) {
      const pkt = bytes.subarray(off, off + n);
      off += n;
      let r;
      try {
        r = dec.decode(pkt);
      } catch (e) {
        if (e instanceof m.UnsupportedVersionError) lines.push('U');
        else if (e instanceof m.ProtocolError) lines.push('E');
        else lines.push('X ' + e);
        continue;
      }
      if (r.kind === 'need_keyframe') {
        lines.push(`N ${r.streamId} ${r.seq} ${r.missingRef}`);
        continue;
      }
      const h = r.header;
      lines.push(`D ${h.streamId} ${h.seq} ${h.captureTsNs} ${h.refSeq} ${h.keyframe ? 1 : 0} ` +
        `${h.hasWorld ? 1 : 0} ${h.numPoses} ${h.epoch} ${h.headerLen + h.payloadLen + 4} ` +
        `${h.tsResidualUs}`);
      for (const a of [r.image, r.world]) {
        if (a) {
          parts.push(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
          size += a.byteLength;
        }
      }
    }
    const floats = new Uint8Array(size);
    let at = 0;
    for (const p of parts) {
      floats.set(p, at);
      at += p.length;
    }
    const text = new TextEncoder().encode(lines.join('\n'));
    if (full.includes(tag)) {
      let s = '';
      for (let i = 0; i < floats.length; i += 8192) {
        s += String.fromCharCode(...floats.subarray(i, i + 8192));
      }
      out[tag] = [lines, btoa(s)];
    } else {
      out[tag] = [await hex(text), await hex(floats)];
    }
  }
  return out;
}
