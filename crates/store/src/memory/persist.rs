//! The persister: its own copy of the board, brought up to date from the
//! change log under the store's mutex and written outside it; the write
//! from the space reserve on a full disk; the final write on close.

use std::path::PathBuf;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::{MemoryStore, PERSIST_EVERY, RETRY_AT_MOST, Refusing, State, file};
use crate::{Board, Change, StoreError};

/// The board file and what the persister knows about it. Locked only by the
/// persister (and by close, after the persister stopped): never on a
/// toggle's path.
pub(super) struct Disk {
    pub(super) path: PathBuf,
    /// The space reserve, and its length: the largest board file.
    pub(super) reserve: PathBuf,
    pub(super) reserve_len: u64,
    pub(super) copy: Mutex<DiskCopy>,
}

/// The persister's own copy of the board, behind the store by the changes
/// since its last copy.
pub(super) struct DiskCopy {
    pub(super) board: Board,
    pub(super) checked_at: Vec<u64>,
    /// Seq of the board in the last file written; `None` before the first.
    pub(super) written: Option<u64>,
    /// The `freeze_after_ms` in the last file written: a changed setting
    /// is written even when no box changed.
    pub(super) written_freeze_after: Option<u64>,
    /// Whether the last write failed (logs once per change of state).
    pub(super) failing: bool,
    /// Whether the file written last is marked clean while the store runs
    /// (written from the reserve on a full disk, while refusing changes).
    pub(super) clean_on_disk: bool,
    /// Whether the space reserve is in place (false once it was used).
    pub(super) has_reserve: bool,
}

impl State {
    /// What the persister needs to bring a copy at `seq` of `epoch` up to
    /// this state: the changes since, or (when the log no longer reaches back
    /// that far) everything. Called under the store's mutex: copies only.
    pub(super) fn delta_since(&self, epoch: u64, seq: u64) -> Delta {
        let first_in_log = self.board.seq + 1 - self.log.len() as u64;
        if epoch != self.board.epoch || seq > self.board.seq || seq + 1 < first_in_log {
            return Delta::Whole(Box::new(self.board.clone()), self.checked_at.clone());
        }
        let changes: Vec<Change> =
            self.log.range((seq + 1 - first_in_log) as usize..).copied().collect();
        let times = changes.iter().map(|c| (c.index, self.checked_at[c.index as usize])).collect();
        Delta::Changes(changes, times, self.board.freeze_after_ms)
    }
}

/// See [`State::delta_since`].
pub(super) enum Delta {
    /// The changes in seq order, each touched box's check time now, and
    /// the board's `freeze_after_ms` (a setting, not a change).
    Changes(Vec<Change>, Vec<(u32, u64)>, u64),
    /// The whole board and every check time.
    Whole(Box<Board>, Vec<u64>),
}

impl DiskCopy {
    pub(super) fn apply(&mut self, delta: Delta) {
        match delta {
            Delta::Changes(changes, times, freeze_after_ms) => {
                for c in &changes {
                    self.board.apply_change(c).expect("the log is contiguous from the copy's seq");
                }
                self.board.freeze_after_ms = freeze_after_ms;
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
    /// Stops the persister, stops accepting changes and writes the board one
    /// last time, marked clean. Fails when that write fails: the file then
    /// still says unclean (the next start takes a new epoch), and the error
    /// says whether acknowledged changes are missing from it. Idempotent.
    pub async fn close(&self) -> Result<(), StoreError> {
        let _ = self.inner.stop.send(true);
        let task = self.inner.persister.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.write(true).await
    }

    /// Writes the board when it changed since the last write, or when the
    /// last write failed, or always for a clean close.
    pub(super) async fn write(&self, clean: bool) -> Result<(), StoreError> {
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
        let mut copy = disk.copy.lock();
        let delta = {
            let mut s = self.state();
            let behind = copy.written != Some(s.board.seq)
                || copy.board.epoch != s.board.epoch
                || copy.written_freeze_after != Some(s.board.freeze_after_ms);
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
                copy.written_freeze_after = Some(copy.board.freeze_after_ms);
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
    pub(super) fn write_from_reserve(
        &self,
        disk: &Disk,
        copy: &mut DiskCopy,
    ) -> std::io::Result<()> {
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
    pub(super) fn failed(&self, copy: &mut DiskCopy, e: &std::io::Error, what: &str) -> StoreError {
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

    pub(super) async fn persist_loop(self, mut stop: watch::Receiver<bool>) {
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
