// The time-lapse page (/replay): loads one epoch of the change archive
// (GET /replay/index.json, then its segments: timeline.js), and plays it on
// the grid at 1x to 100,000x with a scrub bar over its time span. The URL
// names the moment shown (`?epoch=<hex>&seq=<n>&speed=<x>`, or `&t=<ms>`)
// and follows the scrub bar and playback, so it can be shared.
//
// Changes are applied once per animation frame and only the boxes they
// touched are repainted (grid.js); a jump further than a keyframe's span
// (a scrub, or a frame at high speed) restores the nearest keyframe and
// repaints the view once.
import { Grid } from './grid.js';
import { GAP, Timeline, readSegment } from './timeline.js';

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat();
const params = new URLSearchParams(location.search);
let tl = null; // the Timeline once loaded
let grid = null;
let playing = false;
// 1x to 100,000x: the page's choices, or any speed in between from the URL.
let speed = Math.min(100_000, Math.max(1, Number(params.get('speed')) || 1000));
let clock = 0; // the replayed time, ms since 1970
let lastFrame = 0;
let urlAt = 0;
let holes = []; // records that are gaps or missing seqs
let rafId = 0;

function status(text) { $('status').textContent = text; }

async function load() {
  const resp = await fetch('/replay/index.json');
  if (!resp.ok) throw new Error(resp.status === 404 ? 'This server keeps no change archive.' : `GET /replay/index.json: ${resp.status}`);
  const index = await resp.json();
  if (!index.epochs.length) throw new Error('The archive is empty: nothing to replay yet.');
  const select = $('epoch');
  for (const e of index.epochs) {
    const from = e.first_ms ? new Date(e.first_ms).toISOString().slice(0, 16).replace('T', ' ') : '–';
    select.append(new Option(`${from} (${fmt.format(e.changes)} changes)`, e.epoch));
  }
  const epoch = index.epochs.find((e) => e.epoch === params.get('epoch')) ?? index.epochs[index.epochs.length - 1];
  select.value = epoch.epoch;
  select.addEventListener('change', () => { location.search = `?epoch=${select.value}&speed=${speed}`; });

  tl = new Timeline(index.size, BigInt(`0x${epoch.epoch}`));
  // Fetched four at a time, added in order.
  const segs = epoch.segments;
  const fetches = [];
  const get = (s) => fetch(s.url).then(async (r) => (r.ok ? new Uint8Array(await r.arrayBuffer()) : r.status));
  for (let i = 0; i < segs.length; i++) {
    for (let k = i; k < Math.min(i + 4, segs.length); k++) fetches[k] ??= get(segs[k]);
    status(`Loading segment ${i + 1} of ${segs.length}…`);
    const bytes = await fetches[i];
    fetches[i] = true; // done: its bytes may go
    const blocks = typeof bytes === 'number' ? [{ offset: 0, error: `cannot be read: HTTP ${bytes}` }] : await readSegment(bytes, tl.epoch);
    tl.addSegment(segs[i].url, blocks);
  }
  tl.finish(epoch.last_seq);
  holes = tl.holes();
  showProblems();
  start();
}

function showProblems() {
  const list = $('problems');
  for (const p of tl.errors) {
    const li = document.createElement('li');
    li.textContent = `${p.file} at byte ${p.offset}: ${p.error}`;
    list.append(li);
  }
  if (tl.outOfRange) {
    const li = document.createElement('li');
    li.textContent = `${fmt.format(tl.outOfRange)} changes of boxes past this board's size (${fmt.format(tl.size)}) were not shown.`;
    list.append(li);
  }
  const span = Math.max(1, tl.lastMs - tl.firstMs);
  for (const p of holes) {
    const el = document.createElement('span');
    el.style.left = `${((tl.times[p] - tl.firstMs) / span) * 100}%`;
    el.title = holeText(p);
    $('holes').append(el);
  }
}

function holeText(p) {
  const [from, to] = [tl.firstSeq(p), tl.lastSeq(p)];
  const seqs = from === to ? `Seq ${fmt.format(from)} is` : `Seqs ${fmt.format(from)}–${fmt.format(to)} are`;
  if (tl.kinds[p] === GAP) return `${seqs} not in the archive: the store had trimmed them before the archiver read them.`;
  return `${seqs} not in the archive: ${tl.problems.get(p)?.error ?? 'missing'}`;
}

function start() {
  const board = tl.board;
  grid = new Grid($('grid'), {
    size: tl.size,
    view: (i) => ({ checked: board.isChecked(i), frozen: board.isFrozen(i) }),
    // A replay is not the board: a box changed by a key press shows the
    // history's value again.
    onToggle: (i) => grid.update([i]),
  });
  const scrub = $('scrub');
  scrub.max = String(Math.max(0, tl.lastMs - tl.firstMs));
  scrub.disabled = false;
  $('play').disabled = false;
  if (![...$('speed').options].some((o) => o.value === String(speed))) $('speed').append(new Option(`${fmt.format(speed)}×`, String(speed)));
  $('speed').value = String(speed);
  let target = 0;
  if (params.has('seq')) target = tl.positionOfSeq(Number(params.get('seq')));
  else if (params.has('t')) target = tl.positionOfTime(Number(params.get('t')));
  moveTo(target);
  scrub.addEventListener('input', () => {
    moveTo(tl.positionOfTime(tl.firstMs + Number(scrub.value)), Number(scrub.value) + tl.firstMs);
    share(true);
  });
  $('play').addEventListener('click', () => (playing ? pause() : play()));
  $('speed').addEventListener('change', () => {
    speed = Number($('speed').value);
    share(true);
  });
  status(`${fmt.format(tl.length)} records, ${fmt.format(holes.length)} without changes.`);
  window.replay.ready = true;
}

// Shows the board after the first `p` records; `at` is the replayed time
// (the last applied change's when not given). Playback (`played`) names the
// last gap it passed; a jump names one it lands right after (the bar marks
// them all).
function moveTo(p, at, played = false) {
  const from = tl.pos;
  const changed = tl.seek(p);
  if (changed === null) grid.refresh();
  else if (changed.length) grid.update(changed);
  clock = at ?? (tl.pos > 0 ? tl.times[tl.pos - 1] : tl.firstMs);
  if (from === tl.pos) return show();
  let hole = -1;
  for (const h of holes) {
    if (played ? h >= from && h < tl.pos : h === tl.pos - 1) hole = h;
  }
  $('notice').textContent = hole >= 0 ? holeText(hole) : played ? $('notice').textContent : '';
  show();
}

function show() {
  const b = tl.board;
  $('when').textContent = tl.length ? new Date(clock).toISOString().replace('T', ' ').slice(0, 23) : '–';
  $('seq').textContent = fmt.format(b.seq);
  $('checked-count').textContent = fmt.format(b.checkedCount);
  $('frozen-count').textContent = fmt.format(b.frozenCount);
  if (document.activeElement !== $('scrub')) $('scrub').value = String(clock - tl.firstMs);
}

// The moment in the URL: at most every second while playing, at once
// otherwise (replaceState is rate limited by browsers).
function share(now) {
  const t = performance.now();
  if (!now && t - urlAt < 1000) return;
  urlAt = t;
  const q = new URLSearchParams({ epoch: $('epoch').value, seq: String(tl.board.seq), speed: String(speed) });
  history.replaceState(null, '', `/replay?${q}`);
}

function play() {
  if (tl.pos >= tl.length) moveTo(0);
  playing = true;
  $('play').textContent = 'Pause';
  lastFrame = performance.now();
  cancelAnimationFrame(rafId);
  rafId = requestAnimationFrame(frame);
}

function pause() {
  playing = false;
  cancelAnimationFrame(rafId);
  $('play').textContent = 'Play';
  share(true);
}

function frame(now) {
  if (!playing) return;
  // A hidden tab gets no frames: the time it was away is not replayed at once.
  const dt = Math.min(250, Math.max(0, now - lastFrame));
  lastFrame = now;
  const began = performance.now();
  clock += dt * speed;
  moveTo(tl.positionOfTime(clock), clock, true);
  share(false);
  // What a frame's work took (ms), for tests and the curious.
  const work = window.replay.frameWork;
  work.push(performance.now() - began);
  if (work.length > 600) work.shift();
  if (tl.pos >= tl.length) pause();
  else rafId = requestAnimationFrame(frame);
}

// For tests and the curious: the state behind the page.
window.replay = {
  ready: false,
  frameWork: [],
  get timeline() { return tl; },
  get grid() { return grid; },
  moveToSeq(seq) { moveTo(tl.positionOfSeq(seq)); share(true); },
};
load().catch((e) => {
  status(e.message);
  console.warn('replay', e);
});
