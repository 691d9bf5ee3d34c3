// The WebSocket to the worker: reconnects with exponential backoff and full
// jitter, resumes with ?since=<seq>&epoch=<epoch> so a short outage costs a few
// batches instead of a 250 KB snapshot, and reports its state for the UI.
import { decodeServerMessage, encodeResync, encodeToggle } from './proto.js';

const BASE_DELAY_MS = 500;
const MAX_DELAY_MS = 30_000;

export class Connection {
  // onMessage(msg) for every decoded ServerMessage; onState(state, detail)
  // with state 'connecting' | 'live' | 'reconnecting' | 'offline'.
  constructor({ url, board, onMessage, onState }) {
    this.url = url;
    this.board = board;
    this.onMessage = onMessage;
    this.onState = onState;
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.stopped = false;
    this.resyncRequested = false;
  }

  start() {
    this.stopped = false;
    this.#open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.ws?.close(1000);
  }

  #open() {
    const board = this.board;
    const resume = board.ready ? `?since=${board.seq}&epoch=${board.epoch}` : '';
    this.onState(this.attempt === 0 ? 'connecting' : 'reconnecting', {});
    const ws = new WebSocket(this.url + resume);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.resyncRequested = false;
    ws.onopen = () => {
      this.attempt = 0;
      this.onState('live', {});
    };
    ws.onmessage = (ev) => {
      if (!(ev.data instanceof ArrayBuffer)) return;
      let msg;
      try {
        msg = decodeServerMessage(new Uint8Array(ev.data));
      } catch (e) {
        console.error('undecodable server message', e);
        return;
      }
      if (msg.kind === 'snapshot') this.resyncRequested = false;
      this.onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) {
        this.onState('offline', {});
        return;
      }
      this.#schedule(ev.code);
    };
    // onerror is always followed by onclose, where the retry happens.
  }

  // Backoff: the server restarting (1012) is worth a quick retry; "try again
  // later" (1013) and rate abuse (1008) ask us to stay away longer.
  #schedule(code) {
    this.attempt += 1;
    let ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** Math.min(this.attempt, 10));
    let floor = 0;
    if (code === 1012 && this.attempt === 1) ceiling = 1000;
    if (code === 1013) floor = 2000;
    if (code === 1008) floor = 15_000;
    const delay = floor + Math.random() * ceiling; // full jitter spreads a reconnect storm
    this.onState('reconnecting', { inMs: delay, code });
    this.timer = setTimeout(() => this.#open(), delay);
  }

  get open() { return this.ws?.readyState === WebSocket.OPEN; }

  sendToggle(index, checked, requestId) {
    if (!this.open) return false;
    this.ws.send(encodeToggle(index, checked, requestId));
    return true;
  }

  // Asks for a snapshot after a gap, once until it arrives.
  resync() {
    if (this.resyncRequested || !this.open) return;
    this.resyncRequested = true;
    this.ws.send(encodeResync());
  }
}
