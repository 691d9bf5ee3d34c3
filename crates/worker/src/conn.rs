//! One WebSocket connection: a reader task that validates and answers client
//! messages, and a writer task for what the hub's fan-out does not do.
//!
//! Everything a socket sends goes through its [`Sink`]: the reader's replies,
//! the hub's batches (written by the fan-out shards, see [`crate::hub`]) and the
//! writer's snapshots and pings, in one order. The writer task starts the socket
//! (snapshot or resumed batches), sends the snapshots a lagging, reset or
//! resyncing socket needs, pings, drains a queue the kernel could not take at
//! once, and closes a socket stuck for `--send-timeout`. Reading runs apart
//! from all of it (a frame read is not cancel-safe), so a socket that stops
//! reading never stalls anyone else.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Role, WebSocket, WebSocketError, WebSocketRead};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use omcb_proto::v1::{
    self, ClientMessage, Code, Reason, ToggleResult, client_message, server_message,
};
use omcb_store::SetOutcome;
use prost::Message;
use tokio::io::{AsyncReadExt as _, Chain};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use crate::App;
use crate::deadline::WriteDeadline;
use crate::hub::{SinkKey, Start};
use crate::limits::{self, Address, Hold};
use crate::ratelimit::TokenBucket;
use crate::sink::{self, Drained, Sink};

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
/// the shutdown drain; uncounts on drop. A socket over a cap still gets its
/// 1013, but holds no slot while it waits to close: an address hammering its
/// own cap cannot lock others out.
#[derive(Debug)]
pub struct SocketSlot {
    app: Arc<App>,
    /// The client's address entry (after trusted `X-Forwarded-For`).
    hold: Hold,
    /// Whether this socket was over a limit when it arrived (it still needs its 1013).
    pub over_limit: bool,
}

impl SocketSlot {
    /// Takes a slot before the upgrade. Over the address's connect or snapshot
    /// budget it is refused outright (HTTP 429); over a connection cap it is
    /// admitted as `over_limit`, to be closed with 1013 (or refused with 429
    /// when `--max-connections` sockets are already waiting for their 1013).
    pub fn take(app: Arc<App>, ip: IpAddr, resuming: bool) -> Result<Self, limits::Refused> {
        let (mut hold, within) = app.addresses.socket(ip, resuming)?;
        let max = app.config.max_connections;
        let admitted = within
            && app
                .sockets
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
                .is_ok();
        if admitted {
            app.metrics.connections.increment(1.0);
        } else {
            hold.refuse();
            // Refused sockets are bounded too (each waits up to a few seconds
            // for its close): past as many as the worker admits, answer 429
            // before the upgrade instead, which costs nothing to hold.
            app.refusing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
                .map_err(|_| limits::Refused::Busy)?;
        }
        Ok(Self { app, hold, over_limit: !admitted })
    }

    /// The client's address entry (its shared budgets).
    pub fn address(&self) -> &Arc<Address> {
        self.hold.address()
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let left = if self.over_limit {
            self.app.refusing.fetch_sub(1, Ordering::SeqCst) - 1
        } else {
            self.app.metrics.connections.decrement(1.0);
            self.app.sockets.fetch_sub(1, Ordering::SeqCst) - 1
        };
        if left == 0 {
            self.app.sockets_gone.notify_waiters();
        }
    }
}

/// Serves one upgraded connection to its end.
pub async fn serve(
    app: Arc<App>,
    slot: SocketSlot,
    ws: WebSocket<TokioIo<Upgraded>>,
    resume: Option<(u64, u64)>,
) {
    // Take the TCP stream back from hyper: writes go through the sink (shared
    // with the hub's fan-out), reads through fastwebsockets' frame parser.
    let parts = match ws.into_inner().into_inner().downcast::<TokioIo<WriteDeadline<TcpStream>>>() {
        Ok(parts) => parts,
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            return;
        }
    };
    let (read, write) = parts.io.into_inner().into_inner().into_split();
    // Bytes the client sent right behind its upgrade request come first. The
    // buffer is a view into hyper's 8 KiB read buffer: copy what is in it
    // (usually nothing) so that buffer is freed, not kept for the socket's life.
    let pre = Bytes::copy_from_slice(&parts.read_buf);
    drop(parts.read_buf);
    let read = std::io::Cursor::new(pre).chain(read);
    let (mut rd, _) = fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
    rd.set_auto_close(true);
    rd.set_auto_pong(true);
    // fastwebsockets refuses frames of at least this many bytes.
    rd.set_max_message_size(app.config.max_frame + 1);
    let sink = Arc::new(Sink::new(write, app.config.send_queue as usize, app.metrics.sink()));
    if slot.over_limit {
        app.metrics.connections_over_limit.increment(1);
        sink.close(close::TRY_AGAIN, "over capacity");
        let _ = tokio::time::timeout(app.config.send_timeout, flush(&sink)).await;
        linger(&mut rd).await;
        return;
    }
    app.metrics.connections_opened.increment(1);
    let mut writer = tokio::spawn(write_loop(app.clone(), sink.clone(), resume));
    tokio::select! {
        () = read_loop(&app, &mut rd, &sink, slot.address()) => {
            // The reader queued whatever must still go out (an Error, a
            // close); give the writer a moment to send it, then it stops.
            sink.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
            writer.abort();
        }
        _ = &mut writer => {}
    }
    linger(&mut rd).await;
    drop(slot);
}

/// The read side of a socket.
type Reader = WebSocketRead<Chain<std::io::Cursor<Bytes>, OwnedReadHalf>>;

/// After our close frame the client answers with its own (RFC 6455 5.5.1).
/// Closing the TCP connection before reading that answer makes the kernel
/// reset it, and a reset can make the client drop our close frame unread (a
/// browser then reports 1006 instead of, say, 1012). So read, and discard,
/// until the client's close, an error, or `CLOSE_LINGER`.
async fn linger(rd: &mut Reader) {
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

/// Writes what the sink holds until it is empty or done; never gives up by
/// itself (callers bound it with a timeout).
async fn flush(sink: &Sink) {
    loop {
        match sink.drain() {
            Drained::Empty | Drained::Done => return,
            Drained::Waiting(_) => {
                if sink.writable().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The socket's own task, for what the fan-out does not do: it starts the
/// socket (snapshot or resumed batches), sends snapshots when the socket
/// lagged, the board was reset or the client asked, pings, drains a queue the
/// kernel could not take at once, and closes a socket that stays stuck for
/// `--send-timeout`.
async fn write_loop(app: Arc<App>, sink: Arc<Sink>, resume: Option<(u64, u64)>) {
    if let Some((epoch, since)) = resume {
        app.hub.catch_up_to(epoch, since, RESUME_PATIENCE).await;
    }
    let (key, start) = app.hub.subscribe(&sink, resume);
    // Leaves the fan-out however this task ends, aborted included.
    let _subscribed = Subscribed { app: &app, key };
    match start {
        Start::Snapshot => app.metrics.snapshots_connect.increment(1),
        Start::Resume => app.metrics.resumes.increment(1),
    }
    write_loop_inner(&app, &sink).await;
}

/// A socket's membership in the hub's fan-out.
struct Subscribed<'a> {
    app: &'a App,
    key: SinkKey,
}

impl Drop for Subscribed<'_> {
    fn drop(&mut self) {
        self.app.hub.unsubscribe(self.key);
    }
}

async fn write_loop_inner(app: &App, sink: &Sink) {
    let mut shutdown = app.shutdown.clone();
    let shutdown = crate::until_set(&mut shutdown);
    tokio::pin!(shutdown);
    let ping_every = app.config.ping_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    // Snapshots are 250 KB per million boxes: a client asking for them in a loop
    // gets at most one a second.
    let mut last_snapshot = Instant::now();
    loop {
        let (needed, asked) = sink.snapshot_due();
        let mut resync_at = None;
        if needed {
            app.hub.send_snapshot(sink);
            last_snapshot = Instant::now();
        } else if asked {
            let earliest = last_snapshot + Duration::from_secs(1);
            if Instant::now() >= earliest {
                app.metrics.snapshots_resync.increment(1);
                app.hub.send_snapshot(sink);
                last_snapshot = Instant::now();
            } else {
                resync_at = Some(tokio::time::Instant::from_std(earliest));
            }
        }
        let stuck_until = match sink.drain() {
            Drained::Done => return,
            Drained::Empty => None,
            Drained::Waiting(since) => {
                let deadline = since + app.config.send_timeout;
                if Instant::now() >= deadline {
                    // It cannot keep up even with snapshots: reconnect later.
                    app.metrics.slow_closed.increment(1);
                    sink.abandon(close::TOO_SLOW, "too slow");
                    return;
                }
                Some(tokio::time::Instant::from_std(deadline))
            }
        };
        tokio::select! {
            biased;
            () = &mut shutdown => {
                sink.close(close::RESTART, "server restarting");
                let _ = tokio::time::timeout(app.config.send_timeout, flush(sink)).await;
                return;
            }
            () = sink.wake.notified() => {}
            ready = sink.writable(), if stuck_until.is_some() => {
                if ready.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(stuck_until.unwrap_or_else(tokio::time::Instant::now)), if stuck_until.is_some() => {}
            () = tokio::time::sleep_until(resync_at.unwrap_or_else(tokio::time::Instant::now)), if resync_at.is_some() => {}
            _ = ping.tick() => sink.send(sink::frame(sink::opcode::PING, &[])),
        }
    }
}

/// Encodes a server message for one socket (toggle results, errors).
fn server_frame(msg: server_message::Msg) -> Bytes {
    sink::frame(sink::opcode::BINARY, &omcb_proto::encode_server(msg))
}

fn error_frame(code: Code, message: &str) -> Bytes {
    server_frame(server_message::Msg::Error(v1::Error {
        code: code as i32,
        message: message.to_owned(),
    }))
}

/// Reads client frames until the client leaves or misbehaves; every answer goes
/// through the sink, in order.
async fn read_loop(app: &App, rd: &mut Reader, sink: &Sink, address: &Arc<Address>) {
    let idle = app.config.ping_interval * 3;
    let max = app.config.max_frame;
    let now = Instant::now();
    let mut limits = Limits {
        toggles: TokenBucket::new(app.config.toggle_rate, app.config.toggle_burst, now),
        abuse: TokenBucket::new(app.config.toggle_rate, app.config.abuse_burst, now),
        address: address.clone(),
    };
    // A fragmented message being assembled (binary only; text is refused at its first frame).
    let mut partial: Option<Vec<u8>> = None;
    // Frames fastwebsockets obliges us to send: a pong, or the echo of the
    // client's close (after which nothing more is sent).
    let mut obligated = |frame: Frame<'_>| {
        if frame.opcode == OpCode::Close {
            sink.close_with(sink::frame(sink::opcode::CLOSE, &frame.payload));
        } else {
            sink.send(sink::frame(sink::opcode::PONG, &frame.payload));
        }
        std::future::ready(Ok::<(), std::io::Error>(()))
    };
    let bad = |code: u16, why: &'static str| {
        app.metrics.bad_input_closed.increment(1);
        tracing::debug!(code, why, "closing on bad input");
    };
    loop {
        let frame = match tokio::time::timeout(idle, rd.read_frame(&mut obligated)).await {
            Err(_) => {
                sink.close(close::GOING_AWAY, "idle");
                return;
            }
            Ok(Err(WebSocketError::FrameTooLarge)) => {
                bad(close::TOO_BIG, "frame too large");
                sink.close(close::TOO_BIG, "frame too large");
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
                sink.send(error_frame(
                    Code::BadMessage,
                    "text frames are not supported: send binary protobuf ClientMessage",
                ));
                sink.close(close::UNSUPPORTED, "binary frames only");
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
                    sink.close(close::TOO_BIG, "message too large");
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
                sink.close(close::PROTOCOL, "bad fragmentation");
                return;
            }
        };
        match ClientMessage::decode(message.as_slice()) {
            Ok(ClientMessage { msg: Some(client_message::Msg::Toggle(t)) }) => {
                // Boxed: the store's set future (fred's, in fleet mode) is
                // ~5 KB, and inline it would size every idle socket's reader
                // for it. One allocation per toggle costs far less than 5 KB
                // per socket (measured: 15.6 -> 11.2 KiB RSS per idle socket).
                match Box::pin(toggle(app, &mut limits, t)).await {
                    Ok(result) => {
                        sink.send(server_frame(server_message::Msg::ToggleResult(result)))
                    }
                    Err(Abusive) => {
                        bad(close::POLICY, "persistent rate abuse");
                        sink.send(error_frame(Code::RateLimited, "too many toggles; slow down"));
                        sink.close(close::POLICY, "rate limit");
                        return;
                    }
                }
            }
            Ok(ClientMessage { msg: Some(client_message::Msg::Resync(_)) }) => {
                // The address's snapshot budget: wait for it (reading nothing
                // more meanwhile), or close when the queue is too long.
                let bytes = limits::snapshot_bytes(app.hub.size());
                match limits.address.reserve_snapshot(bytes, Instant::now()) {
                    Some(wait) => {
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        sink.request_snapshot();
                    }
                    None => {
                        bad(close::POLICY, "snapshot budget");
                        sink.send(error_frame(Code::RateLimited, "too many snapshots; slow down"));
                        sink.close(close::POLICY, "snapshot budget");
                        return;
                    }
                }
            }
            Ok(ClientMessage { msg: None }) | Err(_) => {
                bad(close::INVALID, "undecodable message");
                sink.send(error_frame(Code::BadMessage, "not a ClientMessage with a known msg"));
                sink.close(close::INVALID, "bad message");
                return;
            }
        }
    }
}

/// The limits a socket's toggles pass: its own, then its address's.
#[derive(Debug)]
struct Limits {
    /// `--toggle-rate` / `--toggle-burst`.
    toggles: TokenBucket,
    /// Refused toggles allowed before the connection is closed as abusive.
    abuse: TokenBucket,
    /// The client address's budgets, shared by all of its sockets.
    address: Arc<Address>,
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
    // The socket's bucket first (fairness among an address's sockets), then
    // the address's (`--ip-toggle-rate`): a refusal by either is a rate limit.
    if !limits.toggles.try_take(now) || !limits.address.try_toggle(now) {
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
