//! Writing the archive: one epoch's records appended as blocks, fsynced;
//! resuming after a crash from what the archive itself holds; retention.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::format::{Record, encode_block, segment_header};
use crate::hour::{HOUR_MS, floor};
use crate::reader::{Reader, read_blocks};
use crate::{ArchiveError, segment_name};

/// Most records one block holds: a block is the unit a crash can lose and a
/// reader inflates at once.
const BLOCK_RECORDS: usize = 16_384;

/// Appends one epoch's records to the archive.
#[derive(Debug)]
pub struct Writer {
    root: PathBuf,
    epoch: u64,
    /// The segment being appended to.
    seg: Option<Open>,
    /// Hour and part of the last segment of the epoch (open or not).
    last: Option<(u64, u32)>,
    /// The last seq written or pending.
    last_seq: u64,
    /// The last seq on disk (fsynced).
    durable_seq: u64,
    pending: Vec<Record>,
    /// Repairs [`open`](Self::open) made, for the caller to log.
    repairs: Vec<String>,
}

#[derive(Debug)]
struct Open {
    path: PathBuf,
    file: File,
    hour: u64,
    /// Bytes known good: a failed append is cut back to this.
    len: u64,
}

/// What one [`Writer::flush`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Bytes appended (segment headers included).
    pub bytes: u64,
    /// Change records.
    pub changes: u64,
    /// Gap records.
    pub gaps: u64,
    /// Seqs the gaps cover.
    pub gap_seqs: u64,
}

impl Writer {
    /// A writer of `epoch` in `root`, resuming after the last block the
    /// archive holds for it (the archive is the truth about what was
    /// archived). A torn last block (a crash mid-write) is cut off; a
    /// segment damaged before its end is left as it is (readers report it)
    /// and writing goes on in a new part of the hour.
    pub fn open(root: &Path, epoch: u64) -> Result<Writer, ArchiveError> {
        let dir = crate::epoch_dir(root, epoch);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(ArchiveError::io(&dir))?;
            sync_dir(root)?;
        }
        let mut w = Writer {
            root: root.to_path_buf(),
            epoch,
            seg: None,
            last: None,
            last_seq: 0,
            durable_seq: 0,
            pending: Vec::new(),
            repairs: Vec::new(),
        };
        let segments = Reader::open(root)?.segments_of(epoch)?;
        // The newest segment with a good block says where the archive ends.
        for (i, seg) in segments.iter().enumerate().rev() {
            // A segment with a good header and no block yet (a crash right
            // after it was made) is appended to.
            let mut good_end = Some(crate::SEGMENT_HEADER_LEN);
            let mut damaged = false;
            for block in read_blocks(&seg.path) {
                match block {
                    Ok(b) => {
                        w.last_seq = w.last_seq.max(b.header.last_seq);
                        good_end = Some(
                            b.offset
                                + crate::BLOCK_HEADER_LEN as u64
                                + u64::from(b.header.payload_len),
                        );
                    }
                    Err(e @ ArchiveError::Io { .. }) => return Err(e),
                    Err(ArchiveError::Truncated { offset, .. }) if i + 1 == segments.len() => {
                        // A crash mid-append: cut the torn block off.
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&seg.path)
                            .map_err(ArchiveError::io(&seg.path))?;
                        let keep = offset.max(crate::SEGMENT_HEADER_LEN);
                        if offset < crate::SEGMENT_HEADER_LEN {
                            f.set_len(0)
                                .and_then(|()| (&f).write_all(&segment_header(epoch)))
                                .map_err(ArchiveError::io(&seg.path))?;
                        } else {
                            f.set_len(keep).map_err(ArchiveError::io(&seg.path))?;
                        }
                        f.sync_all().map_err(ArchiveError::io(&seg.path))?;
                        w.repairs.push(format!(
                            "{}: cut a torn block off at byte {keep} (a write a crash interrupted)",
                            seg.path.display()
                        ));
                        good_end = Some(keep);
                        break;
                    }
                    Err(e) => {
                        w.repairs.push(format!("{e}; left as is, writing on in a new part"));
                        damaged = true;
                    }
                }
            }
            if i + 1 == segments.len() {
                w.last = Some((seg.hour_ms, seg.part));
                if let (false, Some(len)) = (damaged, good_end) {
                    let file = OpenOptions::new()
                        .append(true)
                        .open(&seg.path)
                        .map_err(ArchiveError::io(&seg.path))?;
                    w.seg = Some(Open { path: seg.path.clone(), file, hour: seg.hour_ms, len });
                }
            }
            if w.last_seq > 0 {
                break;
            }
        }
        w.durable_seq = w.last_seq;
        Ok(w)
    }

    /// The epoch written.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last seq archived or pending (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The last seq on disk, fsynced.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Records waiting for [`flush`](Self::flush).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// What [`open`](Self::open) repaired or found damaged (for the log).
    pub fn take_repairs(&mut self) -> Vec<String> {
        std::mem::take(&mut self.repairs)
    }

    /// Queues a record; it must start right after the last one.
    pub fn push(&mut self, record: Record) -> Result<(), ArchiveError> {
        if record.first_seq() != self.last_seq + 1 || record.last_seq() < record.first_seq() {
            return Err(ArchiveError::OutOfOrder {
                epoch: self.epoch,
                last: self.last_seq,
                got: record.first_seq(),
            });
        }
        self.last_seq = record.last_seq();
        self.pending.push(record);
        Ok(())
    }

    /// Writes the pending records as blocks, each segment's fsynced before
    /// this returns. A record goes to the segment of its hour (that of its
    /// change's time; a gap's is the current one, or `now_ms`'s when there
    /// is none). On error nothing pending is lost: what was appended is cut
    /// back and the next flush tries again.
    pub fn flush(&mut self, now_ms: u64) -> Result<Flushed, ArchiveError> {
        let mut out = Flushed::default();
        let mut start = 0;
        while start < self.pending.len() {
            // The hour of this run of records: never before the current one.
            let current = self.seg.as_ref().map(|s| s.hour).or(self.last.map(|l| l.0));
            let first_ms = self.pending[start..].iter().find_map(|r| match r {
                Record::Change { ms, .. } => Some(*ms),
                Record::Gap { .. } => None,
            });
            let hour = floor(first_ms.unwrap_or(now_ms)).max(current.unwrap_or(0));
            let mut end = start;
            while end < self.pending.len() && end - start < BLOCK_RECORDS {
                let later = match self.pending[end] {
                    Record::Change { ms, .. } => floor(ms) > hour,
                    Record::Gap { .. } => false,
                };
                if later && end > start {
                    break;
                }
                end += 1;
            }
            let block = encode_block(&self.pending[start..end]);
            let header_bytes = match self.ensure_segment(hour) {
                Ok(n) => n,
                Err(e) => {
                    // What this flush wrote before stays written.
                    self.pending.drain(..start);
                    return Err(e);
                }
            };
            let seg = self.seg.as_mut().expect("ensured");
            let wrote = seg.file.write_all(&block).and_then(|()| seg.file.sync_data());
            if let Err(e) = wrote {
                let path = seg.path.clone();
                // Cut the partial append off; if even that fails, this file
                // is done and the next flush starts a new part.
                if seg.file.set_len(seg.len).and_then(|()| seg.file.sync_data()).is_err() {
                    self.seg = None;
                }
                self.pending.drain(..start);
                return Err(ArchiveError::Io { path, source: e });
            }
            seg.len += block.len() as u64;
            out.bytes += block.len() as u64 + header_bytes;
            for r in &self.pending[start..end] {
                match r {
                    Record::Change { .. } => out.changes += 1,
                    Record::Gap { from, to } => {
                        out.gaps += 1;
                        out.gap_seqs += to - from + 1;
                    }
                }
            }
            self.durable_seq = self.pending[end - 1].last_seq();
            start = end;
        }
        self.pending.clear();
        Ok(out)
    }

    /// Makes sure the open segment is `hour`'s; returns the header bytes a
    /// new segment took.
    fn ensure_segment(&mut self, hour: u64) -> Result<u64, ArchiveError> {
        if self.seg.as_ref().is_some_and(|s| s.hour == hour) {
            return Ok(0);
        }
        // The same hour as the last segment, which cannot be appended to
        // (damaged): its next part.
        let part = match self.last {
            Some((h, p)) if h == hour => p + 1,
            _ => 0,
        };
        let dir = crate::epoch_dir(&self.root, self.epoch);
        let path = dir.join(segment_name(hour, part));
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(ArchiveError::io(&path))?;
        let head = segment_header(self.epoch);
        file.write_all(&head).and_then(|()| file.sync_all()).map_err(ArchiveError::io(&path))?;
        sync_dir(&dir)?;
        self.last = Some((hour, part));
        self.seg = Some(Open { path, file, hour, len: head.len() as u64 });
        Ok(head.len() as u64)
    }
}

fn sync_dir(dir: &Path) -> Result<(), ArchiveError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(ArchiveError::io(dir))
}

/// What [`prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Segment files.
    pub segments: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Deletes the segments whose hour ended more than `keep` before `now_ms`,
/// and epoch directories left empty; never the newest segment of
/// `live_epoch` (the one a writer appends to and resumes from).
pub fn prune(
    root: &Path,
    keep: Duration,
    now_ms: u64,
    live_epoch: Option<u64>,
) -> Result<Pruned, ArchiveError> {
    let reader = Reader::open(root)?;
    let segments = reader.segments()?;
    let keep_ms = keep.as_millis() as u64;
    let newest_live =
        segments.iter().filter(|s| Some(s.epoch) == live_epoch).map(|s| (s.hour_ms, s.part)).max();
    let mut out = Pruned::default();
    let mut touched = std::collections::BTreeSet::new();
    for s in &segments {
        let old = s.hour_ms + HOUR_MS + keep_ms <= now_ms;
        let live = Some(s.epoch) == live_epoch && Some((s.hour_ms, s.part)) == newest_live;
        if old && !live {
            std::fs::remove_file(&s.path).map_err(ArchiveError::io(&s.path))?;
            out.segments += 1;
            out.bytes += s.len;
            touched.insert(s.epoch);
        }
    }
    for epoch in touched {
        if Some(epoch) == live_epoch {
            continue;
        }
        let dir = crate::epoch_dir(root, epoch);
        // Only if empty: remove_dir refuses otherwise, which is the point.
        let _ = std::fs::remove_dir(&dir);
    }
    if out.segments > 0 {
        sync_dir(root)?;
    }
    Ok(out)
}
