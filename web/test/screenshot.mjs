// Renders the board with a few boxes checked into docs/screenshot.png:
//   node test/screenshot.mjs
import { chromium } from 'playwright-core';
import { resolve } from 'node:path';
import { chromiumArgs, startServer } from './server.mjs';

const server = await startServer();
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: chromiumArgs });
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
await page.goto(server.url);
await page.waitForFunction(() => window.omcb.board.ready);
for (const i of [0, 3, 44, 45, 46, 90, 91, 135, 180, 181, 182, 226, 270, 271, 315, 360, 361, 362]) {
  await page.locator(`input[data-index="${i}"]`).click();
}
await page.waitForFunction(() => window.omcb.board.checkedCount >= 18);
await page.screenshot({ path: resolve(import.meta.dirname, '../../docs/screenshot.png') });
await browser.close();
await server.stop();
