//! What this worker remembers of its own answers, and the repairs of a board
//! that lost acknowledged changes: restored from a replica (`restore.lua`),
//! moved to a new epoch (`rebirth.lua`), and this worker's answers the
//! restored board lacks made again.

use bytes::Bytes;
use fred::prelude::*;
use omcb_proto::bits;

use super::reply::typed;
use super::scripts::{Purpose, measured};
use super::{RedisStore, board_error, unavailable};
use crate::{Board, Op, StoreError};

/// An acknowledged change in `Inner::recent`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Recent {
    pub(super) change: Acked,
    /// Its seq was already used (see `Inner::read`): a board restored from a
    /// replica at a later seq may still lack it. Also set, harmlessly, when
    /// the feed read the change before its reply was handled.
    pub(super) reused: bool,
}

/// Acknowledged changes a worker remembers for a restore (see `Inner::recent`):
/// far more than a worker acknowledges while another one's feed reads them.
const RECENT_ACKS: usize = 4096;

/// A change `set.lua` reported, as the feed checks it against the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Acked {
    pub(super) epoch: u64,
    pub(super) seq: u64,
    pub(super) index: u32,
    pub(super) op: Op,
}

impl RedisStore {
    /// Remembers a change `set.lua` made: in the ring of recent ones, and as
    /// the watermark if it is the newest of its epoch.
    pub(super) fn acknowledged(&self, change: Acked) {
        let mut acked = self.inner.acked.lock();
        let read = *self.inner.read.lock();
        let reused = (read.0 == change.epoch && change.seq <= read.1)
            || acked.is_some_and(|a| a.epoch == change.epoch && change.seq <= a.seq);
        self.remember(Recent { change, reused });
        // Replies of two epochs may race (a FLUSHALL, a rebirth): the later
        // epoch usually wins; losing a watermark only skips one check.
        if acked.is_none_or(|a| a.epoch != change.epoch || a.seq < change.seq) {
            *acked = Some(change);
        }
    }

    /// Adds an answer to the ring of recent ones.
    pub(super) fn remember(&self, answer: Recent) {
        let mut recent = self.inner.recent.lock();
        if recent.len() == RECENT_ACKS {
            recent.pop_front();
        }
        recent.push_back(answer);
    }

    /// Notes where the feed has read up to (see `Inner::read`).
    pub(super) fn read_up_to(&self, epoch: u64, seq: u64) {
        *self.inner.read.lock() = (epoch, seq);
    }

    /// The newest change this worker acknowledged on board `epoch`.
    pub(super) fn acked(&self, epoch: u64) -> Option<Acked> {
        let acked = self.inner.acked.lock();
        acked.filter(|a| a.epoch == epoch)
    }

    /// Moves the board from `old` to a new epoch, unless someone already did
    /// (or the board is gone, which makes a new epoch anyway).
    pub(super) async fn rebirth(&self, old: u64) -> Result<(), StoreError> {
        let new = crate::new_epoch();
        let reply = match self
            .eval(
                &self.inner.scripts.rebirth,
                vec![&self.inner.keys.config],
                vec![old.to_string(), new.to_string()],
            )
            .await
        {
            Err(e) if e.details().contains("NOBOARD") => return Ok(()),
            other => other.map_err(unavailable)?,
        };
        let (moved, _epoch_now): (u8, u64) = typed(reply, "rebirth.lua")?;
        if moved == 1 {
            tracing::warn!(
                from_epoch = old,
                epoch = new,
                "Redis lost changes this worker had applied or acknowledged; the board moved to a new epoch"
            );
        }
        Ok(())
    }

    /// Writes `replica` back as the board under a new epoch, if the board
    /// still has epoch `lost` or is gone (`restore.lua`, a compare-and-set).
    /// Counts are recounted from the bits: a replica that read changes under
    /// reused seqs before it noticed a rollback has bits right but counts of
    /// two histories.
    pub(super) async fn restore(&self, replica: &Board, lost: u64) -> Result<(), StoreError> {
        let config = self.config();
        let new = crate::new_epoch();
        let mut args: Vec<Value> = vec![
            lost.to_string().into(),
            new.to_string().into(),
            replica.size.to_string().into(),
            config.max_checked.unwrap_or(0).to_string().into(),
            config.freeze_after_ms.to_string().into(),
            Bytes::copy_from_slice(bits::as_bytes(&replica.checked)).into(),
            Bytes::copy_from_slice(bits::as_bytes(&replica.frozen)).into(),
            replica.checked.count_ones().to_string().into(),
            replica.frozen.count_ones().to_string().into(),
            replica.seq.to_string().into(),
        ];
        if config.freeze_after_ms > 0 {
            args.extend(
                replica
                    .checked
                    .iter_ones()
                    .filter(|&i| !replica.frozen[i])
                    .map(|i| Value::from(i.to_string())),
            );
        }
        let reply = self
            .eval(&self.inner.scripts.restore, self.inner.keys.board(), args)
            .await
            .map_err(board_error)?;
        let (restored, _epoch_now): (u8, u64) = typed(reply, "restore.lua")?;
        if restored == 1 {
            tracing::warn!(
                from_epoch = lost,
                from_seq = replica.seq,
                epoch = new,
                checked = replica.checked.count_ones(),
                "Redis lost acknowledged changes; restored the board from this worker's replica under a new epoch"
            );
        }
        Ok(())
    }

    /// The epoch and seq board `epoch` was restored from (`restore.lua`), if it was.
    pub(super) async fn restored_from(&self, epoch: u64) -> Result<Option<(u64, u64)>, StoreError> {
        // A read of the reset's board, timed with its snapshot.
        let fields = vec!["epoch", "restored_from_epoch", "restored_from_seq"];
        let v: Vec<Option<String>> = measured(
            "snapshot",
            Purpose::Snapshot,
            self.inner.client.hmget(&self.inner.keys.config, fields),
        )
        .await
        .map_err(unavailable)?;
        let num = |i: usize| v.get(i).cloned().flatten().and_then(|s| s.parse::<u64>().ok());
        Ok(match (num(0), num(1), num(2)) {
            (Some(e), Some(from), Some(seq)) if e == epoch => Some((from, seq)),
            _ => None,
        })
    }

    /// Makes again the changes this worker acknowledged on board `from` after
    /// its seq `seq`, or under a seq Redis had already used (after it went
    /// back in time): a board restored from another worker's replica at that
    /// position may lack them. In the order they were acknowledged; a box that
    /// already has the value costs nothing (set, not flip).
    pub(super) async fn reapply(&self, board: &Board, from: u64, seq: u64) {
        let mine: Vec<Acked> = {
            let recent = self.inner.recent.lock();
            // Only a box's latest answer counts: the client may have set the
            // box again since (on the restored board, too).
            let mut latest = std::collections::HashMap::new();
            for (i, r) in recent.iter().enumerate() {
                latest.insert(r.change.index, i);
            }
            recent
                .iter()
                .enumerate()
                .filter(|&(i, r)| {
                    latest.get(&r.change.index) == Some(&i)
                        && r.change.epoch == from
                        && r.change.seq > 0
                        && (r.change.seq > seq || r.reused)
                })
                .map(|(_, r)| r.change)
                .collect()
        };
        let mut made = 0;
        for a in mine {
            let Op::Set(value) = a.op else { continue };
            if board.is_checked(a.index) == value {
                continue;
            }
            match self.set(a.index, value, 0).await {
                Ok(_) => made += 1,
                Err(e) => {
                    tracing::warn!(error = %e, index = a.index, "could not make an acknowledged change again after a restore");
                }
            }
        }
        if made > 0 {
            tracing::warn!(
                changes = made,
                from_epoch = from,
                from_seq = seq,
                "made again acknowledged changes the restored board lacked"
            );
        }
    }
}
