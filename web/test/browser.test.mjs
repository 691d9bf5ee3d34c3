// The board in real Chromium (Debian's, driven by playwright-core) against
// the real omcb binary: two pages see each other's clicks, and the last box
// of a million is reachable and works.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import { chromiumArgs, startServer } from './server.mjs';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: chromiumArgs });
});

after(async () => {
  await browser?.close();
  const code = await server?.stop();
  assert.equal(code, 0, 'the server exits cleanly on SIGTERM');
});

async function openBoard() {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on('pageerror', (e) => { throw e; });
  await page.goto(server.url);
  await page.waitForSelector('#conn-state[data-state="live"]');
  await page.waitForFunction(() => window.omcb.board.ready);
  return page;
}

const box = (page, i) => page.locator(`input[data-index="${i}"]`);

test('a click in one page shows in the other within a second', async () => {
  const a = await openBoard();
  const b = await openBoard();
  assert.equal(await box(b, 42).isChecked(), false);
  await box(a, 42).click();
  assert.equal(await box(a, 42).isChecked(), true, 'optimistic: the click shows at once');
  const started = Date.now();
  await b.waitForFunction(() => document.querySelector('input[data-index="42"]').checked, null, { timeout: 1000 });
  const ms = Date.now() - started;
  console.log(`click -> other page: ${ms} ms`);
  assert.equal(await b.locator('#checked-count').textContent(), '1');
  // And back: unchecking propagates too.
  await box(b, 42).click();
  await a.waitForFunction(() => !document.querySelector('input[data-index="42"]').checked, null, { timeout: 1000 });
  await a.close();
  await b.close();
});

test('box 999,999 can be reached, checked, and is seen elsewhere', async () => {
  const a = await openBoard();
  const b = await openBoard();
  // The DOM holds only what is in view: a few thousand inputs, not a million.
  const inputs = await a.locator('input[type=checkbox]').count();
  assert.ok(inputs > 100 && inputs < 5000, `virtualized: ${inputs} inputs in the DOM`);
  await a.fill('#jump', '999999');
  await a.press('#jump', 'Enter');
  await a.waitForSelector('input[data-index="999999"]');
  assert.equal(await a.evaluate(() => document.activeElement.dataset.index), '999999', 'jump focuses the box');
  // Keyboard works: space toggles the focused box.
  await a.keyboard.press('Space');
  assert.equal(await box(a, 999999).isChecked(), true);
  await b.evaluate(() => window.omcb.grid.jumpTo(999999));
  await b.waitForFunction(() => document.querySelector('input[data-index="999999"]')?.checked, null, { timeout: 1000 });
  const stats = await (await fetch(`${server.url}/api/stats`)).json();
  assert.equal(stats.checked_count >= 1, true);
  assert.equal(await a.locator('#checked-count').textContent(), String(stats.checked_count));
  await a.close();
  await b.close();
});

test('phone width: the grid adapts and still works', async () => {
  const page = await browser.newPage({ viewport: { width: 360, height: 740 }, isMobile: true, hasTouch: true });
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
