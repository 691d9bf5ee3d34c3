//! The change feed: `{B}:log` read with `XREAD BLOCK` on a connection of
//! its own, and the continuity check (`position.lua`) that notices a board
//! that moved or lost changes.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fred::prelude::*;
use fred::types::streams::XReadResponse;
use tokio::sync::broadcast::error::TryRecvError;

use super::reply::{Entry, RawEntry, bad, entries, typed};
use super::scripts::{Purpose, measured};
use super::{COMMAND_TIMEOUT, FEED_BLOCK_MS, FEED_CHUNK, RedisStore, unavailable};
use crate::{Board, FeedEvent, StoreError};

/// What `position.lua` read, all of one moment.
#[derive(Debug)]
struct Position {
    /// `None` when the board does not exist.
    epoch: Option<u64>,
    seq: u64,
    /// The entry at the seq asked for as the last applied change, if Redis has it.
    last: Option<Entry>,
    /// The entry at the seq asked for as the highest acknowledged change.
    acked: Option<Entry>,
}

impl RedisStore {
    /// The board's epoch and seq in Redis, and the log entries at seqs `last`
    /// and `acked` (0 = none), in one atomic read.
    async fn position(
        &self,
        client: &Client,
        last: u64,
        acked: u64,
    ) -> Result<Position, StoreError> {
        let k = &self.inner.keys;
        let reply = self
            .eval_on(
                client,
                &self.inner.scripts.position,
                vec![&k.config, &k.seq, &k.log],
                vec![last.to_string(), acked.to_string()],
            )
            .await
            .map_err(unavailable)?;
        let (epoch, seq, last, acked): (Option<u64>, u64, Vec<RawEntry>, Vec<RawEntry>) =
            typed(reply, "position.lua")?;
        let first = |raw: Vec<RawEntry>| raw.into_iter().next().map(Entry::parse).transpose();
        Ok(Position {
            epoch: epoch.filter(|&e| e > 0),
            seq,
            last: first(last)?,
            acked: first(acked)?,
        })
    }

    /// A reader of the change stream after `seq` of `epoch`, on its own
    /// connection, without a replica: a board that lost changes moves to a
    /// new epoch with what Redis still has (`rebirth.lua`).
    pub fn feed(&self, epoch: u64, seq: u64) -> RedisFeed {
        // Verify before the first read: the caller's position may be of another
        // epoch, or ahead of the board.
        RedisFeed {
            store: self.clone(),
            client: None,
            epoch,
            seq,
            last: None,
            verify: true,
            left: VecDeque::new(),
            replica: None,
        }
    }

    /// A reader of the change stream after `board`, which keeps a replica of
    /// the board (`board` and the changes it read): when Redis lost
    /// acknowledged changes, or the board is gone, the replica is written back
    /// under a new epoch (`restore.lua`), and this worker's toggles never
    /// create an empty board in its place.
    pub fn feed_from(&self, board: &Board) -> RedisFeed {
        self.inner.replicated.store(true, Ordering::Relaxed);
        RedisFeed { replica: Some(board.clone()), ..self.feed(board.epoch, board.seq) }
    }
}

/// Reads `{B}:log` with `XREAD BLOCK` from the last applied id.
#[derive(Debug)]
pub struct RedisFeed {
    store: RedisStore,
    /// Its own connection, made on first use.
    client: Option<(Client, tokio::sync::broadcast::Receiver<Server>)>,
    epoch: u64,
    /// Seq of the last change returned, or of the board the feed started or
    /// reset from: the replica's position.
    seq: u64,
    /// The last entry returned, to check after a reconnect that Redis still
    /// has it (an AOF restart can lose the last second and reuse seqs).
    last: Option<Entry>,
    /// Check continuity before reading on.
    verify: bool,
    /// Epochs this feed moved away from, newest last: Redis showing one of
    /// them again was restored from data older than the move.
    left: VecDeque<u64>,
    /// The board as of `seq` (what the feed started from plus every change it
    /// returned since), when the feed was made with one: what a board that
    /// lost changes is restored from.
    replica: Option<Board>,
}

/// Epochs a feed remembers having left.
const LEFT_EPOCHS: usize = 16;

/// What a continuity check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continuity {
    /// Redis still holds every change of our epoch we applied or acknowledged.
    Intact,
    /// The board is gone or has another epoch.
    Moved,
    /// Same epoch, but Redis lost changes we applied or acknowledged.
    Lost,
}

impl RedisFeed {
    async fn client(&mut self) -> Result<Client, StoreError> {
        if self.client.is_none() {
            let client = self.store.inner.target.builder()?.build().map_err(unavailable)?;
            // The block time must not count as a timeout.
            let reconnects = client.reconnect_rx();
            client.connect();
            client.wait_for_connect().await.map_err(unavailable)?;
            self.client = Some((client, reconnects));
        }
        if self.reconnected() {
            // Redis may have restarted and lost writes.
            self.verify = true;
        }
        Ok(self.client.as_ref().expect("set above").0.clone())
    }

    /// Whether the feed's connection reconnected since the last look.
    fn reconnected(&mut self) -> bool {
        let Some((_, reconnects)) = self.client.as_mut() else { return false };
        let mut any = false;
        while let Ok(_) | Err(TryRecvError::Lagged(_)) = reconnects.try_recv() {
            any = true;
        }
        any
    }

    /// The next changes, a `Reset` when continuity is lost (trimmed log, new
    /// epoch, Redis lost writes), an empty `Changes` after a quiet block (the
    /// heartbeat), or `Unavailable` while Redis is away. Run it in a task of its
    /// own: a dropped call loses nothing, but wastes a blocking read.
    ///
    /// A blocking `XREAD` wakes on every `XADD`: called again at once after
    /// each answer, it reads a busy board once per change (most of a
    /// toggle's Redis CPU after `set.lua`). A reader that only needs the
    /// changes once per tick reads a busy board with [`read_now`](Self::read_now)
    /// instead, just before its tick, and blocks here only once the board
    /// has gone quiet.
    pub async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        self.read(true).await
    }

    /// The changes Redis has now after the feed's position, without waiting:
    /// an empty `Changes` when there are none (nothing new yet, not a
    /// heartbeat), or a `Reset` as [`next`](Self::next) gives it.
    pub async fn read_now(&mut self) -> Result<FeedEvent, StoreError> {
        self.read(false).await
    }

    async fn read(&mut self, block: bool) -> Result<FeedEvent, StoreError> {
        loop {
            let client = self.client().await?;
            if self.verify {
                match self.continuity(&client).await? {
                    Continuity::Intact => self.verify = false,
                    other => return self.reset(other == Continuity::Lost).await,
                }
            }
            let options = Options {
                timeout: Some(
                    Duration::from_millis(if block { FEED_BLOCK_MS } else { 0 }) + COMMAND_TIMEOUT,
                ),
                ..Default::default()
            };
            let read = measured(
                "feed",
                Purpose::Feed,
                client.with_options(&options).xread::<Value, _, _>(
                    Some(FEED_CHUNK),
                    block.then_some(FEED_BLOCK_MS),
                    &self.store.inner.keys.log,
                    format!("{}-0", self.seq),
                ),
            )
            .await;
            let reply = read.map_err(|e| {
                self.verify = true;
                unavailable(e)
            })?;
            if self.reconnected() {
                // The read may have gone to a Redis that restarted with older
                // data: check, then read again.
                self.verify = true;
                continue;
            }
            let entries = entries(xread_entries(reply)?)?;
            if let Some(first) = entries.first() {
                if entries.iter().any(|e| !e.of(self.epoch)) {
                    // Another board's entries (after a FLUSHALL its seqs start
                    // again at 1 and soon pass ours; after a rebirth they
                    // continue ours): never a continuation of this board.
                    return self.reset(false).await;
                }
                if first.change.seq != self.seq + 1 {
                    // The log was trimmed past us: start over from a snapshot.
                    return self.reset(false).await;
                }
                let last = *entries.last().expect("not empty");
                if let Some(replica) = self.replica.as_mut() {
                    for e in &entries {
                        if let Err(error) = replica.apply_change(&e.change) {
                            // Checked above: contiguous, of this epoch. If that
                            // ever breaks, a restore would write a wrong board.
                            tracing::error!(%error, "the feed's replica rejected a change; dropping it");
                            self.replica = None;
                            break;
                        }
                    }
                }
                self.seq = last.change.seq;
                self.last = Some(last);
                self.store.read_up_to(self.epoch, self.seq);
                return Ok(FeedEvent::Changes(entries.into_iter().map(|e| e.change).collect()));
            }
            if !block {
                // Nothing new since the last read, a moment ago: not a quiet
                // block, so no continuity check.
                return Ok(FeedEvent::Changes(Vec::new()));
            }
            // Quiet for a whole block: is this still the same board, with all
            // we applied and acknowledged? If so, say we are caught up (the
            // heartbeat that turns /readyz back to 200 after an outage).
            return match self.continuity(&client).await? {
                Continuity::Intact => Ok(FeedEvent::Changes(Vec::new())),
                other => self.reset(other == Continuity::Lost).await,
            };
        }
    }

    /// Whether Redis still has our epoch, a seq not behind what we applied or
    /// acknowledged, and the very changes we saw at those seqs.
    async fn continuity(&self, client: &Client) -> Result<Continuity, StoreError> {
        // Read the acknowledgement before asking Redis: a change acknowledged
        // before this line was in Redis before the script below runs, so a
        // seq behind it is a loss, never a race between two connections.
        // Checked even when the feed has read past it: after a restore, the
        // feed may have read other changes under those seqs before it noticed.
        let acked = self.store.acked(self.epoch);
        let last = self.last.map_or(0, |e| e.change.seq);
        let now = self.store.position(client, last, acked.map_or(0, |a| a.seq)).await?;
        if now.epoch != Some(self.epoch) {
            return Ok(Continuity::Moved);
        }
        if now.seq < acked.map_or(self.seq, |a| a.seq.max(self.seq)) {
            return Ok(Continuity::Lost);
        }
        // An entry trimmed away is fine (the next XREAD shows whether we were
        // trimmed past); present but different means Redis lost changes and
        // reused their seqs for others.
        if let (Some(mine), Some(theirs)) = (self.last, now.last)
            && mine != theirs
        {
            return Ok(Continuity::Lost);
        }
        if let (Some(mine), Some(theirs)) = (acked, now.acked)
            && !(theirs.of(self.epoch)
                && theirs.change.index == mine.index
                && theirs.change.op == mine.op)
        {
            return Ok(Continuity::Lost);
        }
        Ok(Continuity::Intact)
    }

    /// Starts over from a snapshot. With `lost` (or when the snapshot is of
    /// our epoch but behind what we applied or acknowledged) Redis lost
    /// changes of our epoch: the board moves to a new one first, so that no
    /// client resumes across the loss.
    async fn reset(&mut self, lost: bool) -> Result<FeedEvent, StoreError> {
        // Until a reset succeeds, whatever the next read brings is suspect.
        self.verify = true;
        // Read before the snapshot, as in `continuity`.
        let high = self.store.acked(self.epoch).map_or(self.seq, |a| a.seq.max(self.seq));
        let replica = self.replica.as_ref().filter(|r| r.epoch == self.epoch && r.seq == self.seq);
        let board = match self.store.read_board().await? {
            // The board is gone (Redis restarted empty, FLUSHALL): ours is the
            // board as of our seq, with every change acknowledged before it.
            None => match replica {
                Some(replica) => {
                    self.store.restore(replica, self.epoch).await?;
                    self.read_board_after_move().await?
                }
                // Without a replica there is nothing to restore: a new, empty board.
                None => {
                    self.store.init().await?;
                    self.read_board_after_move().await?
                }
            },
            Some(board) => {
                let behind = board.epoch == self.epoch && (lost || board.seq < high);
                // An epoch we left is back: Redis went back past the move, and its
                // clients may hold seqs of it the restored data does not have.
                let returned = self.left.contains(&board.epoch);
                if behind || returned {
                    match replica {
                        Some(replica) => self.store.restore(replica, board.epoch).await?,
                        None => self.store.rebirth(board.epoch).await?,
                    }
                    self.read_board_after_move().await?
                } else {
                    board
                }
            }
        };
        // A board restored from a replica (ours or another worker's) lacks
        // what that replica had not read: make our own such changes again.
        // They come back through this feed as changes after the board.
        if board.epoch != self.epoch
            && let Some((from, seq)) = self.store.restored_from(board.epoch).await?
        {
            self.store.reapply(&board, from, seq).await;
        }
        if board.epoch != self.epoch {
            if self.left.len() == LEFT_EPOCHS {
                self.left.pop_front();
            }
            self.left.push_back(self.epoch);
        }
        tracing::info!(
            from_epoch = self.epoch,
            from_seq = self.seq,
            epoch = board.epoch,
            seq = board.seq,
            "feed reset"
        );
        self.epoch = board.epoch;
        self.seq = board.seq;
        self.last = None;
        self.verify = false;
        self.store.read_up_to(self.epoch, self.seq);
        if self.replica.is_some() {
            self.replica = Some(board.clone());
        }
        Ok(FeedEvent::Reset(Box::new(board)))
    }

    /// The board after this feed moved or restored it; `Unavailable` when it
    /// is gone again (the next call starts over).
    async fn read_board_after_move(&self) -> Result<Board, StoreError> {
        self.store.read_board().await?.ok_or_else(|| {
            StoreError::Unavailable("the board is gone again right after a restore".into())
        })
    }
}

/// The entries of an `XREAD` of one stream (RESP2 or RESP3): none after a
/// quiet block (a nil reply).
fn xread_entries(reply: Value) -> Result<Vec<RawEntry>, StoreError> {
    if reply.is_null() {
        return Ok(Vec::new());
    }
    let streams: XReadResponse<String, String, String, String> =
        reply.into_xread_response().map_err(|e| bad(&format!("XREAD: {e}")))?;
    Ok(streams.into_values().next().unwrap_or_default())
}
