//! The archive format through its public API, on real files: round trips,
//! a crash's torn block, corruption and holes reported with file and
//! offset, resuming, retention, and the size per million changes.

use std::path::Path;

use omcb_archive::{
    ArchiveError, ArchivedChange, Entry, Filter, Op, Reader, Record, Writer, hour, prune, rebuild,
};
use omcb_testkit::rng::XorShift64;

const EPOCH: u64 = 0x0123_4567_89ab_cdef;
/// 2026-11-26T05:00Z
const T0: u64 = 1_795_669_200_000;

fn change(seq: u64, ms: u64, index: u32, op: Op, origin: u64) -> Record {
    Record::Change { seq, ms, index, op, origin }
}

/// `n` changes from seq `from`, a change every `step_ms`, on a board of 1000.
fn changes(from: u64, n: u64, ms: u64, step_ms: u64) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let seq = from + i;
            change(
                seq,
                ms + i * step_ms,
                (seq * 7 % 1000) as u32,
                Op::Set(!seq.is_multiple_of(3)),
                seq % 5,
            )
        })
        .collect()
}

fn write(root: &Path, records: &[Record], now: u64) -> Writer {
    let mut w = Writer::open(root, EPOCH).unwrap();
    for r in records {
        w.push(*r).unwrap();
    }
    w.flush(now).unwrap();
    w
}

fn all(root: &Path) -> Vec<Result<Entry, ArchiveError>> {
    Reader::open(root).unwrap().entries(Filter::all()).collect()
}

fn as_entry(epoch: u64, r: &Record) -> Entry {
    match *r {
        Record::Change { seq, ms, index, op, origin } => {
            Entry::Change(ArchivedChange { epoch, seq, ms, index, op, origin })
        }
        Record::Gap { from, to } => Entry::Gap { epoch, from_seq: from, to_seq: to },
    }
}

#[test]
fn what_is_written_reads_back_in_order_across_hours_with_its_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = changes(1, 500, T0 + 3_599_000, 10); // crosses into 06:00
    records.push(Record::Gap { from: 501, to: 600 });
    records.extend(changes(601, 10, T0 + 7_300_000, 1));
    let mut w = write(dir.path(), &records[..300], T0);
    for r in &records[300..] {
        w.push(*r).unwrap();
    }
    w.flush(T0).unwrap();
    assert_eq!(w.last_seq(), 610);
    // A record that does not follow is refused.
    assert!(matches!(
        w.push(change(700, T0, 1, Op::Freeze, 0)),
        Err(ArchiveError::OutOfOrder { last: 610, got: 700, .. })
    ));
    let reader = Reader::open(dir.path()).unwrap();
    let names: Vec<String> = reader
        .segments()
        .unwrap()
        .iter()
        .map(|s| s.path.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["2026-11-26T05.seg", "2026-11-26T06.seg", "2026-11-26T07.seg"]);
    let got: Vec<Entry> = all(dir.path()).into_iter().map(Result::unwrap).collect();
    let want: Vec<Entry> = records.iter().map(|r| as_entry(EPOCH, r)).collect();
    assert_eq!(got, want);
    // A time range: only the changes in it (and no gap whose block is outside).
    let since = T0 + 3_600_000;
    let f = Filter { epoch: Some(EPOCH), since_ms: Some(since), until_ms: Some(since + 1000) };
    let got: Vec<Entry> = reader.entries(f).map(Result::unwrap).collect();
    assert!(!got.is_empty());
    assert!(
        got.iter().all(|e| matches!(e, Entry::Change(c) if (since..since + 1000).contains(&c.ms)))
    );
    // Reopening resumes after the last seq.
    assert_eq!(Writer::open(dir.path(), EPOCH).unwrap().last_seq(), 610);
}

#[test]
fn rebuild_applies_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let records = changes(1, 2000, T0, 1);
    write(dir.path(), &records, T0);
    let rebuilt = rebuild(&Reader::open(dir.path()).unwrap(), EPOCH, 1000).unwrap();
    let mut bits = vec![false; 1000];
    for r in &records {
        if let Record::Change { index, op: Op::Set(v), .. } = r {
            bits[*index as usize] = *v;
        }
    }
    for (i, &b) in bits.iter().enumerate() {
        assert_eq!(rebuilt.board.is_checked(i as u32), b, "box {i}");
    }
    assert_eq!(rebuilt.board.seq, 2000);
    assert_eq!(rebuilt.board.checked_count as usize, bits.iter().filter(|b| **b).count());
    assert!(rebuilt.gaps.is_empty());
    let small = rebuild(&Reader::open(dir.path()).unwrap(), EPOCH, 10);
    assert!(matches!(small, Err(ArchiveError::OutOfRange { .. })));
}

/// A crash mid-append leaves a torn block: the reader reports it with its
/// file and offset; the next writer cuts it off and resumes after the last
/// whole block, so the seqs it held are archived again, once.
#[test]
fn a_torn_block_is_reported_then_cut_off_by_the_next_writer() {
    let dir = tempfile::tempdir().unwrap();
    let first = changes(1, 100, T0, 1);
    let second = changes(101, 100, T0 + 200, 1);
    write(dir.path(), &first, T0);
    write(dir.path(), &second, T0);
    let seg = Reader::open(dir.path()).unwrap().segments().unwrap().remove(0);
    let full = std::fs::metadata(&seg.path).unwrap().len();
    let blocks: Vec<_> = omcb_archive::read_blocks(&seg.path).map(Result::unwrap).collect();
    assert_eq!(blocks.len(), 2);
    let torn_at = blocks[1].offset;
    std::fs::OpenOptions::new().write(true).open(&seg.path).unwrap().set_len(full - 5).unwrap();

    let entries = all(dir.path());
    let errors: Vec<&ArchiveError> = entries.iter().filter_map(|e| e.as_ref().err()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(matches!(errors[0], ArchiveError::Truncated { offset, .. } if *offset == torn_at));
    assert_eq!(errors[0].file(), Some(seg.path.as_path()));
    assert_eq!(errors[0].offset(), Some(torn_at));
    let text = errors[0].to_string();
    assert!(
        text.contains(&seg.path.display().to_string()) && text.contains(&format!("byte {torn_at}")),
        "{text}"
    );
    assert_eq!(entries.iter().filter(|e| e.is_ok()).count(), 100, "the whole block before it");

    let mut w = Writer::open(dir.path(), EPOCH).unwrap();
    assert_eq!(w.last_seq(), 100);
    assert_eq!(w.take_repairs().len(), 1);
    for r in &second {
        w.push(*r).unwrap();
    }
    w.flush(T0).unwrap();
    let got: Vec<Entry> = all(dir.path()).into_iter().map(Result::unwrap).collect();
    let seqs: Vec<u64> = got
        .iter()
        .map(|e| match e {
            Entry::Change(c) => c.seq,
            _ => 0,
        })
        .collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
}

/// A flipped byte in a block: the reader reports the block's file and
/// offset, goes on with the next block, and reports the seqs it lost.
#[test]
fn a_corrupt_block_is_reported_with_file_and_offset_and_nothing_skipped_silently() {
    let dir = tempfile::tempdir().unwrap();
    for part in 0..3 {
        write(dir.path(), &changes(1 + part * 50, 50, T0 + part * 100, 1), T0);
    }
    let seg = Reader::open(dir.path()).unwrap().segments().unwrap().remove(0);
    let blocks: Vec<_> = omcb_archive::read_blocks(&seg.path).map(Result::unwrap).collect();
    let bad_at = blocks[1].offset;
    let mut bytes = std::fs::read(&seg.path).unwrap();
    bytes[bad_at as usize + omcb_archive::BLOCK_HEADER_LEN + 3] ^= 0x40;
    std::fs::write(&seg.path, &bytes).unwrap();

    let entries = all(dir.path());
    let errors: Vec<&ArchiveError> = entries.iter().filter_map(|e| e.as_ref().err()).collect();
    assert!(
        matches!(errors[0], ArchiveError::Corrupt { file, offset, .. } if *offset == bad_at && file == &seg.path),
        "{errors:?}"
    );
    assert!(
        matches!(errors[1], ArchiveError::Missing { from_seq: 51, to_seq: 100, offset, .. } if *offset == blocks[2].offset),
        "{errors:?}"
    );
    assert_eq!(errors.len(), 2);
    assert_eq!(entries.iter().filter(|e| e.is_ok()).count(), 100);
    // A writer leaves the damaged segment alone and writes on in a new part.
    let mut w = Writer::open(dir.path(), EPOCH).unwrap();
    assert_eq!(w.last_seq(), 150);
    assert!(!w.take_repairs().is_empty());
    w.push(change(151, T0 + 500, 1, Op::Set(true), 9)).unwrap();
    w.flush(T0).unwrap();
    let names: Vec<String> = Reader::open(dir.path())
        .unwrap()
        .segments()
        .unwrap()
        .iter()
        .map(|s| s.path.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["2026-11-26T05.seg", "2026-11-26T05.1.seg"]);
    assert_eq!(std::fs::read(&seg.path).unwrap(), bytes, "the damaged segment is as it was");
}

/// A segment deleted by hand: the seqs it held are reported missing.
#[test]
fn a_missing_segment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = changes(1, 10, T0, 1);
    records.extend(changes(11, 10, T0 + hour::HOUR_MS, 1));
    records.extend(changes(21, 10, T0 + 2 * hour::HOUR_MS, 1));
    write(dir.path(), &records, T0);
    let segs = Reader::open(dir.path()).unwrap().segments().unwrap();
    std::fs::remove_file(&segs[1].path).unwrap();
    let errors: Vec<ArchiveError> = all(dir.path()).into_iter().filter_map(Result::err).collect();
    assert_eq!(errors.len(), 1);
    assert!(
        matches!(&errors[0], ArchiveError::Missing { from_seq: 11, to_seq: 20, file, offset: 16, .. } if file == &segs[2].path),
        "{errors:?}"
    );
}

#[test]
fn retention_deletes_old_hours_but_never_the_live_epoch_s_newest_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = changes(1, 10, T0, 1);
    records.extend(changes(11, 10, T0 + hour::HOUR_MS, 1));
    write(dir.path(), &records, T0);
    let keep = std::time::Duration::from_secs(86_400);
    let now = T0 + 2 * hour::HOUR_MS + 86_400_000;
    let pruned = prune(dir.path(), keep, now, Some(EPOCH)).unwrap();
    assert_eq!(pruned.segments, 1, "the 05:00 hour ended a day and an hour ago");
    let pruned = prune(dir.path(), keep, now + 10 * hour::HOUR_MS, Some(EPOCH)).unwrap();
    assert_eq!(pruned.segments, 0, "the live epoch's newest stays");
    let pruned = prune(dir.path(), keep, now + 10 * hour::HOUR_MS, None).unwrap();
    assert_eq!(pruned.segments, 1);
    assert!(Reader::open(dir.path()).unwrap().segments().unwrap().is_empty());
}

/// Bytes per million changes (docs/BENCHMARKS.md), for a uniform-random
/// board (random boxes and ops at 1,000 changes a second, each from one of
/// 10,000 origins, or of 100)
/// and a drawn one (runs of 5 to 60 neighbouring boxes from one of 200
/// origins, a few ms apart), written as the archiver writes them (a block a
/// second). The drawn pattern must meet the 3 MB.
#[test]
fn bytes_per_million_changes() {
    let n: u64 = std::env::var("OMCB_ARCHIVE_SIZE_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let measure = |records: Vec<Record>| -> f64 {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path(), EPOCH).unwrap();
        let mut bytes = 0;
        let mut next_flush = T0 + 1000;
        for r in records {
            if let Record::Change { ms, .. } = r
                && ms >= next_flush
            {
                bytes += w.flush(ms).unwrap().bytes;
                next_flush = ms + 1000;
            }
            w.push(r).unwrap();
        }
        bytes += w.flush(T0).unwrap().bytes;
        bytes as f64 * 1e6 / n as f64
    };
    let mut rng = XorShift64::new(7);
    let mut uniform = |clients: u64| -> Vec<Record> {
        (1..=n)
            .map(|seq| {
                let x = rng.next_u64();
                let origin = 1 + (x >> 40) % clients;
                change(seq, T0 + seq, (x % 1_000_000) as u32, Op::Set(x >> 32 & 1 == 1), origin)
            })
            .collect()
    };
    let (u10k, u100) = (uniform(10_000), uniform(100));
    let mut drawn = Vec::new();
    let (mut seq, mut ms) = (1, T0);
    let origins: Vec<u64> = (0..200).map(|_| rng.next_u64()).collect();
    while seq <= n {
        let origin = origins[(rng.next_u64() % 200) as usize];
        let start = (rng.next_u64() % 1_000_000) as u32;
        let run = 5 + rng.next_u64() % 56;
        let value = !rng.next_u64().is_multiple_of(4);
        for k in 0..run.min(n - seq + 1) {
            ms += rng.next_u64() % 3;
            drawn.push(change(seq, ms, (start + k as u32) % 1_000_000, Op::Set(value), origin));
            seq += 1;
        }
    }
    let (u10k, u100, d) = (measure(u10k), measure(u100), measure(drawn));
    println!(
        "bytes per million changes: uniform random from 10,000 origins {:.2} MB, \
         from 100 origins {:.2} MB, drawn {:.2} MB",
        u10k / 1e6,
        u100 / 1e6,
        d / 1e6
    );
    assert!(d <= 3e6, "drawn: {d} bytes per million");
}

/// A crash right after a segment was made leaves it with its header only:
/// the next writer appends to it rather than starting another part.
#[test]
fn a_segment_with_no_block_yet_is_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &changes(1, 5, T0, 1), T0);
    let next_hour = T0 + hour::HOUR_MS;
    let empty =
        omcb_archive::epoch_dir(dir.path(), EPOCH).join(omcb_archive::segment_name(next_hour, 0));
    let mut header = b"OMCBSEG1".to_vec();
    header.extend_from_slice(&EPOCH.to_le_bytes());
    std::fs::write(&empty, &header).unwrap();
    let mut w = Writer::open(dir.path(), EPOCH).unwrap();
    assert_eq!(w.last_seq(), 5, "found behind the empty segment");
    w.push(change(6, next_hour + 5, 1, Op::Set(true), 1)).unwrap();
    w.flush(next_hour).unwrap();
    let segments = Reader::open(dir.path()).unwrap().segments().unwrap();
    assert_eq!(segments.len(), 2);
    assert_eq!(segments[1].path, empty);
    let got: Vec<Entry> = all(dir.path()).into_iter().map(Result::unwrap).collect();
    assert_eq!(got.len(), 6);
}

/// A flush that fails part way (here: the next hour's segment cannot be
/// made) keeps what it wrote and loses nothing pending: the next flush
/// writes the rest, and every seq is in the archive once.
#[test]
fn a_flush_that_fails_part_way_loses_nothing_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = changes(1, 10, T0, 1);
    records.extend(changes(11, 10, T0 + hour::HOUR_MS, 1));
    let mut w = Writer::open(dir.path(), EPOCH).unwrap();
    let blocker = omcb_archive::epoch_dir(dir.path(), EPOCH)
        .join(omcb_archive::segment_name(T0 + hour::HOUR_MS, 0));
    std::fs::create_dir_all(&blocker).unwrap();
    for r in &records {
        w.push(*r).unwrap();
    }
    let e = w.flush(T0).unwrap_err();
    assert_eq!(e.file(), Some(blocker.as_path()), "{e}");
    assert_eq!((w.durable_seq(), w.pending()), (10, 10));
    std::fs::remove_dir(&blocker).unwrap();
    w.flush(T0).unwrap();
    let got: Vec<Entry> = all(dir.path()).into_iter().map(Result::unwrap).collect();
    assert_eq!(got, records.iter().map(|r| as_entry(EPOCH, r)).collect::<Vec<_>>());
}

/// Every single flipped bit anywhere in a segment is reported (a checksum,
/// a header that cannot be, an epoch that is not the directory's): the
/// reader never returns other changes as if nothing happened, and never
/// panics.
#[test]
fn any_flipped_bit_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    for part in 0..3 {
        write(dir.path(), &changes(1 + part * 4, 4, T0 + part * 10, 3), T0);
    }
    let seg = Reader::open(dir.path()).unwrap().segments().unwrap().remove(0);
    let good = std::fs::read(&seg.path).unwrap();
    let want: Vec<Entry> = all(dir.path()).into_iter().map(Result::unwrap).collect();
    assert_eq!(want.len(), 12);
    for i in 0..good.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = good.clone();
            bad[i] ^= bit;
            std::fs::write(&seg.path, &bad).unwrap();
            let got = all(dir.path());
            assert!(got.iter().any(Result::is_err), "byte {i} bit {bit:#x}: not reported: {got:?}");
        }
    }
}

/// The entries of a time window over an archive of `blocks` (each written
/// as its own block; the changes' times are ms after `T0`).
fn window(blocks: &[Vec<Record>], since: Option<u64>, until: Option<u64>) -> Vec<Entry> {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::open(dir.path(), EPOCH).unwrap();
    for block in blocks {
        for r in block {
            w.push(*r).unwrap();
        }
        w.flush(T0).unwrap();
    }
    let f = Filter {
        epoch: Some(EPOCH),
        since_ms: since.map(|s| T0 + s),
        until_ms: until.map(|u| T0 + u),
    };
    Reader::open(dir.path()).unwrap().entries(f).map(Result::unwrap).collect()
}

/// `(seqs, gaps)` of entries: the changes' seqs and the gaps' ranges.
fn seqs_and_gaps(entries: &[Entry]) -> (Vec<u64>, Vec<(u64, u64)>) {
    let mut seqs = Vec::new();
    let mut gaps = Vec::new();
    for e in entries {
        match *e {
            Entry::Change(c) => seqs.push(c.seq),
            Entry::Gap { from_seq, to_seq, .. } => gaps.push((from_seq, to_seq)),
        }
    }
    (seqs, gaps)
}

/// A gap has no time: it lies between the change before it and the change
/// after it. With a time filter the reader yields every gap that may reach
/// into the window, wherever its block is (a block whose changes are all
/// outside the window still holds gaps that may be inside), and no gap that
/// a change before the window follows or a change after the window precedes.
#[test]
fn a_time_window_yields_every_gap_that_may_reach_into_it_and_no_other() {
    let gap = |from, to| Record::Gap { from, to };
    let at = |from: u64, n: u64, ms: u64| changes(from, n, T0 + ms, 0);
    let cat = |parts: &[Vec<Record>]| parts.concat();

    // At the end of a block of changes before the window: the changes it
    // lost may be in the window, since the next change is.
    let blocks = [cat(&[at(1, 10, 1000), vec![gap(11, 15)]]), at(16, 5, 5000)];
    let got = seqs_and_gaps(&window(&blocks, Some(3000), None));
    assert_eq!(got, ((16..=20).collect(), vec![(11, 15)]));
    // In a block of its own after them: the same.
    let blocks = [at(1, 10, 1000), vec![gap(11, 15)], at(16, 5, 5000)];
    assert_eq!(seqs_and_gaps(&window(&blocks, Some(3000), None)).1, [(11, 15)]);
    // At the archive's end, nothing after it: it may be in the window.
    let blocks = [cat(&[at(1, 10, 1000), vec![gap(11, 15)]])];
    assert_eq!(seqs_and_gaps(&window(&blocks, Some(3000), None)), (vec![], vec![(11, 15)]));

    // At the start of a block of changes after the window (`until`): the
    // change before it is in the window, so it may be too.
    let blocks = [at(1, 5, 1000), cat(&[vec![gap(6, 10)], at(11, 5, 5000)])];
    let got = seqs_and_gaps(&window(&blocks, None, Some(3000)));
    assert_eq!(got, ((1..=5).collect(), vec![(6, 10)]));

    // Followed by a change before the window, in its block or a later one
    // the reader skips: before the window, not yielded.
    let before = [
        cat(&[at(1, 5, 1000), vec![gap(6, 8)], at(9, 2, 1000)]),
        vec![gap(11, 12)],
        at(13, 2, 1000),
        cat(&[vec![gap(15, 20)], at(21, 2, 2000), at(23, 2, 5000)]),
    ];
    assert_eq!(seqs_and_gaps(&window(&before, Some(3000), None)), (vec![23, 24], vec![]));
    // Preceded by a change after the window: after it, not yielded.
    let after = [
        cat(&[at(1, 2, 1000), at(3, 2, 5000), vec![gap(5, 8)], at(9, 2, 5000)]),
        vec![gap(11, 12)],
        at(13, 2, 6000),
    ];
    assert_eq!(seqs_and_gaps(&window(&after, None, Some(3000))), (vec![1, 2], vec![]));
    // Without a time filter every gap is there, in order.
    let got = seqs_and_gaps(&window(&before, None, None));
    assert_eq!(
        got,
        (
            (1..=5).chain(9..=10).chain(13..=14).chain(21..=24).collect(),
            vec![(6, 8), (11, 12), (15, 20)]
        )
    );
    let got: Vec<u64> = window(&before, None, None)
        .iter()
        .map(|e| match *e {
            Entry::Change(c) => c.seq,
            Entry::Gap { from_seq, .. } => from_seq,
        })
        .collect();
    assert!(got.is_sorted(), "{got:?}");
}
