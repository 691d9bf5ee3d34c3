// The reconnect policy: exponential backoff with full jitter, and the close
// codes that ask a client to come back sooner or later.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { retryDelay } from '../conn.js';

const lowest = () => 0;
const highest = () => 0.999999;

test('full jitter: anywhere from 0 up to a ceiling that doubles per attempt, capped', () => {
  const ceilings = [1, 2, 3, 4, 5, 6, 7].map((n) => Math.round(retryDelay(n, 1006, highest)));
  assert.deepEqual(ceilings, [1000, 2000, 4000, 8000, 16000, 30000, 30000]);
  assert.equal(retryDelay(1, 1006, lowest), 0);
  assert.equal(Math.round(retryDelay(50, 1006, highest)), 30000, 'no overflow after many attempts');
});

test('1012 (server restart): the first retry comes within a second', () => {
  assert.ok(retryDelay(1, 1012, highest) <= 1000);
  assert.ok(retryDelay(2, 1012, highest) > 1000, 'then the usual backoff');
});

test('1013 (overloaded), 1008 (abuse), 1003/1007/1009 (bad frames): stay away longer', () => {
  assert.ok(retryDelay(1, 1013, lowest) >= 2000);
  assert.ok(retryDelay(1, 1013, highest) >= 8000, 'the crowd spreads over at least 8 s');
  assert.ok(retryDelay(1, 1008, lowest) >= 15_000);
  for (const code of [1003, 1007, 1009]) assert.ok(retryDelay(1, code, lowest) >= 5000, `${code}`);
});
