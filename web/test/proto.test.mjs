// The browser's protobuf codec against golden vectors written by the Rust
// crate (crates/proto/tests/golden.rs): a disagreement fails here.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  decodeServerMessage, decodeSnapshot, encodeResync, encodeSubscribe, encodeToggle, deltaDecode, DecodeError, inflateSnapshot,
} from '../proto.js';
import { deflateRawSync } from 'node:zlib';

const vectors = JSON.parse(readFileSync(new URL('./golden/vectors.json', import.meta.url)));
const fromHex = (h) => Uint8Array.from(h.match(/../g) ?? [], (x) => parseInt(x, 16));
const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');

// BigInt -> decimal string, bytes -> hex: the JSON shape the Rust side wrote.
function normalize(v) {
  if (typeof v === 'bigint') return v.toString();
  if (v instanceof Uint8Array) return toHex(v);
  if (Array.isArray(v)) return v.map(normalize);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, normalize(x)]));
  return v;
}

test('golden vectors exist for every message kind', () => {
  const kinds = new Set(vectors.map((v) => (v.kind === 'server' ? v.expected.kind : v.kind)));
  for (const k of ['snapshot', 'batch', 'toggleResult', 'error', 'client']) assert.ok(kinds.has(k), k);
  // The viewport additions: a range Snapshot, region and counts frames, Subscribe.
  for (const field of ['rangeCount', 'region', 'countsOnly', 'subscribe']) {
    assert.ok(vectors.some((v) => field in v.expected), field);
  }
});

for (const v of vectors) {
  test(`golden: ${v.name}`, () => {
    const bytes = fromHex(v.hex);
    if (v.kind === 'server') {
      assert.deepEqual(normalize(decodeServerMessage(bytes)), v.expected);
    } else if (v.kind === 'snapshot') {
      assert.deepEqual(normalize(decodeSnapshot(bytes)), v.expected);
    } else if (v.expected.toggle) {
      const t = v.expected.toggle;
      assert.equal(toHex(encodeToggle(t.index, t.checked, t.requestId)), v.hex);
    } else if (v.expected.subscribe) {
      const { first, count } = v.expected.subscribe;
      assert.equal(toHex(encodeSubscribe(first, count)), v.hex);
    } else {
      assert.equal(toHex(encodeResync()), v.hex);
    }
  });
}

test('truncated and malformed input is an error, not garbage', () => {
  const snap = vectors.find((v) => v.kind === 'server' && v.expected.kind === 'snapshot');
  const bytes = fromHex(snap.hex);
  assert.throws(() => decodeServerMessage(bytes.subarray(0, bytes.length - 3)), DecodeError);
  assert.throws(() => decodeServerMessage(Uint8Array.of(0x0a, 0xff)), DecodeError);
  assert.throws(() => decodeServerMessage(new Uint8Array(0)), DecodeError);
  // Unknown fields are skipped.
  const withUnknown = Uint8Array.of(0x78, 0x05, ...fromHex(vectors.find((v) => v.expected.kind === 'error').hex));
  assert.equal(decodeServerMessage(withUnknown).kind, 'error');
});

test('delta decoding', () => {
  assert.deepEqual([...deltaDecode([3, 1, 6, 999989])], [3, 4, 10, 999999]);
  assert.deepEqual([...deltaDecode([])], []);
  assert.throws(() => [...deltaDecode([5, 0])], DecodeError);
  assert.throws(() => [...deltaDecode([0xffffffff, 1])], DecodeError);
});

test('repeated fields: unpacked and packed are both read, in order', () => {
  // Batch{checked: [5] unpacked, checked: [1, 2] packed, checked: [3] unpacked}.
  const batch = Uint8Array.of(0x18, 0x05, 0x1a, 0x02, 0x01, 0x02, 0x18, 0x03);
  const msg = decodeServerMessage(Uint8Array.of(0x12, batch.length, ...batch));
  assert.deepEqual(msg.checked, [5, 1, 2, 3]);
  // A repeated field with an unexpected wire type (fixed32) is skipped.
  const odd = Uint8Array.of(0x1d, 1, 2, 3, 4, 0x30, 0x07);
  const m2 = decodeServerMessage(Uint8Array.of(0x12, odd.length, ...odd));
  assert.deepEqual([m2.checked, m2.checkedCount], [[], 7]);
});

test('uint32 fields are truncated like protobuf does; uint64 fields keep all bits', () => {
  // ToggleResult{request_id: 2^32 + 7 (a 64-bit varint), seq: 2^64 - 1}.
  const t = Uint8Array.of(0x08, 0x87, 0x80, 0x80, 0x80, 0x10, 0x28, ...Array(9).fill(0xff), 0x01);
  const msg = decodeServerMessage(Uint8Array.of(0x1a, t.length, ...t));
  assert.equal(msg.requestId, 7);
  assert.equal(msg.seq, 2n ** 64n - 1n);
  assert.throws(() => decodeServerMessage(Uint8Array.of(0x1a, 11, 0x08, ...Array(10).fill(0xff))), DecodeError, '11-byte varint');
});

test('lengths past the buffer or past 2^31 are errors', () => {
  assert.throws(() => decodeServerMessage(Uint8Array.of(0x0a, 0x05, 0x08)), DecodeError);
  assert.throws(() => decodeServerMessage(Uint8Array.of(0x0a, 0x83, 0x80, 0x80, 0x80, 0x10)), DecodeError);
  assert.throws(() => decodeServerMessage(Uint8Array.of(0x0b)), DecodeError, 'group wire types are not ours');
});

test('a big batch decodes fast (Number arithmetic, not BigInt, per index)', () => {
  // 100,000 boxes one apart: the densest batch a busy second could bring.
  const packed = [0x00, ...Array(99_999).fill(0x01)];
  const len = [0xa0, 0x8d, 0x06]; // 100,000 as a varint
  const batch = Uint8Array.of(0x1a, ...len, ...packed);
  const outerLen = [0xa4, 0x8d, 0x06]; // 100,004
  const bytes = Uint8Array.of(0x12, ...outerLen, ...batch);
  const started = performance.now();
  const msg = decodeServerMessage(bytes);
  const ms = performance.now() - started;
  assert.equal(msg.checked.length, 100_000);
  assert.equal([...deltaDecode(msg.checked)].at(-1), 99_999);
  assert.ok(ms < 200, `${ms.toFixed(1)} ms`);
});

test('deflated snapshot bitsets (snapshot=deflate) inflate with DecompressionStream, to exactly the board', async () => {
  const size = 1_000_000;
  const checked = new Uint8Array(size / 8);
  checked[0] = 0x80;
  checked[124_999] = 0x01;
  const z = deflateRawSync(checked);
  // Snapshot{size: 1e6 (field 2), checked_deflate (field 10)}: frozen stays plain and empty here.
  const len = [z.length & 0x7f | 0x80, z.length >> 7];
  assert.ok(z.length < 16384 && z.length >= 128);
  const bare = Uint8Array.of(0x10, 0xc0, 0x84, 0x3d, 0x52, ...len, ...z);
  const s = decodeSnapshot(bare);
  assert.equal(s.size, size);
  assert.deepEqual(s.checkedDeflate, Uint8Array.from(z));
  await inflateSnapshot(s);
  assert.deepEqual(s.checked, checked);
  assert.equal(s.checkedDeflate, undefined);
  // Too long, too short, or not deflate at all: an error, never a wrong board.
  const tooLong = { size: 8, checkedDeflate: deflateRawSync(new Uint8Array(2)) };
  await assert.rejects(inflateSnapshot(tooLong), DecodeError);
  const tooShort = { size: 24, checkedDeflate: deflateRawSync(new Uint8Array(2)) };
  await assert.rejects(inflateSnapshot(tooShort), DecodeError);
  const bomb = { size: 8, checkedDeflate: deflateRawSync(new Uint8Array(50_000_000)) };
  await assert.rejects(inflateSnapshot(bomb), DecodeError);
  await assert.rejects(inflateSnapshot({ size: 8, checkedDeflate: Uint8Array.of(0xff, 0xff, 0xff) }), DecodeError);
});
