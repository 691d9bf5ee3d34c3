//! The change archiver (`--archive-dir`): copies every change from the
//! store's log into the change archive (`omcb-archive`) before the log
//! trims it, so that nothing is lost.
//!
//! - **Who archives:** in a fleet one worker at a time, under a lease in
//!   Redis (`{B}:archive_lease`, `lease.lua`, as the sweep's), renewed on
//!   every pass; embedded, the worker archives its own store. A worker that
//!   loses the lease drops its writer (what it had not flushed is read
//!   again by the next holder), and one that takes it opens the archive
//!   afresh.
//! - **What it reads:** the store's log itself ([`Store::log_after`]), not
//!   the hub's batches: so it sees exactly which seqs the log no longer
//!   holds.
//! - **Where it resumes:** after the last seq the archive holds for the
//!   board's epoch (the archive is the truth; [`Writer::open`] cuts off a
//!   block a crash tore). Seqs the log has trimmed before they were read
//!   are written as a gap record, never skipped silently; a new epoch
//!   starts a new directory, with a gap for the seqs before its first
//!   change when it continues an older board's (a Redis board reborn or
//!   restored, the embedded board after a crash: the archive has no
//!   snapshot of where such an epoch began).
//! - **When it writes:** a block every [`FLUSH_EVERY`] (or every
//!   [`FLUSH_CHANGES`] changes), fsynced before the position moves on. A
//!   crash loses nothing that the log still holds when the archiver starts
//!   again.
//! - **Retention:** segments whose hour ended more than `--archive-keep` ago
//!   are deleted at start and every [`PRUNE_EVERY`].
//!
//! In a fleet every worker that may archive must see the same directory
//! (one host, or a shared filesystem); a lease holder that stalls longer
//! than [`LEASE`] between renewing and writing could overlap its successor
//! (its own block then shows as repeated seqs to a reader, never as a loss).
//!
//! # Metrics
//! `omcb_archive_holder` (1 while this worker archives),
//! `omcb_archive_lag_changes` (the board's seq minus the last archived,
//! fsynced seq), `omcb_archive_lag_seconds` (age of the oldest change not
//! yet archived; 0 when caught up), `omcb_archive_log_capacity_changes`
//! (how far behind the log lets it fall before changes are lost: the
//! alert compares the lag with it), `omcb_archive_bytes_total`,
//! `omcb_archive_changes_total`, `omcb_archive_gaps_total` and
//! `omcb_archive_gap_changes_total` (changes lost to gaps),
//! `omcb_archive_errors_total` and `omcb_archive_pruned_segments_total`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use omcb_archive::{Record, Writer};
use omcb_store::{Store, StoreError};
use tokio::sync::watch;

/// The lease's length; renewed on every pass (every [`POLL`] or faster).
pub const LEASE: Duration = Duration::from_secs(5);
/// How often a caught-up archiver looks for new changes.
pub const POLL: Duration = Duration::from_millis(200);
/// A block is written at least this often while changes come.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// ... or once this many changes wait.
pub const FLUSH_CHANGES: usize = 10_000;
/// Changes read from the log at once.
pub const READ_CHUNK: usize = 4096;
/// How often old segments are deleted.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why a pass failed (it is tried again).
#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The archive could not be written.
    #[error(transparent)]
    Archive(#[from] omcb_archive::ArchiveError),
}

/// The archiver's state between passes.
#[derive(Debug)]
pub struct Archiver {
    store: Store,
    root: PathBuf,
    keep: Duration,
    writer: Option<Writer>,
    /// Commit time of the oldest change pushed but not yet flushed.
    oldest_pending_ms: Option<u64>,
    last_flush: Instant,
    /// The board's seq at the last read (for the lag in changes).
    board_seq: u64,
}

impl Archiver {
    /// An archiver of `store` into `root`, deleting segments older than `keep`.
    pub fn new(store: Store, root: PathBuf, keep: Duration) -> Self {
        for name in [
            "omcb_archive_bytes_total",
            "omcb_archive_changes_total",
            "omcb_archive_gaps_total",
            "omcb_archive_gap_changes_total",
            "omcb_archive_errors_total",
            "omcb_archive_pruned_segments_total",
        ] {
            counter!(name).increment(0);
        }
        gauge!("omcb_archive_holder").set(0.0);
        gauge!("omcb_archive_lag_changes").set(0.0);
        gauge!("omcb_archive_lag_seconds").set(0.0);
        gauge!("omcb_archive_log_capacity_changes").set(store.log_capacity() as f64);
        Self {
            store,
            root,
            keep,
            writer: None,
            oldest_pending_ms: None,
            last_flush: Instant::now(),
            board_seq: 0,
        }
    }

    /// The epoch and last seq archived (fsynced), when writing.
    pub fn position(&self) -> Option<(u64, u64)> {
        self.writer.as_ref().map(|w| (w.epoch(), w.durable_seq()))
    }

    /// One pass: renews the lease, reads what the log has after the
    /// archive's last seq, queues it (a gap for what the log lost), and
    /// writes a block when one is due (`flush`: now). True when the read
    /// was full (more may be waiting).
    pub async fn step(&mut self, flush: bool) -> Result<bool, ArchiverError> {
        let held = self.store.archive_lease(LEASE.as_millis() as u64).await?;
        gauge!("omcb_archive_holder").set(if held { 1.0 } else { 0.0 });
        if !held {
            // The next holder reads again whatever was not flushed.
            self.writer = None;
            self.oldest_pending_ms = None;
            gauge!("omcb_archive_lag_changes").set(0.0);
            gauge!("omcb_archive_lag_seconds").set(0.0);
            return Ok(false);
        }
        if self.writer.as_ref().is_some_and(|w| w.pending() >= 4 * FLUSH_CHANGES) {
            // Writing fails (a full disk?): read no more until it works.
            self.flush().await?;
        }
        let after = self.writer.as_ref().map_or(0, Writer::last_seq);
        let mut read = self.store.log_after(after, READ_CHUNK).await?;
        if self.writer.as_ref().map(Writer::epoch) != Some(read.epoch) {
            // First pass, or a new epoch: finish the old one, then resume
            // the board's from what the archive holds.
            self.flush().await?;
            let (root, epoch) = (self.root.clone(), read.epoch);
            let mut writer = blocking(move || Writer::open(&root, epoch)).await?;
            for repair in writer.take_repairs() {
                tracing::warn!(%repair, "change archive");
            }
            tracing::info!(
                epoch = format_args!("{epoch:016x}"),
                resume_after = writer.last_seq(),
                "archiving the board's changes"
            );
            let after = writer.last_seq();
            self.writer = Some(writer);
            read = self.store.log_after(after, READ_CHUNK).await?;
            if read.epoch != epoch {
                return Ok(true);
            }
        }
        let writer = self.writer.as_mut().expect("opened above");
        let last = writer.last_seq();
        self.board_seq = read.seq;
        if read.seq < last {
            tracing::warn!(
                board_seq = read.seq,
                archived = last,
                "the board's seq is behind the archive of its epoch; waiting for it"
            );
            return Ok(false);
        }
        let full = read.changes.len() == READ_CHUNK;
        let first = read.changes.first().map_or(read.seq + 1, |c| c.seq);
        if first > last + 1 {
            // The log no longer has these: they were trimmed before this
            // archiver (or any before it) read them.
            let (from, to) = (last + 1, first - 1);
            tracing::warn!(
                from,
                to,
                "changes trimmed from the log before they were archived: recording a gap"
            );
            writer.push(Record::Gap { from, to })?;
        }
        let now = omcb_store::now_ms();
        for c in read.changes.iter().filter(|c| c.seq > last) {
            // An entry written before entries carried their time: archived
            // at the time it was read.
            let ms = if c.committed_ms == 0 { now } else { c.committed_ms };
            writer.push(Record::Change {
                seq: c.seq,
                ms,
                index: c.index,
                op: c.op,
                origin: c.origin,
            })?;
            self.oldest_pending_ms.get_or_insert(ms);
        }
        if flush
            || writer.pending() >= FLUSH_CHANGES
            || (writer.pending() > 0 && self.last_flush.elapsed() >= FLUSH_EVERY)
        {
            self.flush().await?;
        }
        self.lag();
        Ok(full)
    }

    /// Writes what is queued (fsynced).
    pub async fn flush(&mut self) -> Result<(), ArchiverError> {
        let Some(mut writer) = self.writer.take() else { return Ok(()) };
        if writer.pending() == 0 {
            self.writer = Some(writer);
            return Ok(());
        }
        let (writer, flushed) = tokio::task::spawn_blocking(move || {
            let flushed = writer.flush(omcb_store::now_ms());
            (writer, flushed)
        })
        .await
        .expect("the flush does not panic");
        self.writer = Some(writer);
        let flushed = flushed.inspect_err(|_| {
            counter!("omcb_archive_errors_total").increment(1);
        })?;
        self.last_flush = Instant::now();
        self.oldest_pending_ms = None;
        counter!("omcb_archive_bytes_total").increment(flushed.bytes);
        counter!("omcb_archive_changes_total").increment(flushed.changes);
        counter!("omcb_archive_gaps_total").increment(flushed.gaps);
        counter!("omcb_archive_gap_changes_total").increment(flushed.gap_seqs);
        Ok(())
    }

    fn lag(&self) {
        let durable = self.writer.as_ref().map_or(0, Writer::durable_seq);
        gauge!("omcb_archive_lag_changes").set(self.board_seq.saturating_sub(durable) as f64);
        let age = self.oldest_pending_ms.map_or(0, |ms| omcb_store::now_ms().saturating_sub(ms));
        gauge!("omcb_archive_lag_seconds").set(age as f64 / 1000.0);
    }

    /// Deletes segments past retention (never the one being appended to).
    pub async fn prune(&self) -> Result<omcb_archive::Pruned, ArchiverError> {
        let (root, keep) = (self.root.clone(), self.keep);
        let live = self.writer.as_ref().map(Writer::epoch);
        let pruned =
            blocking(move || omcb_archive::prune(&root, keep, omcb_store::now_ms(), live)).await?;
        counter!("omcb_archive_pruned_segments_total").increment(pruned.segments);
        if pruned.segments > 0 {
            tracing::info!(segments = pruned.segments, bytes = pruned.bytes, "archive retention");
        }
        Ok(pruned)
    }

    /// Archives until `stop` turns true, then writes what it has read and
    /// returns (call before the store closes).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        if let Err(e) = tokio::fs::create_dir_all(&self.root).await {
            tracing::error!(dir = %self.root.display(), error = %e, "cannot create the archive dir");
        }
        let mut next_prune = Instant::now();
        loop {
            if *stop.borrow() {
                break;
            }
            let wait = match self.step(false).await {
                Ok(true) => Duration::ZERO,
                Ok(false) => POLL,
                Err(e) => {
                    counter!("omcb_archive_errors_total").increment(1);
                    tracing::warn!(error = %e, "archiving changes failed; trying again");
                    Duration::from_secs(1)
                }
            };
            if self.writer.is_some() && Instant::now() >= next_prune {
                if let Err(e) = self.prune().await {
                    tracing::warn!(error = %e, "archive retention failed");
                }
                next_prune = Instant::now() + PRUNE_EVERY;
            }
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        // The last changes (a clean stop loses nothing it could read).
        for _ in 0..64 {
            match self.step(true).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "archiving the last changes failed");
                    break;
                }
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, omcb_archive::ArchiveError> + Send + 'static,
) -> Result<T, omcb_archive::ArchiveError> {
    tokio::task::spawn_blocking(f).await.expect("archive I/O does not panic")
}
