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
//!
//! What a client can make a sink hold is bounded whatever it sends or fails
//! to read: at most `--send-queue` batches, one pong (a newer ping's pong
//! replaces one not yet begun), one snapshot not yet begun (a newer one
//! replaces it and everything it covers), and replies the reader's limits
//! bound; a frame not finished within `--send-timeout` closes the socket.
//! Tests: `hostile::a_ping_flood_is_closed_and_memory_stays_flat`,
//! `hostile::a_trickling_reader_is_closed_by_the_send_timeout` and the unit
//! tests below.
//!
//! A socket with a viewport subscription (docs/PROTOCOL.md) gets, instead
//! of each full batch, the frames of the tick's regions in its range that
//! continue their chains ([`omcb_proto::view::Subscriber`], the client's rule
//! on the server's side), several in one write, and the counts frames; they
//! count as batches for `--send-queue`, and its lag and resync snapshots are
//! range Snapshots of its whole range.
//!
//! Frames come encoded from [`crate::frames`] and are written here rather
//! than through fastwebsockets' `WebSocketWrite`, so that a batch framed once
//! is the same bytes for every socket (why, and what it saved: that module's
//! docs).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use fastwebsockets::{CloseCode, OpCode};
use parking_lot::{Mutex, MutexGuard};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use omcb_proto::Applied;
use omcb_proto::view::Subscriber;

use crate::frames::{EncodedBatch, close_frame, frame};
use crate::metrics::SinkMetrics;

/// What a queued frame is, for the lag and coalescing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A batch: dropped in favour of a snapshot when too many wait.
    Batch,
    /// The socket's start (a snapshot, or the batches of a resume).
    Start,
    /// A snapshot sent later: a newer one replaces it if it has not begun.
    Snapshot,
    /// A pong: a newer ping's pong replaces it if it has not begun.
    Pong,
    /// Anything else (reply, ping, close): always sent.
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
    /// The snapshot due is for a reset (not a lag): for its bytes' label.
    reset: bool,
    /// The close frame's code (1005 for one without a code), once one is queued.
    close_code: Option<u16>,
    /// The start (snapshot or resumed batches) is queued: until then nothing
    /// is written, so the client hears its start first (PROTOCOL.md).
    started: bool,
    /// A close frame is queued or the socket failed: nothing more is accepted.
    closing: bool,
    /// The write side failed.
    broken: bool,
    /// Since when the front frame has been waiting to be fully written (the
    /// send timeout). Only a whole frame written counts as progress, so a
    /// client that reads a few bytes a second cannot hold a socket forever.
    waiting_since: Option<Instant>,
    /// The socket's viewport subscription (docs/PROTOCOL.md): while set, it
    /// gets its regions' frames and counts frames instead of full batches.
    /// Boxed: most sockets never subscribe, and an idle socket's size counts.
    sub: Option<Box<Subscriber>>,
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
    /// Held while the subscription changes or a snapshot is made for it (the
    /// reader's `Subscribe`, the writer's snapshots), so the two never
    /// interleave. Taken before the hub's lock.
    pub view: Mutex<()>,
    /// Signalled when the socket's start is queued: a `Subscribe` read
    /// before it waits for it.
    started_signal: Notify,
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
                reset: false,
                close_code: None,
                started: false,
                closing: false,
                broken: false,
                waiting_since: None,
                sub: None,
            }),
            wake: Notify::new(),
            max_batches: max_batches.max(1),
            view: Mutex::new(()),
            started_signal: Notify::new(),
            metrics,
        }
    }

    /// Sends a reply or control frame, in order after everything before it.
    pub fn send(&self, frame: Bytes) {
        let mut st = self.state.lock();
        if st.closing {
            return;
        }
        self.push(&mut st, frame, Kind::Other);
    }

    /// Answers a ping. At most one pong waits: a newer ping's pong replaces
    /// one not yet begun (RFC 6455 5.5.3 allows answering only the latest),
    /// so a ping flood queues nothing however slowly the client reads.
    pub fn pong(&self, payload: &[u8]) {
        let mut st = self.state.lock();
        if st.closing {
            return;
        }
        let pong = frame(OpCode::Pong, payload);
        let first_unbegun = usize::from(st.written > 0);
        if let Some(queued) =
            st.queue.iter_mut().skip(first_unbegun).find(|(_, kind)| *kind == Kind::Pong)
        {
            queued.0 = pong;
            return;
        }
        self.push(&mut st, pong, Kind::Pong);
    }

    /// Sends a close frame; nothing is sent after it.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.close_with(close_frame(code, reason));
    }

    /// Sends this close frame (ours, or the echo of the client's); nothing is
    /// sent after it.
    pub fn close_with(&self, frame: Bytes) {
        let mut st = self.state.lock();
        if st.closing {
            return;
        }
        st.close_code = Some(frame.get(2..4).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])));
        self.push(&mut st, frame, Kind::Other);
        st.closing = true;
        drop(st);
        self.wake.notify_one();
    }

    /// The reader is done (the client left, or misbehaved and a close is
    /// queued): send what is queued, accept nothing more.
    pub fn finish(&self) {
        self.state.lock().closing = true;
        self.wake.notify_one();
    }

    /// Starts the socket at `(epoch, seq)` with these frames (a snapshot, or
    /// the batches of a resume). Called by `Hub::join` under the hub's read
    /// lock, before the sink can see any batch; only queued, so the writer task does the
    /// writing outside that lock.
    pub fn start(&self, epoch: u64, seq: u64, frames: impl IntoIterator<Item = Bytes>) {
        let mut st = self.state.lock();
        st.epoch = epoch;
        st.seq = seq;
        // Replies the reader queued meanwhile go after the start.
        let early = std::mem::take(&mut st.queue);
        st.queue.extend(frames.into_iter().map(|f| (f, Kind::Start)));
        st.queue.extend(early);
        st.started = true;
        drop(st);
        self.wake.notify_one();
        self.started_signal.notify_waiters();
    }

    /// [`start`](Self::start) with a range Snapshot of `regions` (the
    /// subscription the client asked for at connect), which is the socket's
    /// subscription from then on.
    pub fn start_subscribed(
        &self,
        epoch: u64,
        seq: u64,
        regions: std::ops::Range<u32>,
        frames: impl IntoIterator<Item = Bytes>,
    ) {
        self.state.lock().sub = Some(Box::new(Subscriber::new(regions, seq)));
        self.start(epoch, seq, frames);
    }

    /// Waits until the socket's start is queued (`Hub::join`).
    pub async fn started(&self) {
        loop {
            let signal = self.started_signal.notified();
            tokio::pin!(signal);
            signal.as_mut().enable();
            if self.state.lock().started {
                return;
            }
            signal.await;
        }
    }

    /// The socket's subscription: its range of regions, `None` on the full board.
    pub fn subscribed(&self) -> Option<std::ops::Range<u32>> {
        self.state.lock().sub.as_ref().map(|s| s.regions())
    }

    /// The regions of a new subscription `regions` that need a range
    /// Snapshot: `None` when the whole range needs one (the socket was not
    /// subscribed, or a snapshot is due or queued and not yet begun, which
    /// the whole-range one replaces, so at most one waits), else the runs of
    /// regions the old range did not have.
    pub fn plan_subscribe(
        &self,
        regions: &std::ops::Range<u32>,
    ) -> Option<Vec<std::ops::Range<u32>>> {
        let st = self.state.lock();
        let first_unbegun = usize::from(st.written > 0);
        let queued = st.queue.iter().skip(first_unbegun).any(|(_, k)| *k == Kind::Snapshot);
        if st.needs_snapshot || queued || st.closing {
            return None;
        }
        let mut sub = st.sub.as_deref()?.clone();
        Some(sub.resubscribe(regions.clone(), 0))
    }

    /// Takes the new subscription `regions` with the replica at `seq`: its
    /// regions kept keep their chains, and `frames` (the range Snapshots of
    /// the runs [`plan_subscribe`](Self::plan_subscribe) returned) are
    /// queued. The caller holds the hub's read lock.
    pub fn resubscribe(&self, seq: u64, regions: std::ops::Range<u32>, frames: Vec<Bytes>) {
        let mut st = self.state.lock();
        if st.closing {
            return;
        }
        if let Some(sub) = st.sub.as_mut() {
            sub.resubscribe(regions, seq);
        }
        for f in frames {
            self.push(&mut st, f, Kind::Snapshot);
        }
    }

    /// Offers a published batch: sent when it is the client's next one, skipped
    /// when stale, of another epoch or covered by a snapshot to come. Called
    /// by the hub's fan-out, in publication order.
    pub fn offer(&self, b: &EncodedBatch) {
        let mut st = self.state.lock();
        if st.sub.is_some() {
            return self.offer_regions(st, b);
        }
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

    /// [`offer`](Self::offer) to a subscribed socket: the frames of the
    /// tick's regions in its range that continue their chains (the same
    /// rule the client follows), in one write. A region frame already
    /// covered by a Snapshot is skipped; one that would leave a hole (cannot
    /// happen while the hub's invariant holds) asks for a snapshot.
    fn offer_regions(&self, mut st: MutexGuard<'_, State>, b: &EncodedBatch) {
        if st.closing || st.needs_snapshot || b.epoch != st.epoch {
            return;
        }
        let Some(sub) = st.sub.as_deref_mut() else { return };
        let range = sub.regions();
        let start = b.regions.partition_point(|f| f.region < range.start);
        let mut first: Option<&Bytes> = None;
        let mut more: Vec<u8> = Vec::new();
        let mut gap = false;
        for f in b.regions[start..].iter().take_while(|f| f.region < range.end) {
            match sub.offer(f.region, f.from_seq, b.to_seq) {
                Applied::Applied => match first {
                    None => first = Some(&f.frame),
                    Some(one) => {
                        if more.is_empty() {
                            more.extend_from_slice(one);
                        }
                        more.extend_from_slice(&f.frame);
                    }
                },
                Applied::Stale => {}
                Applied::Gap => {
                    gap = true;
                    break;
                }
            }
        }
        if gap {
            return self.lagged(st);
        }
        let Some(one) = first else { return };
        // Several regions of one tick go out as one write.
        let frame = if more.is_empty() { one.clone() } else { Bytes::from(more) };
        if st.batches >= self.max_batches {
            return self.lagged(st);
        }
        st.seq = st.seq.max(b.to_seq);
        self.push(&mut st, frame, Kind::Batch);
    }

    /// Offers a counts frame (`counts_only`, about one a second): only a
    /// subscribed socket takes it. One with a full queue lags like with a
    /// region frame: the range Snapshot it then gets carries newer counts (a
    /// dropped counts frame would otherwise leave the last counts of a
    /// quiet board untold).
    pub fn offer_counts(&self, epoch: u64, frame: &Bytes) {
        let mut st = self.state.lock();
        if st.sub.is_none() || st.closing || st.needs_snapshot || epoch != st.epoch {
            return;
        }
        if st.batches >= self.max_batches {
            return self.lagged(st);
        }
        self.push(&mut st, frame.clone(), Kind::Batch);
    }

    /// The board was replaced: a snapshot before any later batch.
    pub fn reset(&self) {
        let mut st = self.state.lock();
        if st.closing {
            return;
        }
        st.needs_snapshot = true;
        st.reset = true;
        drop(st);
        self.metrics.snapshots_reset.increment(1);
        self.wake.notify_one();
    }

    /// The client asked for a snapshot (`Resync`).
    pub fn request_snapshot(&self) {
        self.state.lock().resync = true;
        self.wake.notify_one();
    }

    /// Whether a snapshot is due now (lag, reset), and whether the client
    /// asked for one (rate-limited by the writer).
    pub fn snapshot_due(&self) -> (bool, bool) {
        let st = self.state.lock();
        (st.needs_snapshot && !st.closing, st.resync && !st.closing)
    }

    /// Queues the snapshot `frame` at `(epoch, seq)` in place of what was due.
    /// The caller holds the hub's read lock, so no batch after `seq` has been
    /// offered yet. A full snapshot ends the socket's subscription.
    pub fn snapshot(&self, epoch: u64, seq: u64, frame: Bytes) {
        self.snapshot_of(epoch, seq, None, frame);
    }

    /// Like [`snapshot`](Self::snapshot), for a range Snapshot of all of
    /// `regions`, which becomes (or stays) the socket's subscription; `None`:
    /// a full snapshot.
    pub fn snapshot_of(
        &self,
        epoch: u64,
        seq: u64,
        regions: Option<std::ops::Range<u32>>,
        frame: Bytes,
    ) {
        let mut st = self.state.lock();
        if st.closing {
            return;
        }
        st.sub = regions.map(|r| Box::new(Subscriber::new(r, seq)));
        let bytes = match (st.needs_snapshot, st.reset) {
            (true, true) => Some(&self.metrics.snapshot_bytes_reset),
            (true, false) => Some(&self.metrics.snapshot_bytes_lagged),
            (false, _) if st.resync => Some(&self.metrics.snapshot_bytes_resync),
            // Neither due nor asked for: a `Subscribe`'s, which the hub counts.
            (false, _) => None,
        };
        if let Some(bytes) = bytes {
            bytes.increment(frame.len() as u64);
        }
        st.needs_snapshot = false;
        st.resync = false;
        st.reset = false;
        st.epoch = epoch;
        st.seq = seq;
        // It holds every change up to `seq`: the snapshots, start frames and
        // batches not yet begun are covered by it and dropped, so a socket that
        // lags again and again holds at most one unsent snapshot. It takes the
        // place of the first snapshot (or start) it replaces, so replies stay
        // in their order around it; with none queued it goes last.
        let first_unbegun = usize::from(st.written > 0);
        let mut at = None;
        let mut i = 0;
        st.queue.retain(|(_, kind)| {
            let covered =
                i >= first_unbegun && matches!(kind, Kind::Batch | Kind::Start | Kind::Snapshot);
            if covered && at.is_none() && *kind != Kind::Batch {
                at = Some(i);
            }
            i += 1;
            !covered
        });
        st.batches = st.queue.iter().filter(|(_, k)| *k == Kind::Batch).count();
        // Retained frames before `at` were all kept, so its index is unchanged.
        let at = at.unwrap_or(st.queue.len());
        // Queued only: the caller holds the hub's read lock, and a snapshot is
        // 250 KB; the writer task writes it right after (woken for it when
        // the reader queued it, for a `Subscribe`).
        st.queue.insert(at, (frame, Kind::Snapshot));
        drop(st);
        self.wake.notify_one();
    }

    /// Too many batches wait: drop the ones not yet begun (the snapshot will
    /// hold their changes) and ask the writer for a snapshot.
    fn lagged(&self, mut st: MutexGuard<'_, State>) {
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
                    self.metrics.egress.fetch_add(front.len() as u64, Ordering::Relaxed);
                    if *kind == Kind::Batch {
                        st.batches -= 1;
                    }
                    st.queue.pop_front();
                    st.written = 0;
                    st.waiting_since = None;
                }
                Ok(n) => {
                    // Part of a frame is not progress: the frame's clock
                    // started when it came to the front and keeps running.
                    st.written += n;
                    st.waiting_since.get_or_insert_with(Instant::now);
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
        let mut st = self.state.lock();
        self.write_queued(&mut st);
        if st.queue.is_empty() && st.queue.capacity() > 0 {
            // An idle socket keeps no queue (the writer drains after the
            // start, then rarely): the next frame allocates a new one.
            st.queue = VecDeque::new();
        }
        match (st.queue.is_empty(), st.closing) {
            (_, true) if st.broken => Drained::Done,
            (true, true) => Drained::Done,
            (true, false) => Drained::Empty,
            (false, _) => Drained::Waiting(*st.waiting_since.get_or_insert_with(Instant::now)),
        }
    }

    /// The code of the close frame sent (or queued), `None` when there was none.
    pub fn close_code(&self) -> Option<u16> {
        self.state.lock().close_code
    }

    /// Waits until the socket can take more bytes.
    pub async fn writable(&self) -> io::Result<()> {
        self.stream.writable().await
    }

    /// Gives up on the queue (the client is too slow): one best-effort close
    /// frame if the queue is at a frame boundary, then nothing more.
    pub fn abandon(&self, code: CloseCode, reason: &str) {
        let mut st = self.state.lock();
        if st.written == 0 {
            st.queue.clear();
            st.batches = 0;
            let close = close_frame(code, reason);
            let _ = self.stream.try_write(&close);
            st.close_code = Some(code.into());
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
            egress: Default::default(),
            snapshots_lagged: metrics::Counter::noop(),
            snapshots_reset: metrics::Counter::noop(),
            snapshot_bytes_lagged: metrics::Counter::noop(),
            snapshot_bytes_reset: metrics::Counter::noop(),
            snapshot_bytes_resync: metrics::Counter::noop(),
        }
    }

    fn batch(epoch: u64, from_seq: u64, to_seq: u64, payload: &[u8]) -> EncodedBatch {
        EncodedBatch {
            epoch,
            from_seq,
            to_seq,
            frame: frame(OpCode::Binary, payload),
            regions: Default::default(),
        }
    }

    /// A sink over one end of a real loopback connection, and the other end.
    async fn pair(max_batches: usize) -> (Sink, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_, write) = accepted.unwrap().0.into_split();
        (Sink::new(write, max_batches, metrics()), client.unwrap())
    }

    /// The next frame the sink wrote: opcode and payload. Parsed here: a
    /// fastwebsockets reader would keep the bytes it read ahead in its own
    /// buffer, and these tests also read the raw stream.
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
        sink.send(frame(OpCode::Binary, b"early reply"));
        sink.start(7, 10, [frame(OpCode::Binary, b"start")]);
        assert_eq!(sink.drain(), Drained::Empty);
        sink.offer(&batch(7, 9, 10, b"stale"));
        sink.offer(&batch(6, 11, 11, b"other epoch"));
        sink.offer(&batch(7, 11, 12, b"b1"));
        sink.send(frame(OpCode::Binary, b"reply"));
        sink.offer(&batch(7, 13, 13, b"b2"));
        sink.offer(&batch(7, 13, 13, b"b2 again"));
        sink.close(CloseCode::Restart, "bye");
        sink.offer(&batch(7, 14, 14, b"after close"));
        assert_eq!(sink.drain(), Drained::Done);
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(read_frame(&mut peer).await);
        }
        let payloads: Vec<&[u8]> = got.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(payloads[..5], [&b"start"[..], b"early reply", b"b1", b"reply", b"b2"]);
        assert_eq!(got[5].0, OpCode::Close as u8);
        assert_eq!(&got[5].1[..2], &1012u16.to_be_bytes());
    }

    #[tokio::test]
    async fn a_gap_or_a_backlog_becomes_one_snapshot() {
        let (sink, mut peer) = pair(3).await;
        sink.start(1, 0, []);
        sink.offer(&batch(1, 3, 3, b"gap"));
        assert_eq!(sink.snapshot_due(), (true, false), "a gap asks for a snapshot");
        sink.offer(&batch(1, 4, 4, b"skipped until the snapshot"));
        sink.snapshot(1, 4, frame(OpCode::Binary, b"snapshot@4"));
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
        sink.snapshot(1, seq + 1, frame(OpCode::Binary, b"snapshot@end"));
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

    impl Sink {
        /// The kinds of the queued frames, front first.
        fn kinds(&self) -> Vec<Kind> {
            self.state.lock().queue.iter().map(|(_, k)| *k).collect()
        }

        /// Queued frames of this kind not yet begun.
        fn unbegun(&self, kind: Kind) -> usize {
            let st = self.state.lock();
            let first_unbegun = usize::from(st.written > 0);
            st.queue.iter().skip(first_unbegun).filter(|(_, k)| *k == kind).count()
        }
    }

    /// Writes frames until the kernel takes no more: the peer is not reading.
    fn stall(sink: &Sink) {
        let big = frame(OpCode::Binary, &vec![0; 64 * 1024]);
        loop {
            sink.send(big.clone());
            if let Drained::Waiting(_) = sink.drain() {
                return;
            }
        }
    }

    #[tokio::test]
    async fn a_ping_flood_leaves_at_most_one_pong_queued() {
        let (sink, mut peer) = pair(8).await;
        sink.start(1, 0, []);
        stall(&sink);
        for i in 0..10_000u32 {
            sink.pong(&i.to_be_bytes());
        }
        assert_eq!(sink.unbegun(Kind::Pong), 1, "one pong waits, however many pings came");
        // The one sent answers the latest ping.
        let reader = tokio::spawn(async move {
            loop {
                let (op, payload) = read_frame(&mut peer).await;
                if op == OpCode::Pong as u8 {
                    return payload;
                }
            }
        });
        while sink.drain() != Drained::Empty {
            sink.writable().await.unwrap();
        }
        assert_eq!(reader.await.unwrap(), 9_999u32.to_be_bytes());
    }

    #[tokio::test]
    async fn a_socket_that_lags_again_holds_one_unsent_snapshot() {
        let (sink, _peer) = pair(2).await;
        sink.start(1, 0, [frame(OpCode::Binary, b"start")]);
        stall(&sink);
        let mut seq = 0;
        for cycle in 0..50 {
            // Lag: more batches than the queue holds.
            while !sink.snapshot_due().0 {
                seq += 1;
                sink.offer(&batch(1, seq, seq, b"batch"));
            }
            sink.send(frame(OpCode::Binary, b"reply"));
            sink.snapshot(1, seq, frame(OpCode::Binary, &vec![cycle; 1000]));
            let kinds = sink.kinds();
            assert_eq!(sink.unbegun(Kind::Snapshot), 1, "cycle {cycle}: {kinds:?}");
            assert_eq!(sink.unbegun(Kind::Start), 0, "the start is covered by the snapshot");
            assert!(kinds.contains(&Kind::Other), "replies are kept");
        }
        let st = sink.state.lock();
        let (snapshot, _) = st.queue.iter().find(|(_, k)| *k == Kind::Snapshot).unwrap();
        assert_eq!(snapshot[snapshot.len() - 1], 49, "the newest snapshot is kept");
    }

    #[tokio::test]
    async fn a_subscribed_socket_whose_queue_is_full_lags_on_a_counts_frame_too() {
        let (sink, _peer) = pair(2).await;
        sink.start(1, 0, []);
        sink.snapshot_of(1, 0, Some(0..2), frame(OpCode::Binary, b"range snapshot"));
        stall(&sink);
        let counts = frame(OpCode::Binary, b"counts");
        for _ in 0..3 {
            sink.offer_counts(1, &counts);
        }
        // Dropping it instead would leave a quiet board's last counts untold.
        assert_eq!(sink.snapshot_due(), (true, false), "the range Snapshot brings the counts");
        assert_eq!(sink.subscribed(), Some(0..2));
    }

    #[tokio::test]
    async fn a_partial_write_is_not_progress() {
        let (sink, mut peer) = pair(8).await;
        sink.start(1, 0, []);
        // One frame far larger than the socket buffers, read a little at a time.
        sink.send(frame(OpCode::Binary, &vec![1; 8 * 1024 * 1024]));
        let Drained::Waiting(since) = sink.drain() else { panic!("the frame fits the kernel") };
        let written = || sink.state.lock().written;
        let first = written();
        let mut buf = vec![0; 64 * 1024];
        while written() < first + 256 * 1024 {
            // Time passes, the peer reads a little, the sink writes a little more.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            assert!(peer.read(&mut buf).await.unwrap() > 0);
            assert_eq!(sink.drain(), Drained::Waiting(since), "bytes moved, the clock did not");
        }
    }
}
