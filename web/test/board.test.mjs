// The convergence rule in the browser's board state.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Board } from '../board.js';

function snapshot(seq, size, on = []) {
  const checked = new Uint8Array(Math.ceil(size / 8));
  for (const i of on) checked[i >> 3] |= 0x80 >> (i & 7);
  return { seq: BigInt(seq), size, checked, frozen: new Uint8Array(checked.length), checkedCount: on.length, frozenCount: 0, freezeAfterMs: 0n, epoch: 9n };
}
const delta = (l) => l.map((x, i) => (i ? x - l[i - 1] : x));
function batch(from, to, { on = [], off = [], frozen = [], count = 0 } = {}) {
  return { fromSeq: BigInt(from), toSeq: BigInt(to), checked: delta(on), unchecked: delta(off), frozen: delta(frozen), checkedCount: count, frozenCount: frozen.length };
}

test('snapshot replaces the state; bit order is Redis order', () => {
  const b = new Board();
  assert.ok(b.applySnapshot(snapshot(5, 20, [0, 9, 19])));
  assert.deepEqual([b.isChecked(0), b.isChecked(1), b.isChecked(9), b.isChecked(19)], [true, false, true, true]);
  assert.equal(b.checked[0], 0x80);
  assert.equal(b.seq, 5n);
  assert.ok(!b.applySnapshot({ ...snapshot(6, 20), checked: new Uint8Array(2) }), 'wrong bitset length refused');
  assert.equal(b.seq, 5n);
});

test('stale, contiguous, overlapping and gapped batches', () => {
  const b = new Board();
  b.applySnapshot(snapshot(10, 100, [1]));
  assert.equal(b.applyBatch(batch(5, 10, { on: [50] })).result, 'stale');
  assert.ok(!b.isChecked(50));
  const r = b.applyBatch(batch(11, 12, { on: [2, 70], off: [1], count: 2 }));
  assert.equal(r.result, 'applied');
  assert.deepEqual(r.changed.sort((x, y) => x - y), [1, 2, 70]);
  assert.ok(b.isChecked(70) && !b.isChecked(1));
  assert.equal(b.applyBatch(batch(11, 14, { on: [3], count: 3 })).result, 'applied', 'overlap applies final values');
  assert.equal(b.seq, 14n);
  assert.equal(b.applyBatch(batch(16, 17, { on: [4] })).result, 'gap');
  assert.ok(!b.isChecked(4));
  assert.equal(b.applyBatch(batch(15, 15, { on: [5] })).result, 'gap', 'after a gap, batches wait for the snapshot');
  b.applySnapshot(snapshot(17, 100, [4]));
  assert.equal(b.applyBatch(batch(18, 18, { on: [6], count: 2 })).result, 'applied');
});

test('a batch with an index off the board changes nothing', () => {
  const b = new Board();
  b.applySnapshot(snapshot(0, 10));
  assert.equal(b.applyBatch(batch(1, 1, { on: [3, 10] })).result, 'invalid');
  assert.ok(!b.isChecked(3));
  assert.equal(b.seq, 0n);
  assert.equal(b.applyBatch({ ...batch(1, 1), checked: [2, 0] }).result, 'invalid');
});

test('frozen boxes', () => {
  const b = new Board();
  b.applySnapshot(snapshot(0, 10, [3]));
  b.applyBatch(batch(1, 1, { frozen: [3], count: 1 }));
  assert.ok(b.isFrozen(3) && b.isChecked(3));
});

test('before any snapshot every batch is a gap; a bad seq range is invalid', () => {
  const b = new Board();
  assert.equal(b.applyBatch(batch(1, 1, { on: [1] })).result, 'gap');
  b.applySnapshot(snapshot(3, 10));
  assert.equal(b.applyBatch(batch(5, 4)).result, 'invalid');
  assert.equal(b.seq, 3n);
});

test('a batch of 100,000 boxes across a million-box board', () => {
  const b = new Board();
  b.applySnapshot(snapshot(0, 1_000_000));
  const on = Array.from({ length: 100_000 }, (_, k) => k * 10 + 9);
  const r = b.applyBatch(batch(1, 100_000, { on, count: on.length }));
  assert.equal(r.result, 'applied');
  assert.equal(r.changed.length, 100_000);
  assert.ok(b.isChecked(999_999) && b.isChecked(9) && !b.isChecked(10));
  assert.equal(b.checkedCount, 100_000);
});
