//! A board at a seq: the worker's in-memory replica and a client's view, with
//! the convergence rule of PROTOCOL.md in one place.

use crate::bits::{self, Bits, BitsError};
use crate::change::{Change, Op};
use crate::delta::{self, DeltaError};
use crate::v1::{Batch, Snapshot};

/// One board's whole state at `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    /// Board incarnation; seqs compare only within one epoch.
    pub epoch: u64,
    /// Seq of the last change this state contains.
    pub seq: u64,
    /// Number of boxes.
    pub size: u32,
    /// Checked boxes, Redis bit order.
    pub checked: Bits,
    /// Frozen boxes, Redis bit order.
    pub frozen: Bits,
    /// Number of set bits in `checked`, as the store counted them.
    pub checked_count: u32,
    /// Number of set bits in `frozen`.
    pub frozen_count: u32,
    /// 0 when freezing is off.
    pub freeze_after_ms: u64,
}

/// What applying a batch did (the convergence rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// `to_seq <= seq`: nothing new, dropped.
    Stale,
    /// Applied; the board is now at the batch's `to_seq`.
    Applied,
    /// `from_seq > seq + 1`: changes are missing. The caller must resync; the
    /// board is unchanged.
    Gap,
}

/// Input that does not describe a state of this board.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoardError {
    /// A bitset had the wrong length or set padding.
    #[error(transparent)]
    Bits(#[from] BitsError),
    /// A delta-coded list was malformed.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// An index is not below the board's size.
    #[error("box {index} is outside a board of {size}")]
    OutOfRange {
        /// The index.
        index: u32,
        /// Board size.
        size: u32,
    },
    /// A change's seq does not directly follow the board's.
    #[error("change seq {got} does not follow board seq {seq}")]
    NotNext {
        /// Board seq.
        seq: u64,
        /// Change seq.
        got: u64,
    },
    /// A range Snapshot (viewport subscriptions) is not a whole board.
    #[error("a range Snapshot ({count} boxes from {first}) is not the whole board")]
    RangeSnapshot {
        /// `range_first`.
        first: u32,
        /// `range_count`.
        count: u32,
    },
    /// `from_seq > to_seq` or similar nonsense.
    #[error("batch range {from}..={to} is empty")]
    BadRange {
        /// from_seq.
        from: u64,
        /// to_seq.
        to: u64,
    },
}

impl Board {
    /// An empty board at seq 0.
    pub fn new(size: u32, epoch: u64, freeze_after_ms: u64) -> Self {
        Self {
            epoch,
            seq: 0,
            size,
            checked: bits::zeroed(size),
            frozen: bits::zeroed(size),
            checked_count: 0,
            frozen_count: 0,
            freeze_after_ms,
        }
    }

    /// Whether box `index` is checked (false outside the board).
    pub fn is_checked(&self, index: u32) -> bool {
        self.checked.get(index as usize).is_some_and(|b| *b)
    }

    /// Whether box `index` is frozen (false outside the board).
    pub fn is_frozen(&self, index: u32) -> bool {
        self.frozen.get(index as usize).is_some_and(|b| *b)
    }

    /// Builds a board from a (full) snapshot, checking its bitsets against its
    /// size; a range Snapshot is refused (see [`crate::view::View`]).
    pub fn from_snapshot(s: &Snapshot) -> Result<Self, BoardError> {
        if s.range_count > 0 {
            return Err(BoardError::RangeSnapshot { first: s.range_first, count: s.range_count });
        }
        Ok(Self {
            epoch: s.epoch,
            seq: s.seq,
            size: s.size,
            checked: bits::from_exact_bytes(&s.checked, s.size)?,
            frozen: bits::from_exact_bytes(&s.frozen, s.size)?,
            checked_count: s.checked_count,
            frozen_count: s.frozen_count,
            freeze_after_ms: s.freeze_after_ms,
        })
    }

    /// The snapshot of this state (copies the two bitsets: 2 x 125 KB per million).
    pub fn to_snapshot(&self, server_time_ms: u64) -> Snapshot {
        Snapshot {
            seq: self.seq,
            size: self.size,
            checked: bits::as_bytes(&self.checked).to_vec(),
            frozen: bits::as_bytes(&self.frozen).to_vec(),
            checked_count: self.checked_count,
            frozen_count: self.frozen_count,
            freeze_after_ms: self.freeze_after_ms,
            server_time_ms,
            epoch: self.epoch,
            ..Snapshot::default()
        }
    }

    /// The range Snapshot of `regions` (PROTOCOL.md, "Viewport
    /// subscriptions"): only their boxes, clipped to the board. Copies
    /// ceil(count/8) bytes of each bitset (a region starts on a byte).
    pub fn range_snapshot(&self, regions: &std::ops::Range<u32>, server_time_ms: u64) -> Snapshot {
        let (first, count) = crate::view::boxes(regions, self.size);
        let bytes = |b: &Bits| {
            let from = first as usize / 8;
            bits::as_bytes(b)[from..from + bits::byte_len(count)].to_vec()
        };
        Snapshot {
            range_first: first,
            range_count: count,
            region_size: crate::view::REGION_SIZE,
            checked: bytes(&self.checked),
            frozen: bytes(&self.frozen),
            ..self.counts_snapshot(server_time_ms)
        }
    }

    /// A Snapshot with this state's header and counts and no bitsets.
    fn counts_snapshot(&self, server_time_ms: u64) -> Snapshot {
        Snapshot {
            seq: self.seq,
            size: self.size,
            checked_count: self.checked_count,
            frozen_count: self.frozen_count,
            freeze_after_ms: self.freeze_after_ms,
            server_time_ms,
            epoch: self.epoch,
            ..Snapshot::default()
        }
    }

    fn check_index(&self, index: u32) -> Result<(), BoardError> {
        if index < self.size {
            Ok(())
        } else {
            Err(BoardError::OutOfRange { index, size: self.size })
        }
    }

    /// Applies the next change of the store's feed (`seq` must be `self.seq + 1`).
    pub fn apply_change(&mut self, c: &Change) -> Result<(), BoardError> {
        if c.seq != self.seq + 1 {
            return Err(BoardError::NotNext { seq: self.seq, got: c.seq });
        }
        self.check_index(c.index)?;
        match c.op {
            Op::Set(v) => self.checked.set(c.index as usize, v),
            Op::Freeze => self.frozen.set(c.index as usize, true),
        }
        self.seq = c.seq;
        self.checked_count = c.checked_count;
        self.frozen_count = c.frozen_count;
        Ok(())
    }

    /// Applies a batch by the convergence rule. A malformed batch (bad deltas,
    /// an index outside the board) is refused whole and changes nothing.
    pub fn apply_batch(&mut self, b: &Batch) -> Result<Applied, BoardError> {
        if b.from_seq > b.to_seq {
            return Err(BoardError::BadRange { from: b.from_seq, to: b.to_seq });
        }
        if b.to_seq <= self.seq {
            return Ok(Applied::Stale);
        }
        if b.from_seq > self.seq + 1 {
            return Ok(Applied::Gap);
        }
        // Validate everything before touching the state.
        for list in [&b.checked, &b.unchecked, &b.frozen] {
            for index in delta::decode_iter(list) {
                self.check_index(index?)?;
            }
        }
        for index in delta::decode_iter(&b.checked).flatten() {
            self.checked.set(index as usize, true);
        }
        for index in delta::decode_iter(&b.unchecked).flatten() {
            self.checked.set(index as usize, false);
        }
        for index in delta::decode_iter(&b.frozen).flatten() {
            self.frozen.set(index as usize, true);
        }
        self.seq = b.to_seq;
        self.checked_count = b.checked_count;
        self.frozen_count = b.frozen_count;
        Ok(Applied::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip_and_validation() {
        let mut b = Board::new(1_000_000, 42, 0);
        b.apply_change(&Change {
            seq: 1,
            index: 999_999,
            op: Op::Set(true),
            checked_count: 1,
            frozen_count: 0,
            committed_ms: 0,
            origin: 0,
        })
        .unwrap();
        let s = b.to_snapshot(7);
        assert_eq!(s.checked.len(), 125_000);
        assert_eq!(s.checked[124_999], 0x01);
        assert_eq!(Board::from_snapshot(&s).unwrap(), b);
        let mut short = s.clone();
        short.checked.pop();
        assert!(Board::from_snapshot(&short).is_err());
    }

    #[test]
    fn batch_with_out_of_range_index_changes_nothing() {
        let mut b = Board::new(10, 1, 0);
        let before = b.clone();
        let bad = Batch {
            from_seq: 1,
            to_seq: 1,
            checked: vec![3, 20],
            unchecked: vec![],
            frozen: vec![],
            checked_count: 2,
            frozen_count: 0,
            ..Batch::default()
        };
        assert_eq!(b.apply_batch(&bad), Err(BoardError::OutOfRange { index: 23, size: 10 }));
        assert_eq!(b, before);
    }

    #[test]
    fn change_must_be_next() {
        let mut b = Board::new(10, 1, 0);
        let c = Change {
            seq: 2,
            index: 0,
            op: Op::Set(true),
            checked_count: 1,
            frozen_count: 0,
            committed_ms: 0,
            origin: 0,
        };
        assert_eq!(b.apply_change(&c), Err(BoardError::NotNext { seq: 0, got: 2 }));
    }
}
