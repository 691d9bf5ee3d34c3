// Starts the real omcb binary on a free port for browser tests, and stops it.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';

const webDir = resolve(import.meta.dirname, '..');
export const binary = process.env.OMCB_BIN ?? resolve(webDir, '../target/debug/omcb');

export const chromiumArgs = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

// Resolves to {url, metricsUrl, dataDir, stop} once the server prints its
// addresses (no sleeps: we read its stdout until both lines appear).
// metricsUrl is the private listener (`omcb admin --worker` talks to it). `listen` defaults to a
// free port; a restart test passes the previous address and data dir.
// The page is served from this checkout's web/ (--web-dir), not the copy built
// into the binary, so the tests exercise the files under test.
// `web` serves another directory's page (a benchmark of an old page).
export async function startServer({ listen = '127.0.0.1:0', dataDir, args = [], web = webDir } = {}) {
  dataDir ??= mkdtempSync(join(tmpdir(), 'omcb-web-'));
  const child = spawn(binary, [
    'serve', '--listen', listen, '--metrics-listen', '127.0.0.1:0',
    '--data-dir', dataDir, '--web-dir', web, ...args,
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  child.stderr.on('data', (d) => { log += d; });
  const exited = new Promise((ok) => child.once('exit', (code, signal) => ok(code ?? signal)));
  let metricsUrl;
  const url = await new Promise((ok, fail) => {
    const lines = createInterface({ input: child.stdout });
    let listening;
    lines.on('line', (line) => {
      const m = line.match(/^listening on (http:\/\/\S+)/);
      if (m) listening = m[1];
      const p = line.match(/^metrics on (http:\/\/\S+)\/metrics/);
      if (p) metricsUrl = p[1];
      if (listening && metricsUrl) ok(listening);
    });
    child.once('error', fail); // e.g. the binary is not built
    exited.then((code) => fail(new Error(`omcb exited with ${code} before listening:\n${log}`)));
    setTimeout(() => fail(new Error(`omcb did not start in 10 s:\n${log}`)), 10_000).unref();
  });
  return {
    url,
    metricsUrl,
    dataDir,
    log: () => log,
    // SIGTERM, then the exit code; removes the data dir unless asked to keep it.
    async stop({ keepData = false } = {}) {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const code = await exited;
      if (!keepData) rmSync(dataDir, { recursive: true, force: true });
      return code;
    },
  };
}
