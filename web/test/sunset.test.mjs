// The sunset on the page (issue 11, part 2), in real Chromium against the
// real omcb binary: a sunset started by `omcb admin` while the page is open
// shows its rule and a countdown without a reload; a box past its time shows
// frozen; a finished board shows the end state with the final numbers and
// "you checked N".
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { binary } from './server.mjs';
import { browserSuite } from './suite.mjs';
import { clock, duration } from '../sunset.js';

const suite = browserSuite();

function server(args) {
  return suite.start({ args });
}

// `omcb admin --worker <private listener> ...`: the board's settings after it.
async function admin(s, ...args) {
  const { stdout } = await promisify(execFile)(binary, ['admin', '--worker', s.metricsUrl, ...args]);
  return JSON.parse(stdout);
}

// A page on `url`; with `context`, another page of that browser profile
// (same localStorage), else a fresh profile.
async function openBoard(url, context) {
  const page = context ? await suite.page(undefined, context) : await suite.page();
  await page.goto(url);
  await page.waitForFunction(() => window.omcb.board.ready);
  // Marks this document: a reload would lose it.
  await page.evaluate(() => { window.notReloaded = true; });
  return page;
}

const box = (page, i) => page.locator(`input[data-index="${i}"]`);

test('the page formats the rule and the countdown', () => {
  assert.equal(clock(599_001), '10:00');
  assert.equal(clock(61_000), '1:01');
  assert.equal(clock(3_723_000), '1:02:03');
  assert.equal(clock(-5), '0:00');
  assert.equal(duration(600_000), '10 minutes');
  assert.equal(duration(90_000), '90 seconds');
  assert.equal(duration(1000), '1 second');
  assert.equal(duration(5_400_000), '90 minutes');
});

test('a sunset started by omcb admin shows at once, counts down, and a box past its time shows frozen', async () => {
  const s = await server(['--board-size', '2000']);
  const page = await openBoard(s.url);
  assert.equal(await page.locator('#sunset').isHidden(), true, 'no sunset, no line');
  await box(page, 7).click();
  await page.waitForFunction(() => window.omcb.pending.size === 0);

  const settings = await admin(s, 'sunset', 'start', '10m');
  assert.equal(settings.freeze_after_ms, 600_000);
  await page.waitForSelector('#sunset:not([hidden])', { timeout: 2000 });
  assert.match(await page.locator('#sunset-rule').textContent(), /checked for 10 minutes can no longer be unchecked/);
  // The pointer on the box this page checked: its own countdown, exact.
  await box(page, 7).hover();
  await page.waitForFunction(() => /Box 7 freezes in 9:\d\d\./.test(document.getElementById('sunset-countdown').textContent));
  const first = await page.locator('#sunset-countdown').textContent();
  await page.waitForFunction((t) => document.getElementById('sunset-countdown').textContent !== t, first, { timeout: 3000 });
  assert.ok(await page.evaluate(() => window.notReloaded), 'no reload');

  // Shortened live: box 7 is past its time now; the sweep freezes it and the page shows it.
  await admin(s, 'sunset', 'set', '300ms');
  await page.waitForFunction(() => window.omcb.board.isFrozen(7), null, { timeout: 5000 });
  await page.waitForFunction(() => {
    const b = document.querySelector('input[data-index="7"]');
    return b.classList.contains('frozen') || b.disabled || b.getAttribute('aria-disabled') === 'true';
  });
  assert.match(await page.locator('#sunset-countdown').textContent(), /Box 7 is frozen\./);
  assert.equal(await page.locator('#frozen-count').textContent(), '1');

  await admin(s, 'sunset', 'stop');
  await page.waitForSelector('#sunset', { state: 'hidden', timeout: 2000 });
  await page.close();
});

test('a finished board shows the end state with the final numbers and "you checked N"', async () => {
  const s = await server(['--board-size', '8']);
  const profile = await suite.browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await openBoard(s.url, profile);
  await page.evaluate(() => localStorage.clear());
  await admin(s, 'sunset', 'start', '200ms');
  await page.waitForSelector('#sunset:not([hidden])', { timeout: 2000 });
  for (let i = 0; i < 8; i++) await box(page, i).click();
  await page.waitForSelector('#board-finished:not([hidden])', { timeout: 5000 });
  const text = await page.locator('#board-finished').textContent();
  assert.match(text, /The board is finished\. Every box is (frozen|checked): 8 of 8 checked, \d frozen\. You checked 8\./);
  await page.waitForFunction(
    () => /Every box is frozen: 8 of 8 checked, 8 frozen/.test(document.getElementById('board-finished').textContent),
    null, { timeout: 5000 },
  );
  assert.equal(await page.locator('#you-checked').textContent(), 'you checked 8');
  assert.equal(await page.locator('#sunset').isHidden(), true, 'the end state replaces the countdown');
  // Another page of this browser: the count is this browser's.
  const again = await openBoard(s.url, profile);
  await again.waitForSelector('#board-finished:not([hidden])');
  assert.equal(await again.locator('#you-checked').textContent(), 'you checked 8');
  await profile.close();
});

test('a board with a limit is finished when full, and says so', async () => {
  const s = await server(['--board-size', '20', '--max-checked', '3']);
  const page = await openBoard(s.url);
  await page.waitForFunction(() => window.omcb.settings.maxChecked === 3, null, { timeout: 2000 });
  for (let i = 0; i < 3; i++) await box(page, i).click();
  await page.waitForSelector('#board-finished:not([hidden])', { timeout: 5000 });
  assert.match(
    await page.locator('#board-finished').textContent(),
    /The board is finished\. It is full \(at most 3 may be checked\): 3 of 20 checked, 0 frozen\./,
  );
  // Unchecking makes room again: no longer finished.
  await box(page, 0).click();
  await page.waitForSelector('#board-finished', { state: 'hidden', timeout: 5000 });
  await page.close();
});
