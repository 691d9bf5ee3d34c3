// Counts the bytes a page load receives, through Chromium's DevTools protocol:
// every HTTP response (headers and body as they came over the wire) and the
// WebSocket (its handshake answer and every frame, headers included) until the
// page holds the board and its socket is open. Used by pageload.test.mjs and
// by pageload-bench.mjs (docs/BENCHMARKS.md, "Bytes per page load").

// Bytes of a server frame's header for a payload of `n` bytes (RFC 6455:
// servers do not mask).
const frameHeader = (n) => (n < 126 ? 2 : n < 65536 ? 4 : 10);

// A page with a counter attached: `load()` navigates (or reloads) and resolves
// to {http: {path: bytes}, httpBytes, socketBytes, dataBytes, assetBytes, total}
// where data is /api/state plus the socket and assets the rest.
// `headers` go with every request (e.g. Accept-Encoding: identity, to count a
// server that does not compress).
export async function countingPage(browser, url, headers = {}) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  await page.setExtraHTTPHeaders(headers);
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Network.enable');
  let urls;
  let done;
  let socketBytes;
  const reset = () => { urls = new Map(); done = new Map(); socketBytes = 0; };
  reset();
  cdp.on('Network.requestWillBeSent', (e) => urls.set(e.requestId, new URL(e.request.url).pathname));
  cdp.on('Network.loadingFinished', (e) => done.set(e.requestId, e.encodedDataLength));
  cdp.on('Network.loadingFailed', (e) => done.set(e.requestId, 0));
  cdp.on('Network.webSocketHandshakeResponseReceived', (e) => {
    const r = e.response;
    socketBytes += r.headersText?.length
      ?? `HTTP/1.1 ${r.status} ${r.statusText}\r\n`.length
        + Object.entries(r.headers).reduce((n, [k, v]) => n + k.length + v.length + 4, 2);
  });
  cdp.on('Network.webSocketFrameReceived', (e) => {
    const { opcode, payloadData } = e.response;
    const n = opcode === 1 ? Buffer.byteLength(payloadData) : Buffer.from(payloadData, 'base64').length;
    socketBytes += n + frameHeader(n);
  });
  async function load({ reload = false } = {}) {
    reset();
    if (reload) await page.reload();
    else await page.goto(url);
    await page.waitForFunction(() => {
      const o = window.omcb;
      return o?.board.ready && !o.board.awaitingSnapshot && o.conn.open;
    }, null, { timeout: 60_000 });
    // Every request the page made has finished (the favicon may come late).
    const deadline = Date.now() + 10_000;
    while ([...urls.keys()].some((id) => !done.has(id))) {
      if (Date.now() > deadline) throw new Error('requests still open after 10 s');
      await page.waitForTimeout(20);
    }
    const http = {};
    for (const [id, path] of urls) if (done.has(id)) http[path] = (http[path] ?? 0) + done.get(id);
    const httpBytes = Object.values(http).reduce((a, b) => a + b, 0);
    const state = http['/api/state'] ?? 0;
    return {
      http,
      httpBytes,
      socketBytes,
      dataBytes: state + socketBytes,
      assetBytes: httpBytes - state,
      total: httpBytes + socketBytes,
    };
  }
  // Socket bytes received so far (since the last load began).
  const socket = () => socketBytes;
  return { page, load, socket };
}
