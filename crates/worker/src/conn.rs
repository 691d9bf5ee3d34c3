//! One WebSocket connection: a reader that validates and answers client
//! messages, and a writer that sends what the hub publishes.
//!
//! The two halves run as two tasks joined by a small channel, because reading a
//! frame is not cancel-safe (it cannot sit in a `select!` beside the fan-out)
//! and a socket that stops reading must never stall the toggles of others.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{
    Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketRead, WebSocketWrite,
};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use omcb_proto::v1::{
    self, ClientMessage, Code, Reason, ToggleResult, client_message, server_message,
};
use omcb_store::SetOutcome;
use prost::Message;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{broadcast, mpsc};

use crate::App;
use crate::hub::{Published, Start};
use crate::ratelimit::TokenBucket;

type Io = TokioIo<Upgraded>;

/// Close codes of PROTOCOL.md.
pub mod close {
    /// The worker is going away (shutdown, restart).
    pub const RESTART: u16 = 1012;
    /// Over the connection limit: try again later.
    pub const TRY_AGAIN: u16 = 1013;
    /// A text frame.
    pub const UNSUPPORTED: u16 = 1003;
    /// An undecodable message.
    pub const INVALID: u16 = 1007;
    /// Persistent abuse (rate).
    pub const POLICY: u16 = 1008;
    /// Frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// Protocol violation (e.g. a stray continuation frame).
    pub const PROTOCOL: u16 = 1002;
    /// The client went silent past the idle limit.
    pub const GOING_AWAY: u16 = 1001;
    /// Could not keep up even with snapshots: reconnect later.
    pub const TOO_SLOW: u16 = 1013;
}

/// How long a resuming client that is ahead of this worker's replica (it came
/// from another worker of the fleet) waits for the replica before it gets a
/// snapshot instead. Replicas trail each other by one feed read, milliseconds.
const RESUME_PATIENCE: Duration = Duration::from_millis(500);

/// How long a closing socket waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What the reader asks the writer to do.
#[derive(Debug)]
enum Ctl {
    /// Send this encoded `ServerMessage`.
    Send(Bytes),
    /// A control frame fastwebsockets obliges us to send (pong, close echo).
    Raw(OpCode, Vec<u8>),
    /// The client asked for a fresh snapshot.
    Resync,
    /// Send a close frame with this code and stop.
    Close(u16, &'static str),
}

/// Where a client asked to resume from (`/ws?since=S&epoch=E`).
pub fn parse_resume(query: Option<&str>) -> Option<(u64, u64)> {
    let (mut since, mut epoch) = (None, None);
    for pair in query?.split('&') {
        match pair.split_once('=') {
            Some(("since", v)) => since = v.parse().ok(),
            Some(("epoch", v)) => epoch = v.parse().ok(),
            _ => {}
        }
    }
    Some((epoch?, since?))
}

/// Counts a socket for `--max-connections`, `--max-connections-per-ip` and
/// the shutdown drain; uncounts on drop.
#[derive(Debug)]
pub struct SocketSlot {
    app: Arc<App>,
    /// The client's address (after trusted `X-Forwarded-For`).
    ip: IpAddr,
    /// Whether this socket was over a limit when it arrived (it still needs its 1013).
    pub over_limit: bool,
}

impl SocketSlot {
    /// Takes a slot, even over a limit: the socket still needs its 1013.
    pub fn take(app: Arc<App>, ip: IpAddr) -> Self {
        let before = app.sockets.fetch_add(1, Ordering::SeqCst);
        let per_ip = {
            let mut map = app.sockets_per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_insert(0);
            *n += 1;
            *n
        };
        let cap = app.config.max_connections_per_ip;
        let over_limit = before >= app.config.max_connections || (cap > 0 && per_ip > cap);
        if !over_limit {
            app.metrics.connections.increment(1.0);
        }
        Self { app, ip, over_limit }
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        if !self.over_limit {
            self.app.metrics.connections.decrement(1.0);
        }
        {
            let mut map = self.app.sockets_per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
        if self.app.sockets.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.app.sockets_gone.notify_waiters();
        }
    }
}

/// Serves one upgraded connection to its end.
pub async fn serve(app: Arc<App>, slot: SocketSlot, ws: WebSocket<Io>, resume: Option<(u64, u64)>) {
    let mut ws = ws;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    // fastwebsockets refuses frames of at least this many bytes.
    ws.set_max_message_size(app.config.max_frame + 1);
    let (mut rd, wr) = ws.split(tokio::io::split);
    let mut out = Out { ws: wr, timeout: app.config.send_timeout, app: app.clone() };
    if slot.over_limit {
        app.metrics.connections_over_limit.increment(1);
        let _ = out.close(close::TRY_AGAIN, "over capacity").await;
        return;
    }
    app.metrics.connections_opened.increment(1);
    let (ctl_tx, ctl_rx) = mpsc::channel(32);
    let mut writer = tokio::spawn(write_loop(app.clone(), out, ctl_rx, resume));
    tokio::select! {
        () = read_loop(&app, &mut rd, ctl_tx) => {
            // The reader queued whatever must still go out (an Error, a close);
            // give the writer a moment to send it.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
            writer.abort();
        }
        _ = &mut writer => {}
    }
    linger(&mut rd).await;
    drop(slot);
}

/// After our close frame the client answers with its own (RFC 6455 5.5.1).
/// Closing the TCP connection before reading that answer makes the kernel
/// reset it, and a reset can make the client drop our close frame unread (a
/// browser then reports 1006 instead of, say, 1012). So read, and discard,
/// until the client's close, an error, or `CLOSE_LINGER`.
async fn linger(rd: &mut WebSocketRead<ReadHalf<Io>>) {
    let mut discard = |_: Frame<'_>| std::future::ready(Ok::<(), std::io::Error>(()));
    let until_close = async {
        while let Ok(frame) = rd.read_frame(&mut discard).await {
            if frame.opcode == OpCode::Close {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, until_close).await;
}

/// Why a writer stopped.
#[derive(Debug)]
enum End {
    /// The socket failed.
    Io,
    /// A write did not finish within the send timeout.
    TooSlow,
}

/// The write half, with the send timeout and accounting every write needs.
struct Out {
    ws: WebSocketWrite<WriteHalf<Io>>,
    timeout: Duration,
    app: Arc<App>,
}

impl Out {
    async fn frame(&mut self, frame: Frame<'_>) -> Result<(), End> {
        let len = frame.payload.len();
        match tokio::time::timeout(self.timeout, self.ws.write_frame(frame)).await {
            Ok(Ok(())) => {
                self.app.metrics.frames_sent.increment(1);
                self.app.metrics.bytes_sent.increment(len as u64);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Io),
            Err(_) => {
                self.app.metrics.slow_closed.increment(1);
                Err(End::TooSlow)
            }
        }
    }

    async fn binary(&mut self, bytes: &[u8]) -> Result<(), End> {
        self.frame(Frame::binary(Payload::Borrowed(bytes))).await
    }

    async fn close(&mut self, code: u16, reason: &str) -> Result<(), End> {
        self.frame(Frame::close(code, reason.as_bytes())).await
    }
}

/// Sends the start (snapshot or resumed batches), then everything the hub
/// publishes, replies the reader queues, and pings.
async fn write_loop(
    app: Arc<App>,
    mut out: Out,
    mut ctl: mpsc::Receiver<Ctl>,
    resume: Option<(u64, u64)>,
) {
    if let Err(end) = write_loop_inner(&app, &mut out, &mut ctl, resume).await {
        tracing::debug!(?end, "socket writer ended");
        if matches!(end, End::TooSlow) {
            // Best effort: the socket is stuck, so this likely times out too.
            out.timeout = Duration::from_millis(100);
            let _ = out.close(close::TOO_SLOW, "too slow").await;
        }
    }
}

async fn write_loop_inner(
    app: &App,
    out: &mut Out,
    ctl: &mut mpsc::Receiver<Ctl>,
    resume: Option<(u64, u64)>,
) -> Result<(), End> {
    if let Some((epoch, since)) = resume {
        app.hub.catch_up_to(epoch, since, RESUME_PATIENCE).await;
    }
    let sub = app.hub.subscribe(resume);
    let mut rx = sub.rx;
    let mut cur = match sub.start {
        Start::Snapshot(s) => {
            app.metrics.snapshots_connect.increment(1);
            out.binary(&s.frame).await?;
            s.seq
        }
        Start::Resume { batches, seq } => {
            app.metrics.resumes.increment(1);
            for b in &batches {
                out.binary(&b.frame).await?;
            }
            seq
        }
    };
    let mut shutdown = app.shutdown.clone();
    // Made once, not per loop: at 20 batches a second per socket, rebuilding
    // this watch future each time was 3.5% of the worker's CPU.
    let shutdown = crate::until_set(&mut shutdown);
    tokio::pin!(shutdown);
    let ping_every = app.config.ping_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    // Snapshots are 250 KB per million boxes: a client asking for them in a loop
    // gets at most one a second.
    let mut last_snapshot = Instant::now();
    let mut resync_due: Option<tokio::time::Instant> = None;
    loop {
        let resync_timer = async {
            match resync_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = &mut shutdown => {
                out.close(close::RESTART, "server restarting").await?;
                return Ok(());
            }
            msg = ctl.recv() => match msg {
                None => return Ok(()),
                Some(Ctl::Send(bytes)) => out.binary(&bytes).await?,
                Some(Ctl::Raw(opcode, payload)) => {
                    out.frame(Frame::new(true, opcode, None, Payload::Owned(payload))).await?;
                    if opcode == OpCode::Close {
                        return Ok(());
                    }
                }
                Some(Ctl::Resync) => {
                    let earliest = last_snapshot + Duration::from_secs(1);
                    if Instant::now() >= earliest {
                        app.metrics.snapshots_resync.increment(1);
                        cur = send_snapshot(app, out, &mut last_snapshot).await?;
                    } else {
                        resync_due.get_or_insert(tokio::time::Instant::from_std(earliest));
                    }
                }
                Some(Ctl::Close(code, reason)) => {
                    out.close(code, reason).await?;
                    return Ok(());
                }
            },
            () = resync_timer => {
                resync_due = None;
                app.metrics.snapshots_resync.increment(1);
                cur = send_snapshot(app, out, &mut last_snapshot).await?;
            }
            published = rx.recv() => match published {
                Ok(Published::Batch(b)) => {
                    if b.to_seq <= cur {
                        continue;
                    }
                    if b.from_seq > cur + 1 {
                        // Cannot happen while the hub's invariant holds; a
                        // snapshot repairs it if it ever does.
                        app.metrics.snapshots_lagged.increment(1);
                        cur = send_snapshot(app, out, &mut last_snapshot).await?;
                    } else {
                        out.binary(&b.frame).await?;
                        cur = b.to_seq;
                    }
                }
                Ok(Published::Reset) => {
                    app.metrics.snapshots_reset.increment(1);
                    cur = send_snapshot(app, out, &mut last_snapshot).await?;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // This socket fell more than the queue behind: the backlog
                    // is worth less than the state, so send the state.
                    app.metrics.snapshots_lagged.increment(1);
                    cur = send_snapshot(app, out, &mut last_snapshot).await?;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    out.close(close::RESTART, "server restarting").await?;
                    return Ok(());
                }
            },
            _ = ping.tick() => {
                out.frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[]))).await?;
            }
        }
    }
}

async fn send_snapshot(app: &App, out: &mut Out, last: &mut Instant) -> Result<u64, End> {
    let s = app.hub.snapshot();
    out.binary(&s.frame).await?;
    *last = Instant::now();
    Ok(s.seq)
}

/// Encodes a server message for one socket (toggle results, errors).
fn server_frame(msg: server_message::Msg) -> Bytes {
    Bytes::from(omcb_proto::encode_server(msg))
}

fn error_frame(code: Code, message: &str) -> Bytes {
    server_frame(server_message::Msg::Error(v1::Error {
        code: code as i32,
        message: message.to_owned(),
    }))
}

/// Reads client frames until the client leaves or misbehaves; every answer goes
/// through `ctl` to the writer, in order.
async fn read_loop(app: &App, rd: &mut WebSocketRead<ReadHalf<Io>>, ctl: mpsc::Sender<Ctl>) {
    let idle = app.config.ping_interval * 3;
    let max = app.config.max_frame;
    let now = Instant::now();
    let mut limits = Limits {
        toggles: TokenBucket::new(app.config.toggle_rate, app.config.toggle_burst, now),
        abuse: TokenBucket::new(app.config.toggle_rate, app.config.abuse_burst, now),
    };
    // A fragmented message being assembled (binary only; text is refused at its first frame).
    let mut partial: Option<Vec<u8>> = None;
    let obligated_tx = ctl.clone();
    let mut obligated = move |frame: Frame<'_>| {
        let tx = obligated_tx.clone();
        let msg = Ctl::Raw(frame.opcode, frame.payload.to_vec());
        async move { tx.send(msg).await.map_err(|_| "socket writer is gone") }
    };
    let bad = |code: u16, why: &'static str| {
        app.metrics.bad_input_closed.increment(1);
        tracing::debug!(code, why, "closing on bad input");
    };
    loop {
        let frame = match tokio::time::timeout(idle, rd.read_frame(&mut obligated)).await {
            Err(_) => {
                let _ = ctl.send(Ctl::Close(close::GOING_AWAY, "idle")).await;
                return;
            }
            Ok(Err(WebSocketError::FrameTooLarge)) => {
                bad(close::TOO_BIG, "frame too large");
                let _ = ctl.send(Ctl::Close(close::TOO_BIG, "frame too large")).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "socket read ended");
                return;
            }
            Ok(Ok(frame)) => frame,
        };
        let message: Vec<u8> = match (frame.opcode, frame.fin) {
            (OpCode::Close, _) => return,
            (OpCode::Ping | OpCode::Pong, _) => continue,
            (OpCode::Text, _) => {
                bad(close::UNSUPPORTED, "text frame");
                let _ = ctl
                    .send(Ctl::Send(error_frame(
                        Code::BadMessage,
                        "text frames are not supported: send binary protobuf ClientMessage",
                    )))
                    .await;
                let _ = ctl.send(Ctl::Close(close::UNSUPPORTED, "binary frames only")).await;
                return;
            }
            (OpCode::Binary, true) if partial.is_none() => frame.payload.to_vec(),
            (OpCode::Binary, false) if partial.is_none() => {
                partial = Some(frame.payload.to_vec());
                continue;
            }
            (OpCode::Continuation, fin) if partial.is_some() => {
                let buf = partial.as_mut().expect("checked above");
                if buf.len() + frame.payload.len() > max {
                    bad(close::TOO_BIG, "message too large");
                    let _ = ctl.send(Ctl::Close(close::TOO_BIG, "message too large")).await;
                    return;
                }
                buf.extend_from_slice(&frame.payload);
                if !fin {
                    continue;
                }
                partial.take().expect("checked above")
            }
            _ => {
                bad(close::PROTOCOL, "bad fragmentation");
                let _ = ctl.send(Ctl::Close(close::PROTOCOL, "bad fragmentation")).await;
                return;
            }
        };
        let reply = match ClientMessage::decode(message.as_slice()) {
            Ok(ClientMessage { msg: Some(client_message::Msg::Toggle(t)) }) => {
                // Boxed: the store's set future (fred's, in fleet mode) is
                // ~5 KB, and inline it would size every idle socket's reader
                // for it. One allocation per toggle costs far less than 5 KB
                // per socket (measured: 15.6 -> 11.2 KiB RSS per idle socket).
                match Box::pin(toggle(app, &mut limits, t)).await {
                    Ok(result) => {
                        Ctl::Send(server_frame(server_message::Msg::ToggleResult(result)))
                    }
                    Err(Abusive) => {
                        bad(close::POLICY, "persistent rate abuse");
                        let _ = ctl
                            .send(Ctl::Send(error_frame(
                                Code::RateLimited,
                                "too many toggles; slow down",
                            )))
                            .await;
                        let _ = ctl.send(Ctl::Close(close::POLICY, "rate limit")).await;
                        return;
                    }
                }
            }
            Ok(ClientMessage { msg: Some(client_message::Msg::Resync(_)) }) => Ctl::Resync,
            Ok(ClientMessage { msg: None }) | Err(_) => {
                bad(close::INVALID, "undecodable message");
                let _ = ctl
                    .send(Ctl::Send(error_frame(
                        Code::BadMessage,
                        "not a ClientMessage with a known msg",
                    )))
                    .await;
                let _ = ctl.send(Ctl::Close(close::INVALID, "bad message")).await;
                return;
            }
        };
        if ctl.send(reply).await.is_err() {
            return;
        }
    }
}

/// The per-connection limits.
#[derive(Debug)]
struct Limits {
    /// `--toggle-rate` / `--toggle-burst`.
    toggles: TokenBucket,
    /// Refused toggles allowed before the connection is closed as abusive.
    abuse: TokenBucket,
}

/// The client kept sending after being rate limited for too long.
#[derive(Debug)]
struct Abusive;

async fn toggle(app: &App, limits: &mut Limits, t: v1::Toggle) -> Result<ToggleResult, Abusive> {
    let m = &app.metrics;
    let refused = |reason: Reason, checked: bool| ToggleResult {
        request_id: t.request_id,
        accepted: false,
        checked,
        reason: reason as i32,
        seq: 0,
    };
    let now = Instant::now();
    if !limits.toggles.try_take(now) {
        m.toggles_rate_limited.increment(1);
        if !limits.abuse.try_take(now) {
            return Err(Abusive);
        }
        return Ok(refused(Reason::RateLimited, app.hub.is_checked(t.index)));
    }
    if t.index >= app.hub.size() {
        m.toggles_out_of_range.increment(1);
        return Ok(refused(Reason::OutOfRange, false));
    }
    Ok(match app.store.set(t.index, t.checked).await {
        Ok(SetOutcome::Changed { seq, checked }) => {
            m.toggles_changed.increment(1);
            ToggleResult { request_id: t.request_id, accepted: true, checked, reason: 0, seq }
        }
        Ok(SetOutcome::Unchanged { checked }) => {
            m.toggles_unchanged.increment(1);
            ToggleResult { request_id: t.request_id, accepted: true, checked, reason: 0, seq: 0 }
        }
        Ok(SetOutcome::Refused { reason, checked }) => {
            m.refused(reason).increment(1);
            let reason = match reason {
                omcb_store::Refusal::OutOfRange => Reason::OutOfRange,
                omcb_store::Refusal::Frozen => Reason::Frozen,
                omcb_store::Refusal::BoardFull => Reason::BoardFull,
            };
            refused(reason, checked)
        }
        Err(e) => {
            tracing::debug!(error = %e, "toggle: store unavailable");
            m.toggles_unavailable.increment(1);
            refused(Reason::Unavailable, app.hub.is_checked(t.index))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_query() {
        assert_eq!(parse_resume(Some("since=5&epoch=9")), Some((9, 5)));
        assert_eq!(parse_resume(Some("epoch=9&since=0&x=1")), Some((9, 0)));
        assert_eq!(parse_resume(Some("since=5")), None);
        assert_eq!(parse_resume(Some("since=-1&epoch=9")), None);
        assert_eq!(parse_resume(None), None);
    }
}
