//! Viewport subscriptions (PROTOCOL.md, "Viewport subscriptions"): the
//! board's fixed regions, the split of a tick's coalesced Batch into region
//! frames (the worker's side), and [`View`], a client's state of the regions
//! it subscribed to, following the viewport rule (the load generator's and
//! the tests' reference client).

use std::collections::BTreeMap;
use std::ops::Range;

use crate::bits::{self, Bits};
use crate::board::{Applied, BoardError};
use crate::delta;
use crate::v1::{Batch, Snapshot};

/// Boxes per region. Part of the wire contract (a range Snapshot says it in
/// `region_size`): region `r` is the boxes `[r * REGION_SIZE, (r + 1) * REGION_SIZE)`,
/// clipped to the board.
pub const REGION_SIZE: u32 = 2048;

/// The most boxes one `Subscribe` may ask for; more is `CODE_TOO_LARGE`.
pub const MAX_SUBSCRIBE: u32 = 65_536;

/// Regions on a board of `size` boxes.
pub fn region_count(size: u32) -> u32 {
    size.div_ceil(REGION_SIZE)
}

/// The boxes of `regions`, clipped to the board: `(first, count)`.
pub fn boxes(regions: &Range<u32>, size: u32) -> (u32, u32) {
    let first = (u64::from(regions.start) * u64::from(REGION_SIZE)).min(u64::from(size));
    let end = (u64::from(regions.end) * u64::from(REGION_SIZE)).min(u64::from(size));
    (first as u32, (end - first) as u32)
}

/// Why a `Subscribe` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// `count` is over [`MAX_SUBSCRIBE`].
    #[error("a subscription may hold at most {MAX_SUBSCRIBE} boxes, not {0}")]
    TooLarge(u32),
    /// `first` is not a box of the board.
    #[error("box {first} is outside a board of {size}")]
    OutOfRange {
        /// The first box asked for.
        first: u32,
        /// Board size.
        size: u32,
    },
}

/// The regions a `Subscribe{first, count}` covers on a board of `size`:
/// `Ok(None)` for `count = 0` (the full board), else the range clipped to the
/// board and rounded out to whole regions.
pub fn subscription(
    first: u32,
    count: u32,
    size: u32,
) -> Result<Option<Range<u32>>, SubscribeError> {
    if count == 0 {
        return Ok(None);
    }
    if count > MAX_SUBSCRIBE {
        return Err(SubscribeError::TooLarge(count));
    }
    if first >= size {
        return Err(SubscribeError::OutOfRange { first, size });
    }
    let last = (u64::from(first) + u64::from(count)).min(u64::from(size)) - 1;
    Ok(Some(first / REGION_SIZE..(last as u32) / REGION_SIZE + 1))
}

/// The changes of one region in a coalesced Batch: delta-coded lists, as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionPart {
    /// The region.
    pub region: u32,
    /// Boxes now checked.
    pub checked: Vec<u32>,
    /// Boxes now unchecked.
    pub unchecked: Vec<u32>,
    /// Boxes frozen.
    pub frozen: Vec<u32>,
}

impl RegionPart {
    /// The region frame's Batch: this part's changes, `from_seq..=to_seq`.
    pub fn to_batch(&self, from_seq: u64, to_seq: u64) -> Batch {
        Batch {
            from_seq,
            to_seq,
            checked: self.checked.clone(),
            unchecked: self.unchecked.clone(),
            frozen: self.frozen.clone(),
            region: Some(self.region),
            ..Batch::default()
        }
    }
}

/// Splits a coalesced Batch (ascending, delta-coded lists, as
/// [`crate::BatchBuilder`] makes) into one part per region that has a change,
/// regions ascending. O(changes); a malformed list is an error.
pub fn split(batch: &Batch) -> Result<Vec<RegionPart>, BoardError> {
    let mut parts: Vec<RegionPart> = Vec::new();
    type Pick = fn(&mut RegionPart) -> &mut Vec<u32>;
    let lists: [(&Vec<u32>, Pick); 3] = [
        (&batch.checked, |p| &mut p.checked),
        (&batch.unchecked, |p| &mut p.unchecked),
        (&batch.frozen, |p| &mut p.frozen),
    ];
    // First absolute indices per part (each list is ascending, so each
    // part's lists stay ascending), then delta-coded.
    for (list, pick) in lists {
        let mut at = 0;
        for index in delta::decode_iter(list) {
            let index = index?;
            let region = index / REGION_SIZE;
            if parts.get(at).is_none_or(|p| p.region != region) {
                at = match parts.binary_search_by_key(&region, |p| p.region) {
                    Ok(at) => at,
                    Err(at) => {
                        parts.insert(at, RegionPart { region, ..RegionPart::default() });
                        at
                    }
                };
            }
            pick(&mut parts[at]).push(index);
        }
    }
    for p in &mut parts {
        for list in [&mut p.checked, &mut p.unchecked, &mut p.frozen] {
            *list = delta::encode(list);
        }
    }
    Ok(parts)
}

/// The worker's side of the regions' chains: the `to_seq` of each region's
/// last frame, so its next frame's `from_seq` follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chains {
    last_to: Vec<u64>,
}

impl Chains {
    /// Chains of a board of `size` boxes whose replica is at `seq`: each
    /// region's first frame starts right after it.
    pub fn new(size: u32, seq: u64) -> Self {
        Self { last_to: vec![seq; region_count(size) as usize] }
    }

    /// The replica was replaced at `seq` (a new epoch, or a reload): every
    /// socket gets a range Snapshot at `seq` or later, so the chains restart there.
    pub fn reset(&mut self, size: u32, seq: u64) {
        *self = Self::new(size, seq);
    }

    /// The region frames of one tick's coalesced Batch, regions ascending:
    /// `(region, frame)`, each frame chained to its region's previous one.
    pub fn frames(&mut self, batch: &Batch) -> Result<Vec<(u32, Batch)>, BoardError> {
        let parts = split(batch)?;
        let mut out = Vec::with_capacity(parts.len());
        for part in parts {
            let Some(last) = self.last_to.get_mut(part.region as usize) else {
                return Err(BoardError::OutOfRange {
                    index: part.region * REGION_SIZE,
                    size: self.last_to.len() as u32 * REGION_SIZE,
                });
            };
            let from_seq = (*last + 1).min(batch.from_seq);
            *last = batch.to_seq;
            out.push((part.region, part.to_batch(from_seq, batch.to_seq)));
        }
        Ok(out)
    }
}

/// The worker's side of one subscribed socket: its range and, per region of
/// it, the `to_seq` of the last frame (or Snapshot) it queued. It decides
/// which region frames the socket gets (the same rule the client follows, so
/// the two agree on every region's chain) and which regions a new
/// subscription needs a Snapshot of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    regions: Range<u32>,
    /// `seqs[r - regions.start]`.
    seqs: Vec<u64>,
}

impl Subscriber {
    /// A socket given a range Snapshot of all of `regions` at `seq`.
    pub fn new(regions: Range<u32>, seq: u64) -> Self {
        let seqs = vec![seq; regions.len()];
        Self { regions, seqs }
    }

    /// The socket's range.
    pub fn regions(&self) -> Range<u32> {
        self.regions.clone()
    }

    /// A new subscription to `regions`, with the replica at `seq`: the
    /// regions kept keep their chains, the new ones start at `seq`. Returns
    /// the runs of new regions, which the socket needs range Snapshots of
    /// (at `seq`), ascending.
    pub fn resubscribe(&mut self, regions: Range<u32>, seq: u64) -> Vec<Range<u32>> {
        let old = std::mem::replace(self, Self::new(regions.clone(), seq));
        let kept = regions.start.max(old.regions.start)..regions.end.min(old.regions.end);
        for r in kept.clone() {
            self.seqs[(r - regions.start) as usize] = old.seqs[(r - old.regions.start) as usize];
        }
        if kept.is_empty() {
            return vec![regions];
        }
        [regions.start..kept.start, kept.end..regions.end]
            .into_iter()
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// A range Snapshot of the whole range at `seq` was queued.
    pub fn snapshot(&mut self, seq: u64) {
        self.seqs.iter_mut().for_each(|s| *s = seq);
    }

    /// Whether region `region`'s frame `from_seq..=to_seq` goes to this
    /// socket: [`Applied::Applied`] (send it; the region's chain moves on),
    /// [`Applied::Stale`] (not in the range, or covered by a Snapshot), or
    /// [`Applied::Gap`] (it would leave the client a hole: send a Snapshot).
    pub fn offer(&mut self, region: u32, from_seq: u64, to_seq: u64) -> Applied {
        if !self.regions.contains(&region) {
            return Applied::Stale;
        }
        let seq = &mut self.seqs[(region - self.regions.start) as usize];
        if to_seq <= *seq {
            Applied::Stale
        } else if from_seq > *seq + 1 {
            Applied::Gap
        } else {
            *seq = to_seq;
            Applied::Applied
        }
    }
}

/// One region a client holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    /// `cur[r]`: the seq this region's state is at.
    seq: u64,
    checked: Bits,
    frozen: Bits,
}

/// A subscribed client's state: the regions of its range it has state for,
/// each at its own seq, and the counts. Follows PROTOCOL.md's viewport rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    /// Board epoch of the held regions.
    pub epoch: u64,
    /// Board size (from the last Snapshot).
    pub size: u32,
    held: BTreeMap<u32, Held>,
    /// The range of the last `Subscribe` sent; `None` before the first.
    range: Option<Range<u32>>,
    /// The board's counts, as of `counts_seq`.
    pub checked_count: u32,
    /// Frozen boxes on the board, as of `counts_seq`.
    pub frozen_count: u32,
    /// The seq the counts are at.
    pub counts_seq: u64,
}

impl View {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// The client sends `Subscribe` for `regions` (`None`: the full board):
    /// regions outside it are forgotten.
    pub fn subscribe(&mut self, regions: Option<&Range<u32>>) {
        match regions {
            Some(r) => self.held.retain(|k, _| r.contains(k)),
            None => self.held.clear(),
        }
        self.range = regions.cloned();
    }

    /// The regions held, ascending.
    pub fn regions(&self) -> impl Iterator<Item = u32> + '_ {
        self.held.keys().copied()
    }

    /// `cur[r]` of a held region.
    pub fn region_seq(&self, region: u32) -> Option<u64> {
        self.held.get(&region).map(|h| h.seq)
    }

    /// Box `index`'s value, `None` when its region is not held.
    pub fn is_checked(&self, index: u32) -> Option<bool> {
        let h = self.held.get(&(index / REGION_SIZE))?;
        h.checked.get((index % REGION_SIZE) as usize).map(|b| *b)
    }

    /// Whether box `index` is frozen, `None` when its region is not held.
    pub fn is_frozen(&self, index: u32) -> Option<bool> {
        let h = self.held.get(&(index / REGION_SIZE))?;
        h.frozen.get((index % REGION_SIZE) as usize).map(|b| *b)
    }

    /// Applies a range Snapshot (`range_count > 0`): its regions inside the
    /// last subscription sent. A malformed one changes nothing.
    pub fn apply_snapshot(&mut self, s: &Snapshot) -> Result<(), BoardError> {
        let end = u64::from(s.range_first) + u64::from(s.range_count);
        if s.range_count == 0
            || s.region_size != REGION_SIZE
            || !s.range_first.is_multiple_of(REGION_SIZE)
            || end > u64::from(s.size)
            || (!end.is_multiple_of(u64::from(REGION_SIZE)) && end != u64::from(s.size))
        {
            return Err(BoardError::OutOfRange { index: s.range_first, size: s.size });
        }
        let checked = bits::from_exact_bytes(&s.checked, s.range_count)?;
        let frozen = bits::from_exact_bytes(&s.frozen, s.range_count)?;
        if s.epoch != self.epoch {
            self.held.clear();
            self.counts_seq = 0;
            self.epoch = s.epoch;
        }
        self.size = s.size;
        for (k, start) in (s.range_first..end as u32).step_by(REGION_SIZE as usize).enumerate() {
            let from = k * REGION_SIZE as usize;
            let to = (from + REGION_SIZE as usize).min(s.range_count as usize);
            let region = start / REGION_SIZE;
            if self.range.as_ref().is_some_and(|r| !r.contains(&region)) {
                // Sent for an earlier subscription: no frames of it will come.
                continue;
            }
            self.held.insert(
                region,
                Held {
                    seq: s.seq,
                    checked: checked[from..to].to_bitvec(),
                    frozen: frozen[from..to].to_bitvec(),
                },
            );
        }
        if s.seq >= self.counts_seq {
            self.counts_seq = s.seq;
            self.checked_count = s.checked_count;
            self.frozen_count = s.frozen_count;
        }
        Ok(())
    }

    /// Applies a region frame or a counts frame by the viewport rule. A
    /// frame for a region not held is [`Applied::Stale`] (dropped); a
    /// malformed one changes nothing.
    pub fn apply_batch(&mut self, b: &Batch) -> Result<Applied, BoardError> {
        if b.counts_only {
            if b.to_seq > self.counts_seq {
                self.counts_seq = b.to_seq;
                self.checked_count = b.checked_count;
                self.frozen_count = b.frozen_count;
                return Ok(Applied::Applied);
            }
            return Ok(Applied::Stale);
        }
        if b.from_seq > b.to_seq {
            return Err(BoardError::BadRange { from: b.from_seq, to: b.to_seq });
        }
        let Some(region) = b.region else {
            // A full Batch: this view has no full state to apply it to.
            return Ok(Applied::Stale);
        };
        let size = self.size;
        let Some(h) = self.held.get_mut(&region) else {
            return Ok(Applied::Stale);
        };
        if b.to_seq <= h.seq {
            return Ok(Applied::Stale);
        }
        if b.from_seq > h.seq + 1 {
            return Ok(Applied::Gap);
        }
        let first = region * REGION_SIZE;
        let len = h.checked.len() as u32;
        for list in [&b.checked, &b.unchecked, &b.frozen] {
            for index in delta::decode_iter(list) {
                let index = index?;
                if index < first || index - first >= len {
                    return Err(BoardError::OutOfRange { index, size });
                }
            }
        }
        for index in delta::decode_iter(&b.checked).flatten() {
            h.checked.set((index - first) as usize, true);
        }
        for index in delta::decode_iter(&b.unchecked).flatten() {
            h.checked.set((index - first) as usize, false);
        }
        for index in delta::decode_iter(&b.frozen).flatten() {
            h.frozen.set((index - first) as usize, true);
        }
        h.seq = b.to_seq;
        Ok(Applied::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_round_out_and_clip() {
        assert_eq!(subscription(0, 0, 1_000_000), Ok(None));
        assert_eq!(subscription(0, 1, 1_000_000), Ok(Some(0..1)));
        assert_eq!(subscription(2047, 2, 1_000_000), Ok(Some(0..2)));
        assert_eq!(subscription(2048, 2048, 1_000_000), Ok(Some(1..2)));
        assert_eq!(subscription(999_000, 65_536, 1_000_000), Ok(Some(487..489)));
        assert_eq!(
            subscription(u32::MAX, 10, 1_000_000),
            Err(SubscribeError::OutOfRange { first: u32::MAX, size: 1_000_000 })
        );
        assert_eq!(subscription(0, 65_537, 1_000_000), Err(SubscribeError::TooLarge(65_537)));
        assert_eq!(region_count(1_000_000), 489);
        assert_eq!(boxes(&(487..489), 1_000_000), (997_376, 2_624));
    }

    #[test]
    fn split_keeps_each_region_s_lists_delta_coded() {
        let batch = Batch {
            from_seq: 1,
            to_seq: 9,
            checked: delta::encode(&[1, 5, 2048, 4100]),
            unchecked: delta::encode(&[3, 2050]),
            frozen: delta::encode(&[5, 4100]),
            ..Batch::default()
        };
        let parts = split(&batch).unwrap();
        /// A part with absolute lists: region, checked, unchecked, frozen.
        type Plain = (u32, Vec<u32>, Vec<u32>, Vec<u32>);
        let plain: Vec<Plain> = parts
            .iter()
            .map(|p| {
                (
                    p.region,
                    delta::decode(&p.checked).unwrap(),
                    delta::decode(&p.unchecked).unwrap(),
                    delta::decode(&p.frozen).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            plain,
            vec![
                (0, vec![1, 5], vec![3], vec![5]),
                (1, vec![2048], vec![2050], vec![]),
                (2, vec![4100], vec![], vec![4100]),
            ]
        );
    }
}
