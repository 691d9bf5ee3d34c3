// Wires the page together: the board state, the socket, the grid, and the
// optimistic clicks that make a toggle feel instant.
import { Board, covers, windowFor } from './board.js';
import { Connection } from './conn.js';
import { Grid } from './grid.js';
import { Reason } from './proto.js';

const $ = (id) => document.getElementById(id);
const board = new Board();
const fmt = new Intl.NumberFormat();

// Optimistic values shown over the board until the server's answer (and, for
// an accepted change, the batch that carries it) has arrived:
// index -> {checked, requestId, seq}.
const pending = new Map();
const byRequest = new Map(); // requestId -> index
let nextRequest = 1;

function view(i) {
  if (board.seqAt(i) < 0n) return { unknown: true };
  const p = pending.get(i);
  return { checked: p ? p.checked : board.isChecked(i), frozen: board.isFrozen(i) };
}

// The page subscribes to the boxes it shows and a screen more above and
// below (windowFor), and subscribes again once the screen leaves the inner
// part of that (covers), 120 ms after the scrolling stops. A jump is a scroll
// like any other. The first window (from the grid's first layout) is taken
// at once: the socket opens with it (`conn.start` below).
let sub = null;
let followTimer = 0;
function follow(...shown) {
  if (!sub) {
    sub = windowFor(...shown);
    conn.subscribe(sub.first, sub.count);
    return;
  }
  if (covers(sub, ...shown)) return;
  clearTimeout(followTimer);
  followTimer = setTimeout(() => {
    sub = windowFor(...shown);
    conn.subscribe(sub.first, sub.count);
    grid.refresh();
  }, 120);
}

const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
const conn = new Connection({ url: wsUrl, board, onMessage, onState, onClose });

const grid = new Grid($('grid'), {
  size: 1_000_000,
  view,
  onFrozen(index) {
    toast(`Box ${fmt.format(index)} is frozen: it was checked long enough and can no longer change.`);
  },
  onView: follow,
  onFocusBox(index) {
    $('box-number').textContent = `Box ${fmt.format(index)}`;
  },
  onToggle(index, checked) {
    // Frozen, or not known yet (a click on a placeholder): it shows as it was.
    if (board.isFrozen(index) || board.seqAt(index) < 0n) {
      grid.update([index]);
      return;
    }
    const requestId = nextRequest;
    nextRequest = nextRequest >= 0xffffffff ? 1 : nextRequest + 1;
    if (!conn.sendToggle(index, checked, requestId)) {
      toast('Not connected: your click was not sent.');
      grid.update([index]);
      return;
    }
    pending.set(index, { checked, requestId, seq: null });
    byRequest.set(requestId, index);
    grid.update([index]);
  },
});

// The sunset's line, countdown and end state, and "you checked N" (sunset.js)
// come only when there is something to show: a sunset runs, the board is
// finished, or this browser has checked a box. Most visits see none of it, and
// a first visit's bytes stay under 10 KB (docs/BENCHMARKS.md). Until then the
// page keeps what the Sunset will need: the server's clock and the settings.
let sunset = null;
let sunsetLoad = null;
let clockOffset = 0; // server clock - local clock, ms
const settings = { maxChecked: 0 }; // the board's limit (a Settings message says), 0 = its size
const clockFrom = (serverTimeMs) => {
  if (serverTimeMs > 0n) clockOffset = Number(serverTimeMs) - Date.now();
};

function needSunset() {
  let mine = 0;
  try {
    mine = Number(localStorage.getItem('omcb.youChecked')) || 0;
  } catch {
    // No storage: nothing counted.
  }
  return board.freezeAfterMs > 0n || board.finished(settings.maxChecked) || mine > 0;
}

// Loads sunset.js once; each `then` runs with the Sunset when it is there.
// A failed load (the server restarting) is tried again with the next message,
// and the calls waiting for it (a click's count) still run.
const waiting = [];
function withSunset(then = () => {}) {
  waiting.push(then);
  sunsetLoad ??= import('./sunset.js').then(({ Sunset }) => {
    const s = new Sunset({ board, grid: $('grid'), header: document.querySelector('header'), fmt });
    s.offset = clockOffset;
    s.maxChecked = settings.maxChecked;
    // Every box the board holds checked was checked by now: the Sunset's
    // countdowns start from here, as from a Snapshot.
    s.onSnapshot({ serverTimeMs: 0n });
    sunset = s;
  }, () => { sunsetLoad = null; });
  sunsetLoad.then(() => {
    if (!sunset) return;
    for (const f of waiting.splice(0)) f(sunset);
    sunset.render();
  });
}

const reasonText = {
  [Reason.OUT_OF_RANGE]: 'That box is not on the board.',
  [Reason.FROZEN]: 'That box is frozen.',
  [Reason.RATE_LIMITED]: 'Slow down a little!',
  [Reason.BOARD_FULL]: 'The board is full.',
  [Reason.UNAVAILABLE]: 'The server cannot save clicks right now; try again in a moment.',
};

function onToggleResult(r) {
  const index = byRequest.get(r.requestId);
  byRequest.delete(r.requestId);
  if (index === undefined) return;
  if (r.accepted && r.seq > 0n && r.checked) {
    // Checked now, whenever sunset.js arrives: its countdown is exact.
    const at = Date.now();
    withSunset((s) => s.onAccepted(index, r.checked, at));
  }
  const p = pending.get(index);
  if (!p || p.requestId !== r.requestId) return; // a later click on the same box owns it now
  if (r.accepted && r.seq > board.seqAt(index)) {
    p.seq = r.seq; // keep showing it until the batch with this seq arrives
    return;
  }
  // Refused, or already in the board: show the board's value again.
  pending.delete(index);
  if (!r.accepted) toast(reasonText[r.reason] ?? 'Your click was refused.');
  grid.update([index]);
}

// Drops optimistic values the board has caught up with.
function settle() {
  const done = [];
  for (const [i, p] of pending) if (p.seq !== null && board.seqAt(i) >= p.seq) done.push(i);
  for (const i of done) pending.delete(i);
  return done;
}

function onMessage(msg) {
  switch (msg.kind) {
    case 'snapshot': {
      const epochChanged = board.ready && board.epoch !== msg.epoch;
      if (!board.applySnapshot(msg)) return;
      if (epochChanged) pending.clear(); // seqs of the old board mean nothing now
      settle();
      clockFrom(msg.serverTimeMs);
      sunset?.onSnapshot(msg);
      grid.setSize(board.size);
      grid.refresh();
      break;
    }
    case 'batch': {
      const r = board.applyBatch(msg);
      if (r.result === 'gap') conn.resync();
      if (r.result === 'applied') {
        sunset?.onBatch(msg);
        grid.update(r.changed.concat(settle()));
      }
      break;
    }
    case 'settings':
      clockFrom(msg.serverTimeMs);
      board.freezeAfterMs = msg.freezeAfterMs;
      settings.maxChecked = msg.maxChecked;
      sunset?.onSettings(msg);
      break;
    case 'toggleResult':
      onToggleResult(msg);
      break;
    case 'error':
      console.warn(msg);
      toast(msg.message);
      break;
  }
  counts();
  if (sunset) sunset.render();
  else if (waiting.length || needSunset()) withSunset();
}

function counts() {
  $('checked-count').textContent = fmt.format(board.checkedCount);
  $('frozen-count').textContent = fmt.format(board.frozenCount);
}

// Toggles sent on a socket that closed before answering may or may not have
// been applied: stop showing them, and let the next Snapshot (or the resumed
// batches) say what happened. Accepted ones keep waiting for their seq.
function onClose(code) {
  const lost = [];
  for (const [i, p] of pending) if (p.seq === null) lost.push(i);
  for (const i of lost) pending.delete(i);
  byRequest.clear();
  grid.update(lost);
  if (code === 1008) toast('Too many clicks: disconnected for a little while.');
  if (code === 1013) toast('The server is busy; trying again shortly.');
}

// The state is a live region: screen readers hear each change of state
// (live, reconnecting, offline), but not the countdown to the next attempt,
// which ticks every second beside it, outside the region.
const stateText = { connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…', offline: 'offline' };
let countdown = 0;
function onState(state, { retryAt }) {
  const el = $('conn-state');
  const retry = $('retry-in');
  el.dataset.state = state;
  if (el.textContent !== stateText[state]) el.textContent = stateText[state];
  clearInterval(countdown);
  retry.textContent = '';
  if (retryAt) {
    const show = () => {
      const s = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      retry.textContent = `in ${s} s`;
    };
    show();
    countdown = setInterval(show, 1000);
  }
}

// One toast at a time. The same message again (a burst of refused clicks)
// only keeps it up longer: the text is not rewritten, so it is announced once.
let toastTimer = 0;
function toast(text) {
  const el = $('toast');
  const same = !el.hidden && el.textContent === text;
  el.hidden = false;
  if (!same) el.textContent = text;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 2500);
}

// A box number as people write it: digits, maybe grouped ("499,993",
// "499 993"). Anything else (empty included) is refused, not read as 0.
function parseBox(text) {
  const digits = text.replace(/[\s,._'\u00a0\u202f]/g, '');
  return /^\d{1,9}$/.test(digits) ? Number(digits) : null;
}

$('jump-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('jump').value;
  const n = parseBox(text);
  const range = `a box number from 0 to ${fmt.format(Math.max(board.size, 1) - 1)}`;
  if (text.trim() === '') toast(`Type ${range}.`);
  else if (n === null) toast(`"${text.trim().slice(0, 20)}" is not a number: type ${range}.`);
  else if (!grid.jumpTo(n)) toast(`There is no box ${fmt.format(n)}: type ${range}.`);
});

// The socket opens subscribed to the window the grid shows (`?first=&count=`,
// docs/PROTOCOL.md, "A page load"): its first frame is the range Snapshot of
// that window, and the boxes show as placeholders until it is in.
conn.start();
// For tests and the curious: the state behind the page.
window.omcb = { board, conn, grid, pending, settings, get sunset() { return sunset; } };
