// Issue 15 in real Chromium against the real omcb binary: the page
// subscribes to the boxes it shows (docs/PROTOCOL.md, "Viewport
// subscriptions"). One page scrolls from the top to box 500,000 and back
// while another toggles boxes in both places; in every range it showed, the
// page's state matches GET /api/state, every box whose state it did not hold
// was painted as a placeholder (indeterminate, never unchecked), scrolling
// subscribes again only when it leaves the subscription's inner part and not
// per scroll event, and after its first range Snapshot no full-board Batch
// reached it.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { browserSuite } from './suite.mjs';

const suite = browserSuite();
let server;
before(async () => {
  server = await suite.start();
});

async function openBoard() {
  const page = await suite.page();
  await page.goto(server.url);
  await page.waitForFunction(() => window.omcb?.board.ready && window.omcb.conn.open && window.omcb.board.cur);
  return page;
}

// Polls `fn` in the page until it returns true, or fails after `ms`.
async function until(page, fn, arg, what, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = await page.evaluate(fn, arg);
    if (got === true) return;
    if (Date.now() > deadline) assert.fail(`${what}: ${JSON.stringify(got)}`);
    await page.waitForTimeout(100);
  }
}

test('scrolling to box 500,000 and back while another page toggles there and at the top: each range shown matches /api/state, a box without state is never shown unchecked, and the page subscribes only when it must', async () => {
  const page = await openBoard();
  // Audit every render: each box in the DOM shows its state from the page's
  // board (or its optimistic value), or the placeholder exactly when the
  // page holds no state for it. And count full-board Batches after the
  // first range Snapshot (there must be none).
  await page.evaluate(() => {
    const { board, grid, pending, conn } = window.omcb;
    const audit = { renders: 0, placeholders: 0, wrong: [], ranged: false, rangeSnapshots: 0, fullBatches: 0, subscribes: 0 };
    window.audit = audit;
    const subscribe = conn.subscribe.bind(conn);
    conn.subscribe = (...range) => {
      audit.subscribes++;
      subscribe(...range);
    };
    const render = grid.render.bind(grid);
    grid.render = () => {
      render();
      audit.renders++;
      for (const box of grid.scroller.querySelectorAll('input[data-index]')) {
        if (box.hidden) continue;
        const i = Number(box.dataset.index);
        const unknown = board.seqAt(i) < 0n;
        if (unknown) {
          // The placeholder's look: not a checkbox at all, a filled square.
          if (!audit.placeholders++) {
            const style = getComputedStyle(box);
            audit.look = { appearance: style.appearance, background: style.backgroundColor };
          }
        }
        const shows = unknown || box.checked === (pending.get(i)?.checked ?? board.isChecked(i));
        if (box.indeterminate !== unknown || !shows) audit.wrong.push(i);
      }
    };
    // A new socket starts on the full stream until the server takes its
    // Subscribe.
    const onClose = conn.onClose;
    conn.onClose = (code) => {
      audit.ranged = false;
      onClose(code);
    };
    const onMessage = conn.onMessage;
    conn.onMessage = (m) => {
      if (m.kind === 'snapshot' && m.rangeCount) {
        audit.ranged = true;
        audit.rangeSnapshots++;
      }
      if (audit.ranged && m.kind === 'batch' && m.region === undefined && !m.countsOnly) audit.fullBatches++;
      onMessage(m);
    };
  });

  // The other page toggles boxes near the top and near box 500,000, about
  // 13 a second (under the per-connection rate), and keeps count of the
  // answers it waits for.
  const toggler = await openBoard();
  await toggler.evaluate(() => {
    const { conn } = window.omcb;
    const waiting = new Set();
    let id = 1_000_000;
    window.toggler = { on: true, waiting, sent: 0 };
    const onMessage = conn.onMessage;
    conn.onMessage = (m) => {
      if (m.kind === 'toggleResult') waiting.delete(m.requestId);
      onMessage(m);
    };
    setInterval(() => {
      if (!window.toggler.on) return;
      for (const i of [Math.floor(Math.random() * 3000), 498_500 + Math.floor(Math.random() * 3000)]) {
        id++;
        if (conn.sendToggle(i, Math.random() < 0.6, id)) {
          waiting.add(id);
          window.toggler.sent++;
        }
      }
    }, 150);
  });

  const shown = [];
  // Stops the toggler until the server answered all it sent, then waits for
  // the boxes the page shows to be known and equal to the board's; the
  // toggler goes on after.
  async function check(where) {
    await toggler.evaluate(() => { window.toggler.on = false; });
    await until(toggler, () => window.toggler.waiting.size === 0, null, 'the toggler\'s answers');
    await until(page, async () => {
      const { board, grid } = window.omcb;
      const { decodeSnapshot } = await import('/proto.js');
      const s = decodeSnapshot(new Uint8Array(await (await fetch('/api/state', { cache: 'no-store' })).arrayBuffer()));
      const boxes = [...grid.scroller.querySelectorAll('input[data-index]')].filter((b) => !b.hidden).map((b) => Number(b.dataset.index));
      const [a, b] = [Math.min(...boxes), Math.max(...boxes) + 1];
      const bad = [];
      for (let i = a; i < b; i++) {
        const on = (s.checked[i >> 3] & (0x80 >> (i & 7))) !== 0;
        if (board.seqAt(i) < 0n || board.isChecked(i) !== on) bad.push(i);
      }
      window.lastRange = [a, b];
      return bad.length === 0 || { range: [a, b], bad: bad.slice(0, 10) };
    }, null, `the boxes shown ${where} match /api/state`);
    shown.push(await page.evaluate(() => window.lastRange));
    await toggler.evaluate(() => { window.toggler.on = true; });
  }

  await check('at the top');
  // Scrolling within the inner part of the subscription sends nothing; a
  // burst of scroll events out of it sends one Subscribe, after the last.
  const subscribes = () => page.evaluate(() => window.audit.subscribes);
  const frames = () => page.evaluate(() => new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(ok))));
  const before = await subscribes();
  for (let k = 1; k <= 3; k++) {
    await page.evaluate((k) => { const { grid } = window.omcb; grid.scroller.scrollTop = (k * grid.scroller.clientHeight) / 8; }, k);
    await frames();
  }
  await page.waitForTimeout(300);
  assert.equal(await subscribes(), before, 'three eighths of a screen down: still inside the subscription');
  await page.evaluate(async () => {
    const { grid } = window.omcb;
    for (let k = 1; k <= 6; k++) {
      grid.scroller.scrollTop = 28 * (200 + 40 * k);
      await new Promise((ok) => requestAnimationFrame(ok));
    }
  });
  await until(page, () => window.audit.subscribes > 0 && window.omcb.board.seqAt(window.omcb.grid.cols * 440) >= 0n, null, 'a subscription where the burst ended');
  assert.ok((await subscribes()) - before < 6, `six scroll events, ${(await subscribes()) - before} Subscribes`);
  await check('after a burst of scrolling');
  const target = await page.evaluate(() => {
    const { grid } = window.omcb;
    return Math.floor(500_000 / grid.cols) * 28 - grid.scroller.clientHeight / 2;
  });
  const steps = 40;
  const stops = new Set([10, 25, steps]);
  // Down in steps of ~12,500 boxes (each a jump out of the subscribed
  // range), a frame or two apart, stopping to check now and then; then up.
  for (const path of [[...Array(steps).keys()].map((k) => k + 1), [...Array(steps).keys()].map((k) => steps - 1 - k)]) {
    for (const k of path) {
      await page.evaluate((top) => { window.omcb.grid.scroller.scrollTop = top; }, Math.round((target * k) / steps));
      await frames();
      if (stops.has(k) || k === 0) await check(`at step ${k}`);
    }
  }
  // A reconnect subscribes the new socket to the same boxes.
  const snapshots = await page.evaluate(() => window.audit.rangeSnapshots);
  await page.evaluate(() => window.omcb.conn.ws.close());
  await until(page, (n) => window.omcb.conn.open && window.audit.rangeSnapshots > n, snapshots, 'a range Snapshot on the new socket');
  await check('after a reconnect');
  assert.ok(shown.some(([a, b]) => a <= 500_000 && b > 500_000), `box 500,000 was shown: ${JSON.stringify(shown)}`);
  assert.ok(shown.at(-1)[0] === 0, 'back at the top');
  const audit = await page.evaluate(() => window.audit);
  const sent = await toggler.evaluate(() => window.toggler.sent);
  console.log(`ranges checked: ${JSON.stringify(shown)}; renders ${audit.renders}, placeholders painted ${audit.placeholders}, toggles ${sent}`);
  assert.deepEqual(audit.wrong.slice(0, 10), [], 'every box painted shows the page\'s state, and a placeholder exactly when it has none');
  assert.ok(audit.placeholders > 0, 'boxes were shown before their state arrived (as placeholders)');
  assert.equal(audit.look.appearance, 'none', 'a placeholder is not drawn as a checkbox');
  assert.notEqual(audit.look.background, 'rgba(0, 0, 0, 0)', 'a placeholder is a filled square');
  assert.ok(audit.ranged, 'the page got range Snapshots');
  assert.equal(audit.fullBatches, 0, 'no full-board Batch after the first range Snapshot');
  assert.ok(sent > 50, `the other page toggled (${sent})`);
  await page.close();
  await toggler.close();
});
