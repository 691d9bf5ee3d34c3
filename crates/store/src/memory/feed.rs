//! A reader of the Memory store's change log.

use std::time::Duration;

use super::{FEED_CHUNK, MemoryStore};
use crate::{Change, FeedEvent};

/// How long a quiet feed waits before it says it is caught up.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

impl MemoryStore {
    /// What the log holds after `after` (up to `max` changes), with the
    /// board's epoch and seq, read at once.
    pub fn log_after(&self, after: u64, max: usize) -> crate::LogRead {
        let s = self.state();
        let board = &s.board;
        let first_in_log = board.seq + 1 - s.log.len() as u64;
        let start = (after + 1).max(first_in_log);
        let changes = if start > board.seq {
            Vec::new()
        } else {
            s.log.range((start - first_in_log) as usize..).take(max).copied().collect()
        };
        crate::LogRead { epoch: board.epoch, seq: board.seq, changes }
    }

    /// A feed of changes after `seq` of board `epoch`.
    pub fn feed(&self, epoch: u64, seq: u64) -> MemoryFeed {
        MemoryFeed { store: self.clone(), epoch, seq }
    }
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
    /// `Reset` when the position is gone from the log or of another epoch;
    /// an empty `Changes` after [`HEARTBEAT`] without any (caught up, as the
    /// Redis feed says after a quiet block), so a reader can tell a quiet
    /// board from a stuck feed. Cancel-safe: the position only moves when a
    /// value is returned.
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
            if tokio::time::timeout(HEARTBEAT, notified).await.is_err() {
                return FeedEvent::Changes(Vec::new());
            }
        }
    }

    /// The changes after the reader's position now, without waiting (an
    /// empty `Changes` when there are none), or a `Reset` as in [`next`](Self::next).
    pub fn read_now(&mut self) -> FeedEvent {
        self.poll_log().unwrap_or(FeedEvent::Changes(Vec::new()))
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
