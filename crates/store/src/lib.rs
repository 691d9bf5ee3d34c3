//! The board store: the one place that decides what a box's value is.
//!
//! # Layout
//! - [`Store`]: the operations the worker needs, dispatched to a backend.
//! - [`memory`]: the Memory backend, the embedded default: the board in process,
//!   persisted to a data directory at least every second and on close; it
//!   refuses changes (`StoreError::Unavailable`) while it cannot persist them.
//! - [`redis`]: the Redis backend, the same semantics as Lua scripts in
//!   `lua/*.lua`, for a fleet of workers sharing one board.
//!
//! # Semantics every backend shares
//! - **Set, not flip**: `set(i, v)` on a box that already has `v` is accepted
//!   and changes nothing (seq 0). Retries are harmless.
//! - The index is validated against the board's size here, whatever the caller did.
//! - A frozen box refuses every set (`Refusal::Frozen`).
//! - With `max_checked`, checking a box on a board that already has that many
//!   checked refuses (`Refusal::BoardFull`).
//! - Freezing (the seed's sunset rule, off when `freeze_after_ms` is 0): a box
//!   checked for at least `freeze_after_ms` cannot be unchecked. Trying to
//!   freezes it (a change with its own seq) and refuses with `Refusal::Frozen`;
//!   [`Store::sweep`] freezes such boxes nobody touched.
//! - `freeze_after_ms` is the board's live setting, not fixed at creation:
//!   [`Store::set_freeze_after`] (an operator's `omcb admin sunset`) changes
//!   it for the whole board, persisted with it (the Redis config hash, the
//!   embedded board file); the next set and sweep follow it, and every worker
//!   reads it with [`Store::current_config`] each tick. Starting a sunset
//!   applies to boxes already checked: one checked longer ago than the new
//!   setting freezes at the next sweep.
//! - Every accepted change gets the next seq (1, 2, ...), and appears in the
//!   change feed in seq order, with no holes.
//! - A board has a random non-zero epoch, chosen when it is created, and a new
//!   one whenever acknowledged changes may have been lost.
//! - Every change carries the time the store committed it
//!   ([`Change::committed_ms`]), from which the worker measures its feed's lag.
//! - Every change carries its origin ([`Change::origin`]), the keyed hash of
//!   the client address the caller gave [`Store::set`] (0 for the sweep's
//!   freezes), for the change archive; the store never sees an address.
//!
//! # Metrics
//! The store records its own, through the `metrics` facade (the worker
//! installs the recorder): `omcb_store_commands_total{purpose}` and
//! `omcb_store_command_seconds{script}` for every Redis round trip,
//! `omcb_store_toggles_total` for the toggles `set.lua` calls carried (and the
//! Memory store's board file writes, `script="persist"`),
//! `omcb_store_errors_total{kind}` for every failed one,
//! `omcb_feed_last_read_timestamp_seconds` on every successful feed read, and
//! the Memory store's `omcb_persist_failures_total` and `omcb_persist_ok`.

use std::time::{SystemTime, UNIX_EPOCH};

pub use omcb_proto::{Board, Change, Op};

pub mod memory;
pub mod redis;

/// A board's settings: size and limit fixed when it is created, the sunset
/// (`freeze_after_ms`) live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoardConfig {
    /// Number of boxes.
    pub size: u32,
    /// Refuse checking once this many boxes are checked; `None` = no limit.
    pub max_checked: Option<u32>,
    /// A box checked at least this long freezes; 0 = freezing off.
    pub freeze_after_ms: u64,
}

impl Default for BoardConfig {
    fn default() -> Self {
        Self { size: 1_000_000, max_checked: None, freeze_after_ms: 0 }
    }
}

/// Why a set was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `index >= size`.
    OutOfRange,
    /// The box is frozen (or froze now, on this attempt to uncheck it).
    Frozen,
    /// `max_checked` boxes are already checked.
    BoardFull,
}

/// The answer to a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOutcome {
    /// The box changed; the change has this seq.
    Changed {
        /// Seq of the change.
        seq: u64,
        /// The box's value now.
        checked: bool,
    },
    /// The box already had the value: accepted, nothing changed, no seq.
    Unchanged {
        /// The box's value.
        checked: bool,
    },
    /// Refused; `checked` is the box's current value (false when out of range).
    Refused {
        /// Why.
        reason: Refusal,
        /// The box's value now.
        checked: bool,
    },
}

/// What the change feed yields.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedEvent {
    /// The next changes, in seq order, continuing exactly where the feed was.
    /// Empty means "caught up, nothing new" (a backend's heartbeat).
    Changes(Vec<Change>),
    /// Continuity is lost (the feed was trimmed past our position, or the board
    /// has a new epoch): here is the whole board; continue after its seq.
    Reset(Box<Board>),
}

/// What [`Store::log_after`] read: the board's epoch and seq, and the
/// changes the store's log still holds after the asked seq.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRead {
    /// The board's epoch now.
    pub epoch: u64,
    /// The board's seq, read before the changes: a seq up to it that the
    /// changes do not start with was trimmed from the log.
    pub seq: u64,
    /// The log's changes of `epoch` after the asked seq, in order, from the
    /// first it still holds (the first may be later than the asked seq + 1:
    /// those between were trimmed).
    pub changes: Vec<Change>,
}

/// A store operation that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached now; the caller answers `REASON_UNAVAILABLE`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Persisted data exists but does not fit this configuration or is damaged.
    #[error("store data: {0}")]
    Data(String),
    /// Reading or writing the data directory failed.
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The store cannot be used as configured and waiting will not help: a
    /// bad Redis URL or CA file, a user or password Redis refuses, a TLS
    /// handshake that fails. Refused at start; the message says what to fix.
    #[error("{0}")]
    Config(String),
}

/// Milliseconds since the Unix epoch, the store's clock for check times.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Counts one failed store operation in `omcb_store_errors_total{kind}`:
/// `unavailable` (Redis unreachable or too slow), `data` (a reply or file
/// that cannot be read), `io` (the Memory store's data dir), `script` (Redis
/// answered a command with an error).
pub(crate) fn count_error(kind: &'static str) {
    metrics::counter!("omcb_store_errors_total", "kind" => kind).increment(1);
}

/// Registers every `omcb_store_errors_total{kind}` at zero, so that a healthy
/// store exports the series (an alert on their rate then has data to read,
/// and a dashboard shows 0 rather than nothing). Call once the recorder is in.
pub fn register_metrics() {
    for kind in ["unavailable", "data", "io", "script"] {
        metrics::counter!("omcb_store_errors_total", "kind" => kind).increment(0);
    }
}

/// A random non-zero epoch.
pub fn new_epoch() -> u64 {
    loop {
        let e: u64 = rand::random();
        if e != 0 {
            return e;
        }
    }
}

/// The board store, whichever backend holds the board.
#[derive(Debug, Clone)]
pub enum Store {
    /// In process (the embedded default).
    Memory(memory::MemoryStore),
    /// In Redis, shared by a fleet of workers.
    Redis(redis::RedisStore),
}

impl Store {
    /// The board's settings.
    pub fn config(&self) -> BoardConfig {
        match self {
            Store::Memory(m) => m.config(),
            Store::Redis(r) => r.config(),
        }
    }

    /// Sets the board's `freeze_after_ms` (0 stops the sunset), persisted
    /// before it answers; returns the board's settings after the change.
    pub async fn set_freeze_after(&self, freeze_after_ms: u64) -> Result<BoardConfig, StoreError> {
        match self {
            Store::Memory(m) => m.set_freeze_after(freeze_after_ms).await,
            Store::Redis(r) => r.set_freeze_after(freeze_after_ms).await,
        }
    }

    /// The board's settings as the store holds them now: free for the
    /// embedded store, one `HGET` for Redis (which also refreshes what
    /// [`config`](Self::config) answers and the sweep reads).
    pub async fn current_config(&self) -> Result<BoardConfig, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.config()),
            Store::Redis(r) => r.reload_config().await,
        }
    }

    /// Sets box `index` to `checked` (see the crate docs for the rules) for
    /// client `origin`: the keyed hash of its address, which the change
    /// carries ([`Change::origin`]); 0 = no client.
    pub async fn set(
        &self,
        index: u32,
        checked: bool,
        origin: u64,
    ) -> Result<SetOutcome, StoreError> {
        match self {
            Store::Memory(m) => m.set(index, checked, origin),
            Store::Redis(r) => r.set(index, checked, origin).await,
        }
    }

    /// Whether the store accepts changes now. The Memory store refuses them
    /// while it cannot persist the board; the Redis store's trouble shows in
    /// its feed instead (always true here).
    pub fn is_writable(&self) -> bool {
        match self {
            Store::Memory(m) => m.is_writable(),
            Store::Redis(_) => true,
        }
    }

    /// The whole board, atomically, with its seq and epoch.
    pub async fn snapshot(&self) -> Result<Board, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.snapshot()),
            Store::Redis(r) => r.snapshot().await,
        }
    }

    /// The ordered change feed, starting after `seq` of board `epoch`.
    pub fn feed(&self, epoch: u64, seq: u64) -> ChangeFeed {
        match self {
            Store::Memory(m) => ChangeFeed::Memory(m.feed(epoch, seq)),
            Store::Redis(r) => ChangeFeed::Redis(Box::new(r.feed(epoch, seq))),
        }
    }

    /// The change feed after `board`, the caller's replica. The Redis feed
    /// keeps a copy up to date, to restore the board from when Redis loses
    /// acknowledged changes (see [`redis`]).
    pub fn feed_from(&self, board: &Board) -> ChangeFeed {
        match self {
            Store::Memory(m) => ChangeFeed::Memory(m.feed(board.epoch, board.seq)),
            Store::Redis(r) => ChangeFeed::Redis(Box::new(r.feed_from(board))),
        }
    }

    /// Freezes up to `limit` boxes whose check is older than `freeze_after_ms`;
    /// returns how many froze. A no-op when freezing is off.
    pub async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        Ok(self.sweep_leased(limit).await?.unwrap_or(0))
    }

    /// [`sweep`](Self::sweep), saying whether this caller swept: `None` when
    /// another worker holds the Redis sweep lease (the embedded store has no
    /// lease: its one worker always sweeps).
    pub async fn sweep_leased(&self, limit: usize) -> Result<Option<usize>, StoreError> {
        match self {
            Store::Memory(m) => Ok(Some(m.sweep(limit))),
            Store::Redis(r) => r.sweep(limit).await,
        }
    }

    /// The change log after seq `after`, up to `max` changes, as the store
    /// holds it (not through a feed: no reset, no replica), for the change
    /// archiver, which must see exactly which seqs were trimmed.
    pub async fn log_after(&self, after: u64, max: usize) -> Result<LogRead, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.log_after(after, max)),
            Store::Redis(r) => r.log_after(after, max).await,
        }
    }

    /// Takes or renews the archiver's lease for `ms`: whether this caller
    /// may archive (in a fleet one worker at a time; the embedded store's
    /// one worker always).
    pub async fn archive_lease(&self, ms: u64) -> Result<bool, StoreError> {
        match self {
            Store::Memory(_) => Ok(true),
            Store::Redis(r) => r.archive_lease(ms).await,
        }
    }

    /// Most changes the store's log keeps: a reader further behind than
    /// this loses changes (the archiver records them as a gap).
    pub fn log_capacity(&self) -> u64 {
        match self {
            Store::Memory(_) => memory::LOG_CAPACITY as u64,
            Store::Redis(_) => redis::LOG_MAXLEN,
        }
    }

    /// Persists what is not yet persisted and stops background work; call once
    /// on shutdown.
    pub async fn close(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => m.close().await,
            Store::Redis(r) => r.close().await,
        }
    }
}

/// A reader of the store's change feed.
#[derive(Debug)]
pub enum ChangeFeed {
    /// From the Memory backend.
    Memory(memory::MemoryFeed),
    /// From the Redis backend's change stream.
    /// Boxed: ten times the size of the memory feed, and made once per reset.
    Redis(Box<redis::RedisFeed>),
}

impl ChangeFeed {
    /// Waits for the next changes (or a reset). Cancel-safe: dropping the future
    /// loses nothing.
    pub async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        let event = match self {
            ChangeFeed::Memory(f) => Ok(f.next().await),
            ChangeFeed::Redis(f) => f.next().await,
        };
        read(event)
    }

    /// Most changes one read returns: a read that returned this many may
    /// have left more behind it.
    pub fn chunk(&self) -> usize {
        match self {
            ChangeFeed::Memory(_) => memory::FEED_CHUNK,
            ChangeFeed::Redis(_) => redis::FEED_CHUNK as usize,
        }
    }

    /// The changes the store has now after the feed's position, without
    /// waiting: an empty `Changes` when there are none yet (not a
    /// heartbeat), or a `Reset`. How a reader that publishes once per tick
    /// reads a busy board: once per tick, rather than once per change as
    /// repeated [`next`](Self::next) calls would (a Redis `XREAD BLOCK`
    /// wakes on every change).
    pub async fn read_now(&mut self) -> Result<FeedEvent, StoreError> {
        let event = match self {
            ChangeFeed::Memory(f) => Ok(f.read_now()),
            ChangeFeed::Redis(f) => f.read_now().await,
        };
        read(event)
    }
}

/// Records a successful read of the feed.
fn read(event: Result<FeedEvent, StoreError>) -> Result<FeedEvent, StoreError> {
    if event.is_ok() {
        // Heartbeats count: a feed that stopped reading shows as the age
        // of this time, whether or not anything changed.
        metrics::gauge!("omcb_feed_last_read_timestamp_seconds")
            .set(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
    }
    event
}
