//! Reading the archive: its segments, their raw blocks, and the entries in
//! order with every problem reported at its place.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use omcb_proto::{Board, Op};

use crate::format::{
    BLOCK_HEADER_LEN, BlockHeader, Record, SEGMENT_HEADER_LEN, SEGMENT_MAGIC, decode_block,
};
use crate::{ArchiveError, ArchivedChange, Entry, Filter, parse_segment_name};

/// A reader of an archive directory.
#[derive(Debug, Clone)]
pub struct Reader {
    root: PathBuf,
}

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The epoch its directory names.
    pub epoch: u64,
    /// The start of its UTC hour, ms since the Unix epoch.
    pub hour_ms: u64,
    /// 0 for the hour's first file, 1, 2, ... for later parts.
    pub part: u32,
    /// The file.
    pub path: PathBuf,
    /// Its length in bytes when listed.
    pub len: u64,
}

/// One block as stored: where it starts, its header and its compressed
/// payload (CRC checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBlock {
    /// Byte offset of the block's header in its segment.
    pub offset: u64,
    /// The header.
    pub header: BlockHeader,
    /// The raw DEFLATE payload.
    pub payload: Vec<u8>,
}

impl Reader {
    /// A reader of the archive in `root` (which must exist).
    pub fn open(root: impl Into<PathBuf>) -> Result<Reader, ArchiveError> {
        let root = root.into();
        std::fs::metadata(&root).map_err(ArchiveError::io(&root))?;
        Ok(Reader { root })
    }

    /// The archive's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every segment, in archive order: epochs by their first change (the
    /// hour of their first segment, then the time in its first blocks),
    /// then each epoch's segments by hour and part (which is seq order).
    pub fn segments(&self) -> Result<Vec<Segment>, ArchiveError> {
        let mut epochs: Vec<Vec<Segment>> = Vec::new();
        for dir in read_dir(&self.root)? {
            let Some(epoch) = dir
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            if !dir.is_dir() {
                continue;
            }
            let segs = self.segments_in(epoch, &dir)?;
            if !segs.is_empty() {
                epochs.push(segs);
            }
        }
        epochs.sort_by_cached_key(|s| (s[0].hour_ms, first_ms(&s[0].path), s[0].epoch));
        Ok(epochs.into_iter().flatten().collect())
    }

    /// One epoch's segments, in seq order (empty when it has none).
    pub fn segments_of(&self, epoch: u64) -> Result<Vec<Segment>, ArchiveError> {
        let dir = crate::epoch_dir(&self.root, epoch);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        self.segments_in(epoch, &dir)
    }

    fn segments_in(&self, epoch: u64, dir: &Path) -> Result<Vec<Segment>, ArchiveError> {
        let mut out = Vec::new();
        for path in read_dir(dir)? {
            let Some((hour_ms, part)) =
                path.file_name().and_then(|n| n.to_str()).and_then(parse_segment_name)
            else {
                continue;
            };
            let len = std::fs::metadata(&path).map_err(ArchiveError::io(&path))?.len();
            out.push(Segment { epoch, hour_ms, part, path, len });
        }
        out.sort_by_key(|s| (s.hour_ms, s.part));
        Ok(out)
    }

    /// The epochs, in archive order.
    pub fn epochs(&self) -> Result<Vec<u64>, ArchiveError> {
        let mut out: Vec<u64> = Vec::new();
        for s in self.segments()? {
            if out.last() != Some(&s.epoch) {
                out.push(s.epoch);
            }
        }
        Ok(out)
    }

    /// Every entry `filter` takes, in order, with every problem as an
    /// `Err` at its place (the iteration goes on after it where it can).
    ///
    /// A gap has no time. The store's seqs follow its clock, so the seqs a
    /// gap lost were committed after the change before it and before the
    /// change after it; with a time filter a gap is yielded unless the
    /// change after it is before `since_ms` or the change before it is at
    /// or after `until_ms`, wherever its block is. A gap with no change
    /// after it (the epoch's end, or a problem the reader reports next) is
    /// yielded with a `since_ms` filter, as it may be in the window; so is
    /// one with no change before it with an `until_ms` filter.
    pub fn entries(&self, filter: Filter) -> Entries {
        let segments = match filter.epoch {
            Some(e) => self.segments_of(e),
            None => self.segments(),
        };
        let (segments, first_error) = match segments {
            Ok(s) => (s.into(), None),
            Err(e) => (VecDeque::new(), Some(e)),
        };
        Entries {
            filter,
            segments,
            current: None,
            ready: first_error.into_iter().map(Err).collect(),
            expect: None,
            before_ms: None,
            waiting: Vec::new(),
        }
    }
}

/// The earliest change time in a segment's first few blocks (0 when they
/// hold none or cannot be read): orders epochs that began in the same hour.
fn first_ms(path: &Path) -> u64 {
    read_blocks_headers(path).take(4).find(|&ms| ms > 0).unwrap_or(0)
}

fn read_blocks_headers(path: &Path) -> impl Iterator<Item = u64> {
    let mut blocks = read_blocks(path);
    std::iter::from_fn(move || match blocks.next_with(|_| true)? {
        Ok(b) => Some(b.header.min_ms),
        Err(_) => None,
    })
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, ArchiveError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(ArchiveError::io(dir))? {
        out.push(e.map_err(ArchiveError::io(dir))?.path());
    }
    Ok(out)
}

/// The blocks of one segment file, in order; an error for a bad header,
/// a torn or corrupt block (after a corrupt block whose length is
/// plausible the iteration goes on with the next one; after a torn one it
/// ends). The newest segment of a live archive may end in a block being
/// appended right now: that reads as `Truncated` at its offset until the
/// write completes (blocks are appended whole, then fsynced).
pub fn read_blocks(path: &Path) -> Blocks {
    Blocks::open(path)
}

/// Iterator of [`read_blocks`].
#[derive(Debug)]
pub struct Blocks {
    path: PathBuf,
    file: Option<File>,
    len: u64,
    offset: u64,
    /// The epoch the segment's header names (0 before it is read).
    pub epoch: u64,
    pending: Option<ArchiveError>,
}

impl Blocks {
    fn open(path: &Path) -> Blocks {
        let mut b = Blocks {
            path: path.to_path_buf(),
            file: None,
            len: 0,
            offset: SEGMENT_HEADER_LEN,
            epoch: 0,
            pending: None,
        };
        match b.open_file() {
            Ok(()) => {}
            Err(e) => b.pending = Some(e),
        }
        b
    }

    fn open_file(&mut self) -> Result<(), ArchiveError> {
        let io = ArchiveError::io(&self.path);
        let mut f = File::open(&self.path).map_err(io)?;
        self.len = f.metadata().map_err(ArchiveError::io(&self.path))?.len();
        let mut head = [0u8; SEGMENT_HEADER_LEN as usize];
        if self.len < SEGMENT_HEADER_LEN {
            return Err(ArchiveError::Truncated {
                file: self.path.clone(),
                offset: 0,
                why: format!("{} bytes, shorter than the segment header", self.len),
            });
        }
        f.read_exact(&mut head).map_err(ArchiveError::io(&self.path))?;
        if &head[..8] != SEGMENT_MAGIC {
            return Err(ArchiveError::Corrupt {
                file: self.path.clone(),
                offset: 0,
                why: "not a segment (bad magic)".into(),
            });
        }
        self.epoch = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
        self.file = Some(f);
        Ok(())
    }

    /// The next block, reading its header only; `skip` decides from the
    /// header whether the payload is needed (a skipped block comes back
    /// with an empty payload, its CRC unchecked).
    fn next_with(
        &mut self,
        skip: impl Fn(&BlockHeader) -> bool,
    ) -> Option<Result<RawBlock, ArchiveError>> {
        if let Some(e) = self.pending.take() {
            return Some(Err(e));
        }
        let file = self.file.as_mut()?;
        if self.offset == self.len {
            self.file = None;
            return None;
        }
        let offset = self.offset;
        let (path, len) = (&self.path, self.len);
        let torn = |why: String| ArchiveError::Truncated { file: path.clone(), offset, why };
        if len - offset < BLOCK_HEADER_LEN as u64 {
            self.file = None;
            return Some(Err(torn(format!(
                "{} bytes left, less than a block header",
                len - offset
            ))));
        }
        let mut head = [0u8; BLOCK_HEADER_LEN];
        let read = file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut head));
        if let Err(e) = read {
            self.file = None;
            return Some(Err(ArchiveError::Io { path: path.clone(), source: e }));
        }
        let header = BlockHeader::parse(&head);
        if let Err(why) = header.plausible() {
            // A header that cannot be: nothing after it can be found.
            self.file = None;
            return Some(Err(ArchiveError::Corrupt { file: path.clone(), offset, why }));
        }
        let end = offset + BLOCK_HEADER_LEN as u64 + u64::from(header.payload_len);
        if end > len {
            self.file = None;
            return Some(Err(torn(format!(
                "the block needs {} bytes, the file has {}",
                end - offset,
                len - offset
            ))));
        }
        self.offset = end;
        if skip(&header) {
            return Some(Ok(RawBlock { offset, header, payload: Vec::new() }));
        }
        let mut payload = vec![0u8; header.payload_len as usize];
        if let Err(e) = file.read_exact(&mut payload) {
            self.file = None;
            return Some(Err(ArchiveError::Io { path: path.clone(), source: e }));
        }
        if !header.check(&payload) {
            return Some(Err(ArchiveError::Corrupt {
                file: path.clone(),
                offset,
                why: "checksum mismatch".into(),
            }));
        }
        Some(Ok(RawBlock { offset, header, payload }))
    }
}

impl Iterator for Blocks {
    type Item = Result<RawBlock, ArchiveError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_with(|_| false)
    }
}

/// Iterator of [`Reader::entries`].
#[derive(Debug)]
pub struct Entries {
    filter: Filter,
    segments: VecDeque<crate::Segment>,
    current: Option<(u64, Blocks)>,
    ready: VecDeque<Result<Entry, ArchiveError>>,
    /// `(epoch, next seq expected)`: blocks of an epoch must be contiguous
    /// from seq 1.
    expect: Option<(u64, u64)>,
    /// The commit time of the epoch's last change read so far, or a time
    /// no later than it (the earliest of a block read by its header only);
    /// `None` before the epoch's first change.
    before_ms: Option<u64>,
    /// Gaps waiting for the change after them, whose time tells whether
    /// they may be in the window (only with `since_ms`).
    waiting: Vec<Entry>,
}

impl Entries {
    /// Whether a gap after a change at `before_ms` may end in the window:
    /// not when that change is at or after `until_ms`.
    fn gap_may_be_before_until(&self, before_ms: Option<u64>) -> bool {
        match (self.filter.until_ms, before_ms) {
            (Some(u), Some(b)) => b < u,
            _ => true,
        }
    }

    /// The next change after the waiting gaps is at `after_ms` or earlier:
    /// they are in the window unless that is before `since_ms`.
    fn settle_waiting(&mut self, after_ms: u64) {
        let before_window = self.filter.since_ms.is_some_and(|s| after_ms < s);
        let waiting = std::mem::take(&mut self.waiting);
        if !before_window {
            self.ready.extend(waiting.into_iter().map(Ok));
        }
    }

    /// The waiting gaps when nothing after them tells their time (the
    /// epoch's end, a problem in the archive): they may be in the window.
    fn release_waiting(&mut self) {
        self.ready.extend(self.waiting.drain(..).map(Ok));
    }

    /// A gap record of the epoch: yielded now, dropped (a change at or
    /// after `until` precedes it), or kept until the change after it says
    /// whether it is before `since`.
    fn gap(&mut self, gap: Entry) {
        if !self.gap_may_be_before_until(self.before_ms) {
            return;
        }
        if self.filter.since_ms.is_some() {
            self.waiting.push(gap);
        } else {
            self.ready.push_back(Ok(gap));
        }
    }

    /// A problem at its place: the waiting gaps come first.
    fn problem(&mut self, e: ArchiveError) {
        self.release_waiting();
        self.ready.push_back(Err(e));
    }

    fn fill(&mut self) -> bool {
        loop {
            let Some((epoch, blocks)) = self.current.as_mut() else {
                let Some(seg) = self.segments.pop_front() else {
                    self.release_waiting();
                    return !self.ready.is_empty();
                };
                let blocks = read_blocks(&seg.path);
                if self.expect.is_none_or(|(e, _)| e != seg.epoch) {
                    self.release_waiting();
                    self.expect = Some((seg.epoch, 1));
                    self.before_ms = None;
                }
                self.current = Some((seg.epoch, blocks));
                continue;
            };
            let epoch = *epoch;
            let filter = self.filter;
            // A block with gaps is read whatever its times: a gap at its
            // end or start may reach into the window.
            let block = blocks.next_with(|h| !filter.takes_block(h) && h.records == h.changes);
            let path = blocks.path.clone();
            let header_epoch = blocks.epoch;
            if header_epoch != 0 && header_epoch != epoch {
                self.problem(ArchiveError::Corrupt {
                    file: path,
                    offset: 0,
                    why: format!(
                        "the header says epoch {header_epoch:016x}, the directory {epoch:016x}"
                    ),
                });
                self.current = None;
                return true;
            }
            let Some(block) = block else {
                self.current = None;
                continue;
            };
            let block = match block {
                Ok(b) => b,
                Err(e) => {
                    self.problem(e);
                    return true;
                }
            };
            let h = block.header;
            let (_, next) = self.expect.expect("set with the segment");
            if h.first_seq > next {
                self.problem(ArchiveError::Missing {
                    file: path.clone(),
                    offset: block.offset,
                    epoch,
                    from_seq: next,
                    to_seq: h.first_seq - 1,
                });
            }
            if h.first_seq < next {
                self.problem(ArchiveError::Repeated {
                    file: path.clone(),
                    offset: block.offset,
                    epoch,
                    from_seq: h.first_seq,
                    to_seq: h.last_seq.min(next - 1),
                });
            }
            let skip_below = next.max(h.first_seq);
            self.expect = Some((epoch, next.max(h.last_seq + 1)));
            if block.payload.is_empty() {
                // Outside the time filter and no gap: nothing to yield. Its
                // first change is no later than its latest, its last no
                // earlier than its earliest.
                if h.changes > 0 {
                    self.settle_waiting(h.max_ms);
                    self.before_ms = Some(h.min_ms);
                }
                if !self.ready.is_empty() {
                    return true;
                }
                continue;
            }
            match decode_block(&h, &block.payload) {
                Err(why) => {
                    self.problem(ArchiveError::Corrupt { file: path, offset: block.offset, why });
                    // Its changes are unknown: so is the time before a gap
                    // after it.
                    self.before_ms = None;
                }
                Ok(records) => {
                    for r in records {
                        match r {
                            Record::Gap { from, to } if to >= skip_below => self.gap(Entry::Gap {
                                epoch,
                                from_seq: from.max(skip_below),
                                to_seq: to,
                            }),
                            Record::Gap { .. } => {}
                            Record::Change { seq, ms, index, op, origin } => {
                                if seq < skip_below {
                                    continue;
                                }
                                self.settle_waiting(ms);
                                self.before_ms = Some(ms);
                                if self.filter.takes_ms(ms) {
                                    self.ready.push_back(Ok(Entry::Change(ArchivedChange {
                                        epoch,
                                        seq,
                                        ms,
                                        index,
                                        op,
                                        origin,
                                    })));
                                }
                            }
                        }
                    }
                }
            }
            if !self.ready.is_empty() {
                return true;
            }
        }
    }
}

impl Iterator for Entries {
    type Item = Result<Entry, ArchiveError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ready.is_empty() && !self.fill() {
            return None;
        }
        self.ready.pop_front()
    }
}

/// An epoch's board rebuilt from its archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The board after the epoch's last archived change (its `seq`), counts
    /// recounted, `freeze_after_ms` 0 (the archive does not hold settings).
    pub board: Board,
    /// The gaps met, `(from_seq, to_seq)`: with any, the board is what the
    /// archived changes make, not necessarily the store's.
    pub gaps: Vec<(u64, u64)>,
}

/// Rebuilds board `epoch` of `size` boxes from its archived changes; the
/// first problem the reader reports is the error.
pub fn rebuild(reader: &Reader, epoch: u64, size: u32) -> Result<Rebuilt, ArchiveError> {
    let mut board = Board::new(size, epoch, 0);
    let mut gaps = Vec::new();
    for entry in reader.entries(Filter::epoch(epoch)) {
        match entry? {
            Entry::Gap { from_seq, to_seq, .. } => {
                gaps.push((from_seq, to_seq));
                board.seq = to_seq;
            }
            Entry::Change(c) => {
                if c.index >= size {
                    return Err(ArchiveError::OutOfRange {
                        epoch,
                        seq: c.seq,
                        index: c.index,
                        size,
                    });
                }
                match c.op {
                    Op::Set(v) => board.checked.set(c.index as usize, v),
                    Op::Freeze => board.frozen.set(c.index as usize, true),
                }
                board.seq = c.seq;
            }
        }
    }
    board.checked_count = board.checked.count_ones() as u32;
    board.frozen_count = board.frozen.count_ones() as u32;
    Ok(Rebuilt { board, gaps })
}
