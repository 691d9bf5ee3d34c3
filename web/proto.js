// Protobuf codec for exactly the omcb.v1 messages (proto/omcb.proto), by hand:
// the wire format is small and a generated runtime would be the biggest file
// on the page. uint64 fields (seq, epoch, times) are BigInt: epochs are random
// 64-bit numbers and would lose digits as Number. uint32 fields are Number.

export const Reason = Object.freeze({
  UNSPECIFIED: 0, OUT_OF_RANGE: 1, FROZEN: 2, RATE_LIMITED: 3, BOARD_FULL: 4, UNAVAILABLE: 5,
});

export class DecodeError extends Error {}

class Reader {
  constructor(bytes) {
    this.buf = bytes;
    this.pos = 0;
  }
  done() { return this.pos >= this.buf.length; }
  // A 64-bit varint as BigInt (seq, epoch, times).
  varint() {
    let result = 0n;
    let shift = 0n;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.buf.length) throw new DecodeError('truncated varint');
      const b = this.buf[this.pos++];
      result |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) return result & 0xffffffffffffffffn;
      shift += 7n;
    }
    throw new DecodeError('varint longer than 10 bytes');
  }
  // A varint read as uint32, in Number arithmetic: batch index lists are
  // thousands of these, and BigInt per value would dominate decoding. Like
  // protobuf, a wider value is truncated to its low 32 bits.
  uint32() {
    let result = 0;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.buf.length) throw new DecodeError('truncated varint');
      const b = this.buf[this.pos++];
      // Bytes past the fifth only carry bits above 32: skip them.
      if (i < 5) result += (b & 0x7f) * 2 ** (7 * i);
      if ((b & 0x80) === 0) return result % 0x1_0000_0000;
    }
    throw new DecodeError('varint longer than 10 bytes');
  }
  bool() { return this.varint() !== 0n; }
  // A length prefix, exact (not truncated): a wrapped length would misparse.
  length() {
    const n = this.varint();
    if (n > 0x7fffffffn) throw new DecodeError('length out of range');
    return Number(n);
  }
  bytes() {
    const len = this.length();
    if (this.pos + len > this.buf.length) throw new DecodeError('truncated field');
    const out = this.buf.subarray(this.pos, this.pos + len);
    this.pos += len;
    return out;
  }
  skip(wireType) {
    switch (wireType) {
      case 0: this.varint(); break;
      case 1: this.need(8); this.pos += 8; break;
      case 2: this.bytes(); break;
      case 5: this.need(4); this.pos += 4; break;
      default: throw new DecodeError(`unsupported wire type ${wireType}`);
    }
  }
  need(n) { if (this.pos + n > this.buf.length) throw new DecodeError('truncated field'); }
  // A repeated uint32, packed (wire type 2) or not (wire type 0): both are
  // legal. Returns false for any other wire type, so the caller skips it.
  repeatedUint32(wireType, into) {
    if (wireType === 0) {
      into.push(this.uint32());
      return true;
    }
    if (wireType !== 2) return false;
    const sub = new Reader(this.bytes());
    while (!sub.done()) into.push(sub.uint32());
    return true;
  }
}

// Calls fn(fieldNumber, wireType, reader) for each field of a message.
function fields(bytes, fn) {
  const r = new Reader(bytes);
  while (!r.done()) {
    const key = r.uint32();
    const field = key >>> 3;
    const wire = key & 7;
    if (field === 0) throw new DecodeError('field number 0');
    if (!fn(field, wire, r)) r.skip(wire);
  }
}

export function decodeSnapshot(bytes) {
  const s = {
    seq: 0n, size: 0, checked: new Uint8Array(0), frozen: new Uint8Array(0),
    checkedCount: 0, frozenCount: 0, freezeAfterMs: 0n, serverTimeMs: 0n, epoch: 0n,
  };
  fields(bytes, (f, w, r) => {
    switch (f) {
      case 1: if (w !== 0) return false; s.seq = r.varint(); return true;
      case 2: if (w !== 0) return false; s.size = r.uint32(); return true;
      case 3: if (w !== 2) return false; s.checked = r.bytes(); return true;
      case 4: if (w !== 2) return false; s.frozen = r.bytes(); return true;
      case 5: if (w !== 0) return false; s.checkedCount = r.uint32(); return true;
      case 6: if (w !== 0) return false; s.frozenCount = r.uint32(); return true;
      case 7: if (w !== 0) return false; s.freezeAfterMs = r.varint(); return true;
      case 8: if (w !== 0) return false; s.serverTimeMs = r.varint(); return true;
      case 9: if (w !== 0) return false; s.epoch = r.varint(); return true;
      // Only on a socket opened with snapshot=deflate, and only when present:
      // see inflateSnapshot.
      case 10: if (w !== 2) return false; s.checkedDeflate = r.bytes(); return true;
      case 11: if (w !== 2) return false; s.frozenDeflate = r.bytes(); return true;
      // Only on a range Snapshot (docs/PROTOCOL.md, "Viewport subscriptions"):
      // its bitsets hold the boxes [rangeFirst, rangeFirst + rangeCount).
      case 12: if (w !== 0) return false; s.rangeFirst = r.uint32(); return true;
      case 13: if (w !== 0) return false; s.rangeCount = r.uint32(); return true;
      case 14: if (w !== 0) return false; s.regionSize = r.uint32(); return true;
      default: return false;
    }
  });
  return s;
}

// Inflates the bitsets a socket opened with `snapshot=deflate` sent as raw
// DEFLATE (checked_deflate, frozen_deflate) into `checked` and `frozen`, with
// the browser's own DecompressionStream. Each must inflate to exactly
// ceil(size/8) bytes (ceil(rangeCount/8) for a range Snapshot): more is
// refused as soon as it shows (a small message cannot make us hold more than
// the board).
export async function inflateSnapshot(s) {
  const bytes = Math.ceil((s.rangeCount || s.size) / 8);
  if (s.checkedDeflate) s.checked = await inflateRaw(s.checkedDeflate, bytes);
  if (s.frozenDeflate) s.frozen = await inflateRaw(s.frozenDeflate, bytes);
  delete s.checkedDeflate;
  delete s.frozenDeflate;
  return s;
}

async function inflateRaw(deflated, length) {
  const out = new Uint8Array(length);
  let n = 0;
  const reader = new Blob([deflated]).stream().pipeThrough(new DecompressionStream('deflate-raw')).getReader();
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      throw new DecodeError(`bad deflate data: ${e.message}`);
    }
    if (chunk.done) break;
    if (n + chunk.value.length > length) {
      reader.cancel().catch(() => {});
      throw new DecodeError('an inflated bitset is larger than the board');
    }
    out.set(chunk.value, n);
    n += chunk.value.length;
  }
  if (n !== length) throw new DecodeError(`an inflated bitset is ${n} bytes, not ${length}`);
  return out;
}

function decodeBatch(bytes) {
  const b = { fromSeq: 0n, toSeq: 0n, checked: [], unchecked: [], frozen: [], checkedCount: 0, frozenCount: 0 };
  fields(bytes, (f, w, r) => {
    switch (f) {
      case 1: if (w !== 0) return false; b.fromSeq = r.varint(); return true;
      case 2: if (w !== 0) return false; b.toSeq = r.varint(); return true;
      case 3: return r.repeatedUint32(w, b.checked);
      case 4: return r.repeatedUint32(w, b.unchecked);
      case 5: return r.repeatedUint32(w, b.frozen);
      case 6: if (w !== 0) return false; b.checkedCount = r.uint32(); return true;
      case 7: if (w !== 0) return false; b.frozenCount = r.uint32(); return true;
      // Only to a subscribed socket, and only when present: `region` marks a
      // region frame (even region 0), `countsOnly` a counts frame.
      case 8: if (w !== 0) return false; b.region = r.uint32(); return true;
      case 9: if (w !== 0) return false; b.countsOnly = r.bool(); return true;
      default: return false;
    }
  });
  return b;
}

function decodeToggleResult(bytes) {
  const t = { requestId: 0, accepted: false, checked: false, reason: 0, seq: 0n };
  fields(bytes, (f, w, r) => {
    if (w !== 0) return false;
    switch (f) {
      case 1: t.requestId = r.uint32(); return true;
      case 2: t.accepted = r.bool(); return true;
      case 3: t.checked = r.bool(); return true;
      case 4: t.reason = r.uint32(); return true;
      case 5: t.seq = r.varint(); return true;
      default: return false;
    }
  });
  return t;
}

// The board's live settings (the sunset), sent when an operator changes them
// and at the end of a resumed start.
function decodeSettings(bytes) {
  const s = { freezeAfterMs: 0n, serverTimeMs: 0n, maxChecked: 0 };
  fields(bytes, (f, w, r) => {
    if (w !== 0) return false;
    switch (f) {
      case 1: s.freezeAfterMs = r.varint(); return true;
      case 2: s.serverTimeMs = r.varint(); return true;
      case 3: s.maxChecked = r.uint32(); return true;
      default: return false;
    }
  });
  return s;
}

function decodeError(bytes) {
  const e = { code: 0, message: '' };
  fields(bytes, (f, w, r) => {
    if (f === 1 && w === 0) { e.code = r.uint32(); return true; }
    if (f === 2 && w === 2) { e.message = new TextDecoder().decode(r.bytes()); return true; }
    return false;
  });
  return e;
}

// Decodes a ServerMessage into {kind: 'snapshot'|'batch'|'toggleResult'|'error'|'settings', ...fields}.
// The last oneof field on the wire wins, as protobuf specifies.
export function decodeServerMessage(bytes) {
  let msg = null;
  fields(bytes, (f, w, r) => {
    if (w !== 2) return false;
    switch (f) {
      case 1: msg = { kind: 'snapshot', ...decodeSnapshot(r.bytes()) }; return true;
      case 2: msg = { kind: 'batch', ...decodeBatch(r.bytes()) }; return true;
      case 3: msg = { kind: 'toggleResult', ...decodeToggleResult(r.bytes()) }; return true;
      case 4: msg = { kind: 'error', ...decodeError(r.bytes()) }; return true;
      case 5: msg = { kind: 'settings', ...decodeSettings(r.bytes()) }; return true;
      default: return false;
    }
  });
  if (!msg) throw new DecodeError('ServerMessage without a known msg');
  return msg;
}

class Writer {
  constructor() { this.out = []; }
  varint(v) {
    let n = BigInt(v);
    do {
      let b = Number(n & 0x7fn);
      n >>= 7n;
      if (n) b |= 0x80;
      this.out.push(b);
    } while (n);
  }
  key(field, wire) { this.varint((field << 3) | wire); }
  bytes(field, b) { this.key(field, 2); this.varint(b.length); for (const x of b) this.out.push(x); }
  finish() { return Uint8Array.from(this.out); }
}

// A ClientMessage with its oneof `field` set to a message whose varint
// fields 1, 2, ... are `values`. Proto3 encoding: fields with default values
// are omitted, as prost does, so the bytes equal the Rust side's byte for byte.
function clientMessage(field, ...values) {
  const inner = new Writer();
  values.forEach((v, k) => {
    if (v) { inner.key(k + 1, 0); inner.varint(v); }
  });
  const m = new Writer();
  m.bytes(field, inner.finish());
  return m.finish();
}

export const encodeToggle = (index, checked, requestId) => clientMessage(1, index, checked ? 1 : 0, requestId);
export const encodeResync = () => clientMessage(2);
// The boxes [first, first + count) this socket wants (count 0: the full board).
export const encodeSubscribe = (first, count) => clientMessage(3, first, count);

// Delta-coded index lists (first value absolute, then differences >= 1).
export function* deltaDecode(deltas) {
  let prev = 0;
  for (let i = 0; i < deltas.length; i++) {
    const d = deltas[i];
    if (i > 0 && d === 0) throw new DecodeError('delta list is not strictly ascending');
    prev = i === 0 ? d : prev + d;
    if (prev > 0xffffffff) throw new DecodeError('delta list overflows u32');
    yield prev;
  }
}
