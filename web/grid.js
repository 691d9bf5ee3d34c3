// A virtualized grid of checkboxes: only the rows in view (plus a few above and
// below) exist in the DOM, as real <input type=checkbox> elements, reused as
// the page scrolls. A spacer gives the scroll height of every row, so the
// native scrollbar covers all boxes.
//
// Keyboard: the grid is one Tab stop (a roving tabindex: the current box has
// tabindex 0, every other -1); arrow keys move between boxes, frozen ones
// included (they are not disabled, so they take focus; a click or Space on
// one is refused with a message). A change of the column count (a resize, a
// phone's rotation) keeps the focused box, or else the first visible one, in
// view and focused. A jump marks its box.

const CELL = 28; // px per box, both ways
const OVERSCAN = 4; // rows kept beyond each edge of the view
// Past this many boxes waiting for a repaint (a hidden tab gets no animation
// frames but keeps receiving batches), repainting the view is cheaper than
// remembering them.
const MAX_DIRTY = 4096;

export class Grid {
  // view(index) -> {checked, frozen, unknown}; onToggle(index, checked) on
  // user input; onFrozen(index) when a frozen box is clicked; onFocusBox(index)
  // when a box takes focus; onView(a, b, size) after each render, with the
  // boxes [a, b) it put in the DOM.
  constructor(scroller, { size, view, onToggle, onFrozen = () => {}, onFocusBox = () => {}, onView = () => {} }) {
    this.scroller = scroller;
    this.size = size;
    this.view = view;
    this.onToggle = onToggle;
    this.onFrozen = onFrozen;
    this.onFocusBox = onFocusBox;
    this.onView = onView;
    this.current = 0; // the box with tabindex 0
    this.marked = -1; // the box of the last jump
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
    // A frozen box keeps its value: the click (mouse, touch or Space) is
    // cancelled before it changes the input.
    scroller.addEventListener('click', (e) => {
      const box = e.target;
      if (box.dataset?.index === undefined || !box.classList.contains('frozen')) return;
      e.preventDefault();
      this.onFrozen(Number(box.dataset.index));
    });
    scroller.addEventListener('focusin', (e) => {
      const box = e.target;
      if (box.dataset?.index === undefined) return;
      this.#setCurrent(Number(box.dataset.index));
      this.onFocusBox(this.current);
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
    if (cols === this.cols) {
      this.spacer.style.height = `${Math.ceil(this.size / this.cols) * CELL}px`;
      this.schedule();
      return;
    }
    // The box to keep in view: the focused one, else the first visible one,
    // at the same height in the view when it fits.
    const focused = this.#focusedIndex();
    const anchor = focused ?? this.#firstVisible();
    const offset = Math.floor(anchor / this.cols) * CELL - this.scroller.scrollTop;
    this.cols = cols;
    for (const el of this.rows.values()) el.remove();
    this.rows.clear();
    this.free = [];
    this.spacer.style.height = `${Math.ceil(this.size / this.cols) * CELL}px`;
    const top = Math.floor(anchor / cols) * CELL;
    const fits = offset >= 0 && offset + CELL <= this.scroller.clientHeight;
    const target = fits ? top - offset : top - this.scroller.clientHeight / 2 + CELL / 2;
    // Never below the anchor's row: with no height yet, it goes to the top.
    this.scroller.scrollTop = Math.max(0, Math.min(target, top));
    this.render();
    if (focused !== null) this.#box(focused)?.focus({ preventScroll: true });
  }

  // The index of the focused box, or null when focus is elsewhere.
  #focusedIndex() {
    const el = document.activeElement;
    return el && this.scroller.contains(el) && el.dataset.index !== undefined ? Number(el.dataset.index) : null;
  }

  // The first box of the first row wholly in view.
  #firstVisible() {
    const row = Math.ceil(this.scroller.scrollTop / CELL);
    return Math.min(row * this.cols, Math.max(0, this.size - 1));
  }

  // The element of box `i`, when its row is in the DOM.
  #box(i) {
    const el = this.rows.get(Math.floor(i / this.cols));
    return i >= 0 && i < this.size ? el?.children[i % this.cols] : undefined;
  }

  // Moves the roving tabindex to box `i`.
  #setCurrent(i) {
    if (i === this.current) return;
    const old = this.#box(this.current);
    if (old) old.tabIndex = -1;
    this.current = i;
    const box = this.#box(i);
    if (box) box.tabIndex = 0;
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
    // The grid keeps one Tab stop: when the current box scrolled away, the
    // first visible box takes its place.
    if (!this.#box(this.current)) this.#setCurrent(this.#firstVisible());
    this.onView(first * this.cols, Math.min(this.size, (last + 1) * this.cols), this.size);
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
    const { checked, frozen = false, unknown = false } = this.view(i);
    box.checked = checked;
    box.tabIndex = i === this.current ? 0 : -1;
    box.classList.toggle('marked', i === this.marked);
    // Not known yet (its region's state is on the way): neither checked nor
    // unchecked, for the eye (index.html) and for assistive technology.
    box.indeterminate = unknown;
    if (box.classList.contains('frozen') === frozen) return;
    box.classList.toggle('frozen', frozen);
    if (frozen) {
      box.setAttribute('aria-disabled', 'true');
      box.title = 'Frozen: checked long enough, it can no longer change';
    } else {
      box.removeAttribute('aria-disabled');
      box.removeAttribute('title');
    }
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

  // Scrolls box `i` into view, marks it (a ring that stays until the next
  // jump, seen whether the jump came from the keyboard or the mouse) and
  // focuses it.
  jumpTo(i) {
    if (!(Number.isInteger(i) && i >= 0 && i < this.size)) return false;
    const row = Math.floor(i / this.cols);
    this.scroller.scrollTop = row * CELL - this.scroller.clientHeight / 2 + CELL / 2;
    const old = this.#box(this.marked);
    this.marked = i;
    old?.classList.remove('marked');
    this.render();
    const box = this.#box(i);
    box?.classList.add('marked');
    box?.focus({ preventScroll: true });
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
    this.#setCurrent(next);
    this.render();
    this.#box(next)?.focus({ preventScroll: true });
  }
}
