//! The Memory backend: the embedded default. The board lives in this process
//! behind one mutex (every operation is microseconds and never awaits under
//! it) and is persisted to `--data-dir` at least every second while it changes
//! and on [`MemoryStore::close`], as temp file + fsync + rename.
//!
//! A crash (kill -9) loses at most what was acknowledged since the last
//! persist (about a second); because acknowledged changes may then be gone, a
//! board loaded from a file that was not written by a clean close gets a new
//! epoch (PROTOCOL.md: a board that lost writes comes back as a new
//! incarnation). Opening rewrites the file marked unclean before the first
//! change is accepted, so a crash right after a clean restart is noticed too;
//! that first write is also the check that the data dir is writable.
//!
//! **The store never acknowledges more than it can persist:** when a write
//! fails (full or read-only disk, I/O error), every set answers
//! [`StoreError::Unavailable`] until a write succeeds again; the persister
//! retries with a backoff.
//!
//! **A full disk loses no acknowledged change.** The data dir holds a space
//! reserve, [`RESERVE_NAME`]: a file of zeros (written, not `fallocate`d, so
//! its blocks really are allocated) as large as the largest board file this
//! board can need ([`reserve_len`]); start-up refuses a data dir where it
//! cannot be created. When a write fails for lack of space (ENOSPC, EDQUOT),
//! the store first refuses changes, then takes the board (which now holds
//! every acknowledged change), writes it over the reserve's own blocks
//! (no new space needed), truncates and fsyncs it and renames it over the
//! board file. That file is marked clean, truthfully: nothing acknowledged
//! is missing from it and nothing more is acknowledged until a later write
//! marks the file unclean again, so a stop (even a kill -9) while the disk is
//! still full keeps the epoch. The store keeps refusing until the reserve can
//! be written again (retried with the backoff), then writes the board
//! (unclean) and accepts again. A filesystem that copies on write (btrfs,
//! ZFS) or compresses zeros may need new blocks even to overwrite the
//! reserve; there the emergency write can fail like any other.
//!
//! A read-only disk or an I/O error cannot be worked around: what was
//! acknowledged before the failure stays in memory and is written by the
//! next write that succeeds; if none does before the process ends,
//! [`MemoryStore::close`] fails loudly and the file on disk, marked unclean,
//! gives the next start a new epoch.
//!
//! The persister keeps its own copy of the board, brought up to date from the
//! change log: under the store's mutex it copies only the changes since its
//! last write, and encodes, checksums and writes outside it, so a persist does
//! not stall toggles.
//!
//! # Layout
//! - this file: [`MemoryStore`], the board under its mutex and the rules of
//!   a set and a sweep.
//! - `persist`: the persister: its copy of the board, the writes, the space
//!   reserve on a full disk, the final write on close.
//! - `file`: the board file format and the file system steps (atomic
//!   replace, the reserve).
//! - `feed`: [`MemoryFeed`], a reader of the change log.

mod feed;
mod file;
mod persist;

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{Notify, watch};

pub use feed::{HEARTBEAT, MemoryFeed};

use crate::{Board, BoardConfig, Change, Op, Refusal, SetOutcome, StoreError};
use persist::{Disk, DiskCopy};

/// Changes kept for the feed; a reader further behind gets a `Reset`.
pub const LOG_CAPACITY: usize = 100_000;
/// Most changes one `MemoryFeed::next` returns.
pub const FEED_CHUNK: usize = 4096;
/// The board file inside the data directory.
pub const FILE_NAME: &str = "board.omcb";
/// The space reserve inside the data directory (see the module docs).
pub const RESERVE_NAME: &str = "board.omcb.reserve";
/// How often the persister checks for unsaved changes.
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts while writes fail: the store refuses
/// toggles until one succeeds, so it keeps trying often.
pub const RETRY_AT_MOST: Duration = Duration::from_secs(5);

/// The store's clock: milliseconds since the Unix epoch. Replaceable in tests.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The embedded store. Cheap to clone: clones share one board.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("config", &self.inner.config)
            .field("path", &self.inner.disk.as_ref().map(|d| &d.path))
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The settings this run was started with; the live `freeze_after_ms`
    /// is the board's (`State::board`), which `omcb admin` changes.
    config: BoardConfig,
    /// The board and what changes with it.
    state: Mutex<State>,
    /// Woken after every accepted change, for feed readers.
    changed: Notify,
    /// Time source for check times and the freeze rule.
    clock: Clock,
    /// The board file and the persister's copy of the board, when persisting.
    disk: Option<Disk>,
    /// Tells the persister to stop (on close).
    stop: watch::Sender<bool>,
    /// The persister task, taken by close.
    persister: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Everything one mutex guards.
struct State {
    /// Bits, counts, seq, epoch.
    board: Board,
    /// When each checked box was last checked (ms); 0 for unchecked boxes.
    checked_at: Vec<u64>,
    /// `(checked_at, index)` of checked, unfrozen boxes, oldest first, so the
    /// sweep costs O(log n + due) instead of a scan of the board. Kept only
    /// while freezing is on (`board.freeze_after_ms > 0`, the live setting).
    due: Option<BTreeSet<(u64, u32)>>,
    /// Recent changes, oldest first, contiguous, ending at `board.seq`.
    log: VecDeque<Change>,
    /// Why changes are refused now: the last write failed, or the store is
    /// closing (its final write is taken). Checked under the same lock that
    /// accepts a change, so nothing is acknowledged after it is set.
    refusing: Option<Refusing>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusing {
    /// The last write of the board failed; cleared by the next that succeeds.
    WriteFailed,
    /// [`MemoryStore::close`] took its final copy of the board.
    Closed,
}

impl State {
    fn new(board: Board, checked_at: Vec<u64>) -> Self {
        let mut state = Self { board, checked_at, due: None, log: VecDeque::new(), refusing: None };
        state.index_due();
        state
    }

    /// Builds (freezing on) or drops (off) the queue of boxes due to
    /// freeze, after the board's `freeze_after_ms` was set: O(size), once
    /// per load or `omcb admin` change.
    fn index_due(&mut self) {
        let (board, checked_at) = (&self.board, &self.checked_at);
        self.due = (board.freeze_after_ms > 0).then(|| {
            checked_at
                .iter()
                .enumerate()
                .filter(|&(i, &at)| at > 0 && !board.is_frozen(i as u32))
                .map(|(i, &at)| (at, i as u32))
                .collect()
        });
    }

    /// Records one accepted change, committed at `now` (ms) for client
    /// `origin` (0 = none): next seq, new counts, the log.
    fn push(&mut self, index: u32, op: Op, now: u64, origin: u64) -> u64 {
        let b = &self.board;
        let (checked_count, frozen_count) = match op {
            Op::Set(true) => (b.checked_count + 1, b.frozen_count),
            Op::Set(false) => (b.checked_count - 1, b.frozen_count),
            Op::Freeze => (b.checked_count, b.frozen_count + 1),
        };
        let change = Change {
            seq: b.seq + 1,
            index,
            op,
            checked_count,
            frozen_count,
            committed_ms: now,
            origin,
        };
        self.board.apply_change(&change).expect("the store only makes valid, next changes");
        if self.log.len() == LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(change);
        change.seq
    }

    fn freeze(&mut self, index: u32, now: u64, origin: u64) -> u64 {
        if let Some(due) = self.due.as_mut() {
            due.remove(&(self.checked_at[index as usize], index));
        }
        self.push(index, Op::Freeze, now, origin)
    }
}

impl MemoryStore {
    /// Opens the board: loads `data_dir/board.omcb` when there is one, else
    /// creates a new board with a random epoch. With a data dir, writes the
    /// board back marked unclean (refusing a data dir it cannot write) and
    /// starts the persister (call [`close`](Self::close) on shutdown).
    pub async fn open(config: BoardConfig, data_dir: Option<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with_clock(config, data_dir, Arc::new(crate::now_ms)).await
    }

    /// [`open`](Self::open) with a given clock (tests control time with it).
    pub async fn open_with_clock(
        config: BoardConfig,
        data_dir: Option<PathBuf>,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let path = match data_dir {
            Some(dir) => {
                tokio::fs::create_dir_all(&dir).await?;
                Some(dir.join(FILE_NAME))
            }
            None => None,
        };
        let loaded = match &path {
            Some(p) => {
                let p = p.clone();
                tokio::task::spawn_blocking(move || file::load(&p))
                    .await
                    .map_err(|e| StoreError::Data(format!("loading the board: {e}")))??
            }
            None => None,
        };
        let state = match loaded {
            Some(saved) => {
                if saved.board.size != config.size {
                    return Err(StoreError::Data(format!(
                        "the data dir holds a board of {} boxes but --board-size is {}: refusing to resize \
                         (use another --data-dir for a new board)",
                        saved.board.size, config.size
                    )));
                }
                let mut board = saved.board;
                // The board's own setting wins (`omcb admin` may have changed
                // it); a version 1 file has none, so the flag's applies.
                board.freeze_after_ms = saved.freeze_after_ms.unwrap_or(config.freeze_after_ms);
                if !saved.clean {
                    let old = board.epoch;
                    board.epoch = crate::new_epoch();
                    tracing::warn!(
                        old_epoch = old,
                        new_epoch = board.epoch,
                        seq = board.seq,
                        "the board was not closed cleanly: up to a second of changes may be lost; new epoch"
                    );
                }
                State::new(board, saved.checked_at)
            }
            None => State::new(
                Board::new(config.size, crate::new_epoch(), config.freeze_after_ms),
                vec![0; config.size as usize],
            ),
        };
        let disk = match path {
            Some(path) => {
                let copy = DiskCopy {
                    board: state.board.clone(),
                    checked_at: state.checked_at.clone(),
                    written: None,
                    written_freeze_after: None,
                    failing: false,
                    clean_on_disk: false,
                    has_reserve: false,
                };
                let reserve = path.with_file_name(RESERVE_NAME);
                let reserve_len = reserve_len(config);
                let disk = Disk { path, reserve, reserve_len, copy: Mutex::new(copy) };
                let disk = tokio::task::spawn_blocking(move || {
                    let mut copy = disk.copy.lock();
                    let dir = disk.path.parent().unwrap_or(&disk.path).display();
                    // Without the reserve a full disk could lose acknowledged
                    // changes: no start without it.
                    file::ensure_reserve(&disk.reserve, disk.reserve_len).map_err(|e| {
                        StoreError::Data(format!(
                            "cannot write the data dir {dir}: creating the space reserve {RESERVE_NAME} \
                             of {} bytes failed: {e}; refusing to start (the data dir needs {} bytes \
                             for the reserve plus room for the board file, up to {} bytes, twice \
                             while it is replaced)",
                            disk.reserve_len, disk.reserve_len, disk.reserve_len
                        ))
                    })?;
                    copy.has_reserve = true;
                    // Before any change is accepted, the file on disk says
                    // "unclean" (a crash from now on must give a new epoch) and
                    // holds this run's epoch. It is also the proof that the data
                    // dir can be written at all.
                    let bytes = file::encode(&copy.board, &copy.checked_at, false);
                    file::write_atomic(&disk.path, &bytes).map_err(|e| {
                        StoreError::Data(format!(
                            "cannot write the data dir {dir}: {e}; refusing to start \
                             (the board could not be persisted)",
                        ))
                    })?;
                    copy.written = Some(copy.board.seq);
                    copy.written_freeze_after = Some(copy.board.freeze_after_ms);
                    drop(copy);
                    Ok::<_, StoreError>(disk)
                })
                .await
                .map_err(|e| StoreError::Data(format!("writing the board: {e}")))??;
                metrics::gauge!("omcb_persist_ok").set(1.0);
                // Exported from the start, so an alert on its rate sees a 0 first.
                metrics::counter!("omcb_persist_failures_total").increment(0);
                Some(disk)
            }
            None => None,
        };
        let (stop, stop_rx) = watch::channel(false);
        let store = Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                changed: Notify::new(),
                clock,
                disk,
                stop,
                persister: Mutex::new(None),
            }),
        };
        if store.inner.disk.is_some() {
            let task = tokio::spawn(store.clone().persist_loop(stop_rx));
            *store.inner.persister.lock() = Some(task);
        }
        Ok(store)
    }

    /// The board's settings: the size and limit it was opened with, and
    /// the live `freeze_after_ms`.
    pub fn config(&self) -> BoardConfig {
        let freeze_after_ms = self.state().board.freeze_after_ms;
        BoardConfig { freeze_after_ms, ..self.inner.config }
    }

    /// Sets the board's `freeze_after_ms` (the sunset; 0 stops it) and
    /// persists it before answering, so an acknowledged setting survives a
    /// crash. From now on a box checked at least that long ago cannot be
    /// unchecked and the sweep freezes it, whenever it was checked.
    /// [`StoreError::Unavailable`] while the board cannot be persisted.
    pub async fn set_freeze_after(&self, freeze_after_ms: u64) -> Result<BoardConfig, StoreError> {
        let before = {
            let mut s = self.state();
            if s.refusing.is_some() {
                return Err(StoreError::Unavailable(
                    "the board cannot be persisted now; the setting was not changed".into(),
                ));
            }
            let before = s.board.freeze_after_ms;
            if before != freeze_after_ms {
                s.board.freeze_after_ms = freeze_after_ms;
                s.index_due();
            }
            before
        };
        if let Err(e) = self.write(false).await {
            // Not on disk: the board keeps its old setting, so what the
            // caller is told (refused) stays true after a restart.
            let mut s = self.state();
            if s.board.freeze_after_ms == freeze_after_ms && before != freeze_after_ms {
                s.board.freeze_after_ms = before;
                s.index_due();
            }
            return Err(e);
        }
        Ok(self.config())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock()
    }

    /// Whether changes are accepted now: false after a failed write (until
    /// one succeeds) and once closing.
    pub fn is_writable(&self) -> bool {
        self.state().refusing.is_none()
    }

    /// Sets box `index` to `checked` for client `origin` (its keyed hash, 0 =
    /// none; kept in the log entry): see the crate docs for every rule.
    /// [`StoreError::Unavailable`] while the board cannot be persisted.
    pub fn set(&self, index: u32, checked: bool, origin: u64) -> Result<SetOutcome, StoreError> {
        let now = (self.inner.clock)();
        let mut s = self.state();
        let freeze_after = s.board.freeze_after_ms;
        if let Some(why) = s.refusing {
            return Err(StoreError::Unavailable(
                match why {
                    Refusing::WriteFailed => {
                        "the board cannot be persisted (data dir full or read-only?)"
                    }
                    Refusing::Closed => "the store is closing",
                }
                .into(),
            ));
        }
        if index >= s.board.size {
            return Ok(SetOutcome::Refused { reason: Refusal::OutOfRange, checked: false });
        }
        let current = s.board.is_checked(index);
        if s.board.is_frozen(index) {
            return Ok(SetOutcome::Refused { reason: Refusal::Frozen, checked: current });
        }
        if current == checked {
            return Ok(SetOutcome::Unchanged { checked });
        }
        let outcome = if checked {
            if self.inner.config.max_checked.is_some_and(|max| s.board.checked_count >= max) {
                return Ok(SetOutcome::Refused { reason: Refusal::BoardFull, checked: false });
            }
            s.checked_at[index as usize] = now.max(1);
            if let Some(due) = s.due.as_mut() {
                due.insert((now.max(1), index));
            }
            SetOutcome::Changed { seq: s.push(index, Op::Set(true), now, origin), checked: true }
        } else {
            let since = s.checked_at[index as usize];
            if freeze_after > 0 && now.saturating_sub(since) >= freeze_after {
                // The seed's sunset rule: too late to uncheck; it freezes instead.
                s.freeze(index, now, origin);
                SetOutcome::Refused { reason: Refusal::Frozen, checked: true }
            } else {
                if let Some(due) = s.due.as_mut() {
                    due.remove(&(since, index));
                }
                s.checked_at[index as usize] = 0;
                SetOutcome::Changed {
                    seq: s.push(index, Op::Set(false), now, origin),
                    checked: false,
                }
            }
        };
        drop(s);
        self.inner.changed.notify_waiters();
        Ok(outcome)
    }

    /// The whole board (a copy: two bitsets of `size/8` bytes).
    pub fn snapshot(&self) -> Board {
        self.state().board.clone()
    }

    /// Freezes up to `limit` boxes checked at least `freeze_after_ms` ago.
    /// Freezes nothing while changes are refused (they could not be persisted).
    pub fn sweep(&self, limit: usize) -> usize {
        let now = (self.inner.clock)();
        let mut s = self.state();
        let freeze_after = s.board.freeze_after_ms;
        if freeze_after == 0 {
            return 0;
        }
        let cutoff = now.saturating_sub(freeze_after);
        if s.refusing.is_some() {
            return 0;
        }
        let Some(due) = s.due.as_ref() else { return 0 };
        let expired: Vec<u32> =
            due.iter().take_while(|&&(at, _)| at <= cutoff).take(limit).map(|&(_, i)| i).collect();
        for &index in &expired {
            s.freeze(index, now, 0);
        }
        drop(s);
        if !expired.is_empty() {
            self.inner.changed.notify_waiters();
        }
        expired.len()
    }
}

/// The length of the space reserve for a board of `config`: the largest
/// board file it can need (every box it may check has a check time).
pub fn reserve_len(config: BoardConfig) -> u64 {
    let checkable = config.max_checked.map_or(config.size, |max| max.min(config.size));
    file::len(config.size, checkable)
}

/// Decodes the bytes of a board file: the board, each box's check time (ms, 0
/// when unchecked) and whether a clean close wrote it. The fuzz targets'
/// door to the decoder (crates/fuzz-targets), not an API.
#[doc(hidden)]
pub fn decode_board_file(bytes: &[u8]) -> Result<(Board, Vec<u64>, bool), String> {
    file::decode(bytes).map(|saved| (saved.board, saved.checked_at, saved.clean))
}

/// The bytes of a board file, as the persister writes them (for the fuzz
/// targets' seeds and round trips), not an API.
#[doc(hidden)]
pub fn encode_board_file(board: &Board, checked_at: &[u64], clean: bool) -> Vec<u8> {
    file::encode(board, checked_at, clean)
}
