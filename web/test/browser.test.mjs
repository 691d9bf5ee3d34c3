// The board in real Chromium (Debian's, driven by playwright-core) against
// the real omcb binary: two pages see each other's clicks, the last box of a
// million is reachable and works, refusals revert, a page survives a
// server restart, and every socket opens subscribed to the page's window.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { decodeSnapshot } from '../proto.js';
import { startServer } from './server.mjs';
import { browserSuite } from './suite.mjs';

const suite = browserSuite();
let server;
before(async () => {
  server = await suite.start();
});

async function openBoard(url = server.url, viewport = { width: 1280, height: 800 }) {
  const page = await suite.page({ viewport });
  await page.goto(url);
  await page.waitForSelector('#conn-state[data-state="live"]');
  await page.waitForFunction(() => window.omcb.board.ready);
  return page;
}

const box = (page, i) => page.locator(`input[data-index="${i}"]`);
const isCheckedInDom = (i) => document.querySelector(`input[data-index="${i}"]`)?.checked;

test('a click in one page shows in the other within a second', async () => {
  const a = await openBoard();
  const b = await openBoard();
  assert.equal(await a.locator('#conn-state').textContent(), 'live');
  assert.equal(await box(b, 42).isChecked(), false);
  await box(a, 42).click();
  assert.equal(await box(a, 42).isChecked(), true, 'optimistic: the click shows at once');
  const started = Date.now();
  await b.waitForFunction(isCheckedInDom, 42, { timeout: 1000, polling: 5 });
  console.log(`click -> other page: ${Date.now() - started} ms`);
  assert.equal(await b.locator('#checked-count').textContent(), '1');
  // And back: unchecking propagates too.
  await box(b, 42).click();
  await a.waitForFunction((i) => !document.querySelector(`input[data-index="${i}"]`).checked, 42, { timeout: 1000 });
  await b.waitForFunction(() => window.omcb.pending.size === 0);
  await a.close();
  await b.close();
});

test('box 999,999 can be reached, checked, and is seen elsewhere', async () => {
  const a = await openBoard();
  const b = await openBoard();
  const before = await (await fetch(`${server.url}/api/stats`)).json();
  // The DOM holds only what is in view: a few thousand inputs, not a million.
  const inputs = await a.locator('input[type=checkbox]').count();
  assert.ok(inputs > 100 && inputs < 5000, `virtualized: ${inputs} inputs in the DOM`);
  await a.fill('#jump', '999999');
  await a.press('#jump', 'Enter');
  await a.waitForSelector('input[data-index="999999"]');
  assert.equal(await a.evaluate(() => document.activeElement.dataset.index), '999999', 'jump focuses the box');
  // Its state comes with the page's new subscription (until then the box is
  // a placeholder and takes no keys).
  await a.waitForFunction(() => window.omcb.board.seqAt(999_999) >= 0n);
  // Keyboard works: space toggles the focused box.
  await a.keyboard.press('Space');
  assert.equal(await box(a, 999999).isChecked(), true);
  // The other page scrolls there by hand: the spacer really is a million boxes
  // tall. It subscribes there and gets the box's state with the range Snapshot.
  await b.evaluate(() => { const g = document.getElementById('grid'); g.scrollTop = g.scrollHeight; });
  await b.waitForFunction(isCheckedInDom, 999999, { timeout: 5000 });
  await a.waitForFunction(() => window.omcb.pending.size === 0);
  const stats = await (await fetch(`${server.url}/api/stats`)).json();
  assert.equal(stats.checked_count, before.checked_count + 1, '/api/stats counts the new box');
  // A subscribed page learns the counts from the counts frame, about once a
  // second (docs/PROTOCOL.md, "Viewport subscriptions"): wait for it.
  await a.waitForFunction(
    (n) => document.getElementById('checked-count').textContent === String(n),
    stats.checked_count,
    { timeout: 5000 },
  );
  await a.close();
  await b.close();
});

test('phone width: the grid adapts and still works', async () => {
  const page = await suite.page({ viewport: { width: 360, height: 740 }, isMobile: true, hasTouch: true });
  await page.goto(server.url);
  await page.waitForFunction(() => window.omcb.board.ready);
  const perRow = await page.evaluate(() => window.omcb.grid.cols);
  assert.ok(perRow >= 8 && perRow <= 13, `${perRow} boxes per row at 360 px`);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  assert.equal(overflow, false, 'no horizontal scrolling');
  await box(page, 7).tap();
  await page.waitForFunction(() => window.omcb.board.isChecked(7), null, { timeout: 1000 });
  await page.close();
});

test('a flood of clicks: refusals are shown and reverted, and the page converges', async () => {
  const page = await openBoard();
  // 120 clicks in one go: past the worker's burst (40 by default), so some
  // come back REASON_RATE_LIMITED, well under the abuse limit that closes.
  await page.evaluate(() => {
    for (let i = 500; i < 620; i++) document.querySelector(`input[data-index="${i}"]`).click();
  });
  await page.waitForSelector('#toast:not([hidden])');
  assert.match(await page.locator('#toast').textContent(), /slow down/i);
  await page.waitForFunction(() => window.omcb.pending.size === 0);
  const snap = decodeSnapshot(new Uint8Array(await (await fetch(`${server.url}/api/state`)).arrayBuffer()));
  // The page is subscribed to the boxes it shows: their counts come about
  // once a second (docs/PROTOCOL.md, "Viewport subscriptions").
  await page.waitForFunction((seq) => window.omcb.board.seq >= BigInt(seq), String(snap.seq));
  // Every box on screen shows the board's value, and every box the page
  // holds is the server's.
  const { shown, board } = await page.evaluate(() => {
    const shown = [];
    for (let i = 500; i < 620; i++) shown.push(document.querySelector(`input[data-index="${i}"]`).checked);
    const { checked, seq, size } = window.omcb.board;
    const held = [];
    for (let i = 0; i < size; i++) if (window.omcb.board.seqAt(i) >= 0n) held.push(i);
    return { shown, board: { checked: Array.from(checked), seq: String(seq), held } };
  });
  const accepted = shown.filter(Boolean).length;
  console.log(`flood: ${accepted} of 120 accepted, the rest refused and reverted`);
  assert.ok(accepted >= 40 && accepted < 120, `${accepted} accepted`);
  assert.equal(board.seq, String(snap.seq), 'the page is at the server\'s seq');
  assert.ok(board.held.length >= 2048, 'the page holds the boxes it shows');
  const bit = (bits, i) => (bits[i >> 3] & (0x80 >> (i & 7))) !== 0;
  assert.deepEqual(board.held.filter((i) => bit(board.checked, i) !== bit(snap.checked, i)), [], 'every box held is the server\'s');
  for (let k = 0; k < 120; k++) {
    const i = 500 + k;
    assert.equal(shown[k], (snap.checked[i >> 3] & (0x80 >> (i & 7))) !== 0, `box ${i}`);
  }
  await page.close();
});

test('a server restart: close 1012, reconnecting, live again with the board intact', async () => {
  const first = await startServer();
  const page = await openBoard(first.url);
  await box(page, 5).click();
  await page.waitForFunction(() => window.omcb.board.isChecked(5) && window.omcb.pending.size === 0);
  // Every close the page sees, in order: after the restart's 1012 the page
  // retries at once, and those attempts fail (1006) until the server is back.
  await page.evaluate(() => {
    const conn = window.omcb.conn;
    const onClose = conn.onClose;
    window.closeCodes = [];
    conn.onClose = (code) => { window.closeCodes.push(code); onClose(code); };
  });
  await first.stop({ keepData: true });
  await page.waitForSelector('#conn-state:not([data-state="live"])');
  assert.equal(await page.evaluate(() => window.closeCodes[0]), 1012, 'a restart closes with 1012');
  assert.match(await page.locator('#conn-state').textContent(), /reconnecting/);
  // The same address and data dir: the board must come back as it was.
  const second = await startServer({ listen: new URL(first.url).host, dataDir: first.dataDir });
  try {
    const started = Date.now();
    await page.waitForSelector('#conn-state[data-state="live"]', { timeout: 15_000 });
    await page.waitForFunction(() => window.omcb.board.ready && !window.omcb.board.awaitingSnapshot);
    console.log(`restart: live again ${Date.now() - started} ms after the new server listened`);
    assert.equal(await box(page, 5).isChecked(), true, 'the board survived the restart');
    await box(page, 6).click();
    await page.waitForFunction(() => window.omcb.board.isChecked(6) && window.omcb.pending.size === 0);
  } finally {
    await page.close();
    assert.equal(await second.stop(), 0);
  }
});

test('every socket opens subscribed to the window of the moment: no GET /api/state, and a reconnect brings a range Snapshot of what the page shows', async () => {
  const page = await suite.page({ viewport: { width: 1280, height: 800 } });
  const sockets = [];
  const paths = [];
  page.on('websocket', (ws) => sockets.push(new URL(ws.url()).search));
  page.on('request', (r) => paths.push(new URL(r.url()).pathname));
  await page.goto(server.url);
  await page.waitForSelector('#conn-state[data-state="live"]');
  assert.match(sockets[0], /^\?first=0&count=\d+&snapshot=deflate$/, 'the first window, from the top');
  await page.fill('#jump', '700000');
  await page.press('#jump', 'Enter');
  await page.waitForFunction(() => window.omcb.board.seqAt(700_000) >= 0n);
  const sub = await page.evaluate(() => {
    const { conn } = window.omcb;
    window.snapshots = [];
    const onMessage = conn.onMessage;
    conn.onMessage = (msg) => {
      if (msg.kind === 'snapshot') window.snapshots.push({ first: msg.rangeFirst, count: msg.rangeCount });
      onMessage(msg);
    };
    conn.ws.close();
    return conn.view;
  });
  assert.ok(sub.first <= 700_000 && 700_000 < sub.first + sub.count, JSON.stringify(sub));
  await page.waitForFunction(() => window.snapshots.length > 0 && window.omcb.conn.open);
  assert.deepEqual(sockets.slice(1), [`?first=${sub.first}&count=${sub.count}&snapshot=deflate`]);
  assert.deepEqual(await page.evaluate(() => window.snapshots), [sub], 'one range Snapshot, of the window');
  assert.ok(!paths.includes('/api/state'), JSON.stringify(paths));
  await page.waitForSelector('#conn-state[data-state="live"]');
  await page.close();
});
