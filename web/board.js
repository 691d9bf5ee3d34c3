// The board as this client knows it, and the convergence rule of the protocol
// (docs/PROTOCOL.md): Snapshot replaces; a Batch that ends at or before our
// seq is stale; one that starts at or before seq+1 applies; anything later is
// a gap, and we ask for a fresh Snapshot and drop batches until it comes.
import { deltaDecode } from './proto.js';

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
  }

  get ready() { return this.seq >= 0n; }

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

  // Replaces the whole state. Returns false (and keeps the old state) when the
  // snapshot's bitsets do not fit its size.
  applySnapshot(s) {
    const bytes = Math.ceil(s.size / 8);
    if (s.checked.length !== bytes || s.frozen.length !== bytes) return false;
    this.size = s.size;
    this.checked = new Uint8Array(s.checked); // copy: the message buffer is not ours
    this.frozen = new Uint8Array(s.frozen);
    this.seq = s.seq;
    this.epoch = s.epoch;
    this.checkedCount = s.checkedCount;
    this.frozenCount = s.frozenCount;
    this.freezeAfterMs = s.freezeAfterMs;
    this.awaitingSnapshot = false;
    return true;
  }

  // Applies a batch by the convergence rule. Returns
  //   {result: 'stale' | 'gap' | 'invalid'} or {result: 'applied', changed: [indices]}.
  applyBatch(b) {
    if (!this.ready || this.awaitingSnapshot) return { result: 'gap' };
    if (b.toSeq < b.fromSeq) return { result: 'invalid' };
    if (b.toSeq <= this.seq) return { result: 'stale' };
    if (b.fromSeq > this.seq + 1n) {
      this.awaitingSnapshot = true;
      return { result: 'gap' };
    }
    let lists;
    try {
      lists = [b.checked, b.unchecked, b.frozen].map((l) => [...deltaDecode(l)]);
    } catch {
      return { result: 'invalid' };
    }
    // Validate everything first: a bad batch changes nothing.
    for (const l of lists) for (const i of l) if (i >= this.size) return { result: 'invalid' };
    const [on, off, frozen] = lists;
    for (const i of on) Board.#set(this.checked, i, true);
    for (const i of off) Board.#set(this.checked, i, false);
    for (const i of frozen) Board.#set(this.frozen, i, true);
    this.seq = b.toSeq;
    this.checkedCount = b.checkedCount;
    this.frozenCount = b.frozenCount;
    return { result: 'applied', changed: on.concat(off, frozen) };
  }
}
