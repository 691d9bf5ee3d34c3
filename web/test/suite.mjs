// What every browser test file sets up and checks: one Debian Chromium for the
// file, the omcb servers it starts, and at its end that no page threw and that
// every server exits cleanly on SIGTERM.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import { chromiumArgs, startServer } from './server.mjs';

/** Debian's Chromium, headless, as every browser test runs it. */
export function launchChromium() {
  return chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: chromiumArgs });
}

/**
 * Registers the file's before/after hooks; returns
 * `{ browser, start(options), page(options, context) }`: `browser` once the
 * hooks ran, `start` a server stopped (and checked) at the end, `page` a new
 * page whose uncaught errors fail the file.
 */
export function browserSuite() {
  const servers = [];
  const pageErrors = [];
  const suite = {
    browser: null,
    async start(options) {
      const server = await startServer(options);
      servers.push(server);
      return server;
    },
    async page(options = { viewport: { width: 1280, height: 800 } }, context = suite.browser) {
      const page = await context.newPage(options);
      page.on('pageerror', (e) => pageErrors.push(String(e)));
      return page;
    },
  };
  before(async () => {
    suite.browser = await launchChromium();
  });
  after(async () => {
    await suite.browser?.close();
    for (const s of servers) assert.equal(await s.stop(), 0, 'the server exits cleanly on SIGTERM');
    assert.deepEqual(pageErrors, [], 'no uncaught errors in any page');
  });
  return suite;
}
