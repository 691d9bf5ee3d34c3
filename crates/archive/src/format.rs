//! The bytes of a segment: its header, and each block's header and payload
//! (the layout is in the crate docs). Pure functions, no files.

use std::io::{Read as _, Write as _};

use omcb_proto::Op;

/// A segment file starts with these 8 bytes, then its epoch (u64 LE).
pub const SEGMENT_MAGIC: &[u8; 8] = b"OMCBSEG1";
/// Bytes before a segment's first block.
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// Bytes of a block's header.
pub const BLOCK_HEADER_LEN: usize = 48;
/// The largest payload (compressed) and record count a reader believes: a
/// header claiming more is corrupt, not a reason to allocate gigabytes.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Most records one block holds (the writer cuts blocks well below).
pub const MAX_RECORDS: u32 = 1 << 20;

/// What a block's header says, readable without decompressing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Bytes of the compressed payload after the header.
    pub payload_len: u32,
    /// CRC-32 (IEEE) of header bytes 8..48 and the payload.
    pub crc: u32,
    /// Seq of the first record (a change, or a gap's first seq).
    pub first_seq: u64,
    /// Seq of the last record (a change, or a gap's last seq).
    pub last_seq: u64,
    /// Earliest commit time (ms) of the block's changes; 0 if it has none.
    pub min_ms: u64,
    /// Latest commit time (ms) of the block's changes; 0 if it has none.
    pub max_ms: u64,
    /// Change records.
    pub changes: u32,
    /// All records, gaps included.
    pub records: u32,
}

impl BlockHeader {
    /// Parses the 48 header bytes; the CRC is checked with the payload, by
    /// [`check`](Self::check).
    pub fn parse(b: &[u8; BLOCK_HEADER_LEN]) -> BlockHeader {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        BlockHeader {
            payload_len: u32_at(0),
            crc: u32_at(4),
            first_seq: u64_at(8),
            last_seq: u64_at(16),
            min_ms: u64_at(24),
            max_ms: u64_at(32),
            changes: u32_at(40),
            records: u32_at(44),
        }
    }

    fn bytes(&self) -> [u8; BLOCK_HEADER_LEN] {
        let mut b = [0u8; BLOCK_HEADER_LEN];
        b[0..4].copy_from_slice(&self.payload_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.crc.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.last_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.min_ms.to_le_bytes());
        b[32..40].copy_from_slice(&self.max_ms.to_le_bytes());
        b[40..44].copy_from_slice(&self.changes.to_le_bytes());
        b[44..48].copy_from_slice(&self.records.to_le_bytes());
        b
    }

    /// Whether the header's numbers are possible at all (checked before
    /// the payload is read: a torn or garbage header must not make the
    /// reader allocate or seek wildly).
    pub fn plausible(&self) -> Result<(), String> {
        if self.payload_len == 0 || self.payload_len > MAX_PAYLOAD {
            return Err(format!("payload length {} out of bounds", self.payload_len));
        }
        if self.records == 0 || self.records > MAX_RECORDS || self.changes > self.records {
            return Err(format!(
                "{} records ({} changes) out of bounds",
                self.records, self.changes
            ));
        }
        if self.first_seq == 0 || self.last_seq < self.first_seq {
            return Err(format!("seq range {}..={} is empty", self.first_seq, self.last_seq));
        }
        Ok(())
    }

    /// Whether `payload` is this header's (its CRC matches).
    pub fn check(&self, payload: &[u8]) -> bool {
        crc(&self.bytes()[8..], payload) == self.crc
    }
}

fn crc(header_tail: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_tail);
    h.update(payload);
    h.finalize()
}

/// One record of a block, without its epoch (the segment's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A change.
    Change {
        /// Its seq.
        seq: u64,
        /// Commit time, ms since the Unix epoch.
        ms: u64,
        /// The box.
        index: u32,
        /// What happened.
        op: Op,
        /// The keyed hash of its client's address; 0 = none.
        origin: u64,
    },
    /// Seqs `from..=to` that are not in the archive ([`crate::Entry::Gap`]).
    Gap {
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
}

impl Record {
    /// The first seq the record covers.
    pub fn first_seq(&self) -> u64 {
        match *self {
            Record::Change { seq, .. } => seq,
            Record::Gap { from, .. } => from,
        }
    }

    /// The last seq the record covers.
    pub fn last_seq(&self) -> u64 {
        match *self {
            Record::Change { seq, .. } => seq,
            Record::Gap { to, .. } => to,
        }
    }
}

// Flag byte of a record: bits 0-1 the kind, bit 2 "same origin as the
// previous change" (no origin index follows).
const KIND_UNSET: u8 = 0;
const KIND_SET: u8 = 1;
const KIND_FREEZE: u8 = 2;
const KIND_GAP: u8 = 3;
const SAME_ORIGIN: u8 = 4;

/// Encodes `records` (contiguous: each starts right after the previous
/// one ends) as one block: header and compressed payload, ready to append.
pub fn encode_block(records: &[Record]) -> Vec<u8> {
    assert!(!records.is_empty() && records.len() <= MAX_RECORDS as usize);
    let changes = records.iter().filter(|r| matches!(r, Record::Change { .. })).count() as u32;
    let times = records.iter().filter_map(|r| match r {
        Record::Change { ms, .. } => Some(*ms),
        Record::Gap { .. } => None,
    });
    let (min_ms, max_ms) = times.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let min_ms = if changes == 0 { 0 } else { min_ms };
    let mut origins: Vec<u64> = Vec::new();
    let mut origin_ids: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let (mut flags, mut seqs, mut times, mut indexes, mut origin_col) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut prev_ms, mut prev_index, mut prev_origin) = (min_ms, 0u32, None);
    let mut next_seq = records[0].first_seq();
    for r in records {
        assert_eq!(r.first_seq(), next_seq, "records must be contiguous");
        next_seq = r.last_seq() + 1;
        match *r {
            Record::Gap { from, to } => {
                flags.push(KIND_GAP);
                put_varint(&mut seqs, to - from);
            }
            Record::Change { ms, index, op, origin, .. } => {
                let kind = match op {
                    Op::Set(false) => KIND_UNSET,
                    Op::Set(true) => KIND_SET,
                    Op::Freeze => KIND_FREEZE,
                };
                put_varint(&mut times, zigzag(ms as i64 - prev_ms as i64));
                put_varint(&mut indexes, zigzag(i64::from(index) - i64::from(prev_index)));
                (prev_ms, prev_index) = (ms, index);
                if prev_origin == Some(origin) {
                    flags.push(kind | SAME_ORIGIN);
                } else {
                    flags.push(kind);
                    let next = origins.len() as u64;
                    let id = *origin_ids.entry(origin).or_insert_with(|| {
                        origins.push(origin);
                        next
                    });
                    put_varint(&mut origin_col, id);
                    prev_origin = Some(origin);
                }
            }
        }
    }
    let mut raw = Vec::with_capacity(flags.len() * 4 + origins.len() * 8 + 32);
    put_varint(&mut raw, records.len() as u64);
    put_varint(&mut raw, origins.len() as u64);
    for o in &origins {
        raw.extend_from_slice(&o.to_le_bytes());
    }
    for col in [&flags, &seqs, &times, &indexes, &origin_col] {
        put_varint(&mut raw, col.len() as u64);
        raw.extend_from_slice(col);
    }
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
    z.write_all(&raw).expect("writing to a Vec");
    let payload = z.finish().expect("writing to a Vec");
    let mut header = BlockHeader {
        payload_len: payload.len() as u32,
        crc: 0,
        first_seq: records[0].first_seq(),
        last_seq: next_seq - 1,
        min_ms,
        max_ms,
        changes,
        records: records.len() as u32,
    };
    header.crc = crc(&header.bytes()[8..], &payload);
    let mut out = Vec::with_capacity(BLOCK_HEADER_LEN + payload.len());
    out.extend_from_slice(&header.bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a block whose CRC has been checked; the error says what does
/// not add up (a block that passes the CRC but fails here was written by
/// something else).
pub fn decode_block(header: &BlockHeader, payload: &[u8]) -> Result<Vec<Record>, String> {
    let mut raw = Vec::new();
    let limit = u64::from(header.records) * 40 + (1 << 16);
    flate2::read::DeflateDecoder::new(payload)
        .take(limit)
        .read_to_end(&mut raw)
        .map_err(|e| format!("payload does not inflate: {e}"))?;
    let mut at = Cursor { b: &raw, i: 0 };
    let n = at.varint()?;
    if n != u64::from(header.records) {
        return Err(format!("{n} records, the header says {}", header.records));
    }
    let n_origins = at.varint()?;
    if n_origins > n {
        return Err(format!("{n_origins} origins for {n} records"));
    }
    let mut origins = Vec::with_capacity(n_origins as usize);
    for _ in 0..n_origins {
        origins.push(u64::from_le_bytes(at.take(8)?.try_into().expect("8 bytes")));
    }
    let mut col = || -> Result<Cursor<'_>, String> {
        let len = at.varint()?;
        Ok(Cursor { b: at.take(usize::try_from(len).map_err(|_| "column length")?)?, i: 0 })
    };
    let (flags, mut seqs, mut times, mut indexes, mut origin_col) =
        (col()?, col()?, col()?, col()?, col()?);
    if at.i != raw.len() || flags.b.len() as u64 != n {
        return Err("columns do not match the record count".into());
    }
    let mut out = Vec::with_capacity(n as usize);
    let (mut seq, mut ms, mut index, mut origin) = (header.first_seq, header.min_ms, 0i64, None);
    for &flag in flags.b {
        if flag & !(SAME_ORIGIN | 3) != 0 {
            return Err(format!("record flag {flag:#x}"));
        }
        let kind = flag & 3;
        if kind == KIND_GAP {
            let len = seqs.varint()?;
            let to = seq.checked_add(len).ok_or("gap past the last seq")?;
            out.push(Record::Gap { from: seq, to });
            seq = to + 1;
            continue;
        }
        ms = ms.checked_add_signed(unzigzag(times.varint()?)).ok_or("time out of range")?;
        index += unzigzag(indexes.varint()?);
        let index = u32::try_from(index).map_err(|_| format!("box {index} out of range"))?;
        if flag & SAME_ORIGIN == 0 {
            let id = origin_col.varint()?;
            origin =
                Some(*origins.get(id as usize).ok_or(format!("origin {id} not in the block"))?);
        }
        let origin = origin.ok_or("a first change without its origin")?;
        let op = match kind {
            KIND_UNSET => Op::Set(false),
            KIND_SET => Op::Set(true),
            _ => Op::Freeze,
        };
        out.push(Record::Change { seq, ms, index, op, origin });
        seq += 1;
    }
    if seq - 1 != header.last_seq {
        return Err(format!("records end at seq {}, the header says {}", seq - 1, header.last_seq));
    }
    if [&seqs, &times, &indexes, &origin_col].iter().any(|c| c.i != c.b.len()) {
        return Err("columns hold more than the records use".into());
    }
    Ok(out)
}

/// The 16 bytes a segment starts with.
pub fn segment_header(epoch: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
    b[..8].copy_from_slice(SEGMENT_MAGIC);
    b[8..].copy_from_slice(&epoch.to_le_bytes());
    b
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.i).ok_or("a number runs past its column")?;
            self.i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a number longer than 64 bits".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end =
            self.i.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("runs past the block")?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, ms: u64, index: u32, op: Op, origin: u64) -> Record {
        Record::Change { seq, ms, index, op, origin }
    }

    #[test]
    fn blocks_round_trip() {
        let records = vec![
            change(5, 1000, 10, Op::Set(true), 7),
            change(6, 999, 11, Op::Set(true), 7),
            change(7, 1500, 3, Op::Set(false), 0),
            Record::Gap { from: 8, to: 20 },
            change(21, 1400, 999_999, Op::Freeze, 7),
            change(22, 1401, 0, Op::Set(true), u64::MAX),
        ];
        let bytes = encode_block(&records);
        let header = BlockHeader::parse(bytes[..BLOCK_HEADER_LEN].try_into().unwrap());
        let payload = &bytes[BLOCK_HEADER_LEN..];
        assert_eq!((header.first_seq, header.last_seq), (5, 22));
        assert_eq!(
            (header.min_ms, header.max_ms, header.changes, header.records),
            (999, 1500, 5, 6)
        );
        assert!(header.plausible().is_ok() && header.check(payload));
        assert_eq!(decode_block(&header, payload).unwrap(), records);
        let mut bad = payload.to_vec();
        bad[0] ^= 1;
        assert!(!header.check(&bad));
    }

    #[test]
    fn a_block_of_only_a_gap() {
        let records = vec![Record::Gap { from: 1, to: 99 }];
        let bytes = encode_block(&records);
        let header = BlockHeader::parse(bytes[..BLOCK_HEADER_LEN].try_into().unwrap());
        assert_eq!(decode_block(&header, &bytes[BLOCK_HEADER_LEN..]).unwrap(), records);
    }
}
