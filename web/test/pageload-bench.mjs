// Bytes per page load for a board 0%, 1%, 10% and 50% checked, the page of
// before issue 11 (the whole board as a raw snapshot on the socket, files
// served plain) against today's (GET /api/state gzipped, a resumed socket,
// files gzipped): docs/BENCHMARKS.md, "Bytes per page load".
//
//   node test/pageload-bench.mjs [OLD_WEB_DIR]
//
// PAGE_WEB_DIR=<dir> measures the page in <dir> as "today's" (e.g. this
// page before a change: `git archive <commit> web | tar -x -C /tmp/x`).
// OLD_WEB_DIR holds the old page's files (e.g. `git archive 29cab6c web`);
// without it only today's page is measured. Note: today's worker strips,
// bundles and compresses any --web-dir it serves, the old page's too, so the
// old page measured this way is smaller than it was with its own worker. The board is filled in a private
// redis-server (random boxes, written straight into its bitset and count)
// and served by the real binary in fleet mode.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir, cpus } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { chromiumArgs, startServer } from './server.mjs';
import { countingPage } from './bytes.mjs';

const oldWeb = process.argv[2];
const SIZE = 1_000_000;

const freePort = () => new Promise((ok) => {
  const s = createServer().listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => ok(port)); });
});

const dir = mkdtempSync(join(tmpdir(), 'omcb-bench-'));
const port = await freePort();
const redis = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' });
const cli = (args, input) => execFileSync('redis-cli', ['-p', String(port), ...args], { input });
for (let deadline = Date.now() + 10_000; ;) {
  try { if (cli(['PING']).toString().trim() === 'PONG') break; } catch { /* not up yet */ }
  if (Date.now() > deadline) throw new Error('redis-server did not start');
  await new Promise((ok) => setTimeout(ok, 50));
}
const redisUrl = `redis://127.0.0.1:${port}`;

// Creates the board once (the worker writes its config), then fills it.
async function fill(fraction) {
  const bits = new Uint8Array(SIZE / 8);
  let n = 0;
  while (n < Math.round(fraction * SIZE)) {
    const i = Math.floor(Math.random() * SIZE);
    if (bits[i >> 3] & (0x80 >> (i & 7))) continue;
    bits[i >> 3] |= 0x80 >> (i & 7);
    n++;
  }
  cli(['-x', 'SET', '{main}:bits'], Buffer.from(bits));
  cli(['SET', '{main}:count', String(n)]);
  return n;
}

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: chromiumArgs });
const version = browser.version();
const rows = [];
try {
  const first = await startServer({ args: ['--redis', redisUrl] });
  await first.stop();
  for (const fraction of [0, 0.01, 0.1, 0.5]) {
    const checked = await fill(fraction);
    const server = await startServer({ args: ['--redis', redisUrl], web: process.env.PAGE_WEB_DIR });
    const row = { fraction, checked };
    try {
      const now = await countingPage(browser, server.url);
      row.after = await now.load();
      row.cached = await now.load({ reload: true });
      // A snapshot the socket must send anyway (Resync, lag, new epoch).
      const before = now.socket();
      await now.page.evaluate(() => new Promise((ok) => {
        const { conn } = window.omcb;
        const onMessage = conn.onMessage;
        conn.onMessage = (msg) => { onMessage(msg); if (msg.kind === 'snapshot') ok(); };
        conn.resync();
      }));
      row.socketSnapshot = now.socket() - before;
      await now.page.close();
      if (oldWeb) {
        // The old page from a worker that served files plain (as it did).
        const old = await startServer({ args: ['--redis', redisUrl], web: oldWeb });
        try {
          const then = await countingPage(browser, old.url, { 'Accept-Encoding': 'identity' });
          row.before = await then.load();
          await then.page.close();
        } finally {
          await old.stop();
        }
      }
    } finally {
      await server.stop();
    }
    rows.push(row);
    console.error(JSON.stringify(row));
  }
} finally {
  await browser.close();
  redis.kill();
  rmSync(dir, { recursive: true, force: true });
}

const kb = (n) => (n / 1000).toFixed(1);
console.log(`Machine: ${cpus()[0].model}, ${cpus().length} cores; Chromium ${version}\n`);
console.log('| board | before: socket | before: total | after: GET /api/state | after: socket | after: files | after: total | after, cached: total | snapshot on the socket, deflated |');
console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
for (const r of rows) {
  const b = r.before;
  console.log(`| ${r.fraction * 100}% (${r.checked.toLocaleString('en')}) | ${b ? kb(b.socketBytes) : '-'} | ${b ? kb(b.total) : '-'} | ${kb(r.after.http['/api/state'] ?? 0)} | ${kb(r.after.socketBytes)} | ${kb(r.after.assetBytes)} | ${kb(r.after.total)} | ${kb(r.cached.total)} | ${kb(r.socketSnapshot)} |`);
}
