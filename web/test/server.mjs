// Starts the real omcb binary on a free port for browser tests, and stops it.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';

export const binary = process.env.OMCB_BIN ?? resolve(import.meta.dirname, '../../target/debug/omcb');

export const chromiumArgs = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

// Resolves to {url, stop} once the server prints its address (no sleeps: we
// read its stdout until the line appears).
export async function startServer(extraArgs = []) {
  const dataDir = mkdtempSync(join(tmpdir(), 'omcb-web-'));
  const child = spawn(binary, ['serve', '--listen', '127.0.0.1:0', '--metrics-listen', '127.0.0.1:0', '--data-dir', dataDir, ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  child.stderr.on('data', (d) => { log += d; });
  const url = await new Promise((ok, fail) => {
    const lines = createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      const m = line.match(/^listening on (http:\/\/\S+)/);
      if (m) ok(m[1]);
    });
    child.on('exit', (code) => fail(new Error(`omcb exited with ${code} before listening:\n${log}`)));
    setTimeout(() => fail(new Error(`omcb did not start in 10 s:\n${log}`)), 10_000).unref();
  });
  return {
    url,
    log: () => log,
    async stop() {
      const exited = new Promise((ok) => child.once('exit', ok));
      child.kill('SIGTERM');
      const code = await exited;
      rmSync(dataDir, { recursive: true, force: true });
      return code;
    },
  };
}
