// The time-lapse's decoder and timeline (web/timeline.js) against a segment
// written by crates/archive's writer (golden/segment.seg, with what it holds
// in golden/segment.json: crates/worker/tests/replay.rs writes both): every
// record decodes as written; the board after any seq, reached forwards,
// backwards or through keyframes, is the one its changes make; damage is
// reported with its byte offset and its seqs become a hole, never skipped.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { GAP, MISSING, Timeline, readSegment } from '../timeline.js';

const golden = JSON.parse(readFileSync(new URL('./golden/segment.json', import.meta.url)));
const bytes = new Uint8Array(readFileSync(new URL('./golden/segment.seg', import.meta.url)));
const epoch = BigInt(`0x${golden.epoch}`);
const SIZE = 1_000_000;
const lastSeq = golden.records.reduce((m, r) => Math.max(m, r.gap ? r.gap[1] : r.seq), 0);

// The board the golden records make after `seq`: checked and frozen boxes.
function expectedAt(seq) {
  const checked = new Set();
  const frozen = new Set();
  for (const r of golden.records) {
    if (r.gap || r.seq > seq) continue;
    if (r.kind === 2) frozen.add(r.index);
    else if (r.kind === 1) checked.add(r.index);
    else checked.delete(r.index);
  }
  return { checked: [...checked].sort((a, b) => a - b), frozen: [...frozen].sort((a, b) => a - b) };
}

function stateOf(tl) {
  const checked = [];
  const frozen = [];
  for (let i = 0; i < SIZE; i++) {
    if (tl.board.isChecked(i)) checked.push(i);
    if (tl.board.isFrozen(i)) frozen.push(i);
  }
  assert.equal(tl.board.checkedCount, checked.length, 'the checked count follows');
  assert.equal(tl.board.frozenCount, frozen.length, 'the frozen count follows');
  return { checked, frozen };
}

async function timeline(b, every = 37) {
  const tl = new Timeline(SIZE, epoch);
  tl.addSegment('/replay/x/seg', await readSegment(b, epoch));
  tl.finish(lastSeq, every);
  return tl;
}

test('every record decodes as the archive wrote it', async () => {
  const blocks = await readSegment(bytes, epoch);
  assert.equal(blocks.length, 4);
  assert.ok(blocks.every((b) => !b.error), JSON.stringify(blocks.filter((b) => b.error)));
  const got = [];
  for (const b of blocks) {
    const { kinds, boxes, ms, gapEnds } = b.records;
    let seq = b.header.firstSeq;
    for (let r = 0; r < kinds.length; r++) {
      if (kinds[r] === GAP) {
        got.push({ gap: [seq, gapEnds.get(r)] });
        seq = gapEnds.get(r) + 1;
      } else {
        got.push({ seq, ms: ms[r], index: boxes[r], kind: kinds[r] });
        seq++;
      }
    }
  }
  assert.deepEqual(got, golden.records);
});

test('the board after any seq is what its changes make, forwards, backwards and through keyframes', async () => {
  const tl = await timeline(bytes);
  assert.equal(tl.length, golden.records.length);
  assert.ok(tl.keyframes.length > 5, 'keyframes every 37 records');
  for (const seq of [0, 1, 2, 36, 37, 38, 100, 163, 165, 170, 171, 250, 320, 329, 40, 5, 329, 0, 200]) {
    const changed = tl.seek(tl.positionOfSeq(seq));
    const inGap = golden.records.find((r) => r.gap && r.gap[0] <= seq && seq <= r.gap[1]);
    // A seq inside a gap shows the board after the gap: its state is unknown.
    const at = inGap ? inGap.gap[1] : seq;
    assert.equal(Number(tl.board.seq), at, `seq ${seq}`);
    assert.deepEqual(stateOf(tl), expectedAt(at), `the board at seq ${seq}`);
    assert.ok(changed === null || Array.isArray(changed));
  }
  // Times never go back (a clock's step back shows the latest time seen),
  // and a time finds the records at or before it.
  for (let p = 1; p < tl.length; p++) assert.ok(tl.times[p] >= tl.times[p - 1]);
  const t = tl.times[100];
  assert.ok(tl.times[tl.positionOfTime(t) - 1] <= t && (tl.positionOfTime(t) === tl.length || tl.times[tl.positionOfTime(t)] > t));
  assert.deepEqual(tl.holes().map((p) => [tl.firstSeq(p), tl.lastSeq(p), tl.kinds[p]]), [[201, 210, GAP]]);
});

test('a damaged block is reported with its byte offset and its seqs are a hole', async () => {
  const blocks = await readSegment(bytes, epoch);
  const second = blocks[1];
  const bad = bytes.slice();
  bad[second.offset + 48 + 3] ^= 0x55;
  const tl = await timeline(bad);
  assert.deepEqual(tl.errors, [{ file: '/replay/x/seg', offset: second.offset, error: 'corrupt: checksum mismatch' }]);
  const holes = tl.holes().filter((p) => tl.kinds[p] === MISSING);
  assert.equal(holes.length, 1);
  const p = holes[0];
  assert.deepEqual([tl.firstSeq(p), tl.lastSeq(p)], [second.header.firstSeq, second.header.lastSeq]);
  assert.match(tl.problems.get(p).error, new RegExp(`at byte ${second.offset}: corrupt: checksum mismatch`));
  // After the hole the board goes on with the blocks that are whole.
  tl.seek(tl.length);
  assert.equal(Number(tl.board.seq), lastSeq);
});

test('a torn end and a lost block are holes too, each named', async () => {
  const blocks = await readSegment(bytes, epoch);
  const last = blocks[3];
  const torn = await timeline(bytes.slice(0, bytes.length - 10));
  assert.match(torn.errors[0].error, /^truncated: the block needs/);
  assert.equal(torn.errors[0].offset, last.offset);
  const tornHole = torn.holes().find((p) => torn.kinds[p] === MISSING);
  assert.deepEqual([torn.firstSeq(tornHole), torn.lastSeq(tornHole)], [last.header.firstSeq, lastSeq]);

  // Block 3 cut out of the file: seqs no block holds.
  const third = blocks[2];
  const lost = new Uint8Array(bytes.length - (last.offset - third.offset));
  lost.set(bytes.subarray(0, third.offset));
  lost.set(bytes.subarray(last.offset), third.offset);
  const tl = await timeline(lost);
  const hole = tl.holes().find((p) => tl.kinds[p] === MISSING);
  assert.deepEqual([tl.firstSeq(hole), tl.lastSeq(hole)], [third.header.firstSeq, third.header.lastSeq]);
  assert.match(tl.problems.get(hole).error, /no block and no gap record holds them/);
  assert.equal(tl.errors.length, 1, 'listed once');
});

test('a segment of another epoch, or not a segment, is refused at byte 0', async () => {
  assert.match((await readSegment(bytes, 7n))[0].error, /^corrupt: the header says epoch/);
  assert.deepEqual(await readSegment(new Uint8Array(20), epoch), [{ offset: 0, error: 'corrupt: not a segment (bad magic)' }]);
  assert.match((await readSegment(bytes.slice(0, 9), epoch))[0].error, /^truncated/);
});
