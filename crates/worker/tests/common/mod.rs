//! Test harness: the real `omcb` binary on port 0, a real WebSocket client
//! (tokio-tungstenite, a different implementation from the server's), and
//! omcb-testkit's HTTP client and `poll`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use omcb_proto::v1::{ClientMessage, ServerMessage, Toggle, client_message, server_message::Msg};
use omcb_proto::{Applied, Board};
pub use omcb_testkit::WorkerProcess;
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

pub mod fleet;

pub use omcb_testkit::http::HttpResponse;
pub use omcb_testkit::{WAIT, poll};

/// Splits a flag string ("--board-size 1000 --batch-ms 2") into arguments.
pub fn flags(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// A running `omcb serve` (omcb-testkit's process harness) plus the HTTP
/// helpers these tests use.
pub struct Worker(pub WorkerProcess);

impl std::ops::Deref for Worker {
    type Target = WorkerProcess;
    fn deref(&self) -> &WorkerProcess {
        &self.0
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut WorkerProcess {
        &mut self.0
    }
}

impl Worker {
    /// Starts a worker with its own temp data dir and extra flags.
    pub fn start(args: &[&str]) -> Worker {
        Worker(WorkerProcess::start(env!("CARGO_BIN_EXE_omcb"), None, args).unwrap())
    }

    /// Starts a worker on an existing data dir (restarts).
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Worker {
        Worker(WorkerProcess::start(env!("CARGO_BIN_EXE_omcb"), Some(data_dir), args).unwrap())
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{}", self.addr, query)
    }

    pub async fn stats(&self) -> serde_json::Value {
        stats(self.addr).await.expect("/api/stats answers 200")
    }

    /// Polls `/api/stats` until the worker's replica has published `seq`
    /// (batches go out on the tick, so the replica trails a ToggleResult).
    pub async fn stats_at(&self, seq: u64) -> serde_json::Value {
        poll("the replica to reach the seq", || async {
            let s = self.stats().await;
            (s["seq"].as_u64().unwrap() >= seq).then_some(s)
        })
        .await
    }

    pub async fn metrics_text(&self) -> String {
        String::from_utf8(http_get(self.metrics, "/metrics", &[]).await.body).unwrap()
    }

    /// The value of one metric series (`name{labels}` exactly as rendered), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

/// GET over a fresh connection (`Connection: close`), enough for tests.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    omcb_testkit::http::get(&addr.to_string(), path, headers).await.unwrap()
}

/// `/api/stats` of the worker at `addr`; `None` unless it answers 200 within
/// 2 s (it may be gone: a test killed it).
pub async fn stats(addr: SocketAddr) -> Option<serde_json::Value> {
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        omcb_testkit::http::get(&addr.to_string(), "/api/stats", &[]),
    )
    .await
    .ok()?
    .ok()?;
    (r.status == 200).then(|| serde_json::from_slice(&r.body).unwrap())
}

type Ws = tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>;

/// What a client saw end its connection.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(Option<u16>),
    Eof,
}

/// A WebSocket client that keeps a board by the convergence rule.
pub struct Client<S = Ws> {
    pub ws: tokio_tungstenite::WebSocketStream<S>,
    pub board: Option<Board>,
    /// Batches seen, for gap checks: (from, to).
    pub batches: Vec<(u64, u64)>,
    pub snapshots: usize,
    pub gaps: usize,
    /// The board's `freeze_after_ms` as the last Snapshot or Settings said.
    pub freeze_after_ms: Option<u64>,
    /// A subscribed client's regions (docs/PROTOCOL.md, "Viewport
    /// subscriptions"), kept by the viewport rule; set by the first range
    /// Snapshot, with `board` then `None`.
    pub view: Option<omcb_proto::view::View>,
    next_request: u32,
}

pub async fn connect(url: &str) -> Client {
    let (ws, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    Client::new(ws)
}

/// A client with a tiny receive buffer, so the server's writes back up quickly.
pub async fn connect_small_buffer(addr: SocketAddr, path: &str) -> Client<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}{path}"), stream).await.unwrap();
    Client::new(ws)
}

impl<S> Client<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    pub fn new(ws: tokio_tungstenite::WebSocketStream<S>) -> Self {
        Client {
            ws,
            board: None,
            batches: Vec::new(),
            snapshots: 0,
            gaps: 0,
            freeze_after_ms: None,
            view: None,
            next_request: 1,
        }
    }

    /// The next server message (skipping pings and `Settings`, which
    /// [`until_freeze_after`](Self::until_freeze_after) waits for), or how
    /// the connection ended.
    pub async fn next(&mut self) -> Result<Msg, Ended> {
        loop {
            match self.next_any().await? {
                Msg::Settings(_) => continue,
                msg => return Ok(msg),
            }
        }
    }

    /// Reads until the board's `freeze_after_ms` (from a Snapshot or a
    /// Settings message) is `ms`.
    pub async fn until_freeze_after(&mut self, ms: u64) {
        while self.freeze_after_ms != Some(ms) {
            self.next_any().await.expect("connection open");
        }
    }

    /// The next server message of any kind (skipping pings).
    pub async fn next_any(&mut self) -> Result<Msg, Ended> {
        loop {
            let m =
                tokio::time::timeout(WAIT, self.ws.next()).await.expect("server message in time");
            match m {
                None => return Err(Ended::Eof),
                Some(Err(_)) => return Err(Ended::Eof),
                Some(Ok(Message::Binary(b))) => {
                    let msg = ServerMessage::decode(b.as_ref())
                        .expect("valid ServerMessage")
                        .msg
                        .expect("msg set");
                    self.observe(&msg);
                    return Ok(msg);
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(Ended::Closed(frame.map(|f: CloseFrame| u16::from(f.code))));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn recv(&mut self) -> Msg {
        self.next().await.expect("connection open")
    }

    /// Applies snapshots and batches to the board by the convergence rule.
    fn observe(&mut self, msg: &Msg) {
        match msg {
            Msg::Settings(s) => self.freeze_after_ms = Some(s.freeze_after_ms),
            Msg::Snapshot(s) if s.range_count > 0 => {
                self.freeze_after_ms = Some(s.freeze_after_ms);
                self.snapshots += 1;
                self.board = None;
                let view = self.view.get_or_insert_with(Default::default);
                view.apply_snapshot(&inflate_snapshot(s)).expect("valid range snapshot");
            }
            Msg::Snapshot(s) => {
                self.freeze_after_ms = Some(s.freeze_after_ms);
                self.snapshots += 1;
                let s = inflate_snapshot(s);
                self.board = Some(Board::from_snapshot(&s).expect("valid snapshot"));
                self.view = None;
            }
            Msg::Batch(b) if b.region.is_some() || b.counts_only => {
                self.batches.push((b.from_seq, b.to_seq));
                if let Some(view) = self.view.as_mut() {
                    match view.apply_batch(b).expect("valid region or counts frame") {
                        Applied::Gap => self.gaps += 1,
                        Applied::Stale | Applied::Applied => {}
                    }
                }
            }
            Msg::Batch(b) => {
                self.batches.push((b.from_seq, b.to_seq));
                if let Some(board) = self.board.as_mut() {
                    match board.apply_batch(b).expect("valid batch") {
                        Applied::Gap => self.gaps += 1,
                        Applied::Stale | Applied::Applied => {}
                    }
                }
            }
            _ => {}
        }
    }

    pub async fn send_msg(&mut self, msg: client_message::Msg) {
        let bytes = ClientMessage { msg: Some(msg) }.encode_to_vec();
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    /// Sends `Subscribe{first, count}` for a board of `size` boxes, and
    /// forgets the regions outside it as the viewport rule says.
    pub async fn subscribe(&mut self, first: u32, count: u32, size: u32) {
        let regions = omcb_proto::view::subscription(first, count, size).expect("a valid range");
        match regions {
            Some(r) => self.view.get_or_insert_with(Default::default).subscribe(Some(&r)),
            None => self.view = None,
        }
        let s = omcb_proto::v1::Subscribe { first, count };
        self.send_msg(client_message::Msg::Subscribe(s)).await;
    }

    /// Sends a toggle; returns its request id.
    pub async fn toggle(&mut self, index: u32, checked: bool) -> u32 {
        let id = self.next_request;
        self.next_request += 1;
        self.send_msg(client_message::Msg::Toggle(Toggle { index, checked, request_id: id })).await;
        id
    }

    /// Reads until the ToggleResult for `id` (applying everything on the way).
    pub async fn result_for(&mut self, id: u32) -> omcb_proto::v1::ToggleResult {
        loop {
            if let Msg::ToggleResult(r) = self.recv().await
                && r.request_id == id
            {
                return r;
            }
        }
    }

    /// Toggle and wait for the answer.
    pub async fn set(&mut self, index: u32, checked: bool) -> omcb_proto::v1::ToggleResult {
        let id = self.toggle(index, checked).await;
        self.result_for(id).await
    }

    /// Reads until the board is at `seq` or later.
    pub async fn until_seq(&mut self, seq: u64) {
        let deadline = Instant::now() + WAIT;
        while self.board.as_ref().is_none_or(|b| b.seq < seq) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.next()).await {
                Ok(Ok(_)) => {}
                outcome => panic!(
                    "client stuck at seq {} short of {seq} ({outcome:?}; {} snapshots, {} gaps, last batches {:?})",
                    self.seq(),
                    self.snapshots,
                    self.gaps,
                    &self.batches[self.batches.len().saturating_sub(5)..],
                ),
            }
        }
    }

    /// Reads until the connection ends; returns the close code.
    pub async fn until_closed(&mut self) -> Ended {
        loop {
            if let Err(e) = self.next().await {
                return e;
            }
        }
    }

    pub fn seq(&self) -> u64 {
        self.board.as_ref().map_or(0, |b| b.seq)
    }
}

/// A Snapshot with any deflated bitsets (`/ws?snapshot=deflate`) inflated
/// into `checked` and `frozen`, as a client that asked for them does.
pub fn inflate_snapshot(s: &omcb_proto::v1::Snapshot) -> omcb_proto::v1::Snapshot {
    let inflate = |z: &[u8], plain: &[u8]| {
        if z.is_empty() {
            return plain.to_vec();
        }
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::DeflateDecoder::new(z), &mut out)
            .expect("valid raw deflate");
        out
    };
    omcb_proto::v1::Snapshot {
        checked: inflate(&s.checked_deflate, &s.checked),
        frozen: inflate(&s.frozen_deflate, &s.frozen),
        checked_deflate: Vec::new(),
        frozen_deflate: Vec::new(),
        ..s.clone()
    }
}

/// The bare Snapshot of `GET /api/state`.
pub async fn api_state(addr: SocketAddr) -> (omcb_proto::v1::Snapshot, HttpResponse) {
    let r = http_get(addr, "/api/state", &[]).await;
    assert_eq!(r.status, 200);
    (omcb_proto::v1::Snapshot::decode(r.body.as_slice()).unwrap(), r)
}

/// Runs `cmd` (an `omcb` that must refuse to start) and waits, within
/// [`WAIT`], for it to exit; panics, with its stderr, if it still runs then.
pub fn refuses_to_start(mut cmd: std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} still runs after {WAIT:?}: it must refuse at start\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The user data sections a dry run of `scripts/provision up` printed, by role.
pub fn dry_run_user_data(out: &str) -> std::collections::BTreeMap<String, String> {
    let mut found = std::collections::BTreeMap::new();
    let mut lines = out.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("# ---- user data for omcb-") else { continue };
        let role = rest.split_whitespace().next().unwrap().to_string();
        let end = format!("# ---- end of user data for omcb-{role} ----");
        let mut text = String::new();
        for l in lines.by_ref().take_while(|l| *l != end) {
            text.push_str(l);
            text.push('\n');
        }
        found.insert(role, text);
    }
    found
}
