// The time-lapse (issue 14 part 3), in real Chromium against the real omcb
// binary: a history is recorded through the socket into the worker's change
// archive (--archive-dir); /replay, opened at a seq, scrubbed, and reopened
// from the URL it shows, holds the board the archive's changes make at that
// seq (compared through the page's state, not pixels), and shows it on the
// grid; a damaged segment is named with its file and byte offset, its seqs
// shown as missing.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { browserSuite } from './suite.mjs';

const suite = browserSuite();
const SIZE = 5000;
const args = (dir) => ['--archive-dir', dir, '--board-size', String(SIZE), '--toggle-rate', '1000000', '--toggle-burst', '1000000', '--batch-ms', '20'];
const archive = mkdtempSync(join(tmpdir(), 'omcb-replay-'));
let server;
let epoch; // the worker's, 16 hex digits
let toggles; // [{index, checked, seq}] in seq order

// Polls `check` (async, truthy when done) until it holds or `ms` pass.
async function until(what, check, ms = 30_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// The board the archive's changes make at `seq`: the toggles up to it.
function expectedAt(seq) {
  const on = new Set();
  for (const t of toggles) {
    if (t.seq > seq) break;
    if (t.checked) on.add(t.index);
    else on.delete(t.index);
  }
  return [...on].sort((a, b) => a - b);
}

// The page's state: its seq and the boxes checked in it.
const pageState = (page) => page.evaluate(() => {
  const b = window.replay.timeline.board;
  const on = [];
  for (let i = 0; i < b.size; i++) if (b.isChecked(i)) on.push(i);
  return { seq: Number(b.seq), on, url: location.pathname + location.search };
});

// Removed at the end, after the suite has stopped the servers reading them.
const dirs = [archive];
after(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }); });

// The history, recorded once, on the first test's demand (the suite's
// browser is there by then).
let recording;
const recorded = () => (recording ??= record());
async function record() {
  server = await suite.start({ args: args(archive) });
  // From the text: a 64-bit epoch loses digits as a JSON number.
  const stats = await (await fetch(`${server.url}/api/stats`)).text();
  epoch = BigInt(stats.match(/"epoch":(\d+)/)[1]).toString(16).padStart(16, '0');
  // Record: 600 toggles from a page's own socket, each waiting for its seq,
  // boxes flipped back and forth (a change each time).
  const page = await suite.page();
  await page.goto(`${server.url}/favicon.ico`);
  const state = new Map();
  const one = [];
  for (let k = 1; k <= 600; k++) {
    const index = (k * 7919) % 97 + (k % 3) * Math.floor(SIZE / 3);
    const checked = !state.get(index);
    state.set(index, checked);
    one.push([{ index, checked }]);
  }
  // One at a time, spread over time so that the scrub bar has a span to scrub.
  toggles = await sendToggles(page, one, { pauseEvery: 100, pauseMs: 100 });
  await page.close();
  const last = toggles[toggles.length - 1].seq;
  // The archiver writes on its own schedule: wait until the archive has all.
  await until('the archive to hold every toggle', async () => {
    const index = await (await fetch(`${server.url}/replay/index.json`)).json();
    return index.epochs.find((e) => e.epoch === epoch)?.last_seq >= last;
  });
}

// Sends `batches` (arrays of {index, checked}) from `page`'s own socket: each
// batch all at once, then waits for every answer in it (a refusal fails the
// test), pausing pauseMs after every pauseEvery-th batch. Returns each
// toggle with the seq of its change.
function sendToggles(page, batches, { pauseEvery = 0, pauseMs = 0 } = {}) {
  return page.evaluate(async ({ batches, pauseEvery, pauseMs }) => {
    const { encodeToggle, decodeServerMessage } = await import('/proto.js');
    const ws = new WebSocket(`ws://${location.host}/ws`);
    ws.binaryType = 'arraybuffer';
    const waiting = new Map();
    ws.onmessage = (e) => {
      const m = decodeServerMessage(new Uint8Array(e.data));
      if (m.kind === 'toggleResult') waiting.get(m.requestId)?.(m);
    };
    await new Promise((ok) => { ws.onopen = ok; });
    const out = [];
    let id = 0;
    for (const [n, batch] of batches.entries()) {
      const sent = batch.map(({ index, checked }) => {
        const rid = ++id;
        const answer = new Promise((ok) => waiting.set(rid, ok)).then((r) => ({ index, checked, r }));
        ws.send(encodeToggle(index, checked, rid));
        return answer;
      });
      for (const { index, checked, r } of await Promise.all(sent)) {
        if (!r.accepted) throw new Error(`toggle of box ${index} refused: ${r.reason}`);
        out.push({ index, checked, seq: Number(r.seq) });
      }
      if (pauseEvery && (n + 1) % pauseEvery === 0) await new Promise((ok) => setTimeout(ok, pauseMs));
    }
    ws.close();
    return out;
  }, { batches, pauseEvery, pauseMs });
}

async function openReplay(query) {
  await recorded();
  const page = await suite.page();
  await page.goto(`${server.url}/replay${query}`);
  await page.waitForFunction(() => window.replay?.ready, null, { timeout: 30_000 });
  return page;
}

test('the page at a seq holds the archive\'s board at that seq; a scrub moves it and the URL; the URL reopens it', async () => {
  await recorded();
  const mid = toggles[299].seq;
  const page = await openReplay(`?epoch=${epoch}&seq=${mid}`);
  let s = await pageState(page);
  assert.equal(s.seq, mid);
  assert.deepEqual(s.on, expectedAt(mid), `the board at seq ${mid}`);
  // The grid shows it: the boxes in view are the state's.
  const shown = await page.evaluate(() => [...document.querySelectorAll('#grid input[data-index]')]
    .map((b) => [Number(b.dataset.index), b.checked]));
  assert.ok(shown.length > 100, 'boxes in view');
  const on = new Set(s.on);
  for (const [i, checked] of shown) assert.equal(checked, on.has(i), `box ${i} as shown`);
  assert.ok(shown.some(([, c]) => c), 'some box in view is checked');

  // Scrub to a quarter of the span: the page moves to a seq before and the
  // URL names it.
  await page.evaluate(() => {
    const scrub = document.getElementById('scrub');
    scrub.value = String(Math.floor(Number(scrub.max) / 4));
    scrub.dispatchEvent(new Event('input'));
  });
  s = await pageState(page);
  assert.ok(s.seq > 0 && s.seq < mid, `scrubbed back to seq ${s.seq}`);
  assert.deepEqual(s.on, expectedAt(s.seq), `the board at seq ${s.seq}`);
  assert.equal(new URLSearchParams(s.url.split('?')[1]).get('seq'), String(s.seq), 'the URL names the moment');
  assert.equal(new URLSearchParams(s.url.split('?')[1]).get('epoch'), epoch);

  // To the end.
  await page.evaluate(() => {
    const scrub = document.getElementById('scrub');
    scrub.value = scrub.max;
    scrub.dispatchEvent(new Event('input'));
  });
  const end = await pageState(page);
  const last = toggles[toggles.length - 1].seq;
  assert.ok(end.seq >= last, `at the end: seq ${end.seq}`);
  assert.deepEqual(end.on, expectedAt(end.seq));

  // The shared URL opens the same moment.
  const again = await openReplay(s.url.slice('/replay'.length));
  assert.deepEqual(await pageState(again), s);
  await page.close();
  await again.close();
});

test('playback applies the history in order and ends at the archive\'s last seq', async () => {
  const page = await openReplay(`?epoch=${epoch}&seq=0&speed=100000`);
  assert.equal((await pageState(page)).seq, 0);
  assert.deepEqual((await pageState(page)).on, []);
  await page.click('#play');
  await page.waitForFunction(() => document.getElementById('play').textContent === 'Play', null, { timeout: 20_000 });
  const s = await pageState(page);
  assert.ok(s.seq >= toggles[toggles.length - 1].seq);
  assert.deepEqual(s.on, expectedAt(s.seq));
  await page.close();
});

test('a damaged segment is named with its file and byte offset, its seqs shown as missing', async () => {
  await recorded();
  // A copy of the archive with one byte of the first block's payload flipped.
  const copy = mkdtempSync(join(tmpdir(), 'omcb-replay-bad-'));
  dirs.push(copy);
  cpSync(join(archive, epoch), join(copy, epoch), { recursive: true });
  const name = readdirSync(join(copy, epoch)).filter((n) => n.endsWith('.seg')).sort()[0];
  const file = join(copy, epoch, name);
  const bytes = readFileSync(file);
  bytes[16 + 48 + 1] ^= 0x55;
  writeFileSync(file, bytes);
  const bad = await suite.start({ args: args(copy) });
  const page = await suite.page();
  await page.goto(`${bad.url}/replay?epoch=${epoch}&seq=1`);
  await page.waitForFunction(() => window.replay?.ready, null, { timeout: 30_000 });
  const problems = await page.locator('#problems').textContent();
  assert.match(problems, new RegExp(`/replay/${epoch}/${name.replace('.', '\\.')} at byte 16: corrupt: checksum mismatch`));
  // The seqs of that block are a hole: the notice names them where the page stands.
  const notice = await page.locator('#notice').textContent();
  assert.match(notice, /Seqs? 1(–[\d,]+)? (is|are) not in the archive: .*at byte 16: corrupt/);
  assert.ok(await page.locator('#holes span').count() >= 1, 'the scrub bar marks the hole');
  await page.close();
});

test('at 10,000 changes a second, each frame applies its share and repaints only the boxes that changed', async (t) => {
  await recorded();
  // A dense stretch of history: 20,000 toggles sent without waiting for
  // each (a thousand in flight at a time), about half of them changes (a
  // box set to the value it has is accepted without a change).
  const writer = await suite.page();
  await writer.goto(`${server.url}/favicon.ico`);
  const chunks = [];
  let x = 1;
  for (let chunk = 0; chunk < 20; chunk++) {
    const toggles = [];
    for (let k = 0; k < 1000; k++) {
      x = (x * 48271) % 2147483647;
      toggles.push({ index: x % SIZE, checked: (x >> 8) % 2 === 0 });
    }
    chunks.push(toggles);
  }
  const burst = await sendToggles(writer, chunks);
  await writer.close();
  const all = toggles.concat(burst).sort((a, b) => a.seq - b.seq);
  const [first, last] = [burst[0].seq, Math.max(...burst.map((b) => b.seq))];
  await until('the archive to hold the burst', async () => {
    const index = await (await fetch(`${server.url}/replay/index.json`)).json();
    return index.epochs.find((e) => e.epoch === epoch)?.last_seq >= last;
  });
  // Its density in the archive, and the speed that replays it at 10,000
  // changes a second (at least 1x).
  const probe = await openReplay(`?epoch=${epoch}&seq=${first - 1}`);
  const perMs = await probe.evaluate(([a, b]) => {
    const tl = window.replay.timeline;
    const [p, q] = [tl.positionOfSeq(a), tl.positionOfSeq(b)];
    return (q - p) / Math.max(1, tl.times[q - 1] - tl.times[p]);
  }, [first, last]);
  await probe.close();
  const speed = Math.max(1, Math.ceil(10 / perMs));
  t.diagnostic(`burst: ${(perMs * 1000).toFixed(0)} changes a second as archived; replayed at ${speed}x`);

  // From the burst's first change: the idle time before it is not the burst's.
  const page = await openReplay(`?epoch=${epoch}&seq=${first}&speed=${speed}`);
  const run = await page.evaluate(async (last) => {
    const r = window.replay;
    const calls = { update: 0, boxes: 0, refresh: 0 };
    const { grid } = r;
    const [update, refresh] = [grid.update.bind(grid), grid.refresh.bind(grid)];
    grid.update = (list) => { calls.update++; calls.boxes += list.length; update(list); };
    grid.refresh = () => { calls.refresh++; refresh(); };
    r.frameWork.length = 0;
    const seq0 = Number(r.timeline.board.seq);
    const t0 = performance.now();
    document.getElementById('play').click();
    await new Promise((ok) => {
      const check = () => (Number(r.timeline.board.seq) >= last || performance.now() - t0 > 20_000 ? ok() : setTimeout(check, 20));
      check();
    });
    // At the end the page pauses itself.
    const play = document.getElementById('play');
    if (play.textContent === 'Pause') play.click();
    const seconds = (performance.now() - t0) / 1000;
    const w = [...r.frameWork].sort((a, b) => a - b);
    return {
      calls, frames: w.length, seconds, applied: Number(r.timeline.board.seq) - seq0,
      p50: w[Math.floor(w.length / 2)], p95: w[Math.floor(w.length * 0.95)], max: w[w.length - 1],
    };
  }, last);
  t.diagnostic(`${run.applied} changes in ${run.seconds.toFixed(2)} s over ${run.frames} frames; frame work p50 ${run.p50.toFixed(2)} ms, p95 ${run.p95.toFixed(2)} ms, max ${run.max.toFixed(2)} ms`);
  const s = await pageState(page);
  assert.ok(s.seq >= last, `played to the burst's end: seq ${s.seq}`);
  // expectedAt reads `toggles`: the burst's are in `all`.
  const on = new Set();
  for (const x of all) if (x.seq <= s.seq) (x.checked ? on.add(x.index) : on.delete(x.index));
  assert.deepEqual(s.on, [...on].sort((a, b) => a - b), 'the board at the end of the burst');
  assert.ok(run.frames >= 10, `played over frames, not at once: ${run.frames}`);
  assert.equal(run.calls.refresh, 0, 'no whole repaint: each frame repaints the boxes it changed');
  assert.ok(run.calls.update > 0 && run.calls.boxes <= run.applied, `${run.calls.boxes} boxes repainted for ${run.applied} changes`);
  assert.ok(run.applied / run.seconds >= 8_000, `${(run.applied / run.seconds).toFixed(0)} changes a second`);
  // A frame's work fits a frame at 60 Hz, with room to paint.
  assert.ok(run.p50 < 8, `frame work p50 ${run.p50.toFixed(2)} ms`);
  await page.close();
});
