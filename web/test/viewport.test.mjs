// The page's viewport subscriptions (docs/PROTOCOL.md, "Viewport
// subscriptions"), in node: which boxes the page asks for as it scrolls
// (windowFor, covers), and the viewport rule in the board state, against a
// simulated worker that follows the protocol's promises (region frames with
// their own chains, range Snapshots of the regions new to a socket, counts
// frames, a Resync after a lost frame) while the client scrolls and jumps.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Board, REGION, covers, windowFor } from '../board.js';

const SIZE = 1_000_000;
const known = (board, i) => board.seqAt(i) >= 0n;

test('the window is the screen and a screen more above and below, in whole regions, within the board and the cap', () => {
  assert.deepEqual(windowFor(0, 1200, SIZE), { first: 0, count: 4096 }, 'down to box 2,400, in whole regions');
  const w = windowFor(500_000, 501_200, SIZE);
  assert.ok(w.first <= 498_800 && w.first + w.count >= 502_400, JSON.stringify(w));
  assert.equal(w.first % REGION, 0);
  assert.equal((w.first + w.count) % REGION, 0);
  assert.equal(w.first + w.count - w.first, w.count);
  const last = windowFor(SIZE - 1000, SIZE, SIZE);
  assert.equal(last.first + last.count, SIZE, 'ends at the board\'s end');
  // A screen at a region's start still gets a region after it: never empty.
  assert.ok(windowFor(4096, 4096, SIZE).count > 0);
  // A screen of 60,000 boxes: the server's cap (65,536), not more.
  assert.equal(windowFor(100_000, 160_000, SIZE).count, 65_536);
  // A small board: all of it.
  assert.deepEqual(windowFor(0, 200, 300), { first: 0, count: 300 });
});

test('a window serves its screen; scrolling within half a screen of its ends sends nothing, further does', () => {
  for (let a = 0; a < SIZE; a += 9_973) {
    const b = Math.min(SIZE, a + 1_215);
    assert.ok(covers(windowFor(a, b, SIZE), a, b, SIZE), `the window of ${a}..${b} covers it`);
  }
  assert.ok(!covers(null, 0, 100, SIZE), 'nothing subscribed yet');
  const sub = windowFor(100_000, 101_200, SIZE);
  assert.ok(covers(sub, 100_300, 101_500, SIZE), 'a quarter screen down');
  assert.ok(!covers(sub, 500_000, 501_200, SIZE), 'a jump');
  assert.ok(!covers(sub, sub.first + sub.count - 1_000, sub.first + sub.count + 200, SIZE), 'past the end');
  // The edges of the board need no margin.
  assert.ok(covers(windowFor(0, 1200, SIZE), 0, 1200, SIZE));
  assert.ok(covers(windowFor(SIZE - 1200, SIZE, SIZE), SIZE - 1200, SIZE, SIZE));
});

test('scrolling a tenth of a screen at a time subscribes again about every screen, not on every step', () => {
  const screen = 1_215;
  let sub = null;
  let subscribes = 0;
  let steps = 0;
  for (let a = 0; a + screen <= 200_000; a += screen / 10, steps++) {
    if (covers(sub, a, a + screen, SIZE)) continue;
    sub = windowFor(a, a + screen, SIZE);
    subscribes++;
  }
  // Each window lasts at least half a screen of travel (covers), and whole
  // regions make most last longer.
  assert.ok(subscribes <= steps / 5, `${subscribes} subscribes in ${steps} steps`);
  assert.ok(subscribes >= 200_000 / (2 * REGION + 3 * screen), `${subscribes} subscribes`);
});

// A deterministic PRNG, so a failure repeats.
function prng(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

const bit = (bits, i) => (bits[i >> 3] & (0x80 >> (i & 7))) !== 0;
function setBit(bits, i, v) {
  if (v) bits[i >> 3] |= 0x80 >> (i & 7);
  else bits[i >> 3] &= ~(0x80 >> (i & 7));
}
const delta = (l) => l.map((x, i) => (i ? x - l[i - 1] : x));

// A worker with one socket, as docs/PROTOCOL.md promises it: full Batches
// until it takes a Subscribe, then range Snapshots of the regions new to the
// socket and each touched region's frame per tick (`from_seq` = the region's
// previous frame's `to_seq + 1`), a counts frame now and then, and a whole-
// range Snapshot after a Resync.
class World {
  constructor(size, random) {
    this.size = size;
    this.random = random;
    this.regions = Math.ceil(size / REGION);
    this.checked = new Uint8Array(Math.ceil(size / 8));
    this.frozen = new Uint8Array(this.checked.length);
    this.count = 0;
    this.seq = 0n;
    this.lastTo = new Array(this.regions).fill(0n); // each region's chain
    this.range = null; // the socket's regions [r0, r1], once it took a Subscribe
    this.toClient = [];
    this.toServer = [];
  }

  snapshot(first, count) {
    const bytes = this.checked.slice(first / 8, first / 8 + Math.ceil(count / 8));
    const s = { seq: this.seq, size: this.size, epoch: 7n, checked: bytes, frozen: new Uint8Array(bytes.length), checkedCount: this.count, frozenCount: 0, freezeAfterMs: 0n };
    // As on the wire: prost leaves out a range_first of 0.
    if (count < this.size || first) Object.assign(s, { rangeCount: count, regionSize: REGION }, first ? { rangeFirst: first } : {});
    return { kind: 'snapshot', ...s };
  }

  rangeSnapshot(r0, r1) {
    const first = r0 * REGION;
    return this.snapshot(first, Math.min(this.size, (r1 + 1) * REGION) - first);
  }

  // One tick of `n` changes near `around`, and its frames.
  tick(n, around) {
    const from = this.seq + 1n;
    const touched = new Map(); // index -> final value
    for (let k = 0; k < n; k++) {
      const i = Math.max(0, Math.min(this.size - 1, Math.floor(around + (this.random() - 0.5) * 20_000)));
      const v = this.random() < 0.5;
      this.seq++;
      if (bit(this.checked, i) === v) continue;
      setBit(this.checked, i, v);
      this.count += v ? 1 : -1;
      touched.set(i, v);
    }
    if (touched.size === 0) return;
    const lists = (r) => {
      const idx = [...touched.keys()].filter((i) => r === undefined || Math.floor(i / REGION) === r).sort((x, y) => x - y);
      return { checked: delta(idx.filter((i) => touched.get(i))), unchecked: delta(idx.filter((i) => !touched.get(i))), frozen: [] };
    };
    if (!this.range) {
      this.toClient.push({ kind: 'batch', fromSeq: from, toSeq: this.seq, ...lists(), checkedCount: this.count, frozenCount: 0 });
      return;
    }
    for (const r of new Set([...touched.keys()].map((i) => Math.floor(i / REGION)))) {
      const frame = { kind: 'batch', fromSeq: this.lastTo[r] + 1n, toSeq: this.seq, ...lists(r), checkedCount: 0, frozenCount: 0, region: r };
      this.lastTo[r] = this.seq;
      if (r >= this.range[0] && r <= this.range[1]) this.toClient.push(frame);
    }
    if (this.random() < 0.3) this.toClient.push({ kind: 'batch', fromSeq: 0n, toSeq: this.seq, checked: [], unchecked: [], frozen: [], checkedCount: this.count, frozenCount: 0, countsOnly: true });
  }

  // The server reads what the client sent.
  serve() {
    for (const m of this.toServer.splice(0)) {
      if (m.resync) {
        this.toClient.push(this.range ? this.rangeSnapshot(...this.range) : this.snapshot(0, this.size));
        continue;
      }
      const r0 = Math.floor(m.first / REGION);
      const r1 = Math.floor((Math.min(m.first + m.count, this.size) - 1) / REGION);
      const old = this.range;
      this.range = [r0, r1];
      // One Snapshot per contiguous run of regions the old range lacked.
      let run = null;
      for (let r = r0; r <= r1 + 1; r++) {
        const isNew = r <= r1 && !(old && r >= old[0] && r <= old[1]);
        if (isNew) run ??= r;
        else if (run !== null) {
          this.toClient.push(this.rangeSnapshot(run, r - 1));
          run = null;
        }
      }
    }
  }
}

test('the viewport rule: through scrolls, jumps, lost frames and Resyncs the page holds exactly the board in its range, and nothing outside it', () => {
  let lost = 0;
  let gaps = 0;
  for (let seed = 1; seed <= 30; seed++) {
    const random = prng(seed);
    const size = seed % 3 === 0 ? 100_000 : 1_000_000 - (seed % 5);
    const world = new World(size, random);
    const board = new Board();
    // The page load: the board over HTTP, then a socket that resumes from it.
    world.tick(50, size / 2);
    assert.ok(board.applySnapshot(world.snapshot(0, size)));
    const screen = 1_215;
    let a = 0;
    const subscribe = () => {
      const w = windowFor(a, Math.min(size, a + screen), size);
      board.subscribe(w.first, w.count);
      world.toServer.push(w);
    };
    subscribe();
    for (let step = 0; step < 300; step++) {
      // Changes near the screen, near box 500,000 and near the top.
      world.tick(1 + Math.floor(random() * 6), [a, size / 2, 0][step % 3]);
      // Now and then a frame is lost (the client must notice the gap).
      if (random() < 0.02 && world.toClient.length) {
        const k = Math.floor(random() * world.toClient.length);
        if (world.toClient[k].region !== undefined) {
          world.toClient.splice(k, 1);
          lost++;
        }
      }
      // The page scrolls a little, or jumps.
      const move = random();
      if (move < 0.1) a = Math.floor(random() * (size - screen));
      else if (move < 0.5) a = Math.max(0, Math.min(size - screen, a + Math.floor((random() - 0.3) * screen)));
      if (!covers(windowFor(a, a + screen, size), a, a + screen, size)) assert.fail('a window must cover its screen');
      const subscribed = random() < 0.5;
      if (subscribed) subscribe();
      // Messages arrive late and in bursts, in order.
      if (random() < 0.6) world.serve();
      for (const m of world.toClient.splice(0, Math.floor(random() * 4))) {
        const r = m.kind === 'snapshot' ? board.applySnapshot(m) : board.applyBatch(m).result;
        assert.notEqual(r, false, 'a well-formed snapshot applies');
        assert.notEqual(r, 'invalid');
        if (r === 'gap') {
          gaps++;
          world.toServer.push({ resync: true });
        }
      }
      // Never a region outside the last Subscribe's range.
      const w = windowFor(a, Math.min(size, a + screen), size);
      if (subscribed) {
        const held = Object.keys(board.cur).map(Number);
        assert.deepEqual([held[0], held.at(-1)], [w.first / REGION, Math.ceil((w.first + w.count) / REGION) - 1], `seed ${seed}: the regions held are the range's`);
      }
    }
    // Quiet: everything is delivered, both ways.
    for (let k = 0; k < 5; k++) {
      world.serve();
      for (const m of world.toClient.splice(0)) {
        const r = m.kind === 'snapshot' ? board.applySnapshot(m) : board.applyBatch(m).result;
        if (r === 'gap') world.toServer.push({ resync: true });
      }
    }
    world.toClient.push({ kind: 'batch', fromSeq: 0n, toSeq: world.seq + 1n, checked: [], unchecked: [], frozen: [], checkedCount: world.count, frozenCount: 0, countsOnly: true });
    board.applyBatch(world.toClient.pop());
    const held = Object.keys(board.cur).map(Number);
    const [r0, r1] = [held[0], held.at(-1)];
    for (let i = r0 * REGION; i < Math.min(size, (r1 + 1) * REGION); i++) {
      assert.ok(known(board, i), `seed ${seed}: box ${i} in the range is known`);
      assert.equal(board.isChecked(i), bit(world.checked, i), `seed ${seed}: box ${i}`);
    }
    assert.equal(board.checkedCount, world.count, `seed ${seed}: the counts`);
    if (r0 > 0) assert.ok(!known(board, r0 * REGION - 1), 'the box before the range is unknown');
    if ((r1 + 1) * REGION < size) assert.ok(!known(board, (r1 + 1) * REGION), 'the box after the range is unknown');
  }
  assert.ok(lost > 10 && gaps > 0, `frames lost on the way (${lost}) and gaps seen (${gaps})`);
});

test('a range Snapshot that does not fit its range, or of another region size, changes nothing', () => {
  const world = new World(SIZE, prng(1));
  const board = new Board();
  board.subscribe(0, 4096);
  const s = world.rangeSnapshot(0, 1);
  assert.ok(!board.applySnapshot({ ...s, checked: s.checked.subarray(1) }));
  assert.ok(!board.applySnapshot({ ...s, regionSize: 4096 }));
  assert.ok(!board.applySnapshot({ ...s, rangeFirst: 100 }));
  assert.ok(!board.applySnapshot({ ...s, rangeCount: 3000, checked: new Uint8Array(375), frozen: new Uint8Array(375) }), 'not whole regions');
  assert.ok(!known(board, 0));
  assert.ok(board.applySnapshot(s));
  assert.ok(known(board, 0) && known(board, 4095) && !known(board, 4096));
  // A region frame with a box outside its region is refused whole.
  const bad = { kind: 'batch', fromSeq: 1n, toSeq: 2n, checked: [5, 5000], unchecked: [], frozen: [], region: 0 };
  assert.equal(board.applyBatch(bad).result, 'invalid');
  assert.ok(!board.isChecked(5));
  // A new epoch: every region held before is gone.
  board.applySnapshot({ ...world.rangeSnapshot(1, 1), epoch: 8n });
  assert.ok(!known(board, 0) && known(board, 2048));
});
