// The sunset on the page: while the board's freeze_after_ms is set (the
// Snapshot carries it; a Settings message changes it live, docs/PROTOCOL.md),
// a line explains the rule and counts down to the next freeze; when the board
// is finished (every box frozen, or every box checked) the page says so with
// the final numbers; "you checked N" counts this browser's checks
// (localStorage).
//
// What the page knows of check times: the server sends none. A box this page
// saw become checked (a Batch, or its own accepted click) was checked at most
// a tick before that, so its countdown is exact to a tick. A box checked
// before the page saw the board was checked before the page loaded it, so it
// freezes at the latest freeze_after after that: the line says "within".
//
// app.js loads this module only when it has something to show (a sunset
// runs, the board is finished, this browser checked a box), then calls
// onSnapshot/onSettings/onBatch/onAccepted as messages arrive and render()
// after each. Boxes checked by others before it loaded count as checked
// before the page came ("within"). Everything else (the elements it
// adds to the header, the pointer and focus tracking, the once-a-second
// countdown) lives here.
import { deltaDecode } from './proto.js';

const STORE_KEY = 'omcb.youChecked';

// "9:58", "1:02:03": a countdown of ms (rounded up to the second).
export function clock(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

// "10 minutes", "90 seconds", "1.5 hours": the rule's duration in words.
export function duration(ms) {
  const n = (v, unit) => `${Number.isInteger(v) ? v : v.toFixed(1)} ${unit}${v === 1 ? '' : 's'}`;
  if (ms < 1000) return n(ms, 'millisecond');
  if (ms < 120_000) return n(ms / 1000, 'second');
  if (ms < 2 * 3_600_000) return n(ms / 60_000, 'minute');
  if (ms < 2 * 86_400_000) return n(ms / 3_600_000, 'hour');
  return n(ms / 86_400_000, 'day');
}

export class Sunset {
  // board: the page's Board; grid: the element holding the boxes (pointer
  // and focus are read from it); header: where the sunset's elements go.
  constructor({ board, grid, header, fmt = new Intl.NumberFormat(), storage = globalThis.localStorage }) {
    this.board = board;
    this.fmt = fmt;
    this.storage = storage;
    this.offset = 0; // server clock - local clock, ms
    this.loadedAt = 0; // server time of the last Snapshot: every box it held checked was checked by then
    // When this page saw each box become checked: ms after `base` plus 1, 0
    // for none (4 bytes a box, 4 MB for a million: a Map of a busy board's
    // boxes would take ten times that). `queue` holds (index, time) pairs in
    // the order seen, which is time order, so the oldest is at its head.
    this.base = 0;
    this.seen = new Uint32Array(0);
    this.seenCount = 0;
    this.queue = [];
    this.head = 0;
    this.target = null; // index under the pointer or focused
    this.maxChecked = 0; // the board's limit (a Settings message says), 0 = its size
    this.youChecked = Number(storage?.getItem(STORE_KEY)) || 0;

    const el = (tag, id, cls) => {
      const e = document.createElement(tag);
      e.id = id;
      e.className = cls;
      return e;
    };
    this.line = el('p', 'sunset', 'sunset');
    this.line.hidden = true;
    // The rule is announced when it changes; the countdown, every second, is not.
    this.rule = el('span', 'sunset-rule', 'sunset-rule');
    this.rule.setAttribute('aria-live', 'polite');
    this.countdown = el('span', 'sunset-countdown', 'sunset-countdown');
    this.line.append(this.rule, ' ', this.countdown);
    this.end = el('p', 'board-finished', 'board-finished');
    this.end.setAttribute('role', 'status');
    this.end.hidden = true;
    this.mine = el('span', 'you-checked', 'you-checked');
    // Its style comes with it: a first visit without a sunset loads neither.
    const style = document.createElement('style');
    style.textContent = '.sunset,.board-finished{flex-basis:100%;margin:0}.sunset-rule,.board-finished{font-weight:600}'
      + '.sunset-countdown{color:var(--muted);font-variant-numeric:tabular-nums}';
    document.head.append(style);
    header.querySelector('.stats')?.append(this.mine);
    header.append(this.line, this.end);

    const pick = (e) => {
      const i = e.target?.dataset?.index;
      this.target = i === undefined ? null : Number(i);
      this.render();
    };
    grid.addEventListener('pointerover', pick);
    grid.addEventListener('focusin', pick);
    grid.addEventListener('pointerleave', () => {
      this.target = grid.contains(document.activeElement) ? Number(document.activeElement.dataset.index ?? NaN) : null;
      if (Number.isNaN(this.target)) this.target = null;
      this.render();
    });
    setInterval(() => this.render(), 1000);
  }

  now() { return Date.now() + this.offset; }

  #clockFrom(serverTimeMs) {
    if (serverTimeMs > 0n) this.offset = Number(serverTimeMs) - Date.now();
  }

  onSnapshot(s) {
    this.#clockFrom(s.serverTimeMs);
    this.loadedAt = this.now();
    if (this.seen.length !== this.board.size) {
      this.base = this.loadedAt;
      this.seen = new Uint32Array(this.board.size);
      this.seenCount = 0;
      this.queue = [];
      this.head = 0;
      return;
    }
    // Boxes it holds checked were checked by now; keep what we saw exactly.
    for (let i = 0; i < this.seen.length; i++) {
      if (this.seen[i] && (!this.board.isChecked(i) || this.board.isFrozen(i))) this.#forget(i);
    }
  }

  #record(i, at) {
    if (i >= this.seen.length) return;
    if (!this.seen[i]) this.seenCount += 1;
    this.seen[i] = Math.max(1, at - this.base + 1);
    this.queue.push(i, this.seen[i]);
    // Stale pairs (boxes unchecked, frozen or checked again) pile up when
    // nothing reads the head (no sunset): rebuild from `seen` once they are
    // most of it, so the queue stays within a few times the boxes seen.
    if (this.queue.length - this.head > 4 * this.seenCount + 4096) this.#rebuild();
  }

  #rebuild() {
    const pairs = [];
    for (let j = 0; j < this.seen.length; j++) if (this.seen[j]) pairs.push([this.seen[j], j]);
    pairs.sort((a, b) => a[0] - b[0]);
    this.queue = pairs.flatMap(([v, j]) => [j, v]);
    this.head = 0;
  }

  #forget(i) {
    if (i >= this.seen.length || !this.seen[i]) return;
    this.seen[i] = 0;
    this.seenCount -= 1;
  }

  // The server time this page saw box i checked, or undefined.
  #seenAt(i) {
    const v = this.seen[i];
    return v ? this.base + v - 1 : undefined;
  }

  // The box this page saw checked longest ago that is still checked and
  // unfrozen: {j, at}, or null. Stale queue entries are dropped on the way.
  #oldest() {
    const q = this.queue;
    while (this.head < q.length) {
      const [j, v] = [q[this.head], q[this.head + 1]];
      if (this.seen[j] === v && this.board.isChecked(j) && !this.board.isFrozen(j)) {
        return { j, at: this.base + v - 1 };
      }
      this.head += 2;
    }
    if (this.head > 0) {
      this.queue = [];
      this.head = 0;
    }
    return null;
  }

  onSettings(s) {
    this.#clockFrom(s.serverTimeMs);
    this.board.freezeAfterMs = s.freezeAfterMs;
    this.maxChecked = s.maxChecked;
  }

  // After the board applied batch `b`: boxes it checked were checked now.
  onBatch(b) {
    const now = this.now();
    try {
      for (const i of deltaDecode(b.checked)) this.#record(i, now);
      for (const i of deltaDecode(b.unchecked)) this.#forget(i);
      for (const i of deltaDecode(b.frozen)) this.#forget(i);
    } catch {
      // The board refused it as invalid already.
    }
  }

  // This page's click on box `index` was accepted and changed it, at local
  // time `at` (app.js loads this module on a first click: the click's time).
  onAccepted(index, checked, at = Date.now()) {
    if (!checked) return;
    this.#record(index, at + this.offset);
    this.youChecked += 1;
    try {
      this.storage?.setItem(STORE_KEY, String(this.youChecked));
    } catch {
      // Private mode or full storage: the count lives for this page only.
    }
  }

  // The box's freeze time (server clock) and whether it is exact, or null
  // when it will not freeze (unchecked, frozen, no sunset).
  freezesAt(i) {
    const after = Number(this.board.freezeAfterMs);
    if (after <= 0 || !this.board.isChecked(i) || this.board.isFrozen(i)) return null;
    const seen = this.#seenAt(i);
    return seen === undefined ? { at: this.loadedAt + after, exact: false } : { at: seen + after, exact: true };
  }

  get capacity() { return this.board.capacity(this.maxChecked); }

  get finished() { return this.board.finished(this.maxChecked); }

  render() {
    const b = this.board;
    const f = this.fmt;
    this.mine.textContent = `you checked ${f.format(this.youChecked)}`;
    this.mine.hidden = this.youChecked === 0;
    if (this.finished) {
      this.end.hidden = false;
      this.line.hidden = true;
      const what = b.frozenCount >= b.size ? 'Every box is frozen'
        : this.capacity < b.size ? `It is full (at most ${f.format(this.capacity)} may be checked)`
          : 'Every box is checked';
      this.end.textContent = `The board is finished. ${what}: ${f.format(b.checkedCount)} of ${f.format(b.size)} checked, ${f.format(b.frozenCount)} frozen.`
        + (this.youChecked ? ` You checked ${f.format(this.youChecked)}.` : '');
      return;
    }
    this.end.hidden = true;
    const after = Number(b.freezeAfterMs);
    this.line.hidden = after <= 0;
    if (after <= 0) return;
    const rule = `Sunset: a box checked for ${duration(after)} can no longer be unchecked, and freezes.`;
    if (this.rule.textContent !== rule) this.rule.textContent = rule;
    this.countdown.textContent = this.#countdown();
  }

  #countdown() {
    const now = this.now();
    const i = this.target;
    if (i !== null && i < this.board.size) {
      if (this.board.isFrozen(i)) return `Box ${this.fmt.format(i)} is frozen.`;
      const t = this.freezesAt(i);
      if (t) return this.#phrase(`Box ${this.fmt.format(i)}`, t, now);
      if (!this.board.isChecked(i)) return `Box ${this.fmt.format(i)} is free.`;
    }
    // The next box to freeze that this page saw checked, else the bound for
    // the ones checked before it arrived.
    const oldest = this.#oldest();
    const unseen = this.board.checkedCount - this.board.frozenCount - this.seenCount > 0;
    const after = Number(this.board.freezeAfterMs);
    if (unseen && (oldest === null || this.loadedAt + after < oldest.at + after)) {
      return this.#phrase('Boxes checked before you came', { at: this.loadedAt + after, exact: false }, now);
    }
    if (oldest) return this.#phrase(`Next: box ${this.fmt.format(oldest.j)}`, { at: oldest.at + after, exact: true }, now);
    return 'No box is waiting to freeze.';
  }

  #phrase(what, { at, exact }, now) {
    const left = at - now;
    if (left <= 0) return `${what} freezes any moment now.`;
    return `${what} freezes ${exact ? 'in' : 'within'} ${clock(left)}.`;
  }
}
