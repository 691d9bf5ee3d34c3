//! The change archive: every change of the board, kept on disk after the
//! store's stream has trimmed it, so that nothing is lost (issue 14): an
//! operator can audit and revert what one client did, and anyone can replay
//! the board's history.
//!
//! This crate is the format, its [`Writer`] and its [`Reader`]; the worker's
//! archiver (`crates/worker/src/archiver.rs`) feeds the writer from the
//! store.
//!
//! # Layout
//! ```text
//! ARCHIVE_DIR/
//!   <epoch, 16 lowercase hex digits>/
//!     2026-11-26T05.seg      one segment per UTC hour of the changes' commit times
//!     2026-11-26T06.seg
//!     2026-11-26T06.1.seg    a second part of an hour (the writer found the
//!                            first damaged in the middle and left it as is)
//! ```
//! A segment's hour is that of its first change's commit time; within an
//! epoch the hour never goes back (a store clock that steps back a little
//! keeps writing the current hour), so segments in name order are in seq
//! order. Retention ([`prune`]) deletes segments by the age of their hour.
//!
//! # A segment
//! 16 bytes: `OMCBSEG1`, the epoch (u64 little endian). Then blocks, each
//! appended and fsynced as a whole; a crash mid-write leaves a torn last
//! block, which the next [`Writer::open`] cuts off (its changes are read
//! again from the store's stream, or recorded as a gap if the stream no
//! longer has them), and which a [`Reader`] reports as
//! [`ArchiveError::Truncated`] with file and offset.
//!
//! A block: a 48-byte header, all little endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | payload length (compressed bytes after the header) |
//! | 4..8 | CRC-32 (IEEE) of header bytes 8..48 and the payload |
//! | 8..16 | first seq |
//! | 16..24 | last seq |
//! | 24..32 | earliest commit time of its changes, ms since 1970 (0 if none) |
//! | 32..40 | latest commit time, ms |
//! | 40..44 | number of changes |
//! | 44..48 | number of records (changes and gaps) |
//!
//! then the payload: **raw DEFLATE** (RFC 1951; a browser inflates it with
//! `DecompressionStream('deflate-raw')`) of:
//! - varint `n`, the records; varint `k`, the origins; `k` origins as u64 LE
//!   (the block's origin dictionary, in order of first use);
//! - five columns, each a varint byte length then its bytes:
//!   1. flags, one byte per record: bits 0-1 the kind (0 uncheck, 1 check,
//!      2 freeze, 3 gap), bit 2 (`0x04`) "same origin as the previous change";
//!   2. gaps: per gap record, varint `to - from`;
//!   3. times: per change, zigzag varint of its ms minus the previous
//!      change's (the first's minus the header's earliest time);
//!   4. boxes: per change, zigzag varint of its index minus the previous
//!      change's (the first's minus 0);
//!   5. origins: per change without the same-origin bit, varint index into
//!      the dictionary.
//!
//! Varints are LEB128 (7 bits a byte, low first); zigzag maps 0, -1, 1, -2
//! to 0, 1, 2, 3. Records are contiguous in seq: the first covers the
//! header's first seq, a change covers one seq and a gap `from..=to`, each
//! starting where the previous ended; blocks of an epoch are contiguous
//! too, the first starting at seq 1. So no seq is stored per change, and a
//! reader can tell a missing block from a recorded gap.
//!
//! A change's origin is the keyed hash of its client's address (the worker's
//! `origin.rs`); 0 = no client (the sweep's freezes). The archive holds no
//! address.
//!
//! # Reading
//! [`Reader::open`] then [`Reader::entries`] with a [`Filter`]: every
//! [`Entry`] in order, epoch by epoch, with every problem as an
//! [`ArchiveError`] in the stream at its place (file and byte offset): a
//! torn or corrupt block, seqs that no block or gap holds. The reader never
//! skips anything silently; it goes on after an error where it can, and the
//! caller decides whether to stop. [`Reader::segments`] and [`read_blocks`]
//! give the raw blocks (for serving segments over HTTP); [`rebuild`] makes
//! an epoch's board from its changes.

mod format;
pub mod hour;
mod reader;
mod writer;

use std::path::{Path, PathBuf};

pub use format::{BLOCK_HEADER_LEN, BlockHeader, Record, SEGMENT_HEADER_LEN, decode_block};
pub use omcb_proto::Op;
pub use reader::{Blocks, Entries, RawBlock, Reader, Rebuilt, Segment, read_blocks, rebuild};
pub use writer::{Flushed, Pruned, Writer, prune};

/// One change, as archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchivedChange {
    /// The board incarnation it belongs to.
    pub epoch: u64,
    /// Its seq in that epoch.
    pub seq: u64,
    /// When the store committed it, ms since the Unix epoch.
    pub ms: u64,
    /// The box.
    pub index: u32,
    /// What happened to the box.
    pub op: Op,
    /// The keyed hash of its client's address; 0 = no client.
    pub origin: u64,
}

/// What the archive holds, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A change.
    Change(ArchivedChange),
    /// Seqs `from_seq..=to_seq` of `epoch` the archive does not have as
    /// changes: the store's stream had trimmed them before the archiver read
    /// them, or (at the start of an epoch whose seqs continue an older
    /// board's: Redis reborn or restored, the embedded board after a crash)
    /// they are the older board's.
    Gap {
        /// The epoch.
        epoch: u64,
        /// First missing seq.
        from_seq: u64,
        /// Last missing seq.
        to_seq: u64,
    },
}

impl Entry {
    /// The entry's epoch.
    pub fn epoch(&self) -> u64 {
        match *self {
            Entry::Change(c) => c.epoch,
            Entry::Gap { epoch, .. } => epoch,
        }
    }
}

/// Which entries [`Reader::entries`] yields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this epoch's.
    pub epoch: Option<u64>,
    /// Only changes committed at or after this ms.
    pub since_ms: Option<u64>,
    /// Only changes committed before this ms.
    pub until_ms: Option<u64>,
}

impl Filter {
    /// Everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// One epoch, all of it.
    pub fn epoch(epoch: u64) -> Self {
        Self { epoch: Some(epoch), ..Self::default() }
    }

    fn takes_ms(&self, ms: u64) -> bool {
        self.since_ms.is_none_or(|s| ms >= s) && self.until_ms.is_none_or(|u| ms < u)
    }

    /// Whether a block with changes committed in `min..=max` may hold
    /// entries this filter takes.
    fn takes_block(&self, h: &BlockHeader) -> bool {
        h.changes == 0
            || (self.since_ms.is_none_or(|s| h.max_ms >= s)
                && self.until_ms.is_none_or(|u| h.min_ms < u))
    }
}

/// Something wrong with the archive, or a file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file ends inside a block (or its header): a write that a crash
    /// cut short, or a file cut by something else.
    #[error("{} at byte {offset}: truncated: {why}", file.display())]
    Truncated {
        /// The segment.
        file: PathBuf,
        /// Where the incomplete block starts.
        offset: u64,
        /// What is missing.
        why: String,
    },
    /// A block (or the segment's header) is not what was written: its
    /// checksum fails or its contents do not add up.
    #[error("{} at byte {offset}: corrupt: {why}", file.display())]
    Corrupt {
        /// The segment.
        file: PathBuf,
        /// Where the block starts.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// Seqs that neither a block nor a gap record holds (a segment deleted
    /// by hand, a block lost to corruption), found where the next block
    /// starts.
    #[error(
        "{} at byte {offset}: seqs {from_seq}..={to_seq} of epoch {epoch:016x} are missing \
         (no block and no gap record holds them)",
        file.display()
    )]
    Missing {
        /// The segment of the block after the hole.
        file: PathBuf,
        /// That block's offset.
        offset: u64,
        /// The epoch.
        epoch: u64,
        /// First missing seq.
        from_seq: u64,
        /// Last missing seq.
        to_seq: u64,
    },
    /// A block repeats seqs an earlier block already held.
    #[error(
        "{} at byte {offset}: seqs {from_seq}..={to_seq} of epoch {epoch:016x} were already archived",
        file.display()
    )]
    Repeated {
        /// The segment of the repeating block.
        file: PathBuf,
        /// Its offset.
        offset: u64,
        /// The epoch.
        epoch: u64,
        /// First repeated seq.
        from_seq: u64,
        /// Last repeated seq.
        to_seq: u64,
    },
    /// A writer was given a record that does not follow the last one.
    #[error("record for seq {got} does not follow seq {last} of epoch {epoch:016x}")]
    OutOfOrder {
        /// The epoch.
        epoch: u64,
        /// The last seq the writer has.
        last: u64,
        /// The record's first seq.
        got: u64,
    },
    /// The archive's changes do not fit the board asked for ([`rebuild`]).
    #[error("epoch {epoch:016x} seq {seq}: box {index} is outside a board of {size}")]
    OutOfRange {
        /// The epoch.
        epoch: u64,
        /// The change's seq.
        seq: u64,
        /// Its box.
        index: u32,
        /// The board's size.
        size: u32,
    },
}

impl ArchiveError {
    /// The file the problem is in, when it is in one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ArchiveError::Io { path, .. } => Some(path),
            ArchiveError::Truncated { file, .. }
            | ArchiveError::Corrupt { file, .. }
            | ArchiveError::Missing { file, .. }
            | ArchiveError::Repeated { file, .. } => Some(file),
            ArchiveError::OutOfOrder { .. } | ArchiveError::OutOfRange { .. } => None,
        }
    }

    /// The byte offset in [`file`](Self::file) where the problem starts.
    pub fn offset(&self) -> Option<u64> {
        match self {
            ArchiveError::Truncated { offset, .. }
            | ArchiveError::Corrupt { offset, .. }
            | ArchiveError::Missing { offset, .. }
            | ArchiveError::Repeated { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
        move |source| ArchiveError::Io { path: path.to_path_buf(), source }
    }
}

/// The directory of `epoch`'s segments under `root`.
pub fn epoch_dir(root: &Path, epoch: u64) -> PathBuf {
    root.join(format!("{epoch:016x}"))
}

/// A segment's file name: its hour, and its part when not the first.
pub fn segment_name(hour_ms: u64, part: u32) -> String {
    match part {
        0 => format!("{}.seg", hour::name(hour_ms)),
        n => format!("{}.{n}.seg", hour::name(hour_ms)),
    }
}

/// `(hour_ms, part)` of a segment file name; `None` for other files.
pub fn parse_segment_name(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_suffix(".seg")?;
    let (hour, part) = match stem.split_once('.') {
        Some((h, p)) => (h, p.parse().ok().filter(|&p| p > 0)?),
        None => (stem, 0),
    };
    Some((hour::parse(hour)?, part))
}
