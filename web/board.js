// The board as this client knows it, and the convergence rule of the protocol
// (docs/PROTOCOL.md): Snapshot replaces; a Batch that ends at or before our
// seq is stale; one that starts at or before seq+1 applies; anything later is
// a gap, and we ask for a fresh Snapshot and drop batches until it comes.
//
// Once the page subscribes to the boxes it shows (`subscribe`), the viewport
// rule ("Viewport subscriptions") applies instead: each region of REGION
// boxes has its own seq (`cur`), only the regions of the last Subscribe are
// held, and `seq` is the seq of the counts.
import { deltaDecode } from './proto.js';

// Boxes per region, and the most boxes one Subscribe may ask for.
export const REGION = 2048;
const MAX_SUBSCRIBE = 65_536;

// What to subscribe to while the boxes [a, b) are on screen: a screen more
// above and below, out to whole regions (the server rounds to them anyway),
// within the board and the server's cap; never empty (count 0 would be the
// full board).
export function windowFor(a, b, size) {
  const first = Math.floor(Math.max(0, 2 * a - b) / REGION) * REGION;
  const end = Math.min(size, (Math.floor((2 * b - a) / REGION) + 1) * REGION, first + MAX_SUBSCRIBE);
  return { first, count: end - first };
}

// Whether subscription `sub` still serves the screen [a, b): it reaches half
// a screen beyond each end of it (or the board's end). Scrolling within that
// sends nothing.
export function covers(sub, a, b, size) {
  return !!sub && sub.first <= Math.max(0, (3 * a - b) / 2) && sub.first + sub.count >= Math.min(size, (3 * b - a) / 2);
}

export class Board {
  constructor() {
    this.size = 0;
    this.seq = -1n; // no state yet
    this.epoch = 0n;
    this.checked = new Uint8Array(0);
    this.frozen = new Uint8Array(0);
    this.checkedCount = 0;
    this.frozenCount = 0;
    this.freezeAfterMs = 0n;
    // True after a gap: batches are dropped until the next Snapshot.
    this.awaitingSnapshot = false;
    // Once subscribed: for each region of the last Subscribe sent (a sparse
    // array, nothing at the others), the seq of the state held (-1n: none).
    this.cur = null;
  }

  get ready() { return this.seq >= 0n; }

  // The seq of box i's state; -1n when the page holds none, and shows the
  // box as unknown, never as unchecked.
  seqAt(i) { return this.cur ? this.cur[Math.floor(i / REGION)] ?? -1n : this.seq; }

  // The page sent Subscribe for [first, first + count): the regions outside
  // it are forgotten (no more of their frames will come); the ones inside
  // keep their state until the Snapshot of them arrives.
  subscribe(first, count) {
    const had = this.cur;
    this.cur = [];
    for (let r = Math.floor(first / REGION); r * REGION < first + count; r++) this.cur[r] = had ? had[r] ?? -1n : this.seq;
  }

  // How many boxes may be checked: the size, or the board's limit
  // (`maxChecked` from a Settings message, 0 for none).
  capacity(maxChecked) { return maxChecked > 0 ? Math.min(maxChecked, this.size) : this.size; }

  // Every box frozen, or no more box can be checked.
  finished(maxChecked) {
    return this.ready && this.size > 0 && (this.frozenCount >= this.size || this.checkedCount >= this.capacity(maxChecked));
  }

  isChecked(i) { return (this.checked[i >> 3] & (0x80 >> (i & 7))) !== 0; }
  isFrozen(i) { return (this.frozen[i >> 3] & (0x80 >> (i & 7))) !== 0; }

  static #set(bits, i, v) {
    if (v) bits[i >> 3] |= 0x80 >> (i & 7);
    else bits[i >> 3] &= ~(0x80 >> (i & 7));
  }

  // A full Snapshot replaces the whole state; a range Snapshot the regions it
  // holds that the last Subscribe asked for. Returns false (and keeps the old
  // state) when a snapshot's bitsets do not fit its range.
  applySnapshot(s) {
    const first = s.rangeCount ? s.rangeFirst ?? 0 : 0; // 0 is not on the wire
    const end = first + (s.rangeCount || s.size); // whole regions, or the board's end
    const bytes = Math.ceil((end - first) / 8);
    if (s.checked.length !== bytes || s.frozen.length !== bytes) return false;
    if (s.rangeCount && (s.regionSize !== REGION || first % REGION || end > s.size || (end % REGION && end !== s.size))) return false;
    // Another board (a new epoch): nothing held is of it.
    const fresh = s.size !== this.size || s.epoch !== this.epoch;
    if (fresh || !s.rangeCount) {
      this.checked = new Uint8Array(Math.ceil(s.size / 8));
      this.frozen = new Uint8Array(this.checked.length);
      this.seq = -1n;
    }
    // Copies: the message buffer is not ours. Boxes of regions no longer
    // wanted are written too, but stay unknown.
    this.checked.set(s.checked, first / 8);
    this.frozen.set(s.frozen, first / 8);
    this.cur?.forEach((seq, r, cur) => {
      cur[r] = r >= first / REGION && r < end / REGION ? s.seq : fresh ? -1n : seq;
    });
    this.size = s.size;
    this.epoch = s.epoch;
    this.freezeAfterMs = s.freezeAfterMs;
    this.awaitingSnapshot = false;
    if (s.seq >= this.seq) {
      this.seq = s.seq;
      this.checkedCount = s.checkedCount;
      this.frozenCount = s.frozenCount;
    }
    return true;
  }

  // Applies a batch by the convergence rule, or a region frame by the
  // viewport rule. Returns
  //   {result: 'stale' | 'gap' | 'invalid'} or {result: 'applied', changed: [indices]}.
  applyBatch(b) {
    if (b.toSeq < b.fromSeq) return { result: 'invalid' };
    const { cur, size } = this;
    const r = b.region;
    let seq = this.seq;
    if (cur) {
      // A counts frame, or a full Batch sent before the server took the
      // Subscribe: only its counts are of use.
      if (r === undefined) {
        if (!this.ready || b.toSeq <= seq) return { result: 'stale' };
        this.seq = b.toSeq;
        this.checkedCount = b.checkedCount;
        this.frozenCount = b.frozenCount;
        return { result: 'applied', changed: [] };
      }
      // A region not held (or no longer wanted) has no state to apply it to.
      seq = cur[r] ?? -1n;
      if (seq < 0n || this.awaitingSnapshot) return { result: 'stale' };
    } else if (!this.ready || this.awaitingSnapshot) return { result: 'gap' };
    if (b.toSeq <= seq) return { result: 'stale' };
    if (b.fromSeq > seq + 1n) {
      this.awaitingSnapshot = true;
      return { result: 'gap' };
    }
    let lists;
    try {
      lists = [b.checked, b.unchecked, b.frozen].map((l) => [...deltaDecode(l)]);
    } catch {
      return { result: 'invalid' };
    }
    // Validate everything first: a bad batch changes nothing. A region
    // frame's boxes are all in its region.
    for (const l of lists) for (const i of l) if (i >= size || (cur && Math.floor(i / REGION) !== r)) return { result: 'invalid' };
    const [on, off, frozen] = lists;
    for (const i of on) Board.#set(this.checked, i, true);
    for (const i of off) Board.#set(this.checked, i, false);
    for (const i of frozen) Board.#set(this.frozen, i, true);
    if (cur) {
      cur[r] = b.toSeq;
    } else {
      this.seq = b.toSeq;
      this.checkedCount = b.checkedCount;
      this.frozenCount = b.frozenCount;
    }
    return { result: 'applied', changed: on.concat(off, frozen) };
  }
}
