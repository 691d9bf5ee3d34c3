//! The sending side of one socket: an ordered queue of WebSocket frames in
//! front of a non-blocking TCP write.
//!
//! Every write to a socket is a `try_write` made under the sink's lock, by
//! whoever has something to send: the hub's fan-out (a batch, the same bytes
//! for every socket), the socket's reader (a reply), or its writer task (a
//! snapshot, a ping, the rest of a queue). While the kernel takes the bytes,
//! which is almost always, nothing waits and no task wakes: the fan-out of a
//! tick is one `write` per socket from the hub's shard tasks. Only a socket
//! whose kernel buffer is full keeps bytes queued, and its writer task waits
//! for it to drain, turns a backlog of batches into one snapshot, and closes a
//! socket that cannot keep up even then.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::hub::EncodedBatch;

/// The counters a sink adds to (handles into the worker's metrics).
#[derive(Debug, Clone)]
pub struct SinkMetrics {
    /// Frames written.
    pub frames_sent: metrics::Counter,
    /// Bytes written (frame headers included).
    pub bytes_sent: metrics::Counter,
    /// Snapshots sent because the socket lagged.
    pub snapshots_lagged: metrics::Counter,
    /// Snapshots sent because the board was reset.
    pub snapshots_reset: metrics::Counter,
}

/// WebSocket opcodes of the frames a server sends.
pub mod opcode {
    /// Binary data frame.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// One complete server frame (FIN set, unmasked, as RFC 6455 requires of a
/// server): header and payload in one buffer, so a socket sends it with one
/// write and every socket can share it.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.put_slice(payload);
    out.freeze()
}

/// A close frame with a status code and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    frame(opcode::CLOSE, &payload)
}

/// What a queued frame is, for the lag rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A batch: dropped in favour of a snapshot when too many wait.
    Batch,
    /// Anything else (snapshot, reply, control frame): always sent.
    Other,
}

/// The sink's state; see the module docs.
#[derive(Debug)]
struct State {
    /// Frames not yet fully written, oldest first; the front may be partly written.
    queue: VecDeque<(Bytes, Kind)>,
    /// Bytes of the front frame already written.
    written: usize,
    /// Batch frames in `queue`.
    batches: usize,
    /// The board (epoch, seq) the client holds once everything queued is out.
    epoch: u64,
    seq: u64,
    /// Batches are skipped until the writer task sends a snapshot (the
    /// socket lagged, or the board was reset).
    needs_snapshot: bool,
    /// The client asked for a snapshot (`Resync`); the writer rate-limits these.
    resync: bool,
    /// The start (snapshot or resumed batches) is queued: until then nothing
    /// is written, so the client hears its start first (PROTOCOL.md).
    started: bool,
    /// A close frame is queued or the socket failed: nothing more is accepted.
    closing: bool,
    /// The write side failed.
    broken: bool,
    /// Since when queued bytes have been waiting (the send timeout).
    waiting_since: Option<Instant>,
}

/// The outgoing side of one socket. See the module docs.
#[derive(Debug)]
pub struct Sink {
    stream: OwnedWriteHalf,
    state: Mutex<State>,
    /// Wakes the socket's writer task: bytes are queued, a snapshot is due,
    /// or the socket is closing.
    pub wake: Notify,
    /// Most batch frames queued before the backlog is replaced by a snapshot.
    max_batches: usize,
    metrics: SinkMetrics,
}

/// What the writer task finds after draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing queued.
    Empty,
    /// Bytes are still queued (the kernel buffer is full), since this instant.
    Waiting(Instant),
    /// A close frame went out, or the socket failed: the writer is done.
    Done,
}

impl Sink {
    /// A sink over `stream`, allowed `max_batches` queued batch frames.
    pub fn new(stream: OwnedWriteHalf, max_batches: usize, metrics: SinkMetrics) -> Self {
        Self {
            stream,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                written: 0,
                batches: 0,
                epoch: 0,
                seq: 0,
                needs_snapshot: false,
                resync: false,
                started: false,
                closing: false,
                broken: false,
                waiting_since: None,
            }),
            wake: Notify::new(),
            max_batches: max_batches.max(1),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a reply or control frame, in order after everything before it.
    pub fn send(&self, frame: Bytes) {
        let mut st = self.lock();
        if st.closing {
            return;
        }
        self.push(&mut st, frame, Kind::Other);
    }

    /// Sends a close frame; nothing is sent after it.
    pub fn close(&self, code: u16, reason: &str) {
        self.close_with(close_frame(code, reason));
    }

    /// Sends this close frame (ours, or the echo of the client's); nothing is
    /// sent after it.
    pub fn close_with(&self, frame: Bytes) {
        let mut st = self.lock();
        if st.closing {
            return;
        }
        self.push(&mut st, frame, Kind::Other);
        st.closing = true;
        drop(st);
        self.wake.notify_one();
    }

    /// The reader is done (the client left, or misbehaved and a close is
    /// queued): send what is queued, accept nothing more.
    pub fn finish(&self) {
        self.lock().closing = true;
        self.wake.notify_one();
    }

    /// Starts the socket at `(epoch, seq)` with these frames (a snapshot, or
    /// the batches of a resume). Called by the hub under its read lock, before
    /// the sink can see any batch; only queued, so the writer task does the
    /// writing outside that lock.
    pub fn start(&self, epoch: u64, seq: u64, frames: impl IntoIterator<Item = Bytes>) {
        let mut st = self.lock();
        st.epoch = epoch;
        st.seq = seq;
        // Replies the reader queued meanwhile go after the start.
        let early = std::mem::take(&mut st.queue);
        st.queue.extend(frames.into_iter().map(|f| (f, Kind::Other)));
        st.queue.extend(early);
        st.started = true;
        drop(st);
        self.wake.notify_one();
    }

    /// Offers a published batch: sent when it is the client's next one, skipped
    /// when stale, of another epoch or covered by a snapshot to come. Called
    /// by the hub's fan-out, in publication order.
    pub fn offer(&self, b: &EncodedBatch) {
        let mut st = self.lock();
        if st.closing || st.needs_snapshot || b.epoch != st.epoch || b.to_seq <= st.seq {
            return;
        }
        if b.from_seq > st.seq + 1 {
            // Cannot happen while the hub's invariant holds; a snapshot repairs it.
            return self.lagged(st);
        }
        if st.batches >= self.max_batches {
            return self.lagged(st);
        }
        st.seq = b.to_seq;
        self.push(&mut st, b.frame.clone(), Kind::Batch);
    }

    /// The board was replaced: a snapshot before any later batch.
    pub fn reset(&self) {
        let mut st = self.lock();
        if st.closing {
            return;
        }
        st.needs_snapshot = true;
        drop(st);
        self.metrics.snapshots_reset.increment(1);
        self.wake.notify_one();
    }

    /// The client asked for a snapshot (`Resync`).
    pub fn request_snapshot(&self) {
        self.lock().resync = true;
        self.wake.notify_one();
    }

    /// Whether a snapshot is due now (lag, reset), and whether the client
    /// asked for one (rate-limited by the writer).
    pub fn snapshot_due(&self) -> (bool, bool) {
        let st = self.lock();
        (st.needs_snapshot && !st.closing, st.resync && !st.closing)
    }

    /// Queues the snapshot `frame` at `(epoch, seq)` in place of what was due.
    /// The caller holds the hub's read lock, so no batch after `seq` has been
    /// offered yet.
    pub fn snapshot(&self, epoch: u64, seq: u64, frame: Bytes) {
        let mut st = self.lock();
        if st.closing {
            return;
        }
        st.needs_snapshot = false;
        st.resync = false;
        st.epoch = epoch;
        st.seq = seq;
        // Queued only: the caller holds the hub's read lock, and a snapshot is
        // 250 KB; the writer task writes it right after.
        st.queue.push_back((frame, Kind::Other));
    }

    /// Too many batches wait: drop the ones not yet begun (the snapshot will
    /// hold their changes) and ask the writer for a snapshot.
    fn lagged(&self, mut st: std::sync::MutexGuard<'_, State>) {
        let started = if st.written > 0 { st.queue.pop_front() } else { None };
        st.queue.retain(|(_, kind)| *kind != Kind::Batch);
        if let Some(front) = started {
            st.queue.push_front(front);
        }
        st.batches = st.queue.iter().filter(|(_, k)| *k == Kind::Batch).count();
        st.needs_snapshot = true;
        drop(st);
        self.metrics.snapshots_lagged.increment(1);
        self.wake.notify_one();
    }

    /// Appends `frame`, writing at once when nothing is queued before it.
    fn push(&self, st: &mut State, frame: Bytes, kind: Kind) {
        if st.broken {
            return;
        }
        if kind == Kind::Batch {
            st.batches += 1;
        }
        let was_empty = st.queue.is_empty();
        st.queue.push_back((frame, kind));
        if was_empty && st.started {
            self.write_queued(st);
            if !st.queue.is_empty() {
                st.waiting_since = Some(Instant::now());
                self.wake.notify_one();
            }
        }
    }

    /// Writes queued frames until the queue is empty or the kernel buffer is
    /// full. Never waits.
    fn write_queued(&self, st: &mut State) {
        while let Some((front, kind)) = st.queue.front() {
            let rest = &front[st.written..];
            match self.stream.try_write(rest) {
                Ok(n) if n == rest.len() => {
                    self.metrics.frames_sent.increment(1);
                    self.metrics.bytes_sent.increment(front.len() as u64);
                    if *kind == Kind::Batch {
                        st.batches -= 1;
                    }
                    st.queue.pop_front();
                    st.written = 0;
                    st.waiting_since = None;
                }
                Ok(n) => {
                    st.written += n;
                    st.waiting_since = Some(Instant::now());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    st.broken = true;
                    st.closing = true;
                    st.queue.clear();
                    st.batches = 0;
                    return;
                }
            }
        }
    }

    /// For the writer task: writes what it can and says what is left.
    pub fn drain(&self) -> Drained {
        let mut st = self.lock();
        self.write_queued(&mut st);
        match (st.queue.is_empty(), st.closing) {
            (_, true) if st.broken => Drained::Done,
            (true, true) => Drained::Done,
            (true, false) => Drained::Empty,
            (false, _) => Drained::Waiting(*st.waiting_since.get_or_insert_with(Instant::now)),
        }
    }

    /// Waits until the socket can take more bytes.
    pub async fn writable(&self) -> io::Result<()> {
        self.stream.writable().await
    }

    /// Gives up on the queue (the client is too slow): one best-effort close
    /// frame if the queue is at a frame boundary, then nothing more.
    pub fn abandon(&self, code: u16, reason: &str) {
        let mut st = self.lock();
        if st.written == 0 {
            st.queue.clear();
            st.batches = 0;
            let close = close_frame(code, reason);
            let _ = self.stream.try_write(&close);
        }
        st.closing = true;
        st.broken = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn metrics() -> SinkMetrics {
        SinkMetrics {
            frames_sent: metrics::Counter::noop(),
            bytes_sent: metrics::Counter::noop(),
            snapshots_lagged: metrics::Counter::noop(),
            snapshots_reset: metrics::Counter::noop(),
        }
    }

    fn batch(epoch: u64, from_seq: u64, to_seq: u64, payload: &[u8]) -> EncodedBatch {
        EncodedBatch { epoch, from_seq, to_seq, frame: frame(opcode::BINARY, payload) }
    }

    /// A sink over one end of a real loopback connection, and the other end.
    async fn pair(max_batches: usize) -> (Sink, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_, write) = accepted.unwrap().0.into_split();
        (Sink::new(write, max_batches, metrics()), client.unwrap())
    }

    async fn read_frame(peer: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        peer.read_exact(&mut head).await.unwrap();
        let len = match head[1] {
            126 => usize::from(peer.read_u16().await.unwrap()),
            127 => peer.read_u64().await.unwrap() as usize,
            n => usize::from(n),
        };
        let mut payload = vec![0; len];
        peer.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x0f, payload)
    }

    #[tokio::test]
    async fn batches_go_out_in_order_once_and_stale_or_foreign_ones_are_skipped() {
        let (sink, mut peer) = pair(8).await;
        sink.send(frame(opcode::BINARY, b"early reply"));
        sink.start(7, 10, [frame(opcode::BINARY, b"start")]);
        assert_eq!(sink.drain(), Drained::Empty);
        sink.offer(&batch(7, 9, 10, b"stale"));
        sink.offer(&batch(6, 11, 11, b"other epoch"));
        sink.offer(&batch(7, 11, 12, b"b1"));
        sink.send(frame(opcode::BINARY, b"reply"));
        sink.offer(&batch(7, 13, 13, b"b2"));
        sink.offer(&batch(7, 13, 13, b"b2 again"));
        sink.close(1012, "bye");
        sink.offer(&batch(7, 14, 14, b"after close"));
        assert_eq!(sink.drain(), Drained::Done);
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(read_frame(&mut peer).await);
        }
        let payloads: Vec<&[u8]> = got.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(payloads[..5], [&b"start"[..], b"early reply", b"b1", b"reply", b"b2"]);
        assert_eq!(got[5].0, opcode::CLOSE);
        assert_eq!(&got[5].1[..2], &1012u16.to_be_bytes());
    }

    #[tokio::test]
    async fn a_gap_or_a_backlog_becomes_one_snapshot() {
        let (sink, mut peer) = pair(3).await;
        sink.start(1, 0, []);
        sink.offer(&batch(1, 3, 3, b"gap"));
        assert_eq!(sink.snapshot_due(), (true, false), "a gap asks for a snapshot");
        sink.offer(&batch(1, 4, 4, b"skipped until the snapshot"));
        sink.snapshot(1, 4, frame(opcode::BINARY, b"snapshot@4"));
        assert_eq!(sink.snapshot_due(), (false, false));
        assert_eq!(sink.drain(), Drained::Empty);
        assert_eq!(read_frame(&mut peer).await.1, b"snapshot@4");

        // The peer stops reading: frames pile up in the kernel, then in the
        // queue; past 3 queued batches they are dropped for a snapshot.
        let big = vec![7u8; 64 * 1024];
        let mut seq = 4;
        while !sink.snapshot_due().0 {
            seq += 1;
            sink.offer(&batch(1, seq, seq, &big));
            assert!(seq < 10_000, "the backlog never triggered a snapshot");
        }
        let lagged_at = seq;
        sink.offer(&batch(1, seq + 1, seq + 1, b"skipped"));
        sink.snapshot(1, seq + 1, frame(opcode::BINARY, b"snapshot@end"));
        sink.offer(&batch(1, seq + 2, seq + 2, b"after the snapshot"));
        // Drain while the peer reads everything: the last two frames are the
        // snapshot and the batch after it, and no dropped batch is among the rest.
        let reader = tokio::spawn(async move {
            let mut last = Vec::new();
            loop {
                let (_, p) = read_frame(&mut peer).await;
                let done = p == b"after the snapshot";
                last.push(p);
                if done {
                    return last;
                }
            }
        });
        while sink.drain() != Drained::Empty {
            sink.writable().await.unwrap();
        }
        let frames = reader.await.unwrap();
        let n = frames.len();
        assert_eq!(frames[n - 2], b"snapshot@end");
        assert!(n - 2 < (lagged_at - 4) as usize, "queued batches were dropped, not sent");
    }

    #[test]
    fn frame_headers_for_every_length_class() {
        assert_eq!(&frame(opcode::BINARY, b"ab")[..], &[0x82, 2, b'a', b'b']);
        let f = frame(opcode::BINARY, &[7; 126]);
        assert_eq!(&f[..4], &[0x82, 126, 0, 126]);
        assert_eq!(f.len(), 4 + 126);
        let f = frame(opcode::BINARY, &vec![7; 70_000]);
        assert_eq!(&f[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(f.len(), 10 + 70_000);
        assert_eq!(&frame(opcode::PING, &[])[..], &[0x89, 0]);
        assert_eq!(&close_frame(1012, "x")[..], &[0x88, 3, 0x03, 0xF4, b'x']);
    }
}
