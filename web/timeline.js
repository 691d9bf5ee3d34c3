// The change archive as the time-lapse (/replay) reads it: segment files as
// the worker serves them (GET /replay/<epoch>/<segment>, the format of
// crates/archive: docs/PROTOCOL.md, "The time-lapse"), checked block by block
// (CRC-32), inflated with DecompressionStream('deflate-raw') and decoded into
// one epoch's timeline of records in seq order; and the board at any point of
// it, reached fast from keyframes.
//
// Nothing is skipped silently: a recorded gap (seqs the store's stream had
// trimmed before the archiver read them), seqs no block holds, a damaged
// block (reported with its file and byte offset) each become a record of the
// timeline that covers its seqs, shown when playback passes it.
import { Board } from './board.js';

const MAGIC = 'OMCBSEG1';
const SEGMENT_HEADER = 16;
const BLOCK_HEADER = 48;
const MAX_PAYLOAD = 64 << 20;
const MAX_RECORDS = 1 << 20;

// Record kinds: the archive's flag values, and one of ours.
export const UNSET = 0;
export const SET = 1;
export const FREEZE = 2;
export const GAP = 3; // recorded by the archiver: the stream had trimmed them
export const MISSING = 4; // no block holds them, or their block is damaged

let table;
export function crc32(...parts) {
  if (!table) {
    table = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      table[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (const p of parts) for (let i = 0; i < p.length; i++) c = table[(c ^ p[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

export async function inflateRaw(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate-raw'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function header(bytes, at) {
  const v = new DataView(bytes.buffer, bytes.byteOffset + at, BLOCK_HEADER);
  const u64 = (i) => Number(v.getBigUint64(i, true));
  return {
    payloadLen: v.getUint32(0, true), crc: v.getUint32(4, true), firstSeq: u64(8), lastSeq: u64(16),
    minMs: u64(24), maxMs: u64(32), changes: v.getUint32(40, true), records: v.getUint32(44, true),
  };
}

function implausible(h) {
  if (h.payloadLen === 0 || h.payloadLen > MAX_PAYLOAD) return `payload length ${h.payloadLen} out of bounds`;
  if (h.records === 0 || h.records > MAX_RECORDS || h.changes > h.records) return `${h.records} records (${h.changes} changes) out of bounds`;
  if (h.firstSeq === 0 || h.lastSeq < h.firstSeq) return `seq range ${h.firstSeq}..=${h.lastSeq} is empty`;
  return null;
}

// A varint reader over one column.
class Col {
  constructor(b) { this.b = b; this.i = 0; }
  varint() {
    let v = 0;
    let mul = 1;
    for (;;) {
      if (this.i >= this.b.length) throw new Error('a number runs past its column');
      const byte = this.b[this.i++];
      v += (byte & 0x7f) * mul;
      if ((byte & 0x80) === 0) return v;
      mul *= 128;
      if (mul > 2 ** 63) throw new Error('a number longer than 64 bits');
    }
  }
  zigzag() { const v = this.varint(); return v % 2 ? -(v + 1) / 2 : v / 2; }
  take(n) {
    if (this.i + n > this.b.length) throw new Error('runs past the block');
    const s = this.b.subarray(this.i, this.i + n);
    this.i += n;
    return s;
  }
}

// Decodes an inflated payload into `{kinds, boxes, ms, gapEnds}` (crates/archive
// format.rs); throws what does not add up.
export function decodeBlock(h, raw) {
  const at = new Col(raw);
  const n = at.varint();
  if (n !== h.records) throw new Error(`${n} records, the header says ${h.records}`);
  at.take(at.varint() * 8); // the origins: a replay does not show them
  const col = () => new Col(at.take(at.varint()));
  const [flags, gaps, times, boxesCol] = [col(), col(), col(), col()];
  col(); // origin ids
  if (at.i !== raw.length || flags.b.length !== n) throw new Error('columns do not match the record count');
  const kinds = new Uint8Array(n);
  const boxes = new Uint32Array(n);
  const ms = new Float64Array(n);
  const gapEnds = new Map();
  let seq = h.firstSeq;
  let t = h.minMs;
  let box = 0;
  for (let r = 0; r < n; r++) {
    const flag = flags.b[r];
    if (flag & ~7) throw new Error(`record flag ${flag}`);
    const kind = flag & 3;
    kinds[r] = kind;
    if (kind === GAP) {
      const to = seq + gaps.varint();
      gapEnds.set(r, to);
      ms[r] = t;
      seq = to + 1;
      continue;
    }
    t += times.zigzag();
    box += boxesCol.zigzag();
    if (box < 0 || box > 0xffffffff) throw new Error(`box ${box} out of range`);
    boxes[r] = box;
    ms[r] = t;
    seq++;
  }
  if (seq - 1 !== h.lastSeq) throw new Error(`records end at seq ${seq - 1}, the header says ${h.lastSeq}`);
  return { kinds, boxes, ms, gapEnds };
}

// The blocks of a segment file's bytes, decoded, in order: `{offset, header,
// records}`, or `{offset, error}` for a damaged one (after a damaged block
// whose length is believable reading goes on; after a torn or unbelievable
// one it ends). `epoch` is the one the URL names (a BigInt).
export async function readSegment(bytes, epoch) {
  const out = [];
  if (bytes.length < SEGMENT_HEADER) return [{ offset: 0, error: `truncated: ${bytes.length} bytes, shorter than the segment header` }];
  if (new TextDecoder().decode(bytes.subarray(0, 8)) !== MAGIC) return [{ offset: 0, error: 'corrupt: not a segment (bad magic)' }];
  const own = new DataView(bytes.buffer, bytes.byteOffset + 8, 8).getBigUint64(0, true);
  if (own !== epoch) return [{ offset: 0, error: `corrupt: the header says epoch ${own.toString(16)}, the URL ${epoch.toString(16)}` }];
  let at = SEGMENT_HEADER;
  while (at < bytes.length) {
    if (bytes.length - at < BLOCK_HEADER) {
      out.push({ offset: at, error: `truncated: ${bytes.length - at} bytes left, less than a block header` });
      break;
    }
    const h = header(bytes, at);
    const why = implausible(h);
    if (why) {
      out.push({ offset: at, error: `corrupt: ${why}` });
      break;
    }
    const end = at + BLOCK_HEADER + h.payloadLen;
    if (end > bytes.length) {
      out.push({ offset: at, error: `truncated: the block needs ${end - at} bytes, the file has ${bytes.length - at}`, header: h });
      break;
    }
    const payload = bytes.subarray(at + BLOCK_HEADER, end);
    if (crc32(bytes.subarray(at + 8, at + BLOCK_HEADER), payload) !== h.crc) {
      out.push({ offset: at, error: 'corrupt: checksum mismatch', header: h });
    } else {
      try {
        out.push({ offset: at, header: h, records: decodeBlock(h, await inflateRaw(payload)) });
      } catch (e) {
        out.push({ offset: at, error: `corrupt: ${e.message}`, header: h });
      }
    }
    at = end;
  }
  return out;
}

// One epoch's records in seq order, and the board after any number of them.
// Per record: its kind, its box, the time (ms; never going back: a store clock
// that stepped back shows the latest time seen), its first seq and, for gaps
// and missing seqs, its last. About 17 bytes a change.
export class Timeline {
  constructor(size, epoch) {
    this.size = size;
    this.epoch = epoch;
    this.length = 0;
    this.kinds = new Uint8Array(1024);
    this.boxes = new Uint32Array(1024);
    this.times = new Float64Array(1024);
    this.seqs = new Float64Array(1024);
    this.ends = new Map(); // record -> last seq, for gaps and missing seqs
    this.problems = new Map(); // record -> {file, offset, error} it stands for
    this.next = 1; // the next seq expected
    this.board = new Board();
    this.board.size = size;
    this.board.epoch = epoch;
    this.board.seq = 0n;
    this.board.checked = new Uint8Array(Math.ceil(size / 8));
    this.board.frozen = new Uint8Array(Math.ceil(size / 8));
    this.pos = 0; // records applied to the board
    this.keyframes = [];
    this.every = 1;
    this.outOfRange = 0; // changes of boxes past the size, not applied
    this.errors = []; // every problem found: {file, offset, error}
    this.orphans = []; // damaged blocks whose seqs are not known yet
  }

  #grow() {
    const grow = (a) => { const b = new a.constructor(a.length * 2); b.set(a); return b; };
    this.kinds = grow(this.kinds);
    this.boxes = grow(this.boxes);
    this.times = grow(this.times);
    this.seqs = grow(this.seqs);
  }

  #push(kind, box, ms, seq, end) {
    if (this.length === this.kinds.length) this.#grow();
    const p = this.length++;
    this.kinds[p] = kind;
    this.boxes[p] = box;
    this.times[p] = p > 0 ? Math.max(this.times[p - 1], ms) : ms;
    this.seqs[p] = seq;
    if (end !== undefined) this.ends.set(p, end);
    this.next = (end ?? seq) + 1;
    return p;
  }

  // Seqs `from..to` that the archive cannot give, for the reason `problem`.
  addMissing(from, to, problem) {
    const p = this.#push(MISSING, 0, this.length ? this.times[this.length - 1] : 0, from, to);
    this.problems.set(p, problem);
  }

  // Adds one segment's blocks (readSegment's output) from file `file`.
  addSegment(file, blocks) {
    for (const b of blocks) {
      if (b.error) {
        // Its header is not to be trusted (the CRC covers it): its seqs show
        // up as missing where the next good block starts.
        const problem = { file, offset: b.offset, error: b.error };
        this.errors.push(problem);
        this.orphans.push(problem);
        continue;
      }
      const h = b.header;
      if (h.firstSeq > this.next) this.#hole(h.firstSeq - 1, file, b.offset);
      const { kinds, boxes, ms, gapEnds } = b.records;
      let seq = h.firstSeq;
      for (let r = 0; r < kinds.length; r++) {
        const end = gapEnds.get(r);
        // Seqs an earlier block already held (a repeated block): not twice.
        if ((end ?? seq) >= this.next) this.#push(kinds[r], boxes[r], ms[r], Math.max(seq, this.next), end);
        seq = (end ?? seq) + 1;
      }
    }
  }

  // Seqs from the next expected to `to` that no block gave.
  #hole(to, file, offset) {
    const why = this.orphans.length
      ? this.orphans.map((o) => `${o.file} at byte ${o.offset}: ${o.error}`).join('; ')
      : `${file} at byte ${offset}: no block and no gap record holds them`;
    const problem = { file, offset, error: `seqs ${this.next}..${to} are missing: ${why}` };
    if (!this.orphans.length) this.errors.push(problem);
    this.orphans = [];
    this.addMissing(this.next, to, problem);
  }

  // The first seq of record p, and its last.
  firstSeq(p) { return this.seqs[p]; }
  lastSeq(p) { return this.ends.get(p) ?? this.seqs[p]; }

  // The last seq the first `p` records cover (0 for none).
  seqAfter(p) { return p > 0 ? this.lastSeq(p - 1) : 0; }

  // How many records the board at seq `seq` has applied: those starting at
  // or before it (a gap holding `seq` counts whole).
  positionOfSeq(seq) {
    let lo = 0;
    let hi = this.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.seqs[mid] <= seq) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  // How many records happened at or before `ms`.
  positionOfTime(ms) {
    let lo = 0;
    let hi = this.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.times[mid] <= ms) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  get firstMs() { return this.length ? this.times[0] : 0; }
  get lastMs() { return this.length ? this.times[this.length - 1] : 0; }

  // Records that are not changes (gaps, missing seqs), in order.
  holes() {
    const out = [];
    for (let p = 0; p < this.length; p++) if (this.kinds[p] >= GAP) out.push(p);
    return out;
  }

  #apply(p, changed) {
    const kind = this.kinds[p];
    if (kind >= GAP) return;
    const i = this.boxes[p];
    if (i >= this.size) {
      this.outOfRange++;
      return;
    }
    const b = this.board;
    const byte = i >> 3;
    const bit = 0x80 >> (i & 7);
    if (kind === FREEZE) {
      if (b.frozen[byte] & bit) return;
      b.frozen[byte] |= bit;
      b.frozenCount++;
    } else {
      const was = (b.checked[byte] & bit) !== 0;
      if (was === (kind === SET)) return;
      b.checked[byte] ^= bit;
      b.checkedCount += kind === SET ? 1 : -1;
    }
    changed?.push(i);
  }

  #save() {
    const b = this.board;
    return { checked: b.checked.slice(), frozen: b.frozen.slice(), checkedCount: b.checkedCount, frozenCount: b.frozenCount };
  }

  // Once every segment is in (`lastSeq`: the index's last seq of the epoch,
  // for damage at its very end): a keyframe (the board) every `every`
  // records (65,536, or 1/256 of the epoch: at most 257 boards in memory),
  // so that a seek applies at most that many.
  finish(lastSeq = 0, every = Math.max(65536, Math.ceil(this.length / 256))) {
    if (lastSeq >= this.next) this.#hole(lastSeq, this.orphans[0]?.file ?? 'the archive', this.orphans[0]?.offset ?? 0);
    this.every = every;
    this.seek(0);
    this.keyframes = [this.#save()];
    while (this.pos < this.length) {
      const to = Math.min(this.length, this.pos + this.every);
      while (this.pos < to) this.#apply(this.pos++);
      if (this.pos % this.every === 0) this.keyframes.push(this.#save());
    }
    this.seek(0);
  }

  // Moves the board to after the first `p` records. Returns the boxes that
  // changed, or null when it jumped (everything may have).
  seek(p) {
    p = Math.max(0, Math.min(this.length, p));
    const b = this.board;
    let changed = [];
    if (p < this.pos || p - this.pos > this.every) {
      const k = Math.floor(p / this.every);
      const frame = this.keyframes[Math.min(k, this.keyframes.length - 1)];
      if (frame) {
        b.checked.set(frame.checked);
        b.frozen.set(frame.frozen);
        b.checkedCount = frame.checkedCount;
        b.frozenCount = frame.frozenCount;
        this.pos = this.keyframes.indexOf(frame) * this.every;
      } else {
        b.checked.fill(0);
        b.frozen.fill(0);
        b.checkedCount = 0;
        b.frozenCount = 0;
        this.pos = 0;
      }
      changed = null;
    }
    while (this.pos < p) this.#apply(this.pos++, changed);
    b.seq = BigInt(this.seqAfter(this.pos));
    return changed;
  }
}
