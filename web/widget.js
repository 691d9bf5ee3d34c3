// The widget's script (web/embed.html, served at /embed inside an iframe):
// keeps the counts live from /api/counts, a Server-Sent Events stream of at
// most one small event a second (docs/PROTOCOL.md), and tells the page that
// embedded it with /embed.js how tall it is.

const $ = (id) => document.getElementById(id);

// What the stream said so far: its first event has every field, later ones
// only those that changed.
const counts = { checked: null, frozen: null, size: null };

export const grouped = (n) => n.toLocaleString('en-US');

// The checked share rounded down, as the worker renders it (http/embed.rs).
export function percent(checked, size) {
  if (!checked || !size) return '0%';
  const hundredths = Math.floor((checked * 10000) / size);
  if (hundredths === 0) return '<0.01%';
  return `${Math.floor(hundredths / 100)}.${String(hundredths % 100).padStart(2, '0')}%`;
}

function show() {
  if (counts.checked !== null) $('checked').textContent = grouped(counts.checked);
  if (counts.frozen !== null) $('frozen').textContent = grouped(counts.frozen);
  if (counts.size !== null) $('size').textContent = grouped(counts.size);
  if (counts.checked !== null && counts.size) {
    const p = percent(counts.checked, counts.size);
    $('percent').textContent = p;
    $('bar').style.width = p.startsWith('<') ? '0' : p;
  }
}

function setState(state) {
  const el = $('state');
  el.dataset.state = state;
  el.textContent = state === 'live' ? 'live' : 'reconnecting…';
}

// The embedding page's origin, which embed.js puts in the iframe's fragment
// (#origin=...). Our height goes to that origin only: were the parent
// navigated elsewhere, the browser drops the message. A bare iframe (oEmbed)
// has none, and nothing is posted.
const parentOrigin = (() => {
  const given = new URLSearchParams(location.hash.slice(1)).get('origin');
  try {
    const origin = given && new URL(given).origin;
    return origin && origin !== 'null' && origin === given ? origin : null;
  } catch {
    return null;
  }
})();

let lastHeight = 0;
function postSize() {
  if (!parentOrigin || window.parent === window) return;
  const height = Math.ceil(document.documentElement.getBoundingClientRect().height);
  if (height === lastHeight) return;
  lastHeight = height;
  window.parent.postMessage({ type: 'omcb:embed-size', height }, parentOrigin);
}
new ResizeObserver(postSize).observe(document.documentElement);

// EventSource reconnects by itself after a dropped stream (the server's
// `retry:` spreads the reconnects); an answer that is not a stream (a 502
// from a proxy, say) closes it for good, so then we start over ourselves.
let source;
function connect() {
  source = new EventSource('/api/counts');
  source.onmessage = (e) => {
    Object.assign(counts, JSON.parse(e.data));
    show();
    setState(navigator.onLine === false ? 'offline' : 'live');
  };
  source.onerror = () => {
    setState('reconnecting');
    if (source.readyState === EventSource.CLOSED) {
      setTimeout(connect, 2000 + Math.random() * 3000);
    }
  };
}
addEventListener('offline', () => setState('offline'));
connect();

// For tests.
window.omcbWidget = { counts };
