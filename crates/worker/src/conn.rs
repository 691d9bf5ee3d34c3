//! One WebSocket connection: a reader task that validates and answers client
//! messages, and a writer task for what the hub's fan-out does not do.
//!
//! Everything a socket sends goes through its [`Sink`]: the reader's replies,
//! the hub's batches (written by the fan-out shards, see [`crate::hub`]) and the
//! writer's snapshots and pings, in one order. The writer task starts the socket
//! (snapshot, resumed batches, or the range Snapshot of a socket subscribed at
//! connect with `?first=&count=`, [`parse_view`]; all of it in `Hub::join`), sends the snapshots a lagging, reset or
//! resyncing socket needs (deflated for a socket opened with
//! `snapshot=deflate`, see [`SnapshotCoding`]), pings, drains a queue the
//! kernel could not take at once, and closes a socket stuck for `--send-timeout`. Reading runs apart
//! from all of it (a frame read is not cancel-safe), so a socket that stops
//! reading never stalls anyone else.
//!
//! The reader holds clients to RFC 6455: fastwebsockets' parser refuses bad
//! RSV bits, unknown opcodes, fragmented control frames, oversized pings and
//! invalid close payloads, and each of its errors gets its close code
//! (`close_for`); what it lets through is checked here (the MASK bit, by
//! `MaskCheck`; pongs and closes over 125 bytes). Every frame a client sends
//! is charged to a receive budget (`RecvBudget`); a client over it is closed
//! with 1008, so no sender can make the worker do or queue unbounded work.
//!
//! An idle socket holds no read buffer: the reader waits for its client's
//! next byte with a `peek`, makes fastwebsockets' parser (and its 8 KiB
//! buffer) then, and drops it once it holds no unparsed byte (`read_loop`).
//! Test: `hostile::idle_sockets_hold_no_read_buffer`; the figure per idle
//! socket is in docs/BENCHMARKS.md (issue 13, part 3).

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{CloseCode, Frame, OpCode, Role, WebSocketError, WebSocketRead};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use omcb_proto::v1::{
    self, ClientMessage, Code, Reason, ToggleResult, client_message, server_message,
};
use omcb_proto::view::SubscribeError;
use omcb_store::SetOutcome;
use tokio::io::{AsyncRead, AsyncReadExt as _, Chain, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tracing::Instrument as _;

use crate::app::App;
use crate::deadline::WriteDeadline;
use crate::frames;
use crate::hub::{SnapshotCoding, Start};
use crate::limits::{self, Address, Hold};
use crate::metrics::{Limiter, Metrics};
use crate::ratelimit::TokenBucket;
use crate::sink::{Drained, Sink};

/// Close codes of PROTOCOL.md, by what they mean here.
pub mod close {
    use fastwebsockets::CloseCode;

    /// The worker is going away (shutdown, restart).
    pub const RESTART: CloseCode = CloseCode::Restart;
    /// Over the connection limit: try again later.
    pub const TRY_AGAIN: CloseCode = CloseCode::Again;
    /// A text frame.
    pub const UNSUPPORTED: CloseCode = CloseCode::Unsupported;
    /// An undecodable message, or a close reason that is not UTF-8.
    pub const INVALID: CloseCode = CloseCode::Invalid;
    /// Persistent abuse (toggle rate, receive budget).
    pub const POLICY: CloseCode = CloseCode::Policy;
    /// Frame over the size limit.
    pub const TOO_BIG: CloseCode = CloseCode::Size;
    /// Protocol violation (RFC 6455 framing: mask, RSV bits, opcodes, control frames).
    pub const PROTOCOL: CloseCode = CloseCode::Protocol;
    /// The client went silent past the idle limit.
    pub const GOING_AWAY: CloseCode = CloseCode::Away;
    /// Could not keep up even with snapshots: reconnect later.
    pub const TOO_SLOW: CloseCode = CloseCode::Again;
}

/// The longest payload of a control frame (RFC 6455 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

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

/// Why a `/ws?first=F&count=N` (a subscription at connect) was refused: the
/// socket is not opened (HTTP 400, with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadView {
    /// `first` without `count`, or the other way round.
    #[error("first and count go together: /ws?first=F&count=N")]
    Half,
    /// A value that is not a whole number.
    #[error("{0} must be a whole number, not {1:?}")]
    NotANumber(&'static str, String),
    /// Refused as a `Subscribe` with these fields would be.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
}

/// The subscription a client asked for at connect (`/ws?first=F&count=N`,
/// the fields of a `Subscribe`, docs/PROTOCOL.md): `Ok(None)` without one
/// (or with `count=0`, the full board), else its regions, validated as a
/// `Subscribe` is. A number too wide for 32 bits reads as 4294967295, as in
/// a `Subscribe`, so it is refused the same way.
pub fn parse_view(query: Option<&str>, size: u32) -> Result<Option<std::ops::Range<u32>>, BadView> {
    let (mut first, mut count) = (None, None);
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("first", v)) => first = Some(("first", v)),
            Some(("count", v)) => count = Some(("count", v)),
            _ => {}
        }
    }
    let number = |(name, v): (&'static str, &str)| {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadView::NotANumber(name, v.chars().take(20).collect()));
        }
        Ok(v.parse::<u32>().unwrap_or(u32::MAX))
    };
    match (first, count) {
        (None, None) => Ok(None),
        (Some(f), Some(c)) => Ok(omcb_proto::view::subscription(number(f)?, number(c)?, size)?),
        _ => Err(BadView::Half),
    }
}

/// How the client wants its Snapshots' bitsets: `/ws?snapshot=deflate` asks
/// for deflated ones; anything else (or nothing) gets plain bitsets.
pub fn parse_snapshot_coding(query: Option<&str>) -> SnapshotCoding {
    let deflate = query.is_some_and(|q| q.split('&').any(|pair| pair == "snapshot=deflate"));
    if deflate { SnapshotCoding::Deflate } else { SnapshotCoding::Plain }
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
    /// The origin its changes carry: the keyed hash of the client's address
    /// (`origin.rs`), computed once per socket.
    pub origin: u64,
}

impl SocketSlot {
    /// Takes a slot before the upgrade. Over the address's connect or snapshot
    /// budget it is refused outright (HTTP 429); over a connection cap it is
    /// admitted as `over_limit`, to be closed with 1013 (or refused with 429
    /// when `--max-connections` sockets are already waiting for their 1013).
    /// `snapshot` is the bytes of the Snapshot the socket starts with, charged
    /// to the address's snapshot budget (`None` for a resume).
    pub fn take(app: Arc<App>, ip: IpAddr, snapshot: Option<f64>) -> Result<Self, limits::Refused> {
        let (mut hold, within) = app.addresses.socket(ip, snapshot)?;
        let max = app.config.max_connections;
        let admitted = within
            && app
                .sockets
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
                .is_ok();
        if admitted {
            app.metrics.connections.increment(1.0);
        } else {
            let cap = if within { Limiter::MaxConnections } else { Limiter::ConnectionsAddress };
            app.metrics.limited(cap);
            hold.refuse();
            // Refused sockets are bounded too (each waits up to a few seconds
            // for its close): past as many as the worker admits, answer 429
            // before the upgrade instead, which costs nothing to hold.
            app.refusing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
                .map_err(|_| limits::Refused::Busy)?;
        }
        let origin = app.origin_key.origin(ip);
        Ok(Self { app, hold, over_limit: !admitted, origin })
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
    upgraded: Upgraded,
    resume: Option<(u64, u64)>,
    view: Option<std::ops::Range<u32>>,
    coding: SnapshotCoding,
) {
    // Take the TCP stream back from hyper: writes go through the sink (shared
    // with the hub's fan-out), reads through fastwebsockets' frame parser.
    let parts = match upgraded.downcast::<TokioIo<WriteDeadline<TcpStream>>>() {
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
    // A frame parser (fastwebsockets', with its 8 KiB read buffer) is made
    // only while the client is sending (see `read_loop`).
    let begun = AtomicU64::new(0);
    let mut input = MaskCheck::new(std::io::Cursor::new(pre).chain(read), &begun);
    let max_frame = app.config.max_frame;
    let sink = Arc::new(Sink::new(write, app.config.send_queue as usize, app.metrics.sink()));
    let _life = SocketLife::begin(&app.metrics, &sink);
    if slot.over_limit {
        app.metrics.connections_over_limit.increment(1);
        sink.close(close::TRY_AGAIN, "over capacity");
        let _ = tokio::time::timeout(app.config.send_timeout, flush(&sink)).await;
        linger(&mut parser(&mut input, max_frame)).await;
        return;
    }
    app.metrics.connections_opened.increment(1);
    let mut writer =
        tokio::spawn(write_loop(app.clone(), sink.clone(), resume, view, coding).in_current_span());
    let lingered = tokio::select! {
        lingered = read_loop(&app, &mut input, &sink, slot.address(), slot.origin, coding) => {
            // The reader queued whatever must still go out (an Error, a
            // close); give the writer a moment to send it, then it stops.
            sink.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
            writer.abort();
            lingered
        }
        _ = &mut writer => false,
    };
    if !lingered {
        linger(&mut parser(&mut input, max_frame)).await;
    }
    drop(slot);
}

/// The client's bytes: what came behind the upgrade request, then the TCP
/// stream, through the MASK check.
type Input<'a> = MaskCheck<'a, Chain<std::io::Cursor<Bytes>, OwnedReadHalf>>;

/// fastwebsockets' frame parser over a socket's input, with our settings.
/// It allocates an 8 KiB read buffer, so it is made only while the client is
/// sending and dropped once it holds no unparsed byte (`read_loop`).
fn parser<'i, 'b>(input: &'i mut Input<'b>, max_frame: usize) -> WebSocketRead<&'i mut Input<'b>> {
    let (mut rd, _) = fastwebsockets::after_handshake_split(input, tokio::io::sink(), Role::Server);
    // fastwebsockets validates a client's close frame and hands us its echo.
    rd.set_auto_close(true);
    // Pings come to the reader, which charges them to the receive budget and
    // coalesces their pongs (`Sink::pong`).
    rd.set_auto_pong(false);
    // fastwebsockets refuses frames of at least this many bytes.
    rd.set_max_message_size(max_frame + 1);
    rd
}

impl Input<'_> {
    /// Waits until the client has sent a byte (or closed, or failed) without
    /// reading it, so a socket waits for its client with no read buffer. A
    /// peek, not a readiness check: readiness stays set after a read that
    /// emptied the kernel's queue, and only a call that finds nothing clears it.
    async fn sent(&mut self) -> io::Result<()> {
        let (pre, tcp) = self.inner.get_mut();
        if self.failed || pre.position() < pre.get_ref().len() as u64 {
            return Ok(());
        }
        tcp.peek(&mut [0; 1]).await.map(drop)
    }
}

/// A client frame without the MASK bit (RFC 6455 5.1: the server must close).
#[derive(Debug, thiserror::Error)]
#[error("unmasked client frame")]
struct Unmasked;

/// Follows the frame headers in the client's byte stream and fails the read
/// at the first frame without the MASK bit. fastwebsockets' server role
/// unmasks a masked frame but takes an unmasked one as it is, and its
/// [`Frame`] does not say which it got, so the check sits under its parser.
/// The bytes before the bad frame are passed on first, so every frame the
/// client sent before it is still handled.
#[derive(Debug)]
struct MaskCheck<'a, R> {
    inner: R,
    /// Frames whose first byte has been passed on: when the parser has
    /// returned as many, it holds no unparsed byte. Shared with the reader,
    /// which reads it while the parser borrows this.
    begun: &'a AtomicU64,
    /// The header being read (2 to 14 bytes) and how much of it is in.
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: u64,
    /// An unmasked frame was seen: every later read fails.
    failed: bool,
}

impl<'a, R> MaskCheck<'a, R> {
    fn new(inner: R, begun: &'a AtomicU64) -> Self {
        Self { inner, begun, head: [0; 14], have: 0, skip: 0, failed: false }
    }

    /// Follows `bytes`; the offset of an unmasked frame's second header byte
    /// (the one with the MASK bit), if one starts in them.
    fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if self.skip > 0 {
                let n = self.skip.min((bytes.len() - i) as u64);
                self.skip -= n;
                i += n as usize;
                continue;
            }
            if self.have == 0 {
                self.begun.fetch_add(1, Ordering::Relaxed);
            }
            self.head[self.have] = bytes[i];
            self.have += 1;
            if self.have == 2 && self.head[1] & 0x80 == 0 {
                return Some(i);
            }
            i += 1;
            if self.have >= 2 {
                let (extra, _) = Self::length_field(self.head[1]);
                if self.have == 2 + extra + 4 {
                    self.skip = self.payload_len();
                    self.have = 0;
                }
            }
        }
        None
    }

    /// The extended length's size for a header's second byte.
    fn length_field(second: u8) -> (usize, u8) {
        match second & 0x7f {
            126 => (2, 126),
            127 => (8, 127),
            n => (0, n),
        }
    }

    fn payload_len(&self) -> u64 {
        match Self::length_field(self.head[1]) {
            (0, n) => u64::from(n),
            (extra, _) => self.head[2..2 + extra].iter().fold(0, |n, b| n << 8 | u64::from(*b)),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for MaskCheck<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, Unmasked)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(at) = this.scan(&buf.filled()[before..]) {
            this.failed = true;
            if at == 0 {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, Unmasked)));
            }
            buf.set_filled(before + at);
        }
        Poll::Ready(Ok(()))
    }
}

/// The close code (and reason) for an error of fastwebsockets' frame parser,
/// or `None` when the client is simply gone (EOF, reset).
fn close_for(e: &WebSocketError) -> Option<(CloseCode, &'static str)> {
    Some(match e {
        WebSocketError::FrameTooLarge => (close::TOO_BIG, "frame too large"),
        WebSocketError::InvalidUTF8 => (close::INVALID, "invalid UTF-8"),
        WebSocketError::ReservedBitsNotZero => (close::PROTOCOL, "reserved bits set"),
        WebSocketError::InvalidValue => (close::PROTOCOL, "unknown opcode"),
        WebSocketError::ControlFrameFragmented => (close::PROTOCOL, "fragmented control frame"),
        WebSocketError::PingFrameTooLarge => (close::PROTOCOL, "control frame over 125 bytes"),
        WebSocketError::InvalidCloseFrame => (close::PROTOCOL, "invalid close frame"),
        WebSocketError::InvalidCloseCode => (close::PROTOCOL, "invalid close code"),
        WebSocketError::IoError(io) if io.get_ref().is_some_and(|e| e.is::<Unmasked>()) => {
            (close::PROTOCOL, "unmasked frame")
        }
        _ => return None,
    })
}

/// What one socket may send per second: its toggle allowance plus
/// `--recv-frame-rate` frames and `--recv-byte-rate` payload bytes for the
/// rest (pings, Resyncs); each bucket holds five seconds of the rest on top of
/// the toggle and abuse bursts. Far above what the page sends, far below a
/// flood: a 15,000/s ping flood empties it in tens of milliseconds.
#[derive(Debug)]
struct RecvBudget {
    frames: TokenBucket,
    bytes: TokenBucket,
}

/// Bytes charged per toggle in the byte budget: a Toggle frame's payload is
/// at most 18 bytes (three varint fields), so this leaves room.
const TOGGLE_BYTES: f64 = 32.0;

impl RecvBudget {
    fn new(c: &crate::config::Config, now: Instant) -> Self {
        let toggles = c.toggle_burst + c.abuse_burst;
        let frames = TokenBucket::new(
            c.toggle_rate + c.recv_frame_rate,
            toggles + 5.0 * c.recv_frame_rate,
            now,
        );
        let byte_burst =
            (TOGGLE_BYTES * toggles + 5.0 * c.recv_byte_rate).max(2.0 * c.max_frame as f64);
        let bytes =
            TokenBucket::new(TOGGLE_BYTES * c.toggle_rate + c.recv_byte_rate, byte_burst, now);
        Self { frames, bytes }
    }

    /// Charges one frame of `len` payload bytes; false when over the budget.
    fn charge(&mut self, len: usize, now: Instant) -> bool {
        // Both are charged, so neither can be spent while the other is short.
        let frame = self.frames.try_take(now);
        let bytes = self.bytes.try_take_n(len as f64, now);
        frame && bytes
    }
}

/// After our close frame the client answers with its own (RFC 6455 5.5.1).
/// Closing the TCP connection before reading that answer makes the kernel
/// reset it, and a reset can make the client drop our close frame unread (a
/// browser then reports 1006 instead of, say, 1012). So read, and discard,
/// until the client's close, an error, or `CLOSE_LINGER`.
async fn linger(rd: &mut WebSocketRead<&mut Input<'_>>) {
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
/// socket ([`Hub::join`](crate::hub::Hub::join)), sends snapshots when the
/// socket lagged, the board was reset or the client asked, pings, drains a
/// queue the kernel could not take at once, and closes a socket that stays
/// stuck for `--send-timeout`.
async fn write_loop(
    app: Arc<App>,
    sink: Arc<Sink>,
    resume: Option<(u64, u64)>,
    view: Option<std::ops::Range<u32>>,
    coding: SnapshotCoding,
) {
    // Leaves the fan-out however this task ends, aborted included.
    let (_joined, start) = app.hub.join(&sink, resume, view, coding).await;
    match start {
        Start::Snapshot | Start::Range => app.metrics.snapshots_connect.increment(1),
        Start::Resume => app.metrics.resumes.increment(1),
    }
    write_loop_inner(&app, &sink, coding).await;
}

async fn write_loop_inner(app: &App, sink: &Sink, coding: SnapshotCoding) {
    let mut shutdown = app.shutdown.clone();
    let shutdown = crate::shutdown::until_set(&mut shutdown);
    tokio::pin!(shutdown);
    let ping_every = app.config.ping_interval;
    let mut next_ping = tokio::time::Instant::now() + ping_every;
    // Snapshots are 250 KB per million boxes: a client asking for them in a loop
    // gets at most one a second.
    let mut last_snapshot = Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_ping {
            sink.send(frames::frame(OpCode::Ping, &[]));
            next_ping = tokio::time::Instant::now() + ping_every;
        }
        let (needed, asked) = sink.snapshot_due();
        let mut resync_at = None;
        if needed {
            app.hub.send_snapshot(sink, coding);
            last_snapshot = Instant::now();
        } else if asked {
            let earliest = last_snapshot + Duration::from_secs(1);
            if Instant::now() >= earliest {
                app.metrics.snapshots_resync.increment(1);
                app.hub.send_snapshot(sink, coding);
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
        // One timer for every deadline (the next ping, the send timeout, a
        // deferred resync): the loop looks at all of them again when it
        // fires. Every socket's task holds this state for its whole life, and
        // a timer is 112 bytes (an `Interval` another boxed one).
        let wake_at = [stuck_until, resync_at].into_iter().flatten().fold(next_ping, Ord::min);
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
            () = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

/// Encodes a server message for one socket (toggle results, errors).
fn server_frame(msg: server_message::Msg) -> Bytes {
    frames::frame(OpCode::Binary, &omcb_proto::encode_server(msg))
}

fn error_frame(code: Code, message: &str) -> Bytes {
    server_frame(server_message::Msg::Error(v1::Error {
        code: code as i32,
        message: message.to_owned(),
    }))
}

/// Reads client frames until the client leaves or misbehaves; every answer goes
/// through the sink, in order. A frame parser (fastwebsockets', with its 8 KiB
/// read buffer) exists only from the client's first byte until it has parsed
/// every byte read: an idle socket holds none. True when it has also
/// lingered for the client's close (see [`linger`]).
async fn read_loop(
    app: &App,
    input: &mut Input<'_>,
    sink: &Sink,
    address: &Arc<Address>,
    origin: u64,
    coding: SnapshotCoding,
) -> bool {
    let idle = app.config.ping_interval * 3;
    let max = app.config.max_frame;
    let now = Instant::now();
    let mut limits = Limits {
        toggles: TokenBucket::new(app.config.toggle_rate, app.config.toggle_burst, now),
        abuse: TokenBucket::new(app.config.toggle_rate, app.config.abuse_burst, now),
        address: address.clone(),
        origin,
    };
    let mut budget = RecvBudget::new(&app.config, now);
    // A fragmented message being assembled (binary only; text is refused at its first frame).
    // Assembled here, not by fastwebsockets' `FragmentCollectorRead`: that one
    // caps each frame but not the message it assembles (a client could grow
    // one without bound; here it is capped at `--max-frame`, 1009), it
    // returns only whole messages (so each fragment could not be charged to
    // the receive budget), and it assembles a text message before we could
    // refuse it.
    let mut partial: Option<Vec<u8>> = None;
    let bad = |code: CloseCode, why: &'static str| {
        app.metrics.bad_input_closed.increment(1);
        tracing::debug!(code = u16::from(code), why, "closing on bad input");
    };
    // The only frame fastwebsockets obliges us to send (auto-pong is off):
    // the echo of the client's close, which it has checked (code, UTF-8
    // reason) except for the length. Nothing is sent after it.
    let mut obligated = |frame: Frame<'_>| {
        if frame.payload.len() > MAX_CONTROL_PAYLOAD {
            bad(close::PROTOCOL, "control frame over 125 bytes");
            sink.close(close::PROTOCOL, "control frame over 125 bytes");
        } else {
            sink.close_with(frames::encode(frame));
        }
        std::future::ready(Ok::<(), std::io::Error>(()))
    };
    let begun = input.begun;
    // Frames the parsers have returned: while `begun` is as many, the parser
    // holds no byte of the client's and can go.
    let mut parsed = 0u64;
    loop {
        // Between bursts of frames: no parser and no read buffer until the
        // client sends something.
        let mut deadline = tokio::time::Instant::now() + idle;
        match tokio::time::timeout_at(deadline, input.sent()).await {
            Err(_) => {
                sink.close(close::GOING_AWAY, "idle");
                return false;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "socket read ended");
                return false;
            }
            Ok(Ok(())) => {}
        }
        // Boxed: the parser, its read future and the frame handling are
        // most of the reader's state, and an idle socket needs none of it.
        let reading = Box::pin(async {
            let mut rd = parser(input, max);
            let first = parsed;
            'frames: loop {
                if parsed > first {
                    if begun.load(Ordering::Relaxed) == parsed {
                        return false;
                    }
                    deadline = tokio::time::Instant::now() + idle;
                }
                let frame =
                    match tokio::time::timeout_at(deadline, rd.read_frame(&mut obligated)).await {
                        Err(_) => {
                            sink.close(close::GOING_AWAY, "idle");
                            break 'frames;
                        }
                        Ok(Err(e)) => {
                            match close_for(&e) {
                                Some((code, why)) => {
                                    bad(code, why);
                                    sink.close(code, why);
                                }
                                None => tracing::debug!(error = %e, "socket read ended"),
                            }
                            break 'frames;
                        }
                        Ok(Ok(frame)) => frame,
                    };
                parsed += 1;
                let read_at = Instant::now();
                if !budget.charge(frame.payload.len(), Instant::now()) {
                    app.metrics.limited(Limiter::RecvBudget);
                    bad(close::POLICY, "over the receive budget");
                    sink.close(close::POLICY, "too many frames");
                    break 'frames;
                }
                if matches!(frame.opcode, OpCode::Ping | OpCode::Pong)
                    && frame.payload.len() > MAX_CONTROL_PAYLOAD
                {
                    // fastwebsockets checks only pings; keep one rule for both.
                    bad(close::PROTOCOL, "control frame over 125 bytes");
                    sink.close(close::PROTOCOL, "control frame over 125 bytes");
                    break 'frames;
                }
                let message: Vec<u8> = match (frame.opcode, frame.fin) {
                    (OpCode::Close, _) => break 'frames,
                    (OpCode::Ping, _) => {
                        sink.pong(&frame.payload);
                        continue 'frames;
                    }
                    (OpCode::Pong, _) => continue,
                    (OpCode::Text, _) => {
                        bad(close::UNSUPPORTED, "text frame");
                        sink.send(error_frame(
                            Code::BadMessage,
                            "text frames are not supported: send binary protobuf ClientMessage",
                        ));
                        sink.close(close::UNSUPPORTED, "binary frames only");
                        break 'frames;
                    }
                    (OpCode::Binary, true) if partial.is_none() => frame.payload.to_vec(),
                    (OpCode::Binary, false) if partial.is_none() => {
                        partial = Some(frame.payload.to_vec());
                        continue 'frames;
                    }
                    (OpCode::Continuation, fin) if partial.is_some() => {
                        let buf = partial.as_mut().expect("checked above");
                        if buf.len() + frame.payload.len() > max {
                            bad(close::TOO_BIG, "message too large");
                            sink.close(close::TOO_BIG, "message too large");
                            break 'frames;
                        }
                        buf.extend_from_slice(&frame.payload);
                        if !fin {
                            continue 'frames;
                        }
                        partial.take().expect("checked above")
                    }
                    _ => {
                        bad(close::PROTOCOL, "bad fragmentation");
                        sink.close(close::PROTOCOL, "bad fragmentation");
                        break 'frames;
                    }
                };
                // Strict: an index wider than 32 bits is out of range, not truncated.
                match omcb_proto::decode_client(&message) {
                    Ok(ClientMessage { msg: Some(client_message::Msg::Toggle(t)) }) => {
                        // Boxed: the store's set future (fred's, in fleet mode) is
                        // ~5 KB, and inline it would size every idle socket's reader
                        // for it. One allocation per toggle costs far less than 5 KB
                        // per socket (measured: 15.6 -> 11.2 KiB RSS per idle socket).
                        match Box::pin(toggle(app, &mut limits, t)).await {
                            Ok(result) => {
                                sink.send(server_frame(server_message::Msg::ToggleResult(result)));
                                app.metrics.toggle_seconds.record(read_at.elapsed());
                            }
                            Err(Abusive) => {
                                bad(close::POLICY, "persistent rate abuse");
                                sink.send(error_frame(
                                    Code::RateLimited,
                                    "too many toggles; slow down",
                                ));
                                sink.close(close::POLICY, "rate limit");
                                break 'frames;
                            }
                        }
                    }
                    Ok(ClientMessage { msg: Some(client_message::Msg::Resync(_)) }) => {
                        // The address's snapshot budget: wait for it (reading nothing
                        // more meanwhile), or close when the queue is too long.
                        let bytes = match sink.subscribed() {
                            Some(regions) => range_snapshot_bytes(&regions, app.hub.size()),
                            None => limits::snapshot_bytes(app.hub.size()),
                        };
                        if !snapshot_budget(app, &limits, sink, bytes).await {
                            break 'frames;
                        }
                        sink.request_snapshot();
                    }
                    Ok(ClientMessage { msg: Some(client_message::Msg::Subscribe(s)) }) => {
                        let size = app.hub.size();
                        match omcb_proto::view::subscription(s.first, s.count, size) {
                            Ok(regions) => {
                                let bytes = regions.as_ref().map_or_else(
                                    || limits::snapshot_bytes(size),
                                    |r| range_snapshot_bytes(r, size),
                                );
                                if !snapshot_budget(app, &limits, sink, bytes).await {
                                    break 'frames;
                                }
                                // A Subscribe read before the socket's start
                                // waits for it: the start is a full one.
                                sink.started().await;
                                app.metrics.subscribes_ok.increment(1);
                                app.hub.subscribe(sink, regions, coding);
                            }
                            Err(e) => {
                                let (code, counter) = match e {
                                    SubscribeError::TooLarge(_) => {
                                        (Code::TooLarge, &app.metrics.subscribes_too_large)
                                    }
                                    SubscribeError::OutOfRange { .. } => {
                                        (Code::BadMessage, &app.metrics.subscribes_out_of_range)
                                    }
                                };
                                counter.increment(1);
                                sink.send(error_frame(code, &e.to_string()));
                            }
                        }
                    }
                    Ok(ClientMessage { msg: None }) | Err(_) => {
                        bad(close::INVALID, "undecodable message");
                        sink.send(error_frame(
                            Code::BadMessage,
                            "not a ClientMessage with a known msg",
                        ));
                        sink.close(close::INVALID, "bad message");
                        break 'frames;
                    }
                }
            }
            // Done reading (the client left, closed or misbehaved): linger with
            // this parser, which may hold the start of the client's next frames.
            linger(&mut rd).await;
            true
        });
        if reading.await {
            return true;
        }
    }
}

/// Bytes a range Snapshot of `regions` costs the address's snapshot budget
/// (its two bitsets, as [`limits::snapshot_bytes`] counts a full one).
pub fn range_snapshot_bytes(regions: &std::ops::Range<u32>, size: u32) -> f64 {
    limits::snapshot_bytes(omcb_proto::view::boxes(regions, size).1)
}

/// Waits for `bytes` of the address's snapshot budget (a `Resync`'s or a
/// `Subscribe`'s Snapshot), reading nothing more meanwhile. False when the
/// wait would be too long: the socket is told and closed with 1008.
async fn snapshot_budget(app: &App, limits: &Limits, sink: &Sink, bytes: f64) -> bool {
    match limits.address.reserve_snapshot(bytes, Instant::now()) {
        Some(wait) => {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            true
        }
        None => {
            app.metrics.limited(Limiter::SnapshotAddress);
            app.metrics.bad_input_closed.increment(1);
            tracing::debug!(
                code = u16::from(close::POLICY),
                why = "snapshot budget",
                "closing on bad input"
            );
            sink.send(error_frame(Code::RateLimited, "too many snapshots; slow down"));
            sink.close(close::POLICY, "snapshot budget");
            false
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
    /// The origin of the socket's changes (see [`SocketSlot::origin`]).
    origin: u64,
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
    let socket_ok = limits.toggles.try_take(now);
    if !socket_ok || !limits.address.try_toggle(now) {
        m.limited(if socket_ok { Limiter::ToggleAddress } else { Limiter::ToggleSocket });
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
    Ok(match app.store.set(t.index, t.checked, limits.origin).await {
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

/// A socket's life: logs its start when made, and on drop (however its task
/// ends) counts its close code and logs it. Made inside the connection's
/// span, so both lines carry its id.
struct SocketLife<'a> {
    metrics: &'a Metrics,
    sink: &'a Sink,
}

impl<'a> SocketLife<'a> {
    fn begin(metrics: &'a Metrics, sink: &'a Sink) -> Self {
        tracing::debug!(target: "omcb_worker::conn", "socket opened");
        Self { metrics, sink }
    }
}

impl Drop for SocketLife<'_> {
    fn drop(&mut self) {
        self.metrics.disconnected(self.sink.close_code());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Payload;

    /// A masked client frame of `len` payload bytes. fastwebsockets writes
    /// the header; the payload is left as it is (`MaskCheck` only reads headers).
    fn masked(len: usize) -> Vec<u8> {
        let payload = Payload::Owned(vec![0x80; len]);
        frames::encode(Frame::new(true, OpCode::Binary, Some([1, 2, 3, 4]), payload)).to_vec()
    }

    #[test]
    fn mask_check_follows_frames_of_every_length_class_in_any_chunking() {
        let mut stream = Vec::new();
        for len in [0, 1, 125, 126, 1000, 65_535, 65_536, 70_000] {
            stream.extend(masked(len));
        }
        let bad_at = stream.len() + 1;
        // A server frame is unmasked: exactly what a client must not send.
        stream.extend_from_slice(&frames::frame(OpCode::Ping, &[]));
        for chunk in [1, 2, 3, 7, 4096, stream.len()] {
            let begun = AtomicU64::new(0);
            let mut check = MaskCheck::new((), &begun);
            let mut found = None;
            for (i, piece) in stream.chunks(chunk).enumerate() {
                if let Some(at) = check.scan(piece) {
                    found = Some(i * chunk + at);
                    break;
                }
            }
            assert_eq!(found, Some(bad_at), "chunks of {chunk}");
            // Eight frames, and the first byte of the unmasked one.
            assert_eq!(begun.load(Ordering::Relaxed), 9, "chunks of {chunk}");
        }
    }

    #[test]
    fn resume_query() {
        assert_eq!(parse_resume(Some("since=5&epoch=9")), Some((9, 5)));
        assert_eq!(parse_resume(Some("epoch=9&since=0&x=1")), Some((9, 0)));
        assert_eq!(parse_resume(Some("since=5")), None);
        assert_eq!(parse_resume(Some("since=-1&epoch=9")), None);
        assert_eq!(parse_resume(None), None);
    }

    #[test]
    fn snapshot_coding_query() {
        let d = SnapshotCoding::Deflate;
        assert_eq!(parse_snapshot_coding(Some("since=5&epoch=9&snapshot=deflate")), d);
        assert_eq!(parse_snapshot_coding(Some("snapshot=deflate")), d);
        assert_eq!(parse_snapshot_coding(Some("snapshot=gzip")), SnapshotCoding::Plain);
        assert_eq!(parse_snapshot_coding(Some("since=5")), SnapshotCoding::Plain);
        assert_eq!(parse_snapshot_coding(None), SnapshotCoding::Plain);
    }
}
