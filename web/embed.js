// Embeds the board's live count on any page:
//   <script async src="https://BOARD/embed.js"></script>
// inserts an iframe of BOARD/embed right after the script tag and keeps its
// height fitted to the widget, which reports it by postMessage. A classic
// script (not a module), so that it can find its own tag and address.
(() => {
  const script = document.currentScript;
  if (!script || !script.src) return;
  // The board is wherever this script came from.
  const board = new URL(script.src).origin;
  const frame = document.createElement('iframe');
  // The fragment tells the widget which origin may receive its size; it is
  // not sent to the server, so every site shares one cached /embed.
  frame.src = `${board}/embed#origin=${encodeURIComponent(location.origin)}`;
  frame.title = 'One Million Checkboxes: live count';
  frame.loading = 'lazy';
  frame.style.cssText = 'display:block;border:0;width:100%;max-width:360px;height:140px;';
  frame.className = 'omcb-embed';
  script.after(frame);
  addEventListener('message', (e) => {
    // Only our widget, in this very iframe, may size it.
    if (e.origin !== board || e.source !== frame.contentWindow) return;
    const { type, height } = e.data ?? {};
    if (type !== 'omcb:embed-size' || !Number.isFinite(height)) return;
    frame.style.height = `${Math.min(Math.max(Math.ceil(height), 40), 600)}px`;
  });
})();
