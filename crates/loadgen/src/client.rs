//! One simulated browser: a WebSocket that follows the convergence rule,
//! reconnects with `?since=`, sends the toggles it is told to, and counts
//! what it receives.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use omcb_proto::v1::{
    ClientMessage, Reason, Resync, ServerMessage, Snapshot, Subscribe, Toggle, client_message,
    server_message::Msg,
};
use omcb_proto::view::View;
use omcb_proto::{Applied, Board};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::Pattern;

/// Bytes each client reads at a time (see `connect`).
const READ_BUFFER: usize = 4096;

/// Counters and samples every client of this process adds to.
#[derive(Debug)]
pub struct Shared {
    /// Clients that have their first snapshot.
    pub connected: AtomicU64,
    /// Board size, learned from the first snapshot.
    pub board_size: AtomicU64,
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    /// Refusals by `Reason` value.
    pub refused: [AtomicU64; 6],
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    /// Box changes applied from Batches and region frames.
    pub changes: AtomicU64,
    pub reconnects: AtomicU64,
    /// Sockets that ended, by client (clients whose socket never ended are
    /// absent): a rolling upgrade must end each client's socket at most once
    /// per worker it was on.
    pub reconnects_by_client: Mutex<HashMap<usize, u64>>,
    /// Attempts to resume that did not get a working socket: a connect that
    /// failed (refused, HTTP error, 429) or a socket that ended before its
    /// first message. A clean drain (1012, then one connect elsewhere) has none.
    pub failed_reconnects: AtomicU64,
    pub snapshots: AtomicU64,
    /// Range Snapshots (viewport mode).
    pub range_snapshots: AtomicU64,
    pub errors: AtomicU64,
    /// Snapshots a client got on a socket that already had one (a reset or a
    /// lag: the server replaced its state).
    pub mid_snapshots: AtomicU64,
    /// Toggles whose socket ended before their answer (own boxes: excluded
    /// from the ack audit, their outcome is unknown).
    pub unanswered: AtomicU64,
    /// Disruptions a user would notice: a socket that ended or could not
    /// connect, a toggle refused `UNAVAILABLE`, unanswered, or answered after
    /// more than a second. The first and the last, in Unix ms (0 = none).
    pub disruptions: AtomicU64,
    pub first_disruption_ms: AtomicU64,
    pub last_disruption_ms: AtomicU64,
    /// The newest epoch any client saw change to (0 = no client saw one
    /// replace another), and how many times a client saw it change.
    pub epoch_changes: AtomicU64,
    /// Toggle -> ToggleResult, microseconds.
    pub result_latency: Mutex<Histogram<u64>>,
    /// Sampled accepted toggles: (seq, when sent).
    pub samples: Mutex<Vec<(u64, Instant)>>,
    /// Receiving clients' batch arrivals: (client, to_seq, when).
    pub receipts: Mutex<Vec<(usize, u64, Instant)>>,
    sample_every: u64,
    toggles_seen: AtomicU64,
}

impl Shared {
    pub fn new(sample_every: u64) -> Self {
        Self {
            connected: AtomicU64::new(0),
            board_size: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: Default::default(),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reconnects_by_client: Mutex::new(HashMap::new()),
            failed_reconnects: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            range_snapshots: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            mid_snapshots: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            disruptions: AtomicU64::new(0),
            first_disruption_ms: AtomicU64::new(u64::MAX),
            last_disruption_ms: AtomicU64::new(0),
            epoch_changes: AtomicU64::new(0),
            result_latency: Mutex::new(
                Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
            ),
            samples: Mutex::new(Vec::new()),
            receipts: Mutex::new(Vec::new()),
            sample_every: sample_every.max(1),
            toggles_seen: AtomicU64::new(0),
        }
    }

    /// Starts the measured window: what the ramp received does not count.
    pub fn reset_traffic_counters(&self) {
        self.frames.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.changes.store(0, Ordering::Relaxed);
        self.range_snapshots.store(0, Ordering::Relaxed);
        self.receipts.lock().expect("lock").clear();
    }

    /// Notes a disruption now.
    pub fn disrupted(&self) {
        let now = unix_ms();
        self.disruptions.fetch_add(1, Ordering::Relaxed);
        self.first_disruption_ms.fetch_min(now, Ordering::Relaxed);
        self.last_disruption_ms.fetch_max(now, Ordering::Relaxed);
    }
}

/// Milliseconds since the Unix epoch: the clock the chaos harness shares with
/// the load generator to place its faults.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a client knows about one of its own boxes (`--own-boxes`): nobody
/// else toggles it, so its value on the board must be the last value the
/// server acknowledged.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnBox {
    /// Its value in the newest snapshot that brought a new epoch (the first
    /// snapshot included): what it must be if no toggle is acknowledged since.
    pub base: bool,
    /// The epoch of that snapshot.
    pub base_epoch: u64,
    /// The last acknowledged value: (value, Unix ms of the answer, the
    /// client's epoch when the answer arrived).
    pub ack: Option<(bool, u64, u64)>,
    /// The value of a toggle refused `UNAVAILABLE` after the last ack: if the
    /// board holds it, the store applied a toggle it reported as failed.
    pub refused: Option<bool>,
    /// A toggle is in flight (one at a time per box keeps answers ordered).
    pub pending: bool,
    /// A toggle went unanswered (its socket ended): the box's expected value
    /// is unknown, so it is neither toggled again nor audited.
    pub tainted: bool,
}

impl OwnBox {
    /// The value the client believes the box has.
    fn expected(&self) -> bool {
        self.ack.map_or(self.base, |a| a.0)
    }
}

/// A client's answer to the end-of-run audit.
#[derive(Debug)]
pub struct ClientAudit {
    pub seq: u64,
    pub epoch: u64,
    pub hash: Option<u64>,
    /// Viewport mode: the client's regions and the range it last asked for.
    pub view: Option<(View, std::ops::Range<u32>)>,
    /// First own box and the boxes.
    pub own_base: u32,
    pub own: Vec<OwnBox>,
}

enum Cmd {
    Toggle(u32, bool),
    /// Flip one of the client's own boxes (`--own-boxes`).
    ToggleOwn,
    Audit(oneshot::Sender<ClientAudit>),
    Stop,
}

/// The handle the driver keeps for each client.
#[derive(Debug)]
pub struct ClientHandle {
    tx: mpsc::UnboundedSender<Cmd>,
    /// The client's seq, for the convergence wait.
    pub seq: Arc<AtomicU64>,
    /// Its epoch, for the convergence wait.
    pub epoch: Arc<AtomicU64>,
    /// Whether it keeps a board to verify.
    pub verify: bool,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl ClientHandle {
    pub fn toggle(&self, index: u32, checked: bool) {
        let _ = self.tx.send(Cmd::Toggle(index, checked));
    }

    pub fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop);
    }

    pub fn toggle_own(&self) {
        let _ = self.tx.send(Cmd::ToggleOwn);
    }

    async fn audit(&self) -> Option<ClientAudit> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Audit(tx)).ok()?;
        rx.await.ok()
    }
}

/// How a client is made.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub url: String,
    pub source: Ipv4Addr,
    pub receiver: bool,
    pub verify: bool,
    /// Own boxes `base .. base + n` (`--own-boxes`), if any.
    pub own: Option<(u32, u32)>,
    /// Viewport mode (`--viewport`), if set.
    pub viewport: Option<Viewport>,
}

/// A viewport client's window and how it scrolls.
#[derive(Debug, Clone, Copy)]
pub struct Viewport {
    /// Boxes in the window.
    pub count: u32,
    /// Mean milliseconds between scrolls.
    pub scroll_ms: u64,
    /// Seed of its position and scrolls.
    pub seed: u64,
}

/// Where a viewport client looks, and its moves.
struct Window {
    spec: Viewport,
    rng: omcb_testkit::rng::XorShift64,
    first: u32,
    /// The regions of the last `Subscribe` sent (the rule's "range").
    regions: Option<std::ops::Range<u32>>,
}

impl Window {
    fn new(spec: Viewport) -> Self {
        Self { spec, rng: omcb_testkit::rng::XorShift64::new(spec.seed), first: 0, regions: None }
    }

    /// When to scroll next: 50-150% of the mean from now.
    fn next_scroll(&mut self) -> tokio::time::Instant {
        let ms = self.spec.scroll_ms / 2 + self.rng.next_u64() % self.spec.scroll_ms.max(1);
        tokio::time::Instant::now() + Duration::from_millis(ms)
    }

    /// Moves like a reader: mostly a small scroll, sometimes a jump.
    fn scroll(&mut self, size: u32) {
        let r = self.rng.next_u64();
        let last = size.saturating_sub(self.spec.count);
        self.first = if self.regions.is_none() || r % 10 == 0 {
            (r >> 8) as u32 % last.max(1)
        } else {
            let by = 100 + (r >> 8) as u32 % 701;
            if (r >> 40) % 2 == 0 {
                self.first.saturating_sub(by)
            } else {
                self.first.saturating_add(by).min(last)
            }
        };
    }

    /// The `Subscribe` for the window now; the view forgets what it leaves.
    fn subscribe(&mut self, size: u32, view: &mut View) -> ClientMessage {
        self.regions =
            omcb_proto::view::subscription(self.first, self.spec.count, size).ok().flatten();
        view.subscribe(self.regions.as_ref());
        let s = Subscribe { first: self.first, count: self.spec.count };
        ClientMessage { msg: Some(client_message::Msg::Subscribe(s)) }
    }
}

/// Starts a client task. A change on `drop` makes it drop its socket and
/// resume at once, as every browser does after a network blip.
pub fn spawn(spec: ClientSpec, shared: Arc<Shared>, drop: watch::Receiver<u64>) -> ClientHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let seq = Arc::new(AtomicU64::new(0));
    let epoch = Arc::new(AtomicU64::new(0));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed) as usize;
    let verify = spec.verify;
    tokio::spawn(client(spec, id, shared, rx, drop, seq.clone(), epoch.clone()));
    ClientHandle { tx, seq, epoch, verify }
}

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A TCP socket bound to `source`, not yet connected, and the address of the
/// `ws://host:port/path` URL it is for, with the URL's `host:port` and path.
pub(crate) async fn bound_socket(
    url: &str,
    source: Ipv4Addr,
) -> anyhow::Result<(tokio::net::TcpSocket, SocketAddr, &str, &str)> {
    let rest =
        url.strip_prefix("ws://").ok_or_else(|| anyhow::anyhow!("only ws:// URLs: {url}"))?;
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: SocketAddr = tokio::net::lookup_host(hostport)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {hostport}"))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    Ok((socket, addr, hostport, path))
}

pub(crate) async fn connect(url: &str, source: Ipv4Addr) -> anyhow::Result<Ws> {
    let (socket, addr, _, _) = bound_socket(url, source).await?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    // tungstenite zero-fills its read buffer up to `read_buffer_size` before
    // every read: at the default 128 KiB that memset was a third of the
    // generator's CPU (perf) and 640 MB of touched memory at 5,000 clients.
    // Frames here are tens of bytes; snapshots just take more reads.
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    Ok(ws)
}

/// The client's state across reconnects.
struct State {
    board: Option<Board>,
    seq: u64,
    epoch: u64,
    awaiting_snapshot: bool,
    connected_once: bool,
    /// This socket already had its first snapshot.
    snapshot_on_socket: bool,
    own_base: u32,
    own: Vec<OwnBox>,
    /// Where the search for the next own box to flip starts.
    own_cursor: usize,
    /// Viewport mode: the regions held, by the viewport rule.
    view: Option<View>,
}

/// A toggle waiting for its answer: when it was sent, whether it is a
/// latency sample, and which own box (offset) it flips.
type Pending = HashMap<u32, (Instant, bool, Option<usize>)>;

async fn client(
    spec: ClientSpec,
    id: usize,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    mut drop: watch::Receiver<u64>,
    seq_out: Arc<AtomicU64>,
    epoch_out: Arc<AtomicU64>,
) {
    let ClientSpec { url, source, receiver, verify, own, viewport } = spec;
    let mut window = viewport.map(Window::new);
    let (own_base, own_n) = own.unwrap_or((0, 0));
    let mut st = State {
        board: None,
        seq: 0,
        epoch: 0,
        awaiting_snapshot: false,
        connected_once: false,
        snapshot_on_socket: false,
        own_base,
        own: vec![OwnBox::default(); own_n as usize],
        own_cursor: 0,
        view: window.as_ref().map(|_| View::new()),
    };
    let mut pending: Pending = HashMap::new();
    let mut next_id: u32 = 1;
    let mut backoff = Duration::from_millis(100);
    loop {
        let full = if window.is_some() {
            // As the page does: deflated Snapshots (a sparse region is a
            // few dozen bytes instead of 512), and no resume (its full
            // Batches would be of no use to a client without the full board).
            format!("{url}?snapshot=deflate")
        } else if st.connected_once {
            format!("{url}?since={}&epoch={}", st.seq, st.epoch)
        } else {
            url.clone()
        };
        let mut ws = match connect(&full, source).await {
            Ok(ws) => ws,
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if st.connected_once {
                    shared.failed_reconnects.fetch_add(1, Ordering::Relaxed);
                    shared.disrupted();
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        st.snapshot_on_socket = false;
        let mut healthy = false;
        let mut scroll_at = window.as_mut().map(Window::next_scroll);
        if let (Some(w), Some(view)) = (window.as_mut(), st.view.as_mut()) {
            // Subscribe at once: the worker answers after the socket's start.
            let size = shared.board_size.load(Ordering::Relaxed) as u32;
            if size > 0 {
                if w.regions.is_none() {
                    w.scroll(size);
                }
                let msg = w.subscribe(size, view);
                if ws.send(Message::Binary(msg.encode_to_vec().into())).await.is_err() {
                    continue;
                }
            }
        }
        loop {
            tokio::select! {
                _ = drop.changed() => break,
                () = tokio::time::sleep_until(scroll_at.unwrap_or_else(tokio::time::Instant::now)), if scroll_at.is_some() => {
                    let (Some(w), Some(view)) = (window.as_mut(), st.view.as_mut()) else { continue };
                    scroll_at = Some(w.next_scroll());
                    let size = shared.board_size.load(Ordering::Relaxed) as u32;
                    if size == 0 {
                        continue;
                    }
                    w.scroll(size);
                    let msg = w.subscribe(size, view);
                    if ws.send(Message::Binary(msg.encode_to_vec().into())).await.is_err() {
                        break;
                    }
                }
                cmd = rx.recv() => match cmd {
                    None | Some(Cmd::Stop) => return,
                    Some(Cmd::Audit(tx)) => {
                        let _ = tx.send(ClientAudit {
                            seq: st.seq,
                            epoch: st.epoch,
                            hash: st.board.as_ref().map(board_hash),
                            view: st.view.clone().zip(window.as_ref().and_then(|w| w.regions.clone())),
                            own_base: st.own_base,
                            own: st.own.clone(),
                        });
                    }
                    Some(Cmd::Toggle(index, checked)) => {
                        if !send_toggle(&mut ws, &shared, &mut pending, &mut next_id, index, checked, None).await {
                            break;
                        }
                    }
                    Some(Cmd::ToggleOwn) => {
                        // The next own box with nothing in flight; flip it.
                        if !st.connected_once || st.own.is_empty() {
                            continue;
                        }
                        let n = st.own.len();
                        let Some(k) = (0..n).map(|j| (st.own_cursor + j) % n).find(|&k| !st.own[k].pending && !st.own[k].tainted) else {
                            continue;
                        };
                        st.own_cursor = (k + 1) % n;
                        let value = !st.own[k].expected();
                        let index = st.own_base + k as u32;
                        st.own[k].pending = true;
                        if !send_toggle(&mut ws, &shared, &mut pending, &mut next_id, index, value, Some(k)).await {
                            break;
                        }
                    }
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(bytes))) => {
                        shared.frames.fetch_add(1, Ordering::Relaxed);
                        shared.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        let Ok(ServerMessage { msg: Some(msg) }) = ServerMessage::decode(bytes.as_ref()) else {
                            shared.errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let first_snapshot = !st.connected_once;
                        if handle(msg, &mut st, verify, receiver, id, &shared, &mut pending) {
                            let resync = ClientMessage { msg: Some(client_message::Msg::Resync(Resync {})) };
                            let _ = ws.send(Message::Binary(resync.encode_to_vec().into())).await;
                        }
                        if first_snapshot && st.connected_once
                            && let (Some(w), Some(view)) = (window.as_mut(), st.view.as_mut())
                            && w.regions.is_none()
                        {
                            // The first socket's Subscribe waited for the board's size.
                            let size = shared.board_size.load(Ordering::Relaxed) as u32;
                            w.scroll(size);
                            let msg = w.subscribe(size, view);
                            if ws.send(Message::Binary(msg.encode_to_vec().into())).await.is_err() {
                                break;
                            }
                        }
                        seq_out.store(st.seq, Ordering::Relaxed);
                        epoch_out.store(st.epoch, Ordering::Relaxed);
                        healthy = true;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        // The socket ended (worker restarted, drained, refused us, or we
        // dropped it): resume, backing off with jitter while the server keeps
        // refusing. What was in flight has an unknown outcome.
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        *shared.reconnects_by_client.lock().expect("lock").entry(id).or_default() += 1;
        if !healthy {
            shared.failed_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        if st.connected_once {
            shared.disrupted();
        }
        for (_, (_, _, own)) in pending.drain() {
            shared.unanswered.fetch_add(1, Ordering::Relaxed);
            if let Some(k) = own {
                st.own[k].pending = false;
                st.own[k].tainted = true;
            }
        }
        if healthy {
            backoff = Duration::from_millis(100);
        } else {
            let jitter = Duration::from_millis(u64::from(std::process::id() ^ id as u32) % 100);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Sends one toggle; false when the socket failed.
async fn send_toggle(
    ws: &mut Ws,
    shared: &Shared,
    pending: &mut Pending,
    next_id: &mut u32,
    index: u32,
    checked: bool,
    own: Option<usize>,
) -> bool {
    let request_id = *next_id;
    *next_id = next_id.wrapping_add(1).max(1);
    // In flight from here: a send that fails may still have reached the server.
    pending.insert(request_id, (Instant::now(), false, own));
    let msg = ClientMessage {
        msg: Some(client_message::Msg::Toggle(Toggle { index, checked, request_id })),
    };
    if ws.send(Message::Binary(msg.encode_to_vec().into())).await.is_err() {
        return false;
    }
    let n = shared.toggles_seen.fetch_add(1, Ordering::Relaxed);
    shared.sent.fetch_add(1, Ordering::Relaxed);
    // Sample by a hash of the count, not every Nth: a regular
    // stride aliases with the worker's tick and biases latency.
    let sampled = (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40).is_multiple_of(shared.sample_every);
    if let Some(p) = pending.get_mut(&request_id) {
        p.1 = sampled;
    }
    true
}

/// A Snapshot with its deflated bitsets (`?snapshot=deflate`) inflated;
/// `None` when one does not inflate.
fn inflated(mut s: Snapshot) -> Option<Snapshot> {
    use std::io::Read as _;
    for (z, plain) in
        [(&mut s.checked_deflate, &mut s.checked), (&mut s.frozen_deflate, &mut s.frozen)]
    {
        if !z.is_empty() {
            plain.clear();
            flate2::read::DeflateDecoder::new(&z[..]).read_to_end(plain).ok()?;
            z.clear();
        }
    }
    Some(s)
}

/// Box changes a Batch (or region frame) carries.
fn changes_in(b: &omcb_proto::v1::Batch) -> u64 {
    (b.checked.len() + b.unchecked.len() + b.frozen.len()) as u64
}

/// Box `i`'s bit in a snapshot's bitset (Redis bit order).
fn bit(bytes: &[u8], i: u32) -> bool {
    bytes.get((i >> 3) as usize).is_some_and(|b| b & (0x80 >> (i & 7)) != 0)
}

/// Applies one message; returns true when a Resync must be sent (a gap).
fn handle(
    msg: Msg,
    st: &mut State,
    verify: bool,
    receiver: bool,
    id: usize,
    shared: &Shared,
    pending: &mut Pending,
) -> bool {
    match msg {
        Msg::Snapshot(s) if s.range_count > 0 => {
            let Some(view) = st.view.as_mut() else {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            shared.range_snapshots.fetch_add(1, Ordering::Relaxed);
            let epoch = s.epoch;
            if inflated(s).and_then(|s| view.apply_snapshot(&s).ok()).is_none() {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
            st.awaiting_snapshot = false;
            st.epoch = epoch;
            st.seq = view.counts_seq;
            false
        }
        Msg::Batch(b) if b.region.is_some() || b.counts_only => {
            let Some(view) = st.view.as_mut() else {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            match view.apply_batch(&b) {
                Ok(Applied::Gap) if !st.awaiting_snapshot => {
                    st.awaiting_snapshot = true;
                    return true;
                }
                // No receipts: a region frame reaching a toggle's seq says
                // nothing of when that toggle (elsewhere, mostly) was delivered.
                Ok(Applied::Applied) if !b.counts_only => {
                    shared.changes.fetch_add(changes_in(&b), Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            st.seq = view.counts_seq;
            false
        }
        // Viewport mode: full Batches come only before the worker took the
        // Subscribe, and the client keeps no full board to apply them to.
        Msg::Batch(_) if st.view.is_some() => false,
        Msg::Snapshot(s) => {
            shared.snapshots.fetch_add(1, Ordering::Relaxed);
            if st.snapshot_on_socket {
                shared.mid_snapshots.fetch_add(1, Ordering::Relaxed);
            }
            st.snapshot_on_socket = true;
            if !st.connected_once {
                st.connected_once = true;
                shared.connected.fetch_add(1, Ordering::Relaxed);
                shared.board_size.store(u64::from(s.size), Ordering::Relaxed);
            } else if s.epoch != st.epoch {
                shared.epoch_changes.fetch_add(1, Ordering::Relaxed);
            }
            if s.epoch != st.epoch {
                // A new board: what the own boxes must be unless acknowledged anew.
                for (k, b) in st.own.iter_mut().enumerate() {
                    b.base = bit(&s.checked, st.own_base + k as u32);
                    b.base_epoch = s.epoch;
                }
            }
            st.seq = s.seq;
            st.epoch = s.epoch;
            st.awaiting_snapshot = false;
            if verify && st.view.is_none() {
                st.board = Board::from_snapshot(&s).ok();
            }
            false
        }
        Msg::Batch(b) => {
            if st.awaiting_snapshot || b.to_seq <= st.seq {
                return false;
            }
            if b.from_seq > st.seq + 1 {
                st.awaiting_snapshot = true;
                return true;
            }
            if let Some(board) = st.board.as_mut()
                && !matches!(board.apply_batch(&b), Ok(Applied::Applied))
            {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
            st.seq = b.to_seq;
            shared.changes.fetch_add(changes_in(&b), Ordering::Relaxed);
            if receiver {
                shared.receipts.lock().expect("lock").push((id, b.to_seq, Instant::now()));
            }
            false
        }
        Msg::ToggleResult(r) => {
            if let Some((sent, sampled, own)) = pending.remove(&r.request_id) {
                let us = sent.elapsed().as_micros() as u64;
                let _ = shared.result_latency.lock().expect("lock").record(us.max(1));
                if us > 1_000_000 {
                    shared.disrupted();
                }
                let unavailable = !r.accepted && r.reason == Reason::Unavailable as i32;
                if unavailable {
                    shared.disrupted();
                }
                if let Some(k) = own {
                    let b = &mut st.own[k];
                    b.pending = false;
                    if r.accepted {
                        b.ack = Some((r.checked, unix_ms(), st.epoch));
                        b.refused = None;
                    } else if unavailable {
                        b.refused = Some(!b.expected());
                    }
                }
                if r.accepted {
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                    if sampled && r.seq > 0 {
                        shared.samples.lock().expect("lock").push((r.seq, sent));
                    }
                } else if let Some(c) = shared.refused.get(r.reason as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            false
        }
        Msg::Error(_) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            false
        }
        // The board's settings (the sunset): nothing to check for the board.
        Msg::Settings(_) => false,
    }
}

/// FNV-1a over the board's seq, bitsets and counts.
pub fn board_hash(b: &Board) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(&b.seq.to_le_bytes());
    h.write(b.checked.as_raw_slice());
    h.write(b.frozen.as_raw_slice());
    h.write(&b.checked_count.to_le_bytes());
    h.write(&b.frozen_count.to_le_bytes());
    h.finish()
}

/// Picks toggle targets by pattern.
#[derive(Debug)]
pub struct Picker {
    pattern: Pattern,
    region: u32,
    rng: omcb_testkit::rng::XorShift64,
}

impl Picker {
    pub fn new(pattern: Pattern, region: u32, seed: u64) -> Self {
        Self { pattern, region: region.max(1), rng: omcb_testkit::rng::XorShift64::new(seed) }
    }

    /// The next `(index, value)` on a board of `size` boxes.
    pub fn next(&mut self, size: u32, elapsed: Duration) -> (u32, bool) {
        let r = self.rng.next_u64();
        let size64 = u64::from(size);
        let index = match self.pattern {
            Pattern::Uniform => r % size64,
            Pattern::Hot => r % u64::from(self.region.min(size)),
            // The window crosses the whole board in a minute.
            Pattern::Sweep => {
                let start = (elapsed.as_millis() as u64 * size64 / 60_000) % size64;
                (start + r % u64::from(self.region)) % size64
            }
        };
        (index as u32, r >> 63 == 1)
    }
}

/// `http://HOST:PORT` of a `ws://HOST:PORT/ws` URL.
fn http_base(url: &str) -> Option<String> {
    let rest = url.strip_prefix("ws://")?;
    Some(rest.split('/').next()?.to_string())
}

/// Where the convergence check reads the board's truth.
#[derive(Debug, Clone)]
pub enum Truth {
    /// A worker's (or nginx's) `/api/state` at `HOST:PORT`: right for the
    /// embedded store, where the worker is the store.
    Http(String),
    /// The store itself, `HOST:PORT` of Redis and the board's name: a
    /// worker whose replica went wrong cannot vouch for itself.
    Redis { addr: String, board: String },
}

impl Truth {
    /// From `--truth-redis` or else the first URL.
    pub fn new(redis: Option<&str>, board: &str, urls: &[String]) -> anyhow::Result<Self> {
        if let Some(r) = redis {
            let addr = r.strip_prefix("redis://").unwrap_or(r).trim_end_matches('/').to_string();
            return Ok(Truth::Redis { addr, board: board.to_string() });
        }
        let base = urls
            .first()
            .and_then(|u| http_base(u))
            .ok_or_else(|| anyhow::anyhow!("no ws:// URL to read /api/state from"))?;
        Ok(Truth::Http(base))
    }

    /// The board now.
    pub async fn fetch(&self) -> anyhow::Result<Board> {
        match self {
            Truth::Http(base) => {
                let r = omcb_testkit::http::get(base, "/api/state", &[]).await?;
                anyhow::ensure!(r.status == 200, "/api/state answered {}", r.status);
                Ok(Board::from_snapshot(&Snapshot::decode(r.body.as_slice())?)?)
            }
            Truth::Redis { addr, board } => redis_board(addr, board).await,
        }
    }
}

/// Reads the board from Redis in one script (one atomic view). The epoch is
/// in the config hash, or in `{B}:epoch` if a later store keeps it there.
async fn redis_board(addr: &str, board: &str) -> anyhow::Result<Board> {
    const SCRIPT: &str = "local c = redis.call('HMGET', KEYS[1], 'size', 'epoch', 'freeze_after_ms') \
        return {c[1] or '0', c[2] or redis.call('GET', KEYS[7]) or '0', c[3] or '0', \
        redis.call('GET', KEYS[2]) or '', redis.call('GET', KEYS[3]) or '', \
        redis.call('GET', KEYS[4]) or '0', redis.call('GET', KEYS[5]) or '0', redis.call('GET', KEYS[6]) or '0'}";
    let keys: Vec<String> = ["config", "bits", "frozen", "count", "frozen_count", "seq", "epoch"]
        .iter()
        .map(|k| format!("{{{board}}}:{k}"))
        .collect();
    let mut cmd: Vec<&[u8]> = vec![b"EVAL", SCRIPT.as_bytes(), b"7"];
    cmd.extend(keys.iter().map(|k| k.as_bytes()));
    let mut req = format!("*{}\r\n", cmd.len()).into_bytes();
    for a in &cmd {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(&req).await?;
    let mut r = tokio::io::BufReader::new(s);
    let parts = read_bulk_array(&mut r).await?;
    anyhow::ensure!(parts.len() == 8, "the truth script answered {} values", parts.len());
    let num = |i: usize| -> anyhow::Result<u64> {
        Ok(std::str::from_utf8(&parts[i])?.trim().parse::<u64>()?)
    };
    let size = num(0)? as u32;
    anyhow::ensure!(size > 0, "no board {board} in Redis");
    Ok(Board {
        epoch: num(1)?,
        seq: num(7)?,
        size,
        checked: omcb_proto::bits::from_bytes(&parts[3], size)?,
        frozen: omcb_proto::bits::from_bytes(&parts[4], size)?,
        checked_count: num(5)? as u32,
        frozen_count: num(6)? as u32,
        freeze_after_ms: num(2)?,
    })
}

/// An array of bulk strings (a Redis error becomes an error).
async fn read_bulk_array(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> anyhow::Result<Vec<Vec<u8>>> {
    use tokio::io::AsyncBufReadExt as _;
    async fn line(r: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> anyhow::Result<String> {
        let mut l = String::new();
        r.read_line(&mut l).await?;
        anyhow::ensure!(!l.is_empty(), "Redis closed the connection");
        Ok(l.trim_end().to_string())
    }
    let head = line(r).await?;
    let n: usize = match head.strip_prefix('*') {
        Some(n) => n.parse()?,
        None => anyhow::bail!("Redis answered {head}"),
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let h = line(r).await?;
        let len: usize = h
            .strip_prefix('$')
            .ok_or_else(|| anyhow::anyhow!("expected a bulk string, got {h}"))?
            .parse()?;
        let mut buf = vec![0; len + 2];
        r.read_exact(&mut buf).await?;
        buf.truncate(len);
        out.push(buf);
    }
    Ok(out)
}

/// What the end-of-run check found (mergeable across processes).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Audit {
    /// Clients that keep a board, and those equal to the truth (epoch, seq,
    /// bitsets, counts).
    pub verified: u64,
    pub verified_equal: u64,
    /// Clients at the truth's epoch and seq.
    pub clients: u64,
    pub clients_at_truth: u64,
    pub final_epoch: u64,
    pub final_seq: u64,
    /// Milliseconds from the end of traffic until every client was at the
    /// truth (None: not within the timeout).
    pub converge_ms: Option<u64>,
    /// Own boxes (`--own-boxes`): all, with an acknowledged toggle, and left
    /// out because a toggle on them went unanswered.
    pub own_boxes: u64,
    pub acked_boxes: u64,
    pub tainted_boxes: u64,
    /// Boxes whose last acknowledged value is gone while the board kept the
    /// epoch of the ack: a silent loss, never allowed.
    pub acks_lost_silent: u64,
    /// Boxes whose last acknowledged value is gone with a new epoch since:
    /// the loss was announced. Unix ms of the oldest and newest such ack.
    pub acks_lost_new_epoch: u64,
    pub lost_ack_oldest_ms: Option<u64>,
    pub lost_ack_newest_ms: Option<u64>,
    /// Boxes holding the value of a toggle that was refused `UNAVAILABLE`.
    pub refused_applied: u64,
    /// Boxes that changed with no toggle from their owner that could explain it.
    pub phantom_changes: u64,
    pub detail: String,
}

impl Audit {
    /// Combines two processes' audits (the truth is the same board).
    pub fn merge(mut self, o: Audit) -> Audit {
        self.verified += o.verified;
        self.verified_equal += o.verified_equal;
        self.clients += o.clients;
        self.clients_at_truth += o.clients_at_truth;
        self.final_epoch = self.final_epoch.max(o.final_epoch);
        self.final_seq = self.final_seq.max(o.final_seq);
        self.converge_ms = match (self.converge_ms, o.converge_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        self.own_boxes += o.own_boxes;
        self.acked_boxes += o.acked_boxes;
        self.tainted_boxes += o.tainted_boxes;
        self.acks_lost_silent += o.acks_lost_silent;
        self.acks_lost_new_epoch += o.acks_lost_new_epoch;
        let min = |a: Option<u64>, b: Option<u64>| a.into_iter().chain(b).min();
        let max = |a: Option<u64>, b: Option<u64>| a.into_iter().chain(b).max();
        self.lost_ack_oldest_ms = min(self.lost_ack_oldest_ms, o.lost_ack_oldest_ms);
        self.lost_ack_newest_ms = max(self.lost_ack_newest_ms, o.lost_ack_newest_ms);
        self.refused_applied += o.refused_applied;
        self.phantom_changes += o.phantom_changes;
        if self.detail.is_empty() || !o.detail.is_empty() && !o.converged() {
            self.detail = o.detail.clone();
        }
        self
    }

    /// Every client at the truth and every verifying client equal to it.
    pub fn converged(&self) -> bool {
        self.clients > 0
            && self.clients_at_truth == self.clients
            && self.verified_equal == self.verified
    }

    /// Checks one own box against its final value on the board.
    fn own_box(&mut self, b: &OwnBox, final_value: bool, final_epoch: u64) {
        self.own_boxes += 1;
        if b.tainted {
            self.tainted_boxes += 1;
            return;
        }
        let Some((value, at, epoch)) = b.ack else {
            if final_value != b.base && b.base_epoch == final_epoch {
                if b.refused == Some(final_value) {
                    self.refused_applied += 1;
                } else {
                    self.phantom_changes += 1;
                }
            }
            return;
        };
        self.acked_boxes += 1;
        if final_value == value {
            return;
        }
        if b.refused == Some(final_value) {
            self.refused_applied += 1;
        } else if epoch == final_epoch {
            self.acks_lost_silent += 1;
        } else {
            self.acks_lost_new_epoch += 1;
            self.lost_ack_oldest_ms = Some(self.lost_ack_oldest_ms.map_or(at, |o| o.min(at)));
            self.lost_ack_newest_ms = Some(self.lost_ack_newest_ms.map_or(at, |o| o.max(at)));
        }
    }
}

/// How a viewport client's regions differ from the board, if they do: it
/// must hold exactly the regions it asked for last, each box as the board has it.
fn view_differs(view: &View, regions: &std::ops::Range<u32>, truth: &Board) -> Option<String> {
    if view.epoch != truth.epoch || !view.regions().eq(regions.clone()) {
        return Some(format!(
            "a viewport client holds regions {:?} at epoch {}, asked for {regions:?} at epoch {}",
            view.regions().collect::<Vec<_>>(),
            view.epoch,
            truth.epoch
        ));
    }
    let (first, count) = omcb_proto::view::boxes(regions, truth.size);
    (first..first + count)
        .find(|&i| {
            view.is_checked(i) != Some(truth.is_checked(i))
                || view.is_frozen(i) != Some(truth.is_frozen(i))
        })
        .map(|i| format!("a viewport client's box {i} differs from the board at seq {}", truth.seq))
}

/// Waits (up to `timeout` s) for every client to reach the truth's epoch and
/// seq, then compares each verifying client's board with it and audits
/// every own box against it.
pub async fn converge(truth: &Truth, clients: &[ClientHandle], timeout: f64) -> Audit {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(timeout);
    let at = |c: &ClientHandle, b: &Board| {
        c.seq.load(Ordering::Relaxed) == b.seq && c.epoch.load(Ordering::Relaxed) == b.epoch
    };
    let mut last: Option<Board> = None;
    let mut why = String::new();
    let mut converge_ms = None;
    loop {
        match truth.fetch().await {
            Ok(b) => {
                if clients.iter().all(|c| at(c, &b)) {
                    // Once more after a tick: nothing was still in flight.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(again) = truth.fetch().await
                        && again.seq == b.seq
                        && again.epoch == b.epoch
                        && clients.iter().all(|c| at(c, &again))
                    {
                        converge_ms = Some(started.elapsed().as_millis() as u64);
                        last = Some(again);
                        break;
                    }
                }
                last = Some(b);
            }
            Err(e) => why = format!("reading the truth: {e:#}"),
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut audit = Audit { clients: clients.len() as u64, converge_ms, ..Audit::default() };
    let Some(truth) = last else {
        audit.detail = if why.is_empty() { "no truth".into() } else { why };
        audit.verified = clients.iter().filter(|c| c.verify).count() as u64;
        return audit;
    };
    audit.final_epoch = truth.epoch;
    audit.final_seq = truth.seq;
    let want = board_hash(&truth);
    let mut example = None;
    // A client answers between messages of a socket: one still trying to
    // connect (nginx answering 502 for ever) must not hang the run, so all
    // are asked at once and given 5 s.
    let answers = futures_util::future::join_all(
        clients.iter().map(|c| tokio::time::timeout(Duration::from_secs(5), c.audit())),
    )
    .await;
    for (c, answer) in clients.iter().zip(answers) {
        let Ok(answer) = answer else {
            example.get_or_insert_with(|| "a client had no socket to answer from".to_string());
            continue;
        };
        let Some(a) = answer else {
            example.get_or_insert_with(|| "a client task ended early".to_string());
            continue;
        };
        if a.seq == truth.seq && a.epoch == truth.epoch {
            audit.clients_at_truth += 1;
        }
        if let Some((view, regions)) = &a.view {
            if c.verify {
                audit.verified += 1;
                match view_differs(view, regions, &truth) {
                    None => audit.verified_equal += 1,
                    Some(why) => {
                        example.get_or_insert(why);
                    }
                }
            }
        } else if c.verify {
            audit.verified += 1;
            if a.hash == Some(want) && a.epoch == truth.epoch {
                audit.verified_equal += 1;
            } else {
                example.get_or_insert_with(|| {
                    format!(
                        "a client at epoch {} seq {} differs from the board at epoch {} seq {}",
                        a.epoch, a.seq, truth.epoch, truth.seq
                    )
                });
            }
        }
        for (k, b) in a.own.iter().enumerate() {
            audit.own_box(b, truth.is_checked(a.own_base + k as u32), truth.epoch);
        }
    }
    audit.detail = match example {
        Some(e) if !audit.converged() => format!(
            "{} of {} clients at the board's epoch and seq {}, {} of {} verified equal; e.g. {e}",
            audit.clients_at_truth, audit.clients, truth.seq, audit.verified_equal, audit.verified
        ),
        _ => format!("{} clients equal the board at seq {}", audit.verified_equal, truth.seq),
    };
    audit
}

#[cfg(test)]
mod tests {
    use super::*;

    const E1: u64 = 11;
    const E2: u64 = 22;

    fn acked(value: bool, at: u64, epoch: u64) -> OwnBox {
        OwnBox { base: false, base_epoch: E1, ack: Some((value, at, epoch)), ..OwnBox::default() }
    }

    #[test]
    fn audit_tells_kept_silent_announced_and_unexplained_changes_apart() {
        let mut a = Audit::default();
        // Kept: the board holds the last ack.
        a.own_box(&acked(true, 5, E1), true, E1);
        // Lost with the epoch unchanged: silent.
        a.own_box(&acked(true, 6, E1), false, E1);
        // Lost, but the board moved to a new epoch since the ack: announced.
        a.own_box(&acked(true, 7, E1), false, E2);
        a.own_box(&acked(true, 3, E1), false, E2);
        // Refused UNAVAILABLE and applied all the same.
        a.own_box(&OwnBox { refused: Some(false), ..acked(true, 8, E1) }, false, E1);
        // Never acknowledged, yet changed in the same epoch: a phantom.
        a.own_box(&OwnBox { base_epoch: E1, ..OwnBox::default() }, true, E1);
        // Unknown outcome: left out.
        a.own_box(&OwnBox { tainted: true, ..acked(true, 9, E1) }, false, E1);
        assert_eq!(a.own_boxes, 7);
        assert_eq!(a.acked_boxes, 5);
        assert_eq!(a.tainted_boxes, 1);
        assert_eq!(a.acks_lost_silent, 1);
        assert_eq!(a.acks_lost_new_epoch, 2);
        assert_eq!((a.lost_ack_oldest_ms, a.lost_ack_newest_ms), (Some(3), Some(7)));
        assert_eq!(a.refused_applied, 1);
        assert_eq!(a.phantom_changes, 1);
    }

    #[test]
    fn audits_merge_across_processes() {
        let one = Audit {
            verified: 2,
            verified_equal: 2,
            clients: 2,
            clients_at_truth: 2,
            converge_ms: Some(10),
            lost_ack_oldest_ms: Some(5),
            ..Audit::default()
        };
        let two = Audit {
            verified: 1,
            verified_equal: 0,
            clients: 1,
            clients_at_truth: 1,
            converge_ms: None,
            lost_ack_oldest_ms: Some(3),
            detail: "a client differs".into(),
            ..Audit::default()
        };
        let m = one.merge(two);
        assert_eq!((m.verified, m.verified_equal, m.clients), (3, 2, 3));
        assert!(!m.converged());
        assert_eq!(m.converge_ms, None, "not every process converged in time");
        assert_eq!(m.lost_ack_oldest_ms, Some(3));
        assert_eq!(m.detail, "a client differs");
    }
}
