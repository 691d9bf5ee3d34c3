// The WebSocket to the worker: reconnects with exponential backoff and full
// jitter, opens every socket subscribed to the page's last wanted range
// (`subscribe`; /ws?first=&count=, docs/PROTOCOL.md), so each one starts with
// a range Snapshot of it (a few hundred bytes for a near-empty board, no
// full board), asks for deflated snapshot bitsets (snapshot=deflate), and
// reports its state for the UI: 'live' only while the socket is open, the
// board holds a state, and the browser is online.
import { decodeServerMessage, encodeResync, encodeSubscribe, encodeToggle, inflateSnapshot } from './proto.js';

const BASE_DELAY_MS = 500;
const MAX_DELAY_MS = 30_000;

// How long to wait before reconnect attempt `attempt` (1, 2, ...) after a
// close with `code`. Full jitter (a uniform pick below the ceiling) spreads a
// whole crowd's reconnects after a worker restart instead of synchronizing
// them into waves; the floors keep a refused client from hammering.
export function retryDelay(attempt, code, random = Math.random) {
  let ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** Math.min(attempt, 10));
  let floor = 0;
  switch (code) {
    case 1012: // Service restart: another worker (or this one, back up) is ready soon.
      if (attempt === 1) ceiling = 1000;
      break;
    case 1013: // Try again later: the worker is at its connection limit.
      floor = 2000;
      ceiling = Math.max(ceiling, 8000);
      break;
    case 1008: // Closed as abusive (rate limits): stay away for a while.
      floor = 15_000;
      break;
    case 1003: // Text frame, undecodable message, frame too large: the server
    case 1007: // rejected what we sent. That is a client bug; retrying fast
    case 1009: // would only repeat it, so back off as if overloaded.
      floor = 5000;
      break;
  }
  return floor + random() * ceiling;
}

export class Connection {
  // onMessage(msg) for every decoded ServerMessage; onState(state, detail)
  // with state 'connecting' | 'live' | 'reconnecting' | 'offline' and detail
  // {retryAt (ms since epoch, when a retry is scheduled), code (close code)};
  // onClose(code) when an open socket is lost (toggles in flight are unknown).
  constructor({ url, board, onMessage, onState, onClose = () => {} }) {
    this.url = url;
    this.board = board;
    this.onMessage = onMessage;
    this.onState = onState;
    this.onClose = onClose;
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.stopped = false;
    this.resyncRequested = false;
    this.view = null; // {first, count} every socket opens subscribed to (subscribe)
    this.lastCloseCode = null; // for the curious and for tests
    // Without a network there is nothing to retry: wait for it to come back.
    this.waitingForNetwork = false;
    this.state = null;
    // Messages are handled one after another, in order: a deflated snapshot
    // is inflated asynchronously and the batches behind it must wait for it.
    this.queue = Promise.resolve();
    addEventListener('online', () => {
      if (!this.waitingForNetwork || this.stopped) return;
      this.waitingForNetwork = false;
      this.#open();
    });
    // An open socket may survive a lost network for minutes without a sign;
    // the page must not say 'live' over a board that stopped moving. Drop it
    // and come back (resuming) when the network does.
    addEventListener('offline', () => {
      if (this.stopped) return;
      clearTimeout(this.timer);
      const ws = this.ws;
      this.ws = null;
      this.waitingForNetwork = true;
      if (ws) {
        ws.close(1000);
        this.onClose(1006);
      }
      this.#setState('offline', {});
    });
  }

  #setState(state, detail) {
    this.state = state;
    this.onState(state, detail);
  }

  // 'live' once the socket is open and the board holds a state to show.
  #maybeLive(ws) {
    if (this.ws !== ws || ws.readyState !== WebSocket.OPEN || this.state === 'live') return;
    if (!this.board.ready || this.board.awaitingSnapshot) return;
    this.attempt = 0;
    this.#setState('live', {});
  }

  start() {
    this.stopped = false;
    if (navigator.onLine === false) {
      this.waitingForNetwork = true;
      this.#setState('offline', {});
      return;
    }
    this.#open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.ws?.close(1000);
  }

  #open() {
    clearTimeout(this.timer);
    const view = this.view;
    const range = view ? `first=${view.first}&count=${view.count}&` : '';
    this.#setState(this.attempt === 0 ? 'connecting' : 'reconnecting', {});
    const ws = new WebSocket(`${this.url}?${range}snapshot=deflate`);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.resyncRequested = false;
    ws.onopen = () => {
      // The page scrolled while the socket was opening.
      if (this.view !== view) ws.send(encodeSubscribe(this.view.first, this.view.count));
      this.#maybeLive(ws);
    };
    ws.onmessage = (ev) => {
      if (!(ev.data instanceof ArrayBuffer)) return;
      let msg;
      try {
        msg = decodeServerMessage(new Uint8Array(ev.data));
      } catch (e) {
        // One bad message must not take the page down; the convergence rule
        // notices any batch we could not read (a gap) and resyncs.
        console.error('undecodable', e);
        return;
      }
      this.queue = this.queue.then(async () => {
        if (msg.kind === 'snapshot') {
          try {
            await inflateSnapshot(msg);
          } catch (e) {
            console.error('undecodable', e);
            return;
          }
          this.resyncRequested = false;
        }
        this.onMessage(msg);
        this.#maybeLive(ws);
      }).catch((e) => {
        // Keep the queue going for the next message, and still report the
        // error as uncaught (the page's error handlers and tests see it).
        setTimeout(() => { throw e; });
      });
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.lastCloseCode = ev.code;
      this.onClose(ev.code);
      if (this.stopped) {
        this.#setState('offline', { code: ev.code });
        return;
      }
      if ([1003, 1007, 1009].includes(ev.code)) console.error(`server rejected our message: close ${ev.code} ${ev.reason}`);
      this.#schedule(ev.code);
    };
    // onerror is always followed by onclose, where the retry happens.
  }

  #schedule(code) {
    if (navigator.onLine === false) {
      this.waitingForNetwork = true;
      this.#setState('offline', { code });
      return;
    }
    this.attempt += 1;
    const delay = retryDelay(this.attempt, code);
    this.#setState('reconnecting', { retryAt: Date.now() + delay, code });
    this.timer = setTimeout(() => this.#open(), delay);
  }

  get open() { return this.ws?.readyState === WebSocket.OPEN; }

  sendToggle(index, checked, requestId) {
    if (!this.open) return false;
    this.ws.send(encodeToggle(index, checked, requestId));
    return true;
  }

  // Wants the boxes [first, first + count) (the board forgets the others):
  // sent now if open, and every socket after this one opens with it.
  subscribe(first, count) {
    this.board.subscribe(first, count);
    this.view = { first, count };
    if (this.open) this.ws.send(encodeSubscribe(first, count));
  }

  // Asks for a snapshot after a gap, once until it arrives.
  resync() {
    if (this.resyncRequested || !this.open) return;
    this.resyncRequested = true;
    this.ws.send(encodeResync());
  }
}
