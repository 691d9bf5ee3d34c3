// What a visitor meets (issue 11's list), in real Chromium against the real
// omcb binary: the status never says "live" without a state or a network; a
// resize or a rotation keeps the box in view and focused; frozen boxes look
// frozen and take focus; the focus ring shows on a checked box; the grid is one
// Tab stop; a jump marks its box, shows its number and refuses non-numbers;
// a burst of refusals is one toast; the reconnect countdown is not announced;
// /favicon.ico exists.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { startServer } from './server.mjs';
import { browserSuite } from './suite.mjs';

const suite = browserSuite();
let server;
before(async () => {
  server = await suite.start();
});
const newPage = (options, context) => suite.page(options, context);

async function openBoard(url = server.url, options) {
  const page = await newPage(options);
  await page.goto(url);
  await page.waitForFunction(() => window.omcb?.board.ready && window.omcb.conn.open);
  return page;
}

const box = (page, i) => page.locator(`input[data-index="${i}"]`);
const focusedIndex = (page) => page.evaluate(() => document.activeElement?.dataset?.index ?? null);

// WCAG relative luminance and contrast of two CSS rgb() colours.
function rgb(css) {
  const m = css.match(/rgba?\(([\d.]+),\s*([\d.]+),\s*([\d.]+)/);
  assert.ok(m, `a colour: ${css}`);
  return m.slice(1, 4).map(Number);
}
function luminance(css) {
  const [r, g, b] = rgb(css).map((v) => {
    const c = v / 255;
    return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
function contrast(a, b) {
  const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}

// Whether box `i` is wholly inside the grid's visible area.
function inView(page, i) {
  return page.evaluate((i) => {
    const el = document.querySelector(`input[data-index="${i}"]`);
    if (!el) return false;
    const b = el.getBoundingClientRect();
    const g = document.getElementById('grid').getBoundingClientRect();
    return b.top >= g.top && b.bottom <= g.bottom && b.left >= g.left && b.right <= g.right;
  }, i);
}

test('the status says "live" only with a state in hand and a network', async () => {
  const context = await suite.browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await newPage(undefined, context);
  // Every time the status turns "live", note whether the page held a state
  // and the browser was online at that moment.
  await page.addInitScript(() => {
    window.liveLog = [];
    new MutationObserver(() => {
      if (document.getElementById('conn-state')?.dataset.state !== 'live') return;
      window.liveLog.push({ ready: Boolean(window.omcb?.board.ready), online: navigator.onLine });
    }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-state'] });
  });
  // Hold the state back (a slow network: the socket is open, its first
  // frame, the range Snapshot, not in) until the page has had its chance to lie.
  await page.addInitScript(() => {
    const held = new Promise((ok) => { window.releaseState = ok; });
    window.WebSocket = class extends window.WebSocket {
      set onmessage(f) { super.onmessage = (ev) => held.then(() => f(ev)); }
    };
  });
  await page.goto(server.url);
  await page.waitForLoadState('load');
  await page.waitForFunction(() => window.omcb.conn.open);
  assert.notEqual(await page.locator('#conn-state').getAttribute('data-state'), 'live');
  assert.notEqual(await page.locator('#checked-count').textContent(), '0', 'no count before there is one');
  await page.evaluate(() => window.releaseState());
  await page.waitForSelector('#conn-state[data-state="live"]');
  assert.deepEqual(await page.evaluate(() => window.liveLog), [{ ready: true, online: true }]);
  // Offline: not live, within a moment, whatever the socket thinks.
  await context.setOffline(true);
  await page.waitForSelector('#conn-state[data-state="offline"]', { timeout: 2000 });
  assert.equal(await page.locator('#conn-state').textContent(), 'offline');
  // Back online: live again, resumed, and the board is the server's.
  await context.setOffline(false);
  await page.waitForSelector('#conn-state[data-state="live"]', { timeout: 5000 });
  assert.ok((await page.evaluate(() => window.liveLog)).every((l) => l.ready && l.online));
  await context.close();
});

test('a resize keeps the focused box in view and focused; a rotation keeps the first visible box', async () => {
  const page = await openBoard();
  await page.fill('#jump', '499993');
  await page.press('#jump', 'Enter');
  await page.waitForFunction(() => document.activeElement?.dataset?.index === '499993');
  const cols = await page.evaluate(() => window.omcb.grid.cols);
  await page.setViewportSize({ width: 900, height: 700 });
  await page.waitForFunction((c) => window.omcb.grid.cols !== c, cols);
  assert.equal(await focusedIndex(page), '499993', 'still focused');
  assert.ok(await inView(page, 499993), 'still in view');
  await page.close();

  // A phone, turned from portrait to landscape and back, nothing focused.
  const phone = await openBoard(server.url, { viewport: { width: 360, height: 740 }, isMobile: true, hasTouch: true });
  await phone.evaluate(() => { document.getElementById('grid').scrollTop = 28 * 40_000 + 5; });
  await phone.waitForFunction(() => document.querySelector(`input[data-index="${40_002 * window.omcb.grid.cols}"]`));
  const first = await phone.evaluate(() => {
    const g = document.getElementById('grid');
    const top = g.getBoundingClientRect().top;
    const boxes = [...g.querySelectorAll('input[data-index]')].filter((b) => b.getBoundingClientRect().top >= top);
    return Math.min(...boxes.map((b) => Number(b.dataset.index)));
  });
  for (const viewport of [{ width: 740, height: 360 }, { width: 360, height: 740 }]) {
    const c = await phone.evaluate(() => window.omcb.grid.cols);
    await phone.setViewportSize(viewport);
    await phone.waitForFunction((c) => window.omcb.grid.cols !== c, c);
    assert.ok(await inView(phone, first), `box ${first} in view at ${viewport.width}x${viewport.height}`);
  }
  await phone.close();
});

test('frozen boxes look frozen, say why, refuse clicks with a message, and arrow keys pass them', async () => {
  const freezing = await startServer({ args: ['--freeze-after', '1s'] });
  try {
    const page = await openBoard(freezing.url);
    await box(page, 11).click();
    await box(page, 30).click();
    await page.waitForFunction(() => window.omcb.board.isFrozen(11) && window.omcb.board.isFrozen(30), null, { timeout: 10_000 });
    // A checked box that is not frozen, for comparison.
    await box(page, 12).click();
    await page.waitForFunction(() => window.omcb.board.isChecked(12) && window.omcb.pending.size === 0);
    await page.waitForFunction(() => document.querySelector('input[data-index="11"]').classList.contains('frozen'));
    const look = await page.evaluate(() => {
      const frozen = document.querySelector('input[data-index="11"]');
      const checked = document.querySelector('input[data-index="12"]');
      return {
        disabled: frozen.disabled,
        ariaDisabled: frozen.getAttribute('aria-disabled'),
        title: frozen.title,
        frozenFill: getComputedStyle(frozen).backgroundColor,
        checkedFill: getComputedStyle(checked).accentColor,
        page: getComputedStyle(document.body).backgroundColor,
      };
    });
    assert.equal(look.disabled, false, 'focusable: not disabled');
    assert.equal(look.ariaDisabled, 'true', 'but announced as unavailable');
    assert.match(look.title, /frozen/i, 'a tooltip says why');
    const c = contrast(look.frozenFill, look.page);
    assert.ok(c >= 3, `frozen fill ${look.frozenFill} on ${look.page}: ${c.toFixed(2)}:1, at least 3:1`);
    const distance = Math.hypot(...rgb(look.frozenFill).map((v, k) => v - rgb(look.checkedFill)[k]));
    assert.ok(distance > 60, `frozen ${look.frozenFill} is unlike checked ${look.checkedFill}`);
    // A click says why and changes nothing.
    // (force: Playwright will not click what is aria-disabled; a visitor can.)
    await box(page, 11).click({ force: true });
    await page.waitForSelector('#toast:not([hidden])');
    assert.match(await page.locator('#toast').textContent(), /frozen/i);
    assert.equal(await box(page, 11).isChecked(), true);
    assert.equal(await page.evaluate(() => window.omcb.pending.size), 0, 'nothing was sent');
    // Arrow keys: 10 -> 11 (frozen) -> 12; Space on a frozen box does nothing.
    await box(page, 10).focus();
    await page.keyboard.press('ArrowRight');
    assert.equal(await focusedIndex(page), '11');
    await page.keyboard.press('Space');
    assert.equal(await box(page, 11).isChecked(), true);
    await page.keyboard.press('ArrowRight');
    assert.equal(await focusedIndex(page), '12');
    await page.close();
  } finally {
    assert.equal(await freezing.stop(), 0);
  }
});

test('the focus ring shows on a checked box: at least 3:1 against the box and the page', async () => {
  const page = await openBoard();
  await box(page, 3).click();
  await page.waitForFunction(() => window.omcb.board.isChecked(3) && window.omcb.pending.size === 0);
  // Focus by keyboard, so :focus-visible applies as it would for a keyboard user.
  await box(page, 2).focus();
  await page.keyboard.press('ArrowRight');
  const ring = await page.evaluate(() => {
    const b = document.activeElement;
    const s = getComputedStyle(b);
    return {
      index: b.dataset.index, visible: b.matches(':focus-visible'), style: s.outlineStyle,
      width: parseFloat(s.outlineWidth), color: s.outlineColor, box: s.accentColor,
      page: getComputedStyle(document.body).backgroundColor,
    };
  });
  assert.equal(ring.index, '3');
  assert.ok(ring.visible && ring.style !== 'none' && ring.width >= 2, JSON.stringify(ring));
  assert.ok(contrast(ring.color, ring.box) >= 3, `ring ${ring.color} on box ${ring.box}`);
  assert.ok(contrast(ring.color, ring.page) >= 3, `ring ${ring.color} on page ${ring.page}`);
  await page.close();
});

test('the grid is one Tab stop (a roving tabindex), also after scrolling', async () => {
  const page = await openBoard();
  const tabStops = () => page.evaluate(() => document.querySelectorAll('#grid input[tabindex="0"]').length);
  const check = async () => {
    assert.equal(await tabStops(), 1, 'exactly one box in the tab order');
    await page.focus('#jump-form button');
    await page.keyboard.press('Tab');
    const into = await focusedIndex(page);
    assert.notEqual(into, null, 'Tab enters the grid');
    assert.ok(await inView(page, Number(into)), `box ${into} is in view`);
    await page.keyboard.press('Tab');
    assert.equal(await focusedIndex(page), null, 'the next Tab leaves it');
  };
  await check();
  await page.evaluate(() => { document.getElementById('grid').scrollTop = 28 * 5000; });
  await page.waitForFunction(() => document.querySelector('#grid input[tabindex="0"]')?.getBoundingClientRect().top > 0);
  await page.evaluate(() => { document.getElementById('grid').scrollTop = 28 * 1000; });
  await page.waitForFunction(() => document.querySelector(`input[data-index="${1002 * window.omcb.grid.cols}"]`));
  await check();
  await page.close();
});

test('a jump with the mouse marks its box and shows its number; empty and non-numeric jumps are refused', async () => {
  const page = await openBoard();
  await page.fill('#jump', '123456');
  await page.click('#jump-form button');
  await page.waitForSelector('input[data-index="123456"]');
  const mark = await page.evaluate(() => {
    const s = getComputedStyle(document.querySelector('input[data-index="123456"]'));
    return { shadow: s.boxShadow, outline: s.outlineStyle };
  });
  assert.ok(mark.shadow !== 'none' || mark.outline !== 'none', `the box is marked: ${JSON.stringify(mark)}`);
  assert.match(await page.locator('header').textContent(), /123,456/, 'the box number is shown');
  const scrolled = await page.evaluate(() => document.getElementById('grid').scrollTop);
  for (const [text, why] of [['', /type a box number/i], ['abc', /not a number/i], ['  ', /type a box number/i], ['2000000', /no box/i]]) {
    await page.evaluate(() => { document.getElementById('toast').hidden = true; });
    await page.fill('#jump', text);
    await page.click('#jump-form button');
    await page.waitForSelector('#toast:not([hidden])');
    assert.match(await page.locator('#toast').textContent(), why, `"${text}"`);
    assert.equal(await page.evaluate(() => document.getElementById('grid').scrollTop), scrolled, `"${text}" went nowhere`);
  }
  // Grouped digits, as people write them.
  await page.fill('#jump', '1,000');
  await page.press('#jump', 'Enter');
  await page.waitForFunction(() => document.activeElement?.dataset?.index === '1000');
  await page.close();
});

test('a burst of refused clicks makes one toast, written (and announced) once', async () => {
  const page = await openBoard();
  await page.evaluate(() => {
    window.toastWrites = 0;
    new MutationObserver((m) => { window.toastWrites += m.length; })
      .observe(document.getElementById('toast'), { childList: true, characterData: true, subtree: true });
    // 120 clicks at once: past the worker's burst of 40, the rest refused.
    for (let i = 600; i < 720; i++) document.querySelector(`input[data-index="${i}"]`).click();
  });
  await page.waitForFunction(() => window.omcb.pending.size === 0);
  assert.match(await page.locator('#toast').textContent(), /slow down/i);
  assert.equal(await page.evaluate(() => document.querySelectorAll('#toast, [role=alert]').length), 1, 'one toast');
  assert.equal(await page.evaluate(() => window.toastWrites), 1, 'its text written once');
  await page.close();
});

test('the reconnect countdown ticks on screen but is not announced every second', async () => {
  // A worker for one socket: the page under test is over capacity (close
  // 1013), so it retries 2 to 10 s later, with a countdown.
  const small = await startServer({ args: ['--max-connections', '1'] });
  try {
    const holder = await openBoard(small.url);
    const page = await newPage();
    await page.goto(small.url);
    const seconds = () => page.evaluate(() => {
      const m = document.body.innerText.match(/in (\d+) s\b/);
      return m ? Number(m[1]) : null;
    });
    // At 3 s or more, the next attempt (which redraws the status) is at least
    // two ticks away: the window below sees only the countdown move.
    await page.waitForFunction(() => Number(document.body.innerText.match(/in (\d+) s\b/)?.[1]) >= 3, null, { timeout: 60_000 });
    // Watch every live region (what a screen reader reads out) for one tick.
    await page.evaluate(() => {
      window.announced = [];
      for (const el of document.querySelectorAll('[aria-live]:not([aria-live="off"]), [role=status], [role=alert]')) {
        new MutationObserver(() => window.announced.push(el.textContent))
          .observe(el, { childList: true, characterData: true, subtree: true });
      }
    });
    const from = await seconds();
    await page.waitForFunction((s) => {
      const m = document.body.innerText.match(/in (\d+) s\b/);
      return m && Number(m[1]) !== s;
    }, from, { timeout: 3000 });
    assert.ok(from >= 2, `${from} s`);
    assert.deepEqual(await page.evaluate(() => window.announced), [], 'a tick is not announced');
    assert.match(await page.locator('#conn-state').textContent(), /reconnecting/);
    await page.close();
    await holder.close();
  } finally {
    assert.equal(await small.stop(), 0);
  }
});

test('/favicon.ico is an icon, and a page load meets no 404', async () => {
  const resp = await fetch(`${server.url}/favicon.ico`);
  assert.equal(resp.status, 200);
  assert.equal(resp.headers.get('content-type'), 'image/x-icon');
  const icon = new Uint8Array(await resp.arrayBuffer());
  assert.deepEqual([...icon.subarray(0, 4)], [0, 0, 1, 0], 'an ICO header');
  const page = await newPage();
  const missing = [];
  page.on('response', (r) => { if (r.status() >= 400) missing.push(`${r.status()} ${r.url()}`); });
  await page.goto(server.url);
  await page.waitForFunction(() => window.omcb?.board.ready && window.omcb.conn.open);
  assert.deepEqual(missing, []);
  await page.close();
});
