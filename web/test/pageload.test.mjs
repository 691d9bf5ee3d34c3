// What a page load costs, counted in real Chromium (bytes.mjs): the socket
// opens subscribed to the window the page shows (/ws?first=&count=) and
// starts with a range Snapshot of it, deflated, so a near-empty board costs
// a few hundred bytes of board data, not the 250 KB of two raw bitsets nor
// a GET /api/state of the whole board; and a snapshot the socket must send
// anyway comes deflated.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer } from './server.mjs';
import { launchChromium } from './suite.mjs';
import { countingPage } from './bytes.mjs';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  assert.equal(await server?.stop(), 0);
});

const KB = 1024;
// docs/BENCHMARKS.md counts kilobytes of 1,000 bytes: the promise is < 10,000 B.
const PAGE_LOAD_BUDGET = 10_000;

// One line per response, and the socket: where a page load's bytes go.
function breakdown(label, load) {
  const rows = Object.entries(load.http).map(([path, n]) => `  ${path.padEnd(14)} ${String(n).padStart(6)} B`);
  console.log(`${label}: ${load.total} B in all\n${rows.join('\n')}\n  ${'socket'.padEnd(14)} ${String(load.socketBytes).padStart(6)} B`);
}

test('a first visit of a near-empty board costs under 10 KB in all (HTTP + socket), a cached reload far less', async () => {
  // A near-empty board: a few boxes checked from another page.
  const other = await browser.newPage();
  await other.goto(server.url);
  await other.waitForFunction(() => window.omcb?.board.ready && window.omcb.conn.open);
  for (const i of [1, 99, 1000]) await other.locator(`input[data-index="${i}"]`).click();
  await other.waitForFunction(() => window.omcb.pending.size === 0 && window.omcb.board.checkedCount === 3);

  const { page, load } = await countingPage(browser, server.url);
  const first = await load();
  breakdown('first visit', first);
  assert.deepEqual(Object.keys(first.http), ['/'], 'the page is one response, and the board comes on the socket');
  // The page is one response (index.html with its style, icon and module
  // bundle inline, stripped and gzipped by the worker: assets.rs), and
  // sunset.js comes only when there is a sunset to show.
  assert.ok(first.total < PAGE_LOAD_BUDGET, `first visit ${first.total} B in all (HTTP + socket; 9,289 B measured with the socket opened subscribed, 9,866-9,960 B before with GET /api/state), over ${PAGE_LOAD_BUDGET} B: ${JSON.stringify(first.http)}`);
  assert.ok(first.socketBytes < KB, `the socket started with a deflated range Snapshot of the window, not the board: ${first.socketBytes} B`);
  assert.equal(await page.evaluate(() => window.omcb.board.checkedCount), 3);
  // The boxes the page holds (its window) are the server's, bit for bit.
  const same = await page.evaluate(async () => {
    const { decodeSnapshot } = await import('/proto.js');
    const s = decodeSnapshot(new Uint8Array(await (await fetch('/api/state')).arrayBuffer()));
    const b = window.omcb.board;
    const bit = (bits, i) => (bits[i >> 3] & (0x80 >> (i & 7))) !== 0;
    let held = 0;
    for (let i = 0; i < s.size; i++) {
      if (b.seqAt(i) < 0n) continue;
      held++;
      if (bit(s.checked, i) !== bit(b.checked, i)) return false;
    }
    return s.seq === b.seq && held >= 2048;
  });
  assert.ok(same, 'the page holds the server\'s boxes in its window');

  // Again with the browser's cache: every file and the state revalidate.
  const again = await load({ reload: true });
  breakdown('cached reload', again);
  assert.ok(again.total < KB, `cached reload ${again.total} B in all (HTTP + socket)`);
  await page.close();
  await other.close();
});

test('a first visit of a busy board costs what a near-empty one does: the board outside the window never comes', async () => {
  const busy = await startServer({
    args: ['--toggle-rate', '100000', '--toggle-burst', '100000', '--abuse-burst', '100000',
      '--ip-toggle-rate', '0', '--recv-frame-rate', '100000'],
  });
  try {
    // 20,000 boxes (2%) scattered over the whole board (611,953 is prime to a
    // million: no box twice), checked by another page:
    // GET /api/state of it is 7.7 KB with its headers (the pattern is
    // regular enough to compress; a random 1% is 17.8 KB, docs/BENCHMARKS.md).
    const N = 20_000;
    const other = await browser.newPage();
    await other.goto(busy.url);
    await other.waitForFunction(() => window.omcb?.conn.open);
    await other.evaluate((n) => {
      for (let i = 0; i < n; i++) window.omcb.conn.sendToggle((i * 611_953) % 1_000_000, true, i + 1);
    }, N);
    for (const deadline = Date.now() + 60_000; ;) {
      const stats = await (await fetch(`${busy.url}/api/stats`)).json();
      if (stats.checked_count === N) break;
      assert.ok(Date.now() < deadline, `the board has ${stats.checked_count} of ${N} checked`);
      await new Promise((ok) => setTimeout(ok, 100));
    }
    await other.close();
    const { page, load } = await countingPage(browser, busy.url);
    const first = await load();
    breakdown('first visit, 2% checked', first);
    assert.ok(first.total < PAGE_LOAD_BUDGET, `first visit of a busy board ${first.total} B in all (9,355 B measured; 17,066 B when the page fetched GET /api/state first): ${JSON.stringify(first.http)}`);
    await page.close();
  } finally {
    assert.equal(await busy.stop(), 0);
  }
});

test('a snapshot on the socket comes deflated when the page asks for it, and the board is still exact', async () => {
  const { page, load, socket } = await countingPage(browser, server.url);
  await load();
  const before = socket();
  // A Resync makes the worker send a Snapshot on the socket.
  const seq = await page.evaluate(async () => {
    const { conn, board } = window.omcb;
    const got = new Promise((ok) => {
      const onMessage = conn.onMessage;
      conn.onMessage = (msg) => { onMessage(msg); if (msg.kind === 'snapshot') ok(); };
    });
    conn.resync();
    await got;
    return String(board.seq);
  });
  await page.waitForFunction(() => !window.omcb.board.awaitingSnapshot);
  const snapshot = socket() - before;
  console.log(`snapshot on the socket: ${snapshot} B`);
  assert.ok(snapshot > 0 && snapshot < 4 * KB, `a deflated near-empty snapshot: ${snapshot} B, not 250 KB`);
  const exact = await page.evaluate(async () => {
    const { decodeSnapshot } = await import('/proto.js');
    const s = decodeSnapshot(new Uint8Array(await (await fetch('/api/state')).arrayBuffer()));
    const b = window.omcb.board;
    return String(s.seq) === String(b.seq)
      && s.checked.every((x, k) => x === b.checked[k]) && s.frozen.every((x, k) => x === b.frozen[k]);
  });
  assert.ok(exact, `the page holds the server's board at seq ${seq}`);
  await page.close();
});

test('every module the worker serves stripped parses and loads in Chromium, and the page is one response', async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  const paths = [];
  page.on('request', (r) => paths.push(new URL(r.url()).pathname));
  await page.goto(server.url);
  await page.waitForFunction(() => window.omcb?.board.ready && window.omcb.conn.open);
  // The first paint asks for the page only (and opens the socket, which is
  // no 'request' here, and brings the board): the modules came inline, the
  // icon and the style too, and no sunset runs.
  assert.deepEqual(paths.sort(), ['/']);
  // Each module on its own path (sunset.js loads that way; the rest are
  // served for anyone who asks) is stripped (assets/minify.rs) and must still
  // be a module Chromium reads, with the exports it had.
  const exports = await page.evaluate(async () => {
    const out = {};
    for (const m of ['proto.js', 'board.js', 'conn.js', 'grid.js', 'sunset.js']) {
      out[m] = Object.keys(await import(`/${m}`)).sort();
    }
    return out;
  });
  assert.deepEqual(exports['sunset.js'], ['Sunset', 'clock', 'duration']);
  assert.ok(exports['proto.js'].includes('decodeServerMessage'), JSON.stringify(exports));
  assert.deepEqual(exports['grid.js'], ['Grid']);
  assert.deepEqual(errors, []);
  await page.close();
});
