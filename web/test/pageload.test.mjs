// What a page load costs, counted in real Chromium (bytes.mjs): the board
// comes from GET /api/state (gzipped) and the socket resumes from its seq,
// so a near-empty board costs a few kilobytes, not the 250 KB of two raw
// bitsets; and a snapshot the socket must send anyway comes deflated.
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

test('a page load of a near-empty board costs under 10 KB of board data, and under 10 KB in all when cached', async () => {
  // A near-empty board: a few boxes checked from another page.
  const other = await browser.newPage();
  await other.goto(server.url);
  await other.waitForFunction(() => window.omcb?.board.ready && window.omcb.conn.open);
  for (const i of [1, 99, 1000]) await other.locator(`input[data-index="${i}"]`).click();
  await other.waitForFunction(() => window.omcb.pending.size === 0 && window.omcb.board.checkedCount === 3);

  const { page, load } = await countingPage(browser, server.url);
  const first = await load();
  console.log('first load', JSON.stringify(first));
  assert.ok(first.dataBytes < 10 * KB, `board data ${first.dataBytes} B (GET /api/state ${first.http['/api/state']} + socket ${first.socketBytes})`);
  assert.ok(first.http['/api/state'] > 0, 'the board came over HTTP');
  // The page's own files come gzipped: a first visit is about 19 KB in all.
  assert.ok(first.total < 25 * KB, `first page load ${first.total} B in all (HTTP + socket)`);
  assert.ok(first.socketBytes < KB, `the socket started with batches, not a snapshot: ${first.socketBytes} B`);
  assert.equal(await page.evaluate(() => window.omcb.board.checkedCount), 3);
  // The board the page holds is the server's, bit for bit.
  const same = await page.evaluate(async () => {
    const { decodeSnapshot } = await import('/proto.js');
    const s = decodeSnapshot(new Uint8Array(await (await fetch('/api/state')).arrayBuffer()));
    const b = window.omcb.board;
    return s.seq === b.seq && s.checked.every((x, k) => x === b.checked[k]);
  });
  assert.ok(same, 'the page holds the server\'s board');

  // Again with the browser's cache: every file and the state revalidate.
  const again = await load({ reload: true });
  console.log('cached load', JSON.stringify(again));
  assert.ok(again.total < 10 * KB, `cached page load ${again.total} B in all (HTTP + socket)`);
  await page.close();
  await other.close();
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
