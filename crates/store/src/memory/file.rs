//! The board file: a small versioned binary format with a checksum, and the
//! file system steps that write it (atomic replace, the space reserve).

use std::hash::Hasher;
use std::io::Write;
use std::path::Path;

use omcb_proto::bits;

use crate::{Board, StoreError};

/// The format written now: version 1's layout plus the board's settings.
const MAGIC: &[u8; 8] = b"OMCBRD02";
/// Version 1 (before the sunset became a live setting): still read, never
/// written. Its files carry no `freeze_after_ms`: the flag's value applies.
const MAGIC_V1: &[u8; 8] = b"OMCBRD01";

/// What a board file holds.
pub(super) struct Saved {
    pub board: Board,
    pub checked_at: Vec<u64>,
    /// Written by a clean close (nothing acknowledged can be missing).
    pub clean: bool,
    /// The board's `freeze_after_ms` (the sunset, set by `omcb admin`);
    /// `None` in a version 1 file, which did not keep it.
    pub freeze_after_ms: Option<u64>,
}

/// Layout (little-endian): magic `OMCBRD02`, clean u8, size u32, epoch u64,
/// seq u64, checked_count u32, frozen_count u32, freeze_after_ms u64, checked
/// bits, frozen bits, n u32, n x (index u32, checked_at u64), FNV-1a-64 of
/// all before. Version 1 (`OMCBRD01`, still read) is the same without
/// freeze_after_ms.
pub(super) fn encode(board: &Board, checked_at: &[u64], clean: bool) -> Vec<u8> {
    let n = bits::byte_len(board.size);
    let mut out = Vec::with_capacity(64 + 2 * n + board.checked_count as usize * 12);
    out.extend_from_slice(MAGIC);
    out.push(u8::from(clean));
    out.extend_from_slice(&board.size.to_le_bytes());
    out.extend_from_slice(&board.epoch.to_le_bytes());
    out.extend_from_slice(&board.seq.to_le_bytes());
    out.extend_from_slice(&board.checked_count.to_le_bytes());
    out.extend_from_slice(&board.frozen_count.to_le_bytes());
    out.extend_from_slice(&board.freeze_after_ms.to_le_bytes());
    out.extend_from_slice(bits::as_bytes(&board.checked));
    out.extend_from_slice(bits::as_bytes(&board.frozen));
    let times: Vec<(u32, u64)> = checked_at
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t > 0)
        .map(|(i, &t)| (i as u32, t))
        .collect();
    out.extend_from_slice(&(times.len() as u32).to_le_bytes());
    for (i, t) in times {
        out.extend_from_slice(&i.to_le_bytes());
        out.extend_from_slice(&t.to_le_bytes());
    }
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The length of a board file of `size` boxes, `checked` of them checked
/// (header, two bitsets, the check times, the checksum).
pub(super) fn len(size: u32, checked: u32) -> u64 {
    let header = MAGIC.len() + 1 + 4 + 8 + 8 + 4 + 4 + 8;
    (header + 2 * bits::byte_len(size) + 4 + 8) as u64 + 12 * u64::from(checked)
}

pub(super) fn load(path: &Path) -> Result<Option<Saved>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    decode(&bytes).map(Some).map_err(|why| {
        crate::count_error("data");
        StoreError::Data(format!(
            "{} is damaged ({why}); refusing to start on a guess",
            path.display()
        ))
    })
}

pub(super) fn decode(bytes: &[u8]) -> Result<Saved, String> {
    if bytes.len() < MAGIC.len() + 8 || (&bytes[..8] != MAGIC && &bytes[..8] != MAGIC_V1) {
        return Err("not an omcb board file".into());
    }
    let v1 = &bytes[..8] == MAGIC_V1;
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    if fnv1a(body).to_le_bytes() != sum {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader { b: &body[8..] };
    let clean = r.take(1)?[0] == 1;
    let size = r.u32()?;
    let epoch = r.u64()?;
    let seq = r.u64()?;
    let checked_count = r.u32()?;
    let frozen_count = r.u32()?;
    let freeze_after_ms = if v1 { None } else { Some(r.u64()?) };
    let n = bits::byte_len(size);
    let checked = bits::from_exact_bytes(r.take(n)?, size).map_err(|e| e.to_string())?;
    let frozen = bits::from_exact_bytes(r.take(n)?, size).map_err(|e| e.to_string())?;
    if checked.count_ones() != checked_count as usize
        || frozen.count_ones() != frozen_count as usize
    {
        return Err("counts do not match the bitsets".into());
    }
    let mut checked_at = vec![0u64; size as usize];
    for _ in 0..r.u32()? {
        let (i, t) = (r.u32()?, r.u64()?);
        *checked_at.get_mut(i as usize).ok_or("check time for a box outside the board")? = t;
    }
    if !r.b.is_empty() {
        return Err("trailing bytes".into());
    }
    // The store never writes these, and the freeze sweep trusts both: a
    // check time queues a box for freezing, and only checked boxes freeze.
    if checked_at.iter().zip(checked.iter()).any(|(&t, is_checked)| t > 0 && !*is_checked) {
        return Err("check time for an unchecked box".into());
    }
    if frozen.iter_ones().any(|i| !checked[i]) {
        return Err("a frozen box that is not checked".into());
    }
    // A checked box with no recorded time (never written that way, but be
    // safe) counts as checked now rather than never freezing.
    for i in checked.iter_ones() {
        if checked_at[i] == 0 {
            checked_at[i] = crate::now_ms();
        }
    }
    let board = Board {
        epoch,
        seq,
        size,
        checked,
        frozen,
        checked_count,
        frozen_count,
        freeze_after_ms: freeze_after_ms.unwrap_or(0),
    };
    Ok(Saved { board, checked_at, clean, freeze_after_ms })
}

/// temp file + fsync + rename + fsync of the directory: a reader (or a
/// crash) sees the old file or the new one, never half of one.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("omcb.tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        // A half-written temp file would only hold space a full disk lacks.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Whether a write failed for lack of space (the reserve helps there).
pub(super) fn out_of_space(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Makes sure the reserve at `path` holds `len` bytes of allocated
/// blocks: kept when it does (a sparse file does not count), else
/// written anew, as zeros: `fallocate` and `set_len` would leave blocks
/// that a later overwrite may still have to allocate. A partial reserve
/// is removed, since it only holds space a full disk lacks.
pub(super) fn ensure_reserve(path: &Path, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.is_file()
        && m.len() == len
        && m.blocks() * 512 >= len
    {
        return Ok(());
    }
    let _ = std::fs::remove_file(path);
    let written = (|| {
        let mut f = std::fs::File::create(path)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        sync_dir(path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Writes `bytes` over the reserve's own (allocated) blocks, cuts it to
/// their length, fsyncs it and renames it over the board at `path`:
/// atomic like [`write_atomic`], and needs no new space (on a filesystem
/// that overwrites in place).
pub(super) fn write_over_reserve(reserve: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(reserve)?;
    if f.metadata()?.len() < bytes.len() as u64 {
        return Err(std::io::Error::other("the space reserve is smaller than the board file"));
    }
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(reserve, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// FNV-1a 64 (the `fnv` crate's hasher; the format's checksum since its
/// first version, `fnv_is_the_board_file_checksum` pins it).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A board of 16 boxes: 2 and 9 checked (check times 1,000 and 2,000), 9 frozen.
    fn board() -> (Board, Vec<u64>) {
        let mut board = Board::new(16, 77, 0);
        let mut checked_at = vec![0; 16];
        for (i, t) in [(2, 1_000), (9, 2_000)] {
            board.checked.set(i, true);
            checked_at[i] = t;
        }
        board.frozen.set(9, true);
        (board.checked_count, board.frozen_count, board.seq) = (2, 1, 3);
        (board, checked_at)
    }

    /// The file's bytes without its checksum.
    fn body() -> Vec<u8> {
        let (board, checked_at) = board();
        let mut bytes = encode(&board, &checked_at, true);
        bytes.truncate(bytes.len() - 8);
        bytes
    }

    /// `body` with a correct checksum, so the decoder gets past it.
    fn sealed(mut body: Vec<u8>) -> Vec<u8> {
        let sum = fnv1a(&body);
        body.extend_from_slice(&sum.to_le_bytes());
        body
    }

    fn refusal(bytes: &[u8]) -> String {
        match decode(bytes) {
            Ok(_) => panic!("decoded a damaged file"),
            Err(why) => why,
        }
    }

    /// Offset of the two counts (checked_count, frozen_count) in the header.
    const COUNTS: usize = 8 + 1 + 4 + 8 + 8;

    #[test]
    fn a_written_file_decodes_to_what_was_written() {
        let (board, checked_at) = board();
        let unclean = decode(&encode(&board, &checked_at, false)).unwrap();
        assert!(!unclean.clean);
        let saved = decode(&encode(&board, &checked_at, true)).unwrap();
        assert_eq!((saved.board, saved.checked_at, saved.clean), (board, checked_at, true));
        assert_eq!(len(16, 2), sealed(body()).len() as u64);
    }

    /// The checksum is FNV-1a 64 as the format has always had it (a
    /// hand-written loop before the `fnv` crate): the published test vectors,
    /// and a golden file, so files written before still load.
    #[test]
    fn fnv_is_the_board_file_checksum() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        // The golden version 1 file of this board (69 bytes and the
        // checksum, computed outside Rust from the layout in `encode`'s
        // docs): pins the format files written before version 2 have.
        let file = v1_file();
        assert_eq!(file.len(), 69 + 8);
        assert_eq!(u64::from_le_bytes(file[69..].try_into().unwrap()), 0x36e5_71a6_ae99_5c9c);
    }

    /// This board's file as version 1 wrote it: version 2's without
    /// freeze_after_ms, under the old magic, sealed again.
    fn v1_file() -> Vec<u8> {
        let mut body = body();
        body.drain(COUNTS + 8..COUNTS + 16);
        body[..8].copy_from_slice(MAGIC_V1);
        sealed(body)
    }

    /// Files written before the sunset became a live setting still load,
    /// without one (the store then takes `--freeze-after`); version 2 keeps
    /// the board's setting.
    #[test]
    fn version_1_files_load_and_version_2_keeps_the_sunset() {
        let (board, checked_at) = board();
        let old = decode(&v1_file()).unwrap();
        assert_eq!((old.freeze_after_ms, &old.board, &old.checked_at), (None, &board, &checked_at));
        let mut sunset = board.clone();
        sunset.freeze_after_ms = 600_000;
        let new = decode(&encode(&sunset, &checked_at, true)).unwrap();
        assert_eq!((new.freeze_after_ms, new.board), (Some(600_000), sunset));
    }

    #[test]
    fn a_bad_checksum_is_refused() {
        let mut file = sealed(body());
        let last = file.len() - 1;
        file[last] ^= 1;
        assert_eq!(refusal(&file), "checksum mismatch");
        // A flipped bit anywhere in the body, too.
        let mut file = sealed(body());
        file[COUNTS + 8 + 1] ^= 0x10;
        assert_eq!(refusal(&file), "checksum mismatch");
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let file = sealed(body());
        // Cut anywhere: the checksum no longer matches, or there is none.
        for cut in [0, 4, 8, 12, COUNTS, file.len() / 2, file.len() - 1] {
            assert!(decode(&file[..cut]).is_err(), "cut at {cut} decoded");
        }
        // Cut and sealed again: the decoder finds the data short.
        for cut in [9, COUNTS + 4, body().len() - 12, body().len() - 1] {
            let mut short = body();
            short.truncate(cut);
            assert_eq!(refusal(&sealed(short)), "truncated", "cut at {cut}");
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut long = body();
        long.extend_from_slice(&[0; 5]);
        assert_eq!(refusal(&sealed(long)), "trailing bytes");
    }

    #[test]
    fn counts_that_do_not_match_the_bitsets_are_refused() {
        for (offset, count) in [(COUNTS, 3u32), (COUNTS, 1), (COUNTS + 4, 0), (COUNTS + 4, 2)] {
            let mut bad = body();
            bad[offset..offset + 4].copy_from_slice(&count.to_le_bytes());
            assert_eq!(refusal(&sealed(bad)), "counts do not match the bitsets");
        }
    }

    #[test]
    fn a_check_time_count_that_does_not_match_its_entries_is_refused() {
        // n says 3 entries where 2 follow: the third is missing.
        let n_at = body().len() - 2 * 12 - 4;
        let mut more = body();
        more[n_at..n_at + 4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(refusal(&sealed(more)), "truncated");
        // n says 1 where 2 follow: the second is left over.
        let mut fewer = body();
        fewer[n_at..n_at + 4].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(refusal(&sealed(fewer)), "trailing bytes");
    }

    #[test]
    fn other_files_and_boxes_outside_the_board_are_refused() {
        let mut other = sealed(body());
        other[..8].copy_from_slice(b"OMCBRD03");
        assert_eq!(refusal(&other), "not an omcb board file");
        assert_eq!(refusal(b"OMCB"), "not an omcb board file");
        let index_at = body().len() - 12;
        let mut outside = body();
        outside[index_at..index_at + 4].copy_from_slice(&16u32.to_le_bytes());
        assert_eq!(refusal(&sealed(outside)), "check time for a box outside the board");
    }
}
