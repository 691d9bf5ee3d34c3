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
    ClientMessage, Resync, ServerMessage, Snapshot, Toggle, client_message, server_message::Msg,
};
use omcb_proto::{Applied, Board};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
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
    pub reconnects: AtomicU64,
    pub snapshots: AtomicU64,
    pub errors: AtomicU64,
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
            reconnects: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            errors: AtomicU64::new(0),
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
        self.receipts.lock().expect("lock").clear();
    }
}

enum Cmd {
    Toggle(u32, bool),
    Report(oneshot::Sender<(u64, Option<u64>)>),
    Stop,
}

/// The handle the driver keeps for each client.
#[derive(Debug)]
pub struct ClientHandle {
    tx: mpsc::UnboundedSender<Cmd>,
    /// The client's seq, for the convergence wait.
    pub seq: Arc<AtomicU64>,
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

    async fn report(&self) -> Option<(u64, Option<u64>)> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Report(tx)).ok()?;
        rx.await.ok()
    }
}

/// Starts a client task.
pub fn spawn(
    url: String,
    source: Ipv4Addr,
    receiver: bool,
    verify: bool,
    shared: Arc<Shared>,
) -> ClientHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let seq = Arc::new(AtomicU64::new(0));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed) as usize;
    tokio::spawn(client(url, source, id, receiver, verify, shared, rx, seq.clone()));
    ClientHandle { tx, seq, verify }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(url: &str, source: Ipv4Addr) -> anyhow::Result<Ws> {
    let rest =
        url.strip_prefix("ws://").ok_or_else(|| anyhow::anyhow!("only ws:// URLs: {url}"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = tokio::net::lookup_host(hostport)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {hostport}"))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
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
}

#[allow(clippy::too_many_arguments)]
async fn client(
    url: String,
    source: Ipv4Addr,
    id: usize,
    receiver: bool,
    verify: bool,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    seq_out: Arc<AtomicU64>,
) {
    let mut st =
        State { board: None, seq: 0, epoch: 0, awaiting_snapshot: false, connected_once: false };
    let mut pending: HashMap<u32, (Instant, bool)> = HashMap::new();
    let mut next_id: u32 = 1;
    let mut backoff = Duration::from_millis(100);
    loop {
        let full = if st.connected_once {
            format!("{url}?since={}&epoch={}", st.seq, st.epoch)
        } else {
            url.clone()
        };
        let mut ws = match connect(&full, source).await {
            Ok(ws) => ws,
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut healthy = false;
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None | Some(Cmd::Stop) => return,
                    Some(Cmd::Report(tx)) => {
                        let hash = st.board.as_ref().map(board_hash);
                        let _ = tx.send((st.seq, hash));
                    }
                    Some(Cmd::Toggle(index, checked)) => {
                        let request_id = next_id;
                        next_id = next_id.wrapping_add(1).max(1);
                        let msg = ClientMessage { msg: Some(client_message::Msg::Toggle(Toggle { index, checked, request_id })) };
                        if ws.send(Message::Binary(msg.encode_to_vec().into())).await.is_err() {
                            break;
                        }
                        let n = shared.toggles_seen.fetch_add(1, Ordering::Relaxed);
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                        // Sample by a hash of the count, not every Nth: a regular
                        // stride aliases with the worker's tick and biases latency.
                        let sampled = (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40).is_multiple_of(shared.sample_every);
                        pending.insert(request_id, (Instant::now(), sampled));
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
                        if handle(msg, &mut st, verify, receiver, id, &shared, &mut pending) {
                            let resync = ClientMessage { msg: Some(client_message::Msg::Resync(Resync {})) };
                            let _ = ws.send(Message::Binary(resync.encode_to_vec().into())).await;
                        }
                        seq_out.store(st.seq, Ordering::Relaxed);
                        healthy = true;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        // The socket ended (worker restarted, drained, refused us): resume,
        // backing off with jitter while the server keeps refusing.
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        pending.clear();
        if healthy {
            backoff = Duration::from_millis(100);
        } else {
            let jitter = Duration::from_millis(u64::from(std::process::id() ^ id as u32) % 100);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Applies one message; returns true when a Resync must be sent (a gap).
fn handle(
    msg: Msg,
    st: &mut State,
    verify: bool,
    receiver: bool,
    id: usize,
    shared: &Shared,
    pending: &mut HashMap<u32, (Instant, bool)>,
) -> bool {
    match msg {
        Msg::Snapshot(s) => {
            shared.snapshots.fetch_add(1, Ordering::Relaxed);
            if !st.connected_once {
                st.connected_once = true;
                shared.connected.fetch_add(1, Ordering::Relaxed);
                shared.board_size.store(u64::from(s.size), Ordering::Relaxed);
            }
            st.seq = s.seq;
            st.epoch = s.epoch;
            st.awaiting_snapshot = false;
            if verify {
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
            if receiver {
                shared.receipts.lock().expect("lock").push((id, b.to_seq, Instant::now()));
            }
            false
        }
        Msg::ToggleResult(r) => {
            if let Some((sent, sampled)) = pending.remove(&r.request_id) {
                let us = sent.elapsed().as_micros() as u64;
                let _ = shared.result_latency.lock().expect("lock").record(us.max(1));
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
    }
}

/// FNV-1a over the board's seq, bitsets and counts.
pub fn board_hash(b: &Board) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &x in bytes {
            h = (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&b.seq.to_le_bytes());
    eat(b.checked.as_raw_slice());
    eat(b.frozen.as_raw_slice());
    eat(&b.checked_count.to_le_bytes());
    eat(&b.frozen_count.to_le_bytes());
    h
}

/// Picks toggle targets by pattern.
#[derive(Debug)]
pub struct Picker {
    pattern: Pattern,
    region: u32,
    rng: omcb_proto::rng::XorShift64,
}

impl Picker {
    pub fn new(pattern: Pattern, region: u32, seed: u64) -> Self {
        Self { pattern, region: region.max(1), rng: omcb_proto::rng::XorShift64::new(seed) }
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

/// A GET over HTTP/1.0 (no chunking, the server closes): status and body.
async fn get(hostport: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = tokio::net::TcpStream::connect(hostport).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end"))?;
    let status = String::from_utf8_lossy(&raw[..split]).split(' ').nth(1).unwrap_or("0").parse()?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// Waits for every client to reach the board's final seq, then compares each
/// verifying client's board with `/api/state`.
pub async fn converge(
    urls: &[String],
    clients: &[ClientHandle],
    _shared: &Shared,
    timeout: f64,
) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let bases: Vec<String> = urls.iter().filter_map(|u| http_base(u)).collect();
    // The final seq: every endpoint agrees (workers have published everything).
    let final_seq = loop {
        let mut seqs = Vec::new();
        for b in &bases {
            if let Ok((200, body)) = get(b, "/api/stats").await
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
            {
                seqs.push(v["seq"].as_u64().unwrap_or(0));
            }
        }
        if !seqs.is_empty() && seqs.iter().all(|s| *s == seqs[0]) {
            tokio::time::sleep(Duration::from_millis(200)).await; // one more tick: nothing in flight
            let mut again = Vec::new();
            for b in &bases {
                if let Ok((200, body)) = get(b, "/api/stats").await
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                {
                    again.push(v["seq"].as_u64().unwrap_or(0));
                }
            }
            if again == seqs {
                break seqs[0];
            }
        }
        if Instant::now() > deadline {
            return (false, format!("endpoints never agreed on a seq: {seqs:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    while clients.iter().any(|c| c.seq.load(Ordering::Relaxed) < final_seq) {
        if Instant::now() > deadline {
            let behind =
                clients.iter().filter(|c| c.seq.load(Ordering::Relaxed) < final_seq).count();
            return (false, format!("{behind} clients never reached seq {final_seq}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The truth (nginx may micro-cache /api/state for a second: poll).
    let truth = loop {
        if let Ok((200, body)) = get(&bases[0], "/api/state").await
            && let Ok(s) = Snapshot::decode(body.as_slice())
            && s.seq == final_seq
        {
            break Board::from_snapshot(&s).ok();
        }
        if Instant::now() > deadline {
            return (false, "never got /api/state at the final seq".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let Some(truth) = truth else { return (false, "/api/state was not a valid snapshot".into()) };
    let want = board_hash(&truth);
    let mut checked = 0;
    for c in clients.iter().filter(|c| c.verify) {
        match c.report().await {
            Some((seq, Some(h))) if seq == final_seq && h == want => checked += 1,
            Some((seq, _)) => {
                return (
                    false,
                    format!("a client at seq {seq} differs from the board at {final_seq}"),
                );
            }
            None => return (false, "a client task ended early".into()),
        }
    }
    (true, format!("{checked} clients equal the board at seq {final_seq}"))
}
