// The widget in real Chromium: a page served from another origin (a second
// local server) embeds the board with /embed.js and shows its badge; a
// toggle on the board shows in the widget within 2 s; the iframe sized
// itself; and the size messages are checked for their origin on both sides.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { startServer } from './server.mjs';
import { launchChromium } from './suite.mjs';

let server;
let blog; // the other site: { url, close }
let browser;
const pageErrors = [];

// A page of another site with the README/blog snippets (as README.md shows them).
function blogPage(board) {
  return `<!doctype html><html><head><meta charset="utf-8"><title>A blog</title></head>
<body><h1>My blog</h1>
<p>The board right now:</p>
<script async src="${board}/embed.js"></script>
<p><img id="badge" src="${board}/badge.svg" alt="checkboxes checked"></p>
</body></html>`;
}

before(async () => {
  server = await startServer();
  const http = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(blogPage(server.url));
  });
  await new Promise((ok) => http.listen(0, '127.0.0.1', ok));
  // "localhost", not 127.0.0.1: another host as well as another port.
  blog = { url: `http://localhost:${http.address().port}`, close: () => new Promise((ok) => http.close(ok)) };
  assert.notEqual(new URL(blog.url).origin, new URL(server.url).origin);
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  await blog?.close();
  const code = await server?.stop();
  assert.equal(code, 0, 'the server exits cleanly on SIGTERM');
  assert.deepEqual(pageErrors, [], 'no uncaught errors in any page');
});

async function newPage(url) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  await page.goto(url);
  return page;
}

// The widget's frame inside `page`, once its stream is live.
async function liveWidget(page) {
  const element = await page.waitForSelector('iframe.omcb-embed');
  const frame = await element.contentFrame();
  await frame.waitForSelector('#state[data-state="live"]');
  return { element, frame };
}

test('another site embeds the widget: it sizes itself and follows the board live', async () => {
  const site = await newPage(blog.url);
  const { element, frame } = await liveWidget(site);
  assert.equal(new URL(frame.url()).origin, new URL(server.url).origin, 'the widget comes from the board');
  assert.equal(await frame.locator('#checked').textContent(), '0');

  // The iframe took the height its content reported (not the 140 px it starts with).
  const content = await frame.evaluate(() => Math.ceil(document.documentElement.getBoundingClientRect().height));
  assert.notEqual(content, 140, 'the content is not by chance as tall as the start height');
  await site.waitForFunction((h) => document.querySelector('iframe.omcb-embed').getBoundingClientRect().height === h, content);
  console.log(`iframe sized itself to ${content} px`);

  // A click on the board shows in the widget within 2 s.
  const board = await newPage(server.url);
  await board.waitForSelector('#conn-state[data-state="live"]');
  await board.locator('input[data-index="42"]').click();
  const started = Date.now();
  await frame.waitForFunction(() => document.getElementById('checked').textContent === '1', null, { timeout: 2000 });
  console.log(`board click -> widget: ${Date.now() - started} ms`);
  assert.equal(await frame.locator('#percent').textContent(), '<0.01%');
  assert.equal(await frame.locator('#frozen').textContent(), '0');
  // The link opens the board.
  assert.equal(await frame.locator('a.title').evaluate((a) => a.href), `${server.url}/`);

  // The badge rendered: the browser decoded the SVG.
  const badge = await site.waitForFunction(() => {
    const img = document.getElementById('badge');
    return img.complete && img.naturalWidth > 0 && { width: img.naturalWidth, height: img.naturalHeight };
  });
  const size = await badge.jsonValue();
  assert.equal(size.height, 20);
  assert.ok(size.width > 60, `badge width ${size.width}`);

  // Origins, parent side: a size message from anyone but the widget's origin
  // (here the site itself) is ignored.
  const before = await element.evaluate((f) => f.style.height);
  await site.evaluate(() => window.postMessage({ type: 'omcb:embed-size', height: 500 }, '*'));
  await site.evaluate(() => new Promise((ok) => setTimeout(ok, 0))); // the message is dispatched
  assert.equal(await element.evaluate((f) => f.style.height), before);
  await board.close();
  await site.close();
});

test('the widget posts its size only to the origin that embedded it', async () => {
  const site = await newPage(blog.url);
  const right = (await liveWidget(site)).frame;
  // A second widget told that its parent is some other origin: the browser
  // drops what it posts, so the site hears only from the right widget.
  await site.evaluate((board) => {
    window.heard = [];
    addEventListener('message', (e) => {
      const wrong = e.source === document.getElementById('wrong').contentWindow;
      window.heard.push({ from: wrong ? 'wrong' : 'right', height: e.data?.height });
    });
    const f = document.createElement('iframe');
    f.id = 'wrong';
    f.src = `${board}/embed#origin=${encodeURIComponent('http://elsewhere.example')}`;
    document.body.append(f);
  }, server.url);
  const wrong = await (await site.waitForSelector('#wrong')).contentFrame();
  await wrong.waitForSelector('#state[data-state="live"]');
  // Both widgets grow, the wrong one first; once the right one's new size
  // has arrived, the wrong one's would have too, had it been delivered.
  await wrong.evaluate(() => { document.body.style.paddingBottom = '37px'; });
  await right.evaluate(() => { document.body.style.paddingBottom = '41px'; });
  await site.waitForFunction(() => window.heard.some((m) => m.from === 'right'));
  const heard = await site.evaluate(() => window.heard);
  assert.deepEqual(heard.filter((m) => m.from === 'wrong'), [], 'a size reached a page of another origin');
  await site.waitForFunction(() => {
    const f = document.querySelector('iframe.omcb-embed');
    return window.heard.at(-1).height === f.getBoundingClientRect().height;
  });
  await site.close();
});
