// The browser's protobuf codec against golden vectors written by the Rust
// crate (crates/proto/tests/golden.rs): a disagreement fails here.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  decodeServerMessage, decodeSnapshot, encodeResync, encodeToggle, deltaDecode, DecodeError,
} from '../proto.js';

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
