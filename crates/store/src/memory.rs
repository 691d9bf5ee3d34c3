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

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use omcb_proto::bits;
use tokio::sync::{Notify, watch};

use crate::{Board, BoardConfig, Change, FeedEvent, Op, Refusal, SetOutcome, StoreError};

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
    /// The settings this run was started with.
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
    /// while freezing is on.
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

/// The board file and what the persister knows about it. Locked only by the
/// persister (and by close, after the persister stopped): never on a
/// toggle's path.
struct Disk {
    path: PathBuf,
    /// The space reserve, and its length: the largest board file.
    reserve: PathBuf,
    reserve_len: u64,
    copy: Mutex<DiskCopy>,
}

/// The persister's own copy of the board, behind the store by the changes
/// since its last copy.
struct DiskCopy {
    board: Board,
    checked_at: Vec<u64>,
    /// Seq of the board in the last file written; `None` before the first.
    written: Option<u64>,
    /// Whether the last write failed (logs once per change of state).
    failing: bool,
    /// Whether the file written last is marked clean while the store runs
    /// (written from the reserve on a full disk, while refusing changes).
    clean_on_disk: bool,
    /// Whether the space reserve is in place (false once it was used).
    has_reserve: bool,
}

impl State {
    fn new(board: Board, checked_at: Vec<u64>, freeze_after_ms: u64) -> Self {
        let due = (freeze_after_ms > 0).then(|| {
            checked_at
                .iter()
                .enumerate()
                .filter(|&(i, &at)| at > 0 && !board.is_frozen(i as u32))
                .map(|(i, &at)| (at, i as u32))
                .collect()
        });
        Self { board, checked_at, due, log: VecDeque::new(), refusing: None }
    }

    /// Records one accepted change, committed at `now` (ms): next seq, new
    /// counts, the log.
    fn push(&mut self, index: u32, op: Op, now: u64) -> u64 {
        let b = &self.board;
        let (checked_count, frozen_count) = match op {
            Op::Set(true) => (b.checked_count + 1, b.frozen_count),
            Op::Set(false) => (b.checked_count - 1, b.frozen_count),
            Op::Freeze => (b.checked_count, b.frozen_count + 1),
        };
        let change =
            Change { seq: b.seq + 1, index, op, checked_count, frozen_count, committed_ms: now };
        self.board.apply_change(&change).expect("the store only makes valid, next changes");
        if self.log.len() == LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(change);
        change.seq
    }

    fn freeze(&mut self, index: u32, now: u64) -> u64 {
        if let Some(due) = self.due.as_mut() {
            due.remove(&(self.checked_at[index as usize], index));
        }
        self.push(index, Op::Freeze, now)
    }

    /// What the persister needs to bring a copy at `seq` of `epoch` up to
    /// this state: the changes since, or (when the log no longer reaches back
    /// that far) everything. Called under the store's mutex: copies only.
    fn delta_since(&self, epoch: u64, seq: u64) -> Delta {
        let first_in_log = self.board.seq + 1 - self.log.len() as u64;
        if epoch != self.board.epoch || seq > self.board.seq || seq + 1 < first_in_log {
            return Delta::Whole(Box::new(self.board.clone()), self.checked_at.clone());
        }
        let changes: Vec<Change> =
            self.log.range((seq + 1 - first_in_log) as usize..).copied().collect();
        let times = changes.iter().map(|c| (c.index, self.checked_at[c.index as usize])).collect();
        Delta::Changes(changes, times)
    }
}

/// See [`State::delta_since`].
enum Delta {
    /// The changes in seq order, and each touched box's check time now.
    Changes(Vec<Change>, Vec<(u32, u64)>),
    /// The whole board and every check time.
    Whole(Box<Board>, Vec<u64>),
}

impl DiskCopy {
    fn apply(&mut self, delta: Delta) {
        match delta {
            Delta::Changes(changes, times) => {
                for c in &changes {
                    self.board.apply_change(c).expect("the log is contiguous from the copy's seq");
                }
                for (index, at) in times {
                    self.checked_at[index as usize] = at;
                }
            }
            Delta::Whole(board, checked_at) => {
                self.board = *board;
                self.checked_at = checked_at;
            }
        }
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
                board.freeze_after_ms = config.freeze_after_ms;
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
                State::new(board, saved.checked_at, config.freeze_after_ms)
            }
            None => State::new(
                Board::new(config.size, crate::new_epoch(), config.freeze_after_ms),
                vec![0; config.size as usize],
                config.freeze_after_ms,
            ),
        };
        let disk = match path {
            Some(path) => {
                let copy = DiskCopy {
                    board: state.board.clone(),
                    checked_at: state.checked_at.clone(),
                    written: None,
                    failing: false,
                    clean_on_disk: false,
                    has_reserve: false,
                };
                let reserve = path.with_file_name(RESERVE_NAME);
                let reserve_len = reserve_len(config);
                let disk = Disk { path, reserve, reserve_len, copy: Mutex::new(copy) };
                let disk = tokio::task::spawn_blocking(move || {
                    let mut copy = lock(&disk.copy);
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
            *lock(&store.inner.persister) = Some(task);
        }
        Ok(store)
    }

    /// The settings this store was opened with.
    pub fn config(&self) -> BoardConfig {
        self.inner.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Whether changes are accepted now: false after a failed write (until
    /// one succeeds) and once closing.
    pub fn is_writable(&self) -> bool {
        self.state().refusing.is_none()
    }

    /// Sets box `index` to `checked`: see the crate docs for every rule.
    /// [`StoreError::Unavailable`] while the board cannot be persisted.
    pub fn set(&self, index: u32, checked: bool) -> Result<SetOutcome, StoreError> {
        let now = (self.inner.clock)();
        let freeze_after = self.inner.config.freeze_after_ms;
        let mut s = self.state();
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
            SetOutcome::Changed { seq: s.push(index, Op::Set(true), now), checked: true }
        } else {
            let since = s.checked_at[index as usize];
            if freeze_after > 0 && now.saturating_sub(since) >= freeze_after {
                // The seed's sunset rule: too late to uncheck; it freezes instead.
                s.freeze(index, now);
                SetOutcome::Refused { reason: Refusal::Frozen, checked: true }
            } else {
                if let Some(due) = s.due.as_mut() {
                    due.remove(&(since, index));
                }
                s.checked_at[index as usize] = 0;
                SetOutcome::Changed { seq: s.push(index, Op::Set(false), now), checked: false }
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

    /// A feed of changes after `seq` of board `epoch`.
    pub fn feed(&self, epoch: u64, seq: u64) -> MemoryFeed {
        MemoryFeed { store: self.clone(), epoch, seq }
    }

    /// Freezes up to `limit` boxes checked at least `freeze_after_ms` ago.
    /// Freezes nothing while changes are refused (they could not be persisted).
    pub fn sweep(&self, limit: usize) -> usize {
        let freeze_after = self.inner.config.freeze_after_ms;
        if freeze_after == 0 {
            return 0;
        }
        let now = (self.inner.clock)();
        let cutoff = now.saturating_sub(freeze_after);
        let mut s = self.state();
        if s.refusing.is_some() {
            return 0;
        }
        let Some(due) = s.due.as_ref() else { return 0 };
        let expired: Vec<u32> =
            due.iter().take_while(|&&(at, _)| at <= cutoff).take(limit).map(|&(_, i)| i).collect();
        for &index in &expired {
            s.freeze(index, now);
        }
        drop(s);
        if !expired.is_empty() {
            self.inner.changed.notify_waiters();
        }
        expired.len()
    }

    /// Stops the persister, stops accepting changes and writes the board one
    /// last time, marked clean. Fails when that write fails: the file then
    /// still says unclean (the next start takes a new epoch), and the error
    /// says whether acknowledged changes are missing from it. Idempotent.
    pub async fn close(&self) -> Result<(), StoreError> {
        let _ = self.inner.stop.send(true);
        let task = lock(&self.inner.persister).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.write(true).await
    }

    /// Writes the board when it changed since the last write, or when the
    /// last write failed, or always for a clean close.
    async fn write(&self, clean: bool) -> Result<(), StoreError> {
        if self.inner.disk.is_none() {
            return Ok(());
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write_blocking(clean))
            .await
            .map_err(|e| StoreError::Data(format!("writing the board: {e}")))?
    }

    fn write_blocking(&self, clean: bool) -> Result<(), StoreError> {
        let Some(disk) = &self.inner.disk else { return Ok(()) };
        let mut copy = lock(&disk.copy);
        let delta = {
            let mut s = self.state();
            let behind = copy.written != Some(s.board.seq) || copy.board.epoch != s.board.epoch;
            if !clean && !behind && s.refusing.is_none() {
                return Ok(());
            }
            if clean {
                // From here on nothing is acknowledged that this write lacks.
                s.refusing = Some(Refusing::Closed);
                if !behind && copy.clean_on_disk {
                    // Written from the reserve on a full disk, while refusing:
                    // the file already holds everything, marked clean.
                    return Ok(());
                }
            }
            s.delta_since(copy.board.epoch, copy.board.seq)
        };
        copy.apply(delta);
        // After the reserve was used, the store accepts nothing until it is
        // back: the next full disk must find it.
        if !clean && !copy.has_reserve {
            if let Err(e) = file::ensure_reserve(&disk.reserve, disk.reserve_len) {
                return Err(self.failed(&mut copy, &e, "re-creating the space reserve"));
            }
            copy.has_reserve = true;
        }
        let started = std::time::Instant::now();
        let bytes = file::encode(&copy.board, &copy.checked_at, clean);
        let mut result = file::write_atomic(&disk.path, &bytes).map(|()| false);
        if let Err(e) = &result
            && file::out_of_space(e)
            && copy.has_reserve
        {
            result = self.write_from_reserve(disk, &mut copy).map(|()| true);
        }
        // The embedded store's one round trip: encode, write, fsync, rename.
        metrics::histogram!("omcb_store_command_seconds", "script" => "persist")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(from_reserve) => {
                copy.written = Some(copy.board.seq);
                copy.clean_on_disk = clean || from_reserve;
                if from_reserve {
                    // The write failed; the reserve saved what was acknowledged.
                    crate::count_error("io");
                    metrics::counter!("omcb_persist_failures_total").increment(1);
                    metrics::gauge!("omcb_persist_ok").set(0.0);
                    if clean {
                        tracing::warn!(
                            seq = copy.board.seq,
                            "the data disk is full: the final write went into the space reserve; \
                             every acknowledged change is on disk, marked clean"
                        );
                        return Ok(());
                    }
                    if !std::mem::replace(&mut copy.failing, true) {
                        tracing::error!(
                            seq = copy.board.seq,
                            reserve_bytes = disk.reserve_len,
                            "persisting the board failed: the data disk is full; every acknowledged \
                             change was written into the space reserve; refusing toggles until the \
                             reserve can be re-created (retrying)"
                        );
                    }
                    return Err(StoreError::Unavailable("the data disk is full".into()));
                }
                if !clean {
                    let mut s = self.state();
                    if s.refusing == Some(Refusing::WriteFailed) {
                        s.refusing = None;
                    }
                }
                if std::mem::take(&mut copy.failing) {
                    tracing::warn!(
                        seq = copy.board.seq,
                        "the board is persisted again; accepting toggles"
                    );
                }
                metrics::gauge!("omcb_persist_ok").set(1.0);
                Ok(())
            }
            Err(e) => {
                if clean {
                    crate::count_error("io");
                    metrics::counter!("omcb_persist_failures_total").increment(1);
                    metrics::gauge!("omcb_persist_ok").set(0.0);
                    let on_disk = copy.written.unwrap_or(0);
                    let acknowledged = copy.board.seq;
                    let lost = if on_disk < acknowledged {
                        format!(
                            "the changes after seq {on_disk} up to {acknowledged} are not on disk"
                        )
                    } else {
                        "every acknowledged change is on disk, but not marked clean".into()
                    };
                    return Err(StoreError::Data(format!(
                        "the final write of {} failed: {e}; {lost}; the next start takes a new epoch",
                        disk.path.display(),
                    )));
                }
                Err(self.failed(&mut copy, &e, "persisting the board"))
            }
        }
    }

    /// A write found the disk full: stop acknowledging, then write the whole
    /// board (every acknowledged change, marked clean) over the reserve's
    /// blocks and rename it over the board file. The reserve is used up
    /// whether or not this succeeds.
    fn write_from_reserve(&self, disk: &Disk, copy: &mut DiskCopy) -> std::io::Result<()> {
        let delta = {
            let mut s = self.state();
            s.refusing.get_or_insert(Refusing::WriteFailed);
            s.delta_since(copy.board.epoch, copy.board.seq)
        };
        copy.apply(delta);
        copy.has_reserve = false;
        let bytes = file::encode(&copy.board, &copy.checked_at, true);
        file::write_over_reserve(&disk.reserve, &disk.path, &bytes)
    }

    /// A write (or the reserve) failed for good: refuse changes until one
    /// succeeds, count it, and log once per failure, not per retry.
    fn failed(&self, copy: &mut DiskCopy, e: &std::io::Error, what: &str) -> StoreError {
        self.state().refusing.get_or_insert(Refusing::WriteFailed);
        crate::count_error("io");
        metrics::counter!("omcb_persist_failures_total").increment(1);
        metrics::gauge!("omcb_persist_ok").set(0.0);
        if !std::mem::replace(&mut copy.failing, true) {
            tracing::error!(
                error = %e,
                on_disk = copy.written.unwrap_or(0),
                acknowledged = copy.board.seq,
                "{what} failed; refusing toggles until a write succeeds (retrying)"
            );
        }
        StoreError::Unavailable(format!("{what} failed: {e}"))
    }

    async fn persist_loop(self, mut stop: watch::Receiver<bool>) {
        let mut wait = PERSIST_EVERY;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(wait) => {
                    wait = match self.write(false).await {
                        Ok(()) => PERSIST_EVERY,
                        Err(_) => (wait * 2).min(RETRY_AT_MOST),
                    };
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent before anything that
    // could panic, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A reader of the Memory store's change log.
#[derive(Debug)]
pub struct MemoryFeed {
    store: MemoryStore,
    /// The board incarnation the reader follows.
    epoch: u64,
    /// The last seq the reader has.
    seq: u64,
}

impl MemoryFeed {
    /// The next changes after the reader's position, waiting for some; a
    /// `Reset` when the position is gone from the log or of another epoch.
    /// Cancel-safe: the position only moves when a value is returned.
    pub async fn next(&mut self) -> FeedEvent {
        let inner = self.store.inner.clone();
        loop {
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            // Register before looking, so a change between the look and the
            // wait still wakes us.
            notified.as_mut().enable();
            if let Some(event) = self.poll_log() {
                return event;
            }
            notified.await;
        }
    }

    fn poll_log(&mut self) -> Option<FeedEvent> {
        let s = self.store.state();
        let board = &s.board;
        let first_in_log = board.seq + 1 - s.log.len() as u64;
        if self.epoch != board.epoch || self.seq > board.seq || self.seq + 1 < first_in_log {
            self.epoch = board.epoch;
            self.seq = board.seq;
            return Some(FeedEvent::Reset(Box::new(board.clone())));
        }
        if self.seq == board.seq {
            return None;
        }
        let start = (self.seq + 1 - first_in_log) as usize;
        let changes: Vec<Change> = s.log.range(start..).take(FEED_CHUNK).copied().collect();
        self.seq = changes.last().map_or(self.seq, |c| c.seq);
        Some(FeedEvent::Changes(changes))
    }
}

/// The length of the space reserve for a board of `config`: the largest
/// board file it can need (every box it may check has a check time).
pub fn reserve_len(config: BoardConfig) -> u64 {
    let checkable = config.max_checked.map_or(config.size, |max| max.min(config.size));
    file::len(config.size, checkable)
}

/// The board file: a small versioned binary format with a checksum.
mod file {
    use super::*;
    use std::io::Write;

    const MAGIC: &[u8; 8] = b"OMCBRD01";

    /// What a board file holds.
    pub(super) struct Saved {
        pub board: Board,
        pub checked_at: Vec<u64>,
        /// Written by a clean close (nothing acknowledged can be missing).
        pub clean: bool,
    }

    /// Layout (little-endian): magic, clean u8, size u32, epoch u64, seq u64,
    /// checked_count u32, frozen_count u32, checked bits, frozen bits, n u32,
    /// n x (index u32, checked_at u64), FNV-1a-64 of all before.
    pub(super) fn encode(board: &Board, checked_at: &[u64], clean: bool) -> Vec<u8> {
        let n = bits::byte_len(board.size);
        let mut out = Vec::with_capacity(64 + 2 * n + board.checked_count as usize * 12);
        out.extend_from_slice(MAGIC);
        out.push(u8::from(clean));
        out.extend_from_slice(&board.size.to_le_bytes());
        out.extend_from_slice(&board.epoch.to_le_bytes());
        out.extend_from_slice(&board.seq.to_le_bytes());
        out.extend_from_slice(&board.checked_count.to_le_bytes());
        out.extend_from_slice(&board.frozen_count.to_le_bytes());
        out.extend_from_slice(bits::as_bytes(&board.checked));
        out.extend_from_slice(bits::as_bytes(&board.frozen));
        let times: Vec<(u32, u64)> = checked_at
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t > 0)
            .map(|(i, &t)| (i as u32, t))
            .collect();
        out.extend_from_slice(&(times.len() as u32).to_le_bytes());
        for (i, t) in times {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&t.to_le_bytes());
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// The length of a board file of `size` boxes, `checked` of them checked
    /// (header, two bitsets, the check times, the checksum).
    pub(super) fn len(size: u32, checked: u32) -> u64 {
        let header = MAGIC.len() + 1 + 4 + 8 + 8 + 4 + 4;
        (header + 2 * bits::byte_len(size) + 4 + 8) as u64 + 12 * u64::from(checked)
    }

    pub(super) fn load(path: &Path) -> Result<Option<Saved>, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        decode(&bytes).map(Some).map_err(|why| {
            crate::count_error("data");
            StoreError::Data(format!(
                "{} is damaged ({why}); refusing to start on a guess",
                path.display()
            ))
        })
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Saved, String> {
        if bytes.len() < MAGIC.len() + 8 || &bytes[..8] != MAGIC {
            return Err("not an omcb board file".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if fnv1a(body).to_le_bytes() != sum {
            return Err("checksum mismatch".into());
        }
        let mut r = Reader { b: &body[8..] };
        let clean = r.take(1)?[0] == 1;
        let size = r.u32()?;
        let epoch = r.u64()?;
        let seq = r.u64()?;
        let checked_count = r.u32()?;
        let frozen_count = r.u32()?;
        let n = bits::byte_len(size);
        let checked = bits::from_exact_bytes(r.take(n)?, size).map_err(|e| e.to_string())?;
        let frozen = bits::from_exact_bytes(r.take(n)?, size).map_err(|e| e.to_string())?;
        if checked.count_ones() != checked_count as usize
            || frozen.count_ones() != frozen_count as usize
        {
            return Err("counts do not match the bitsets".into());
        }
        let mut checked_at = vec![0u64; size as usize];
        for _ in 0..r.u32()? {
            let (i, t) = (r.u32()?, r.u64()?);
            *checked_at.get_mut(i as usize).ok_or("check time for a box outside the board")? = t;
        }
        if !r.b.is_empty() {
            return Err("trailing bytes".into());
        }
        // The store never writes these, and the freeze sweep trusts both: a
        // check time queues a box for freezing, and only checked boxes freeze.
        if checked_at.iter().zip(checked.iter()).any(|(&t, is_checked)| t > 0 && !*is_checked) {
            return Err("check time for an unchecked box".into());
        }
        if frozen.iter_ones().any(|i| !checked[i]) {
            return Err("a frozen box that is not checked".into());
        }
        // A checked box with no recorded time (never written that way, but be
        // safe) counts as checked now rather than never freezing.
        for i in checked.iter_ones() {
            if checked_at[i] == 0 {
                checked_at[i] = crate::now_ms();
            }
        }
        let board = Board {
            epoch,
            seq,
            size,
            checked,
            frozen,
            checked_count,
            frozen_count,
            freeze_after_ms: 0,
        };
        Ok(Saved { board, checked_at, clean })
    }

    /// temp file + fsync + rename + fsync of the directory: a reader (or a
    /// crash) sees the old file or the new one, never half of one.
    pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension("omcb.tmp");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
        if let Err(e) = written {
            // A half-written temp file would only hold space a full disk lacks.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    }

    /// Whether a write failed for lack of space (the reserve helps there).
    pub(super) fn out_of_space(e: &std::io::Error) -> bool {
        matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
    }

    /// Makes sure the reserve at `path` holds `len` bytes of allocated
    /// blocks: kept when it does (a sparse file does not count), else
    /// written anew, as zeros: `fallocate` and `set_len` would leave blocks
    /// that a later overwrite may still have to allocate. A partial reserve
    /// is removed, since it only holds space a full disk lacks.
    pub(super) fn ensure_reserve(path: &Path, len: u64) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.is_file()
            && m.len() == len
            && m.blocks() * 512 >= len
        {
            return Ok(());
        }
        let _ = std::fs::remove_file(path);
        let written = (|| {
            let mut f = std::fs::File::create(path)?;
            let zeros = vec![0u8; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            f.sync_all()?;
            sync_dir(path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(path);
        }
        written
    }

    /// Writes `bytes` over the reserve's own (allocated) blocks, cuts it to
    /// their length, fsyncs it and renames it over the board at `path`:
    /// atomic like [`write_atomic`], and needs no new space (on a filesystem
    /// that overwrites in place).
    pub(super) fn write_over_reserve(
        reserve: &Path,
        path: &Path,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).open(reserve)?;
        if f.metadata()?.len() < bytes.len() as u64 {
            return Err(std::io::Error::other("the space reserve is smaller than the board file"));
        }
        f.write_all(bytes)?;
        f.set_len(bytes.len() as u64)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(reserve, path)?;
        sync_dir(path)
    }

    fn sync_dir(path: &Path) -> std::io::Result<()> {
        match path.parent() {
            Some(dir) => std::fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }

    fn fnv1a(bytes: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    struct Reader<'a> {
        b: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.b.len() < n {
                return Err("truncated".into());
            }
            let (head, rest) = self.b.split_at(n);
            self.b = rest;
            Ok(head)
        }
        fn u32(&mut self) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
        }
        fn u64(&mut self) -> Result<u64, String> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
        }
    }
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
