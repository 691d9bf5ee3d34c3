// A virtualized grid of checkboxes: only the rows in view (plus a few above and
// below) exist in the DOM, as real <input type=checkbox> elements, reused as
// the page scrolls. A spacer gives the scroll height of every row, so the
// native scrollbar covers all boxes. Arrow keys move focus across boxes.

const CELL = 28; // px per box, both ways
const OVERSCAN = 4; // rows kept beyond each edge of the view
// Past this many boxes waiting for a repaint (a hidden tab gets no animation
// frames but keeps receiving batches), repainting the view is cheaper than
// remembering them.
const MAX_DIRTY = 4096;

export class Grid {
  // view(index) -> {checked, frozen}; onToggle(index, checked) on user input.
  constructor(scroller, { size, view, onToggle }) {
    this.scroller = scroller;
    this.size = size;
    this.view = view;
    this.onToggle = onToggle;
    this.spacer = document.createElement('div');
    this.spacer.className = 'spacer';
    scroller.append(this.spacer);
    this.rows = new Map(); // row index -> element
    this.free = []; // detached row elements to reuse
    this.cols = 1;
    this.frame = 0;
    this.dirty = new Set(); // boxes to repaint on the next frame
    this.allDirty = false; // repaint every row on the next frame
    scroller.addEventListener('scroll', () => this.schedule(), { passive: true });
    new ResizeObserver(() => this.layout()).observe(scroller);
    scroller.addEventListener('change', (e) => {
      const box = e.target;
      if (box.dataset.index === undefined) return;
      this.onToggle(Number(box.dataset.index), box.checked);
    });
    scroller.addEventListener('keydown', (e) => this.#keys(e));
    this.layout();
  }

  setSize(size) {
    if (size === this.size) return;
    this.size = size;
    this.layout();
  }

  layout() {
    const width = this.scroller.clientWidth - 16;
    const cols = Math.max(1, Math.floor(width / CELL));
    if (cols !== this.cols) {
      this.cols = cols;
      for (const el of this.rows.values()) el.remove();
      this.rows.clear();
      this.free = [];
    }
    this.spacer.style.height = `${Math.ceil(this.size / this.cols) * CELL}px`;
    this.schedule();
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render() {
    this.#paintDirty();
    const rowCount = Math.ceil(this.size / this.cols);
    const first = Math.max(0, Math.floor(this.scroller.scrollTop / CELL) - OVERSCAN);
    const last = Math.min(rowCount - 1, Math.ceil((this.scroller.scrollTop + this.scroller.clientHeight) / CELL) + OVERSCAN);
    for (const [r, el] of this.rows) {
      if (r < first || r > last) {
        if (el.contains(document.activeElement)) continue; // keep the focused box alive
        el.remove();
        this.rows.delete(r);
        this.free.push(el);
      }
    }
    for (let r = first; r <= last; r++) {
      if (this.rows.has(r)) continue;
      const el = this.free.pop() ?? this.#newRow();
      this.#fill(el, r);
      this.spacer.append(el);
      this.rows.set(r, el);
    }
  }

  #newRow() {
    const el = document.createElement('div');
    el.className = 'row';
    for (let c = 0; c < this.cols; c++) {
      const box = document.createElement('input');
      box.type = 'checkbox';
      el.append(box);
    }
    return el;
  }

  #fill(el, r) {
    el.style.transform = `translateY(${r * CELL}px)`;
    el.dataset.row = r;
    const start = r * this.cols;
    for (let c = 0; c < el.children.length; c++) {
      const box = el.children[c];
      const i = start + c;
      if (i >= this.size) {
        box.hidden = true;
        delete box.dataset.index;
        continue;
      }
      box.hidden = false;
      box.dataset.index = i;
      box.setAttribute('aria-label', `Box ${i}`);
      this.#paint(box, i);
    }
  }

  #paint(box, i) {
    const { checked, frozen } = this.view(i);
    box.checked = checked;
    box.disabled = frozen;
    box.classList.toggle('frozen', frozen);
  }

  // Repaints the given boxes on the next frame, if they are on screen then
  // (a batch touched them). Many batches between two frames cost one repaint.
  update(indices) {
    if (this.allDirty) return;
    for (const i of indices) this.dirty.add(i);
    if (this.dirty.size > MAX_DIRTY) this.refresh();
    else this.schedule();
  }

  // Repaints every box on screen on the next frame (after a snapshot).
  refresh() {
    this.allDirty = true;
    this.dirty.clear();
    this.schedule();
  }

  #paintDirty() {
    if (this.allDirty) {
      for (const [r, el] of this.rows) this.#fill(el, r);
    } else {
      for (const i of this.dirty) {
        const el = this.rows.get(Math.floor(i / this.cols));
        if (el && i < this.size) this.#paint(el.children[i % this.cols], i);
      }
    }
    this.allDirty = false;
    this.dirty.clear();
  }

  // Scrolls box `i` into view and focuses it.
  jumpTo(i) {
    if (!(i >= 0 && i < this.size)) return false;
    const row = Math.floor(i / this.cols);
    this.scroller.scrollTop = row * CELL - this.scroller.clientHeight / 2 + CELL / 2;
    this.render();
    const el = this.rows.get(row);
    el?.children[i % this.cols].focus({ preventScroll: true });
    return true;
  }

  #keys(e) {
    const box = e.target;
    if (box.dataset?.index === undefined) return;
    const i = Number(box.dataset.index);
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: this.cols, ArrowUp: -this.cols }[e.key];
    if (step === undefined) return;
    e.preventDefault();
    const next = i + step;
    if (next < 0 || next >= this.size) return;
    const row = Math.floor(next / this.cols);
    const top = row * CELL;
    if (top < this.scroller.scrollTop || top + CELL > this.scroller.scrollTop + this.scroller.clientHeight) {
      this.scroller.scrollTop = step > 0 ? top + CELL - this.scroller.clientHeight : top;
    }
    this.render();
    this.rows.get(row)?.children[next % this.cols].focus({ preventScroll: true });
  }
}
