//! Coalescing a run of changes into one `Batch` (PROTOCOL.md, "A Batch is coalesced").

use crate::change::{Change, Op};
use crate::delta;
use crate::v1::Batch;

/// Collects consecutive changes and turns them into one coalesced [`Batch`]:
/// for every box set in the run, its final value at `to_seq`; every box frozen in
/// the run; the counts as of `to_seq`.
///
/// Pushing is O(1); [`BatchBuilder::finish`] sorts once, so building a batch of
/// n changes costs O(n log n) however often the same boxes repeat.
#[derive(Debug, Default, Clone)]
pub struct BatchBuilder {
    /// Seq of the first change pushed (0 while empty).
    from_seq: u64,
    /// Seq of the last change pushed.
    to_seq: u64,
    /// `(index, value)` in push order; the last entry per index wins.
    sets: Vec<(u32, bool)>,
    /// Boxes frozen in this run, in push order.
    frozen: Vec<u32>,
    /// Counts after the last change pushed.
    checked_count: u32,
    frozen_count: u32,
}

/// A change that does not continue the run being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("change seq {got} does not follow seq {after}")]
pub struct OutOfOrder {
    /// Seq the builder expected to follow.
    pub after: u64,
    /// Seq it got.
    pub got: u64,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when nothing has been pushed since the last [`finish`](Self::finish).
    pub fn is_empty(&self) -> bool {
        self.from_seq == 0
    }

    /// Number of changes pushed since the last finish.
    pub fn len(&self) -> usize {
        if self.is_empty() { 0 } else { (self.to_seq - self.from_seq + 1) as usize }
    }

    /// Seq of the last change pushed, 0 when empty.
    pub fn to_seq(&self) -> u64 {
        self.to_seq
    }

    /// Adds the next change. Changes must come in seq order without holes.
    pub fn push(&mut self, change: &Change) -> Result<(), OutOfOrder> {
        if self.is_empty() {
            self.from_seq = change.seq;
        } else if change.seq != self.to_seq + 1 {
            return Err(OutOfOrder { after: self.to_seq, got: change.seq });
        }
        self.to_seq = change.seq;
        match change.op {
            Op::Set(value) => self.sets.push((change.index, value)),
            Op::Freeze => self.frozen.push(change.index),
        }
        self.checked_count = change.checked_count;
        self.frozen_count = change.frozen_count;
        Ok(())
    }

    /// Turns the run into one coalesced batch and empties the builder for the
    /// next run; `None` when nothing was pushed.
    pub fn finish(&mut self) -> Option<Batch> {
        if self.is_empty() {
            return None;
        }
        // A stable sort keeps push order among equal indices, so the last entry of
        // each run of equal indices is the box's final value.
        self.sets.sort_by_key(|&(index, _)| index);
        let mut checked = Vec::new();
        let mut unchecked = Vec::new();
        let mut i = 0;
        while i < self.sets.len() {
            let index = self.sets[i].0;
            let mut j = i;
            while j + 1 < self.sets.len() && self.sets[j + 1].0 == index {
                j += 1;
            }
            if self.sets[j].1 {
                checked.push(index)
            } else {
                unchecked.push(index)
            }
            i = j + 1;
        }
        self.frozen.sort_unstable();
        self.frozen.dedup();
        let batch = Batch {
            from_seq: self.from_seq,
            to_seq: self.to_seq,
            checked: delta::encode(&checked),
            unchecked: delta::encode(&unchecked),
            frozen: delta::encode(&self.frozen),
            checked_count: self.checked_count,
            frozen_count: self.frozen_count,
            ..Batch::default()
        };
        self.from_seq = 0;
        self.to_seq = 0;
        self.sets.clear();
        self.frozen.clear();
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(seq: u64, index: u32, v: bool, c: u32) -> Change {
        Change {
            seq,
            index,
            op: Op::Set(v),
            checked_count: c,
            frozen_count: 0,
            committed_ms: 0,
            origin: 0,
        }
    }

    #[test]
    fn final_value_per_box_and_counts_of_last_change() {
        let mut b = BatchBuilder::new();
        for c in [set(5, 7, true, 1), set(6, 3, true, 2), set(7, 7, false, 1), set(8, 9, true, 2)] {
            b.push(&c).unwrap();
        }
        b.push(&Change {
            seq: 9,
            index: 3,
            op: Op::Freeze,
            checked_count: 2,
            frozen_count: 1,
            committed_ms: 0,
            origin: 0,
        })
        .unwrap();
        assert_eq!(b.len(), 5);
        let batch = b.finish().unwrap();
        assert_eq!((batch.from_seq, batch.to_seq), (5, 9));
        assert_eq!(delta::decode(&batch.checked).unwrap(), vec![3, 9]);
        assert_eq!(delta::decode(&batch.unchecked).unwrap(), vec![7]);
        assert_eq!(delta::decode(&batch.frozen).unwrap(), vec![3]);
        assert_eq!((batch.checked_count, batch.frozen_count), (2, 1));
        assert!(b.is_empty());
        assert!(b.finish().is_none());
    }

    #[test]
    fn refuses_holes() {
        let mut b = BatchBuilder::new();
        b.push(&set(1, 0, true, 1)).unwrap();
        assert_eq!(b.push(&set(3, 0, true, 1)), Err(OutOfOrder { after: 1, got: 3 }));
    }
}
