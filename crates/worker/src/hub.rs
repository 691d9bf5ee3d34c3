//! The fan-out hub: the worker's replica of the board, the one reader of the
//! store's change feed, and the tick that turns changes into one encoded Batch
//! that every socket sends as it is.
//!
//! The tick's length comes from [`crate::tick`]: `--batch-ms`, longer while
//! an egress budget asks for it, never past what the latency budget allows.
//! The hub measures what that law needs: the bytes written to sockets per
//! tick, and per batch the time from its oldest change's commit to the last
//! shard's last write (`omcb_delivery_seconds`).
//!
//! Each tick's batch also carries its region frames (docs/PROTOCOL.md,
//! "Viewport subscriptions"): the changes of each 2,048-box region that had
//! any, encoded once, chained per region ([`omcb_proto::view::Chains`]). A
//! subscribed socket's sink takes those of its regions instead of the full
//! batch; [`Hub::subscribe`] gives it the range Snapshots it needs, under the
//! read lock like a start, so no region frame after them is missed. A socket
//! subscribed at connect (`/ws?first=&count=`) starts with its range
//! Snapshot instead of the board ([`Hub::join`]). About
//! once a second subscribed sockets also get the counts (`counts_only`).
//!
//! The fan-out runs in one task per shard of sockets (one shard per core):
//! each published batch (or settings change, `Hub::set_freeze_after`) goes
//! to every shard in order, and a shard offers it to
//! each of its sockets' [`Sink`]s, which write it straight into the socket
//! (one non-blocking `write`; see [`crate::sink`]). No per-socket task wakes
//! for a batch.
//!
//! **Invariant:** the replica and the ring of recent batches change under the
//! write lock, and a batch is queued to the shards before that lock is
//! released; a socket starts (snapshot, range Snapshot or resumed batches) and joins its shard
//! under the read lock. So every batch after a socket's start reaches its sink,
//! in order, and every batch before it is inside the start. Snapshots are
//! encoded outside the lock, so one may be older than the replica when the
//! lock is taken again; the ring's batches after it then go into the start
//! right behind it (see [`Hub::join`], where a socket's start happens).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use omcb_proto::v1::server_message::Msg;
use omcb_proto::view::Chains;
use omcb_proto::{BatchBuilder, Board, Change};
use omcb_store::{ChangeFeed, FeedEvent, Store};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use prost::Message;
use slab::Slab;
use tokio::sync::{mpsc, watch};

use crate::frames::{self, EncodedBatch, RegionFrame};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::tick::{Budgets, Pacer};

/// What the hub hands to every socket.
#[derive(Debug, Clone)]
enum Published {
    /// One coalesced batch, encoded once as a `ServerMessage`.
    Batch(EncodedBatch),
    /// The replica was replaced (new epoch, or the feed lost continuity):
    /// every socket must send a fresh Snapshot before any later batch.
    Reset,
    /// The board's settings changed (`omcb admin`): a `Settings` frame,
    /// encoded once, that every socket sends in order with its batches.
    Settings(Bytes),
    /// The board's counts for subscribed sockets (a `counts_only` Batch,
    /// encoded once), about once a second while they move.
    Counts { epoch: u64, frame: Bytes },
}

/// A snapshot encoded once per seq, for sockets and for `GET /api/state`.
#[derive(Debug)]
pub struct EncodedSnapshot {
    /// Board epoch.
    pub epoch: u64,
    /// Seq the snapshot is at.
    pub seq: u64,
    /// The board's `freeze_after_ms` in it: a setting changes without a new
    /// seq, so it is part of what a cached snapshot must match.
    pub freeze_after_ms: u64,
    /// The binary WebSocket frame of `ServerMessage{snapshot}`, for sockets.
    pub frame: Bytes,
    /// The bare `Snapshot`, for `/api/state`.
    pub bare: Bytes,
    /// `bare` gzipped, made on first request: a mostly empty million-box board
    /// is 250 KB bare and about a kilobyte compressed.
    gzip: std::sync::OnceLock<Bytes>,
    /// The frame with its bitsets deflated, for sockets that asked for
    /// [`SnapshotCoding::Deflate`]; made on first request.
    deflate: std::sync::OnceLock<Bytes>,
}

/// How a socket wants its Snapshots' bitsets (`/ws?snapshot=deflate`,
/// docs/PROTOCOL.md). Opt-in: a client that does not ask gets plain bitsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotCoding {
    /// `checked` and `frozen` as they are.
    #[default]
    Plain,
    /// Each bitset that gets smaller as raw DEFLATE in `checked_deflate` /
    /// `frozen_deflate`, which the browser's `DecompressionStream` reads.
    Deflate,
}

impl EncodedSnapshot {
    /// The WebSocket frame of this snapshot in `coding`. The deflated one is
    /// made once per seq, like the snapshot, at [`SNAPSHOT_LEVEL`].
    pub fn frame(&self, coding: SnapshotCoding) -> &Bytes {
        match coding {
            SnapshotCoding::Plain => &self.frame,
            SnapshotCoding::Deflate => self.deflate.get_or_init(|| {
                let Ok(mut snapshot) = omcb_proto::v1::Snapshot::decode(&self.bare[..]) else {
                    return self.frame.clone(); // cannot happen: we encoded it
                };
                deflate_bitsets(&mut snapshot);
                frames::frame(
                    fastwebsockets::OpCode::Binary,
                    &omcb_proto::encode_server(Msg::Snapshot(snapshot)),
                )
            }),
        }
    }

    /// The bare snapshot, gzipped once.
    pub fn gzip(&self) -> &Bytes {
        self.gzip.get_or_init(|| {
            use std::io::Write as _;
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(self.bare.len() / 8),
                SNAPSHOT_LEVEL,
            );
            enc.write_all(&self.bare).expect("writing to a Vec cannot fail");
            Bytes::from(enc.finish().expect("writing to a Vec cannot fail"))
        })
    }
}

/// Moves each bitset of `snapshot` that deflate makes smaller to its
/// `*_deflate` field (`snapshot=deflate` sockets, docs/PROTOCOL.md).
fn deflate_bitsets(snapshot: &mut omcb_proto::v1::Snapshot) {
    use std::io::Write as _;
    let deflate = |bits: &mut Vec<u8>, into: &mut Vec<u8>| {
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::with_capacity(bits.len() / 8), SNAPSHOT_LEVEL);
        enc.write_all(bits).expect("writing to a Vec cannot fail");
        let z = enc.finish().expect("writing to a Vec cannot fail");
        // A random half-checked board does not compress: keep it plain.
        if z.len() < bits.len() {
            *into = z;
            bits.clear();
        }
    };
    deflate(&mut snapshot.checked, &mut snapshot.checked_deflate);
    deflate(&mut snapshot.frozen, &mut snapshot.frozen_deflate);
}

/// The range Snapshot of `regions` of `board`, as a socket's frame.
fn range_frame(board: &Board, regions: &Range<u32>, coding: SnapshotCoding) -> Bytes {
    let mut snapshot = board.range_snapshot(regions, omcb_store::now_ms());
    if coding == SnapshotCoding::Deflate {
        deflate_bitsets(&mut snapshot);
    }
    frames::frame(
        fastwebsockets::OpCode::Binary,
        &omcb_proto::encode_server(Msg::Snapshot(snapshot)),
    )
}

/// How often subscribed sockets get the counts while they move.
const COUNTS_EVERY: Duration = Duration::from_secs(1);

/// The compression level of a snapshot's bitsets (the socket's deflate and
/// `GET /api/state`'s gzip), made once per seq. Level 1 leaves about 1 KB of
/// a near-empty board's 250 KB of zeros (its matches are short); level 4
/// takes it to about 0.3 KB at the same few milliseconds for a million boxes
/// (docs/BENCHMARKS.md, "Bytes per page load").
const SNAPSHOT_LEVEL: flate2::Compression = flate2::Compression::new(4);

/// Sockets a fan-out task writes before it lets other tasks run.
const FAN_OUT_CHUNK: usize = 256;

/// How a socket started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// From a snapshot.
    Snapshot,
    /// From the batches after the client's `since`.
    Resume,
    /// From a range Snapshot of the subscription it asked for at connect
    /// (`?first=&count=`).
    Range,
}

/// How long a resuming client that is ahead of this worker's replica (it came
/// from another worker of the fleet) waits for the replica before it gets a
/// snapshot instead. Replicas trail each other by one feed read, milliseconds.
const RESUME_PATIENCE: Duration = Duration::from_millis(500);

/// A socket's membership in the fan-out, from [`Hub::join`]. Dropping it
/// removes the socket, however its task ends (aborted included).
pub struct Joined<'a> {
    hub: &'a Hub,
    shard: usize,
    key: usize,
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        self.hub.shards[self.shard].sinks.lock().try_remove(self.key);
    }
}

impl std::fmt::Debug for Joined<'_> {
    // Not derived: the hub's Debug would print the whole board.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined").field("shard", &self.shard).field("key", &self.key).finish()
    }
}

/// Some of the sockets, and the queue of what to hand them.
#[derive(Debug)]
struct Shard {
    sinks: Mutex<Slab<Arc<Sink>>>,
    tx: mpsc::UnboundedSender<Published>,
}

/// The replica and what must change with it atomically.
#[derive(Debug)]
struct State {
    /// The board as of the last published batch.
    board: Board,
    /// Recent batches, oldest first, contiguous, for `?since=` resumes.
    ring: VecDeque<EncodedBatch>,
    /// Each region's last frame, so the next one chains to it.
    chains: Chains,
    /// When the last counts frame was published, and its seq.
    counts: (Instant, u64),
}

/// See the module docs.
#[derive(Debug)]
pub struct Hub {
    /// Replica + ring; write-locked only to publish or reset. A panic under
    /// the lock cannot leave the replica half-written (publish applies changes
    /// the store validated), so parking_lot's locks, which do not poison, fit.
    state: RwLock<State>,
    /// The sockets, sharded for a parallel fan-out.
    shards: Vec<Shard>,
    /// The shards' queues, until `run` starts their tasks.
    shard_queues: Mutex<Vec<mpsc::UnboundedReceiver<Published>>>,
    /// Which shard the next socket joins.
    next_shard: AtomicUsize,
    /// Shards still writing the last batch. A tick that finds the fan-out
    /// busy publishes nothing and leaves its changes to the next one: under
    /// overload batches grow instead of queueing up (latency stays bounded).
    fanning_out: AtomicUsize,
    /// The batch being written by the fan-out, for its delivery time.
    in_flight: Mutex<Option<InFlight>>,
    /// The largest overhead (a change's time outside its tick wait) of the
    /// batches delivered since the tick last read it, for the [`Pacer`].
    overhead: Mutex<Option<Duration>>,
    /// The last encoded snapshot; re-encoded only when the seq moved.
    snapshot: Mutex<Option<Arc<EncodedSnapshot>>>,
    /// Whether the replica is caught up with a reachable store (`/readyz`).
    ready: AtomicBool,
    /// Batches kept for resumes.
    resume_batches: usize,
    /// `(epoch, seq)` of the replica, for resumes that must wait for it.
    position: watch::Sender<(u64, u64)>,
    /// The board's `max_checked` (0 = none), fixed when the board was
    /// created; every `Settings` message carries it.
    max_checked: AtomicU32,
    metrics: Metrics,
}

impl Hub {
    /// A hub starting from `board` (the store's snapshot), fanning out over
    /// `shards` tasks.
    pub fn new(board: Board, shards: usize, resume_batches: usize, metrics: Metrics) -> Self {
        let (shards, shard_queues): (Vec<_>, Vec<_>) = (0..shards.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                (Shard { sinks: Mutex::new(Slab::new()), tx }, rx)
            })
            .unzip();
        metrics.seq.set(board.seq as f64);
        let position = watch::Sender::new((board.epoch, board.seq));
        Self {
            position,
            max_checked: AtomicU32::new(0),
            state: RwLock::new(State {
                chains: Chains::new(board.size, board.seq),
                counts: (Instant::now(), board.seq),
                board,
                ring: VecDeque::new(),
            }),
            shards,
            shard_queues: Mutex::new(shard_queues),
            next_shard: AtomicUsize::new(0),
            fanning_out: AtomicUsize::new(0),
            in_flight: Mutex::new(None),
            overhead: Mutex::new(None),
            snapshot: Mutex::new(None),
            ready: AtomicBool::new(true),
            resume_batches,
            metrics,
        }
    }

    /// Sets the board's `max_checked` (0 = none), once at start.
    pub fn set_max_checked(&self, max_checked: u32) {
        self.max_checked.store(max_checked, Ordering::Relaxed);
    }

    /// `ServerMessage{settings}` for the board's settings with this
    /// `freeze_after_ms`, stamped now.
    fn settings_frame(&self, freeze_after_ms: u64) -> Bytes {
        let settings = omcb_proto::v1::Settings {
            freeze_after_ms,
            server_time_ms: omcb_store::now_ms(),
            max_checked: self.max_checked.load(Ordering::Relaxed),
        };
        frames::frame(
            fastwebsockets::OpCode::Binary,
            &omcb_proto::encode_server(Msg::Settings(settings)),
        )
    }

    /// The `Settings` frame a socket's start ends with: always after resumed
    /// batches (the client may have missed a change), after a Snapshot only
    /// on a board with a limit (the Snapshot has no field for it).
    fn start_settings(&self, board: &Board, resumed: bool) -> Option<Bytes> {
        (resumed || self.max_checked.load(Ordering::Relaxed) > 0)
            .then(|| self.settings_frame(board.freeze_after_ms))
    }

    /// Whether the replica is caught up with its store.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// `(epoch, seq)` of the replica.
    pub fn position(&self) -> (u64, u64) {
        let s = self.state.read();
        (s.board.epoch, s.board.seq)
    }

    /// Board size.
    pub fn size(&self) -> u32 {
        self.state.read().board.size
    }

    /// The replica's value of box `index` (false outside the board).
    pub fn is_checked(&self, index: u32) -> bool {
        self.state.read().board.is_checked(index)
    }

    /// Runs `f` on the replica under the read lock.
    pub fn with_board<T>(&self, f: impl FnOnce(&Board) -> T) -> T {
        f(&self.state.read().board)
    }

    /// Starts a new socket and adds it to the fan-out. Everything a socket's
    /// start does happens here, in this order (the helpers it calls follow it):
    ///
    /// 1. A client resuming (`resume = Some((epoch, since))`) waits up to
    ///    `RESUME_PATIENCE` (500 ms) for the replica to reach `since`. In a
    ///    fleet a client that resumes on another worker may be a few
    ///    milliseconds ahead of this worker's replica; waiting lets it resume
    ///    with batches instead of a 125 KB snapshot (at a worker's death, all
    ///    of its clients reconnect at once). No wait when the epoch differs.
    /// 2. Under the read lock, the start is chosen: the ring's batches after
    ///    `since` when the ring still holds all of them ([`Start::Resume`]);
    ///    otherwise a snapshot and the ring's batches after it
    ///    ([`Start::Snapshot`]).
    /// 3. Still under the read lock, the start is queued into the sink
    ///    ([`Sink::start`]: it goes out before anything else the socket
    ///    sends) and the sink joins a shard. So every batch published after
    ///    the start is offered to the sink, and every one before it is inside
    ///    the start (the module's invariant).
    ///
    /// A socket subscribed at connect (`view`, from `?first=&count=`) skips
    /// all of that: under the read lock it starts with a range Snapshot of its
    /// regions at the replica's seq ([`Start::Range`]), whatever `resume`
    /// says, and is subscribed from then on, as after a `Subscribe`.
    ///
    /// The socket leaves the fan-out when the returned [`Joined`] is dropped.
    pub async fn join(
        &self,
        sink: &Arc<Sink>,
        resume: Option<(u64, u64)>,
        view: Option<Range<u32>>,
        coding: SnapshotCoding,
    ) -> (Joined<'_>, Start) {
        if let Some(regions) = view {
            let state = self.state.read();
            let (epoch, seq) = (state.board.epoch, state.board.seq);
            let frame = range_frame(&state.board, &regions, coding);
            self.metrics.snapshot_bytes_connect.increment(frame.len() as u64);
            let settings = self.start_settings(&state.board, false);
            sink.start_subscribed(epoch, seq, regions, std::iter::once(frame).chain(settings));
            return (self.add(sink, state), Start::Range);
        }
        if let Some((epoch, since)) = resume {
            let mut rx = self.position.subscribe();
            let reached = |&(e, s): &(u64, u64)| e != epoch || s >= since;
            let _ = tokio::time::timeout(RESUME_PATIENCE, rx.wait_for(reached)).await;
        }
        // The snapshot is encoded outside the lock (see `snapshot`), so it may
        // be a few batches old by the time the lock is taken again: the ring's
        // batches after it go out right behind it. Only when the ring lost
        // them (rare: a reset, or a tiny `--resume-batches`) is it taken again.
        let mut snapshot = None;
        for attempt in 0.. {
            let state = self.state.read();
            let (epoch, seq) = (state.board.epoch, state.board.seq);
            let start = if let Some(b) =
                resume.and_then(|(e, since)| Self::resume_from(&state, e, since))
            {
                // A resuming client may have missed a settings change (it
                // was away, or loaded `/api/state` just before): the board's
                // settings go last in its start.
                let settings = self.start_settings(&state.board, true);
                sink.start(epoch, seq, b.into_iter().map(|b| b.frame).chain(settings));
                Start::Resume
            } else if let Some(frames) =
                snapshot.as_ref().and_then(|s| Self::snapshot_and_batches(&state, s, coding))
            {
                let bytes = snapshot.as_ref().map_or(0, |s| s.frame(coding).len());
                self.metrics.snapshot_bytes_connect.increment(bytes as u64);
                sink.start(epoch, seq, frames.chain(self.start_settings(&state.board, false)));
                Start::Snapshot
            } else if attempt >= 3 {
                // Under constant resets: encode under the lock rather than retry forever.
                let frame = self.encode_snapshot(&state.board).frame;
                self.metrics.snapshot_bytes_connect.increment(frame.len() as u64);
                let settings = self.start_settings(&state.board, false);
                sink.start(epoch, seq, std::iter::once(frame).chain(settings));
                Start::Snapshot
            } else {
                drop(state);
                let s = self.snapshot();
                s.frame(coding); // compress outside the lock
                snapshot = Some(s);
                continue;
            };
            return (self.add(sink, state), start);
        }
        unreachable!("the loop returns")
    }

    /// Adds a started socket to a shard of the fan-out, still under the read
    /// lock `state` its start was taken under.
    fn add(&self, sink: &Arc<Sink>, state: RwLockReadGuard<'_, State>) -> Joined<'_> {
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let key = self.shards[shard].sinks.lock().insert(sink.clone());
        drop(state);
        Joined { hub: self, shard, key }
    }

    /// The ring's batches after `since` of `epoch`, when the ring holds every
    /// one of them (none when `since` is the replica's seq); `None` otherwise.
    /// Taken under the read lock `state`.
    fn resume_from(state: &State, epoch: u64, since: u64) -> Option<Vec<EncodedBatch>> {
        let board = &state.board;
        if epoch != board.epoch || since > board.seq {
            return None;
        }
        if since == board.seq {
            return Some(Vec::new());
        }
        // The ring must reach back to the change right after `since`.
        let first = state.ring.front()?;
        if first.from_seq > since + 1 {
            return None;
        }
        Some(state.ring.iter().filter(|b| b.to_seq > since).cloned().collect())
    }

    /// A snapshot and the ring's batches after it that bring it to the
    /// replica's seq: what a socket starts from, taken under the read lock
    /// `state`. `None` when the ring no longer covers the gap (the caller
    /// takes a newer snapshot).
    fn snapshot_and_batches(
        state: &State,
        snapshot: &Arc<EncodedSnapshot>,
        coding: SnapshotCoding,
    ) -> Option<impl Iterator<Item = Bytes> + use<>> {
        if snapshot.freeze_after_ms != state.board.freeze_after_ms {
            // Encoded before a settings change that its sockets already got.
            return None;
        }
        let batches = Self::resume_from(state, snapshot.epoch, snapshot.seq)?;
        let first = snapshot.frame(coding).clone();
        Some(std::iter::once(first).chain(batches.into_iter().map(|b| b.frame)))
    }

    /// The current snapshot, encoded at most once per seq. The encoding (a
    /// 250 KB copy and a protobuf encode for a million boxes) happens outside
    /// the replica's lock: under it only the board is copied, so a publish
    /// never waits for an encode. Concurrent callers wait on the cache's
    /// mutex for the one encode and share it.
    pub fn snapshot(&self) -> Arc<EncodedSnapshot> {
        let mut cache = self.snapshot.lock();
        let board = {
            let state = self.state.read();
            if let Some(s) = cache.as_ref()
                && s.epoch == state.board.epoch
                && s.seq == state.board.seq
                && s.freeze_after_ms == state.board.freeze_after_ms
            {
                return s.clone();
            }
            state.board.clone()
        };
        let encoded = Arc::new(self.encode_snapshot(&board));
        *cache = Some(encoded.clone());
        encoded
    }

    fn encode_snapshot(&self, board: &Board) -> EncodedSnapshot {
        let snapshot = board.to_snapshot(omcb_store::now_ms());
        let bare = Bytes::from(snapshot.encode_to_vec());
        let frame = frames::frame(
            fastwebsockets::OpCode::Binary,
            &omcb_proto::encode_server(Msg::Snapshot(snapshot)),
        );
        self.metrics.snapshot_encodes.increment(1);
        EncodedSnapshot {
            epoch: board.epoch,
            seq: board.seq,
            freeze_after_ms: board.freeze_after_ms,
            frame,
            bare,
            gzip: std::sync::OnceLock::new(),
            deflate: std::sync::OnceLock::new(),
        }
    }

    /// Queues the current snapshot into `sink`, in place of the batches it
    /// skipped. Encoded outside the read lock (see `snapshot`); under it, the
    /// ring's batches after the snapshot are queued with it as one write, so
    /// the next batch the fan-out offers follows.
    pub fn send_snapshot(&self, sink: &Sink, coding: SnapshotCoding) {
        let _view = sink.view.lock();
        match sink.subscribed() {
            Some(regions) => {
                let state = self.state.read();
                let frame = range_frame(&state.board, &regions, coding);
                sink.snapshot_of(state.board.epoch, state.board.seq, Some(regions), frame);
            }
            None => self.send_full_snapshot(sink, coding),
        }
    }

    /// A viewport subscription (docs/PROTOCOL.md, "Viewport
    /// subscriptions"): `regions` from now on, `None` back to the full
    /// board. The socket gets range Snapshots of the regions new to it (of
    /// all of them when it was not subscribed or a snapshot is due), or a
    /// full Snapshot when it leaves its subscription; the regions it keeps
    /// keep their chains. Called by the socket's reader after its start.
    pub fn subscribe(&self, sink: &Sink, regions: Option<Range<u32>>, coding: SnapshotCoding) {
        let _view = sink.view.lock();
        let Some(regions) = regions else {
            if sink.subscribed().is_some() {
                self.metrics.snapshots_subscribe.increment(1);
                self.send_full_snapshot(sink, coding);
            }
            return;
        };
        let plan = sink.plan_subscribe(&regions);
        let state = self.state.read();
        let (epoch, seq) = (state.board.epoch, state.board.seq);
        match plan {
            None => {
                let frame = range_frame(&state.board, &regions, coding);
                self.metrics.snapshots_subscribe.increment(1);
                self.metrics.snapshot_bytes_subscribe.increment(frame.len() as u64);
                sink.snapshot_of(epoch, seq, Some(regions), frame);
            }
            Some(runs) => {
                let frames: Vec<Bytes> =
                    runs.iter().map(|run| range_frame(&state.board, run, coding)).collect();
                for f in &frames {
                    self.metrics.snapshots_subscribe.increment(1);
                    self.metrics.snapshot_bytes_subscribe.increment(f.len() as u64);
                }
                sink.resubscribe(seq, regions, frames);
            }
        }
    }

    /// [`send_snapshot`](Self::send_snapshot) of the whole board. The caller
    /// holds the sink's `view` lock.
    fn send_full_snapshot(&self, sink: &Sink, coding: SnapshotCoding) {
        for attempt in 0.. {
            let s = self.snapshot();
            s.frame(coding); // compress outside the lock
            let state = self.state.read();
            let (epoch, seq) = (state.board.epoch, state.board.seq);
            if let Some(frames) = Self::snapshot_and_batches(&state, &s, coding) {
                let frames: Vec<Bytes> = frames.collect();
                // Usually the snapshot alone; else a copy of 250 KB (microseconds).
                let frame = if frames.len() == 1 {
                    s.frame(coding).clone()
                } else {
                    frames.concat().into()
                };
                sink.snapshot(epoch, seq, frame);
                return;
            }
            if attempt >= 3 {
                sink.snapshot(epoch, seq, self.encode_snapshot(&state.board).frame);
                return;
            }
        }
    }

    /// Reads the store's feed and publishes one batch per tick until the feed
    /// ends or `stop` fires. The tick's length follows `budgets` ([`Pacer`]).
    pub async fn run(
        self: Arc<Self>,
        store: Store,
        feed: ChangeFeed,
        budgets: Budgets,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let queues = std::mem::take(&mut *self.shard_queues.lock());
        let fan_out: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, rx)| tokio::spawn(self.clone().fan_out(i, rx)))
            .collect();
        let mut pending = Pending::default();
        let mut pacer = Pacer::new(budgets);
        let mut egress = (self.metrics.egress.load(Ordering::Relaxed), Instant::now());
        let ticker = tokio::time::sleep(pacer.tick());
        tokio::pin!(ticker);
        let mut feed = FeedTask::spawn(feed);
        'run: loop {
            tokio::select! {
                () = crate::shutdown::until_set(&mut stop) => break,
                event = feed.events.recv() => {
                    if !self.on_feed_event(event, &mut pending, &store, &mut feed).await {
                        break;
                    }
                }
                () = &mut ticker => {
                    if self.fanning_out.load(Ordering::Acquire) == 0 {
                        // Take in what the store has now, so this batch
                        // carries every change committed before the tick.
                        let want = feed.want.clone();
                        for event in feed.read_now(pacer.tick()).await {
                            if !self.on_feed_event(Some(event), &mut pending, &store, &mut feed).await {
                                break 'run;
                            }
                            if !Arc::ptr_eq(&want, &feed.want) {
                                // The feed was replaced: the rest is the old one's.
                                break;
                            }
                        }
                        self.publish(&mut pending);
                        self.quiet_tick();
                    } else {
                        self.metrics.ticks_deferred.increment(1);
                    }
                    let next = self.pace(&mut pacer, &mut egress);
                    // Like an interval that delays missed ticks: on schedule
                    // when on time, a whole tick from now when late.
                    let now = tokio::time::Instant::now();
                    let at = ticker.deadline() + next;
                    ticker.as_mut().reset(if at < now { now + next } else { at });
                }
            }
        }
        feed.task.abort();
        // Publish what was accepted before the stop so it is not lost to clients
        // still connected during the grace period.
        self.publish(&mut pending);
        for task in fan_out {
            task.abort();
        }
    }

    /// Takes one event of the feed task into `pending` (or the replica);
    /// `false` when the feed task is gone.
    async fn on_feed_event(
        &self,
        event: Option<Result<FeedEvent, omcb_store::StoreError>>,
        pending: &mut Pending,
        store: &Store,
        feed: &mut FeedTask,
    ) -> bool {
        match event {
            None => return false,
            Some(Ok(FeedEvent::Changes(changes))) => {
                self.ready.store(true, Ordering::Relaxed);
                if let Err(e) = pending.push(&changes) {
                    // The store promised contiguous changes; if that ever
                    // breaks, start over from a snapshot and a new feed.
                    tracing::error!(error = %e, "store feed out of order; reloading the board");
                    *pending = Pending::default();
                    feed.task.abort();
                    match store.snapshot().await {
                        Ok(board) => {
                            *feed = FeedTask::spawn(store.feed_from(&board));
                            self.reset(board);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reload failed; retrying from the replica's position");
                            *feed = FeedTask::spawn(self.with_board(|b| store.feed_from(b)));
                        }
                    }
                }
            }
            Some(Ok(FeedEvent::Reset(board))) => {
                self.ready.store(true, Ordering::Relaxed);
                *pending = Pending::default();
                self.reset(*board);
            }
            Some(Err(e)) => {
                self.ready.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "store feed failed; retrying");
            }
        }
        true
    }

    /// Tells the pacer what the ticks since its last call measured (the bytes
    /// written to sockets since `egress`'s count and instant, the overhead of
    /// the batches delivered) and returns the next tick's length.
    fn pace(&self, pacer: &mut Pacer, egress: &mut (u64, Instant)) -> Duration {
        let (bytes, now) = (self.metrics.egress.load(Ordering::Relaxed), Instant::now());
        pacer.egress(bytes.saturating_sub(egress.0), now - egress.1);
        *egress = (bytes, now);
        if let Some(overhead) = self.overhead.lock().take() {
            pacer.delivered(overhead);
        }
        let tick = pacer.tick();
        self.metrics.tick.set(tick.as_secs_f64());
        tick
    }

    /// The last shard wrote the batch in flight to its sockets: its delivery
    /// time and its overhead for the pacer.
    fn delivered(&self) {
        let Some(b) = self.in_flight.lock().take() else {
            return;
        };
        let fan_out = b.published.elapsed();
        let mut overhead = fan_out;
        if b.oldest_committed_ms > 0 {
            let delivery = omcb_store::now_ms().saturating_sub(b.oldest_committed_ms);
            let delivery = Duration::from_millis(delivery);
            self.metrics.delivery.record(delivery.as_secs_f64());
            // Minus the wait for the tick, which the pacer chooses.
            let waited = b.published.saturating_duration_since(b.oldest_arrival);
            overhead = overhead.max(delivery.saturating_sub(waited));
        }
        let mut slot = self.overhead.lock();
        *slot = Some(slot.map_or(overhead, |o| o.max(overhead)));
    }

    /// One shard's fan-out task: offers each published batch to every sink of
    /// the shard, in publication order.
    async fn fan_out(self: Arc<Self>, shard: usize, mut rx: mpsc::UnboundedReceiver<Published>) {
        // The sinks are copied out of the lock (a few thousand pointers), so
        // sockets can join and leave while this shard writes.
        let mut sinks: Vec<Arc<Sink>> = Vec::new();
        while let Some(published) = rx.recv().await {
            sinks.extend(self.shards[shard].sinks.lock().iter().map(|(_, s)| s.clone()));
            for chunk in sinks.chunks(FAN_OUT_CHUNK) {
                match &published {
                    Published::Batch(b) => chunk.iter().for_each(|s| s.offer(b)),
                    Published::Reset => chunk.iter().for_each(|s| s.reset()),
                    Published::Settings(frame) => chunk.iter().for_each(|s| s.send(frame.clone())),
                    Published::Counts { epoch, frame } => {
                        chunk.iter().for_each(|s| s.offer_counts(*epoch, frame))
                    }
                }
                // Thousands of writes in a row would keep this runtime thread
                // from the hub's tick, the readers and new connections.
                tokio::task::yield_now().await;
            }
            sinks.clear();
            if matches!(published, Published::Batch(_))
                && self.fanning_out.fetch_sub(1, Ordering::AcqRel) == 1
            {
                self.delivered();
            }
        }
    }

    fn fan_out_all(&self, published: &Published) {
        if matches!(published, Published::Batch(_)) {
            self.fanning_out.fetch_add(self.shards.len(), Ordering::AcqRel);
        }
        for shard in &self.shards {
            // An error only means the fan-out tasks are gone (shutting down).
            let _ = shard.tx.send(published.clone());
        }
    }

    /// Publishes the pending changes as one batch.
    fn publish(&self, pending: &mut Pending) {
        let Some(batch) = pending.builder.finish() else {
            return;
        };
        let changes = std::mem::take(&mut pending.changes);
        let since = pending.first_arrival.take();
        let published = Instant::now();
        *self.in_flight.lock() = Some(InFlight {
            published,
            oldest_arrival: since.unwrap_or(published),
            oldest_committed_ms: changes.first().map_or(0, |c| c.committed_ms),
        });
        let mut state = self.state.write();
        // The tick's region frames, each encoded once (docs/PROTOCOL.md,
        // "Viewport subscriptions"). A few small encodes per tick: the
        // builder's batch holds each touched box once.
        let regions: Arc<[RegionFrame]> = match state.chains.frames(&batch) {
            Ok(frames) => frames
                .into_iter()
                .map(|(region, b)| RegionFrame {
                    region,
                    from_seq: b.from_seq,
                    frame: frames::frame(
                        fastwebsockets::OpCode::Binary,
                        &omcb_proto::encode_server(Msg::Batch(b)),
                    ),
                })
                .collect(),
            Err(e) => {
                // The builder made the batch from changes the store checked.
                tracing::error!(error = %e, "a batch could not be split into regions");
                Arc::default()
            }
        };
        self.metrics.region_frames.increment(regions.len() as u64);
        let encoded = EncodedBatch {
            epoch: state.board.epoch,
            from_seq: batch.from_seq,
            to_seq: batch.to_seq,
            frame: frames::frame(
                fastwebsockets::OpCode::Binary,
                &omcb_proto::encode_server(Msg::Batch(batch)),
            ),
            regions,
        };
        for change in &changes {
            if let Err(e) = state.board.apply_change(change) {
                // The store promised contiguous, valid changes; if it broke that
                // promise the replica is wrong and only a reload can fix it.
                tracing::error!(error = %e, "replica rejected a change");
            }
        }
        if state.ring.len() >= self.resume_batches {
            state.ring.pop_front();
        }
        if self.resume_batches > 0 {
            state.ring.push_back(encoded.clone());
        }
        self.fan_out_all(&Published::Batch(encoded));
        self.counts_if_due(&mut state);
        let seq = state.board.seq;
        self.position.send_replace((state.board.epoch, seq));
        drop(state);
        let applied_ms = omcb_store::now_ms();
        // 0: a log entry written before entries carried their commit time.
        for c in changes.iter().filter(|c| c.committed_ms > 0) {
            self.metrics.feed_lag.record(applied_ms.saturating_sub(c.committed_ms) as f64 / 1e3);
        }
        self.metrics.batches_published.increment(1);
        self.metrics.batch_changes.record(changes.len() as f64);
        self.metrics.seq.set(seq as f64);
        if let Some(t) = since {
            self.metrics.toggle_to_send.record(t.elapsed().as_secs_f64());
        }
    }

    /// Publishes a counts frame for subscribed sockets when the counts moved
    /// and the last one is [`COUNTS_EVERY`] old. Under the write lock, so it
    /// is queued in order with the batches.
    fn counts_if_due(&self, state: &mut State) {
        let (at, seq) = state.counts;
        if seq == state.board.seq || at.elapsed() < COUNTS_EVERY {
            return;
        }
        state.counts = (Instant::now(), state.board.seq);
        let counts = omcb_proto::v1::Batch {
            to_seq: state.board.seq,
            checked_count: state.board.checked_count,
            frozen_count: state.board.frozen_count,
            counts_only: true,
            ..Default::default()
        };
        let frame = frames::frame(
            fastwebsockets::OpCode::Binary,
            &omcb_proto::encode_server(Msg::Batch(counts)),
        );
        self.metrics.counts_frames.increment(1);
        self.fan_out_all(&Published::Counts { epoch: state.board.epoch, frame });
    }

    /// A tick without changes: the counts of the last ones still go out
    /// once their second is up.
    fn quiet_tick(&self) {
        let due = {
            let state = self.state.read();
            state.counts.1 != state.board.seq && state.counts.0.elapsed() >= COUNTS_EVERY
        };
        if due {
            self.counts_if_due(&mut self.state.write());
        }
    }

    /// Takes the board's settings as the store holds them now (the server's
    /// settings loop calls this every tick): when `freeze_after_ms` changed,
    /// the replica (so `/api/stats` and new snapshots) takes it and every
    /// socket gets a `Settings` message, queued in order with its batches.
    /// Returns whether it changed.
    pub fn set_freeze_after(&self, freeze_after_ms: u64) -> bool {
        if self.state.read().board.freeze_after_ms == freeze_after_ms {
            return false;
        }
        // Under the write lock, like a batch: a socket that starts after
        // this has the new setting in its start, one before gets the frame.
        let mut state = self.state.write();
        if state.board.freeze_after_ms == freeze_after_ms {
            return false;
        }
        tracing::info!(
            from_ms = state.board.freeze_after_ms,
            to_ms = freeze_after_ms,
            "the board's freeze_after changed"
        );
        state.board.freeze_after_ms = freeze_after_ms;
        self.fan_out_all(&Published::Settings(self.settings_frame(freeze_after_ms)));
        drop(state);
        true
    }

    /// Replaces the replica (a new epoch, or continuity lost) and tells every
    /// socket to start over from a snapshot.
    pub fn reset(&self, board: Board) {
        let mut state = self.state.write();
        tracing::info!(epoch = board.epoch, seq = board.seq, "replica reset");
        self.position.send_replace((board.epoch, board.seq));
        state.chains.reset(board.size, board.seq);
        state.counts.1 = board.seq;
        state.board = board;
        state.ring.clear();
        self.fan_out_all(&Published::Reset);
        drop(state);
        self.metrics.feed_resets.increment(1);
    }
}

/// The feed's reader, in a task of its own so the hub's `select!` never
/// cancels a read in flight (an `XREAD BLOCK` dropped every tick would never
/// finish).
///
/// While the board is quiet the task waits in the store's blocking read
/// ([`ChangeFeed::next`]), so the first change after a quiet spell reaches
/// the hub at once. After a read that brought changes it does not read
/// again until the hub's next tick asks ([`FeedTask::read_now`]): a busy
/// board is read once per tick, not once per change (a Redis `XREAD BLOCK`
/// wakes on every `XADD`, so reading again at once cost Redis one read per
/// change per worker; issue 13, part 1), and that read is taken just before
/// the tick, so it adds no latency beyond the tick's own.
struct FeedTask {
    events: mpsc::Receiver<Result<FeedEvent, omcb_store::StoreError>>,
    task: tokio::task::JoinHandle<()>,
    /// The hub's tick asks the parked task for a read.
    want: Arc<tokio::sync::Notify>,
    /// The task's last read brought changes, and it waits for `want`.
    parked: Arc<AtomicBool>,
}

/// Longest a tick waits for the read it asked the feed task for; a read
/// that takes longer lands in the next tick.
const TICK_READ_WAIT: Duration = Duration::from_millis(10);

impl FeedTask {
    fn spawn(mut feed: ChangeFeed) -> Self {
        let (tx, events) = mpsc::channel(16);
        let want = Arc::new(tokio::sync::Notify::new());
        let parked = Arc::new(AtomicBool::new(false));
        let task = {
            let (want, parked) = (want.clone(), parked.clone());
            tokio::spawn(async move {
                let (mut busy, mut more) = (false, false);
                loop {
                    let event = if busy {
                        want.notified().await;
                        feed.read_now().await
                    } else if more {
                        feed.read_now().await
                    } else {
                        feed.next().await
                    };
                    let read = match &event {
                        Ok(FeedEvent::Changes(c)) => c.len(),
                        _ => 0,
                    };
                    // A full read may have left more behind it: read on at
                    // once until caught up, so a backlog larger than one
                    // read per tick is never left behind.
                    more = read >= feed.chunk();
                    busy = read > 0 && !more;
                    // Before the send: a hub that has this event sees the
                    // task parked (or about to be) behind it.
                    parked.store(busy, Ordering::Release);
                    let failed = event.is_err();
                    if tx.send(event).await.is_err() {
                        return;
                    }
                    if failed {
                        // The backend reconnects by itself; don't spin meanwhile.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            })
        };
        Self { events, task, want, parked }
    }

    /// The events the feed has for a tick that is about to publish: those
    /// already sent, then, when the task is parked after a busy read, the
    /// read it makes now (waiting at most a quarter of the tick, and
    /// [`TICK_READ_WAIT`]). Nothing waits while the task is in a blocking
    /// read: the board is quiet, and a change would come through at once.
    async fn read_now(&mut self, tick: Duration) -> Vec<Result<FeedEvent, omcb_store::StoreError>> {
        let mut events = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            events.push(event);
        }
        if self.parked.swap(false, Ordering::AcqRel) {
            self.want.notify_one();
            let wait = (tick / 4).min(TICK_READ_WAIT);
            if let Ok(Some(event)) = tokio::time::timeout(wait, self.events.recv()).await {
                events.push(event);
            }
        }
        events
    }
}

/// A batch the fan-out is writing, for its delivery time.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// When it was handed to the shards.
    published: Instant,
    /// When its oldest change reached the hub.
    oldest_arrival: Instant,
    /// Its oldest change's commit time (Unix ms; 0 when unknown).
    oldest_committed_ms: u64,
}

/// Changes received since the last tick.
#[derive(Debug, Default)]
struct Pending {
    builder: BatchBuilder,
    changes: Vec<Change>,
    /// When the oldest pending change reached the hub (for the lag histogram).
    first_arrival: Option<Instant>,
}

impl Pending {
    fn push(&mut self, changes: &[Change]) -> Result<(), omcb_proto::batch::OutOfOrder> {
        if changes.is_empty() {
            return Ok(());
        }
        self.first_arrival.get_or_insert_with(Instant::now);
        for c in changes {
            self.builder.push(c)?;
        }
        self.changes.extend_from_slice(changes);
        Ok(())
    }
}
