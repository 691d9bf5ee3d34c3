//! The time-lapse's HTTP paths (issue 14 part 3, docs/PROTOCOL.md "The
//! time-lapse"): `/replay/index.json` and the segments, their caching
//! headers and 404s, against archives written by `omcb_archive::Writer`.

mod common;

use common::*;
use omcb_archive::{BLOCK_HEADER_LEN, Op, Reader, Record, Writer, hour::HOUR_MS};

/// Epochs of these fixtures: not the worker's own (its archiver, if any,
/// writes that one).
const OLD: u64 = 0xabc;
const BAD: u64 = 0xbad;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn change(seq: u64, ms: u64, index: u32) -> Record {
    Record::Change { seq, ms, index, op: Op::Set(!seq.is_multiple_of(3)), origin: 7 }
}

/// Epoch `OLD`: a segment of an hour long over (seqs 1..=10 with a gap
/// 5..=7), and one of this hour (seqs 11..=20) with a torn block after it.
/// Epoch `BAD`: one old segment of three blocks whose second is damaged.
fn fixture(root: &std::path::Path) -> (u64, u64) {
    let old_hour = omcb_archive::hour::floor(now_ms()) - 30 * 24 * HOUR_MS;
    let mut w = Writer::open(root, OLD).unwrap();
    for seq in 1..=4 {
        w.push(change(seq, old_hour + seq * 1000, seq as u32 * 10)).unwrap();
    }
    w.push(Record::Gap { from: 5, to: 7 }).unwrap();
    for seq in 8..=10 {
        w.push(change(seq, old_hour + seq * 1000, seq as u32 * 10)).unwrap();
    }
    w.flush(old_hour).unwrap();
    let now = now_ms();
    for seq in 11..=20 {
        w.push(change(seq, now, seq as u32)).unwrap();
    }
    w.flush(now).unwrap();
    let segs = Reader::open(root).unwrap().segments_of(OLD).unwrap();
    assert_eq!(segs.len(), 2);
    // A block being appended: half of one.
    let mut f = std::fs::OpenOptions::new().append(true).open(&segs[1].path).unwrap();
    std::io::Write::write_all(&mut f, &[9u8; 20]).unwrap();

    let mut w = Writer::open(root, BAD).unwrap();
    let mut second_block = 0;
    for (i, seqs) in [1..=3u64, 4..=6, 7..=9].into_iter().enumerate() {
        for seq in seqs {
            w.push(change(seq, old_hour + seq, seq as u32)).unwrap();
        }
        w.flush(old_hour).unwrap();
        if i == 0 {
            second_block = Reader::open(root).unwrap().segments_of(BAD).unwrap()[0].len;
        }
    }
    let bad = &Reader::open(root).unwrap().segments_of(BAD).unwrap()[0].path;
    let mut bytes = std::fs::read(bad).unwrap();
    bytes[second_block as usize + BLOCK_HEADER_LEN + 2] ^= 0x55;
    std::fs::write(bad, bytes).unwrap();
    (old_hour, second_block)
}

#[tokio::test]
async fn the_index_and_segments_are_served_with_their_caching() {
    let dir = tempfile::tempdir().unwrap();
    let (old_hour, bad_offset) = fixture(dir.path());
    let archive = dir.path().to_str().unwrap();
    let w = Worker::start(&["--board-size", "1000", "--archive-dir", archive]);

    let r = http_get(w.addr, "/replay/index.json", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("public, max-age=5"));
    let etag = r.header("etag").unwrap().to_string();
    assert_eq!(
        http_get(w.addr, "/replay/index.json", &[("If-None-Match", &etag)]).await.status,
        304
    );
    let index: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(index["size"], 1000);
    let epoch = |e: u64| {
        let name = format!("{e:016x}");
        index["epochs"].as_array().unwrap().iter().find(|x| x["epoch"] == name.as_str()).cloned()
    };
    let old = epoch(OLD).expect("epoch OLD listed");
    assert_eq!((old["first_seq"].as_u64(), old["last_seq"].as_u64()), (Some(1), Some(20)));
    assert_eq!(old["changes"], 17);
    assert_eq!(old["missing"], serde_json::json!([]));
    let segs = old["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 2);
    let (sealed, growing) = (&segs[0], &segs[1]);
    assert_eq!(sealed["name"], format!("{}.seg", omcb_archive::hour::name(old_hour)));
    assert_eq!(sealed["url"], format!("/replay/{OLD:016x}/{}", sealed["name"].as_str().unwrap()));
    assert_eq!(sealed["sealed"], true);
    assert_eq!(growing["sealed"], false);
    assert_eq!((sealed["first_seq"].as_u64(), sealed["last_seq"].as_u64()), (Some(1), Some(10)));
    assert_eq!(sealed["first_ms"].as_u64(), Some(old_hour + 1000));
    assert_eq!(sealed["last_ms"].as_u64(), Some(old_hour + 10_000));
    assert_eq!(sealed["gaps"], serde_json::json!([[5, 7]]));
    assert_eq!(growing["errors"], serde_json::json!([]), "a block being appended is no error");

    // The sealed segment: as stored, for a year.
    let file = |name: &serde_json::Value| {
        std::fs::read(omcb_archive::epoch_dir(dir.path(), OLD).join(name.as_str().unwrap()))
            .unwrap()
    };
    let r = http_get(w.addr, sealed["url"].as_str().unwrap(), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(r.body, file(&sealed["name"]));
    let etag = r.header("etag").unwrap().to_string();
    let again =
        http_get(w.addr, sealed["url"].as_str().unwrap(), &[("If-None-Match", &etag)]).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    // The growing one: a few seconds, and without the half-written block.
    let r = http_get(w.addr, growing["url"].as_str().unwrap(), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), Some("public, max-age=5"));
    let whole = file(&growing["name"]);
    assert_eq!(r.body, whole[..whole.len() - 20]);
    assert_eq!(growing["bytes"].as_u64(), Some(r.body.len() as u64));

    // A damaged block: reported with its offset, its seqs missing after it.
    let bad = epoch(BAD).expect("epoch BAD listed");
    let seg = &bad["segments"][0];
    assert_eq!(
        seg["errors"],
        serde_json::json!([{ "offset": bad_offset, "error": "corrupt: checksum mismatch" }])
    );
    assert_eq!(bad["missing"][0]["from_seq"], 4);
    assert_eq!(bad["missing"][0]["to_seq"], 6);
    assert_eq!(bad["missing"][0]["segment"], seg["name"]);
    assert!(bad["missing"][0]["offset"].as_u64().unwrap() > bad_offset);
    assert_eq!(http_get(w.addr, seg["url"].as_str().unwrap(), &[]).await.status, 200);

    // The page.
    let page = http_get(w.addr, "/replay", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(String::from_utf8_lossy(&page.body).contains("/replay.js"));

    // Nothing else.
    let name = sealed["name"].as_str().unwrap();
    for path in [
        format!("/replay/{:016x}/{name}", 0xdefu64),
        format!("/replay/{OLD:016x}/2001-01-01T00.seg"),
        format!("/replay/{OLD:016x}/notes.txt"),
        format!("/replay/{OLD:016x}/..%2F..%2Fetc%2Fpasswd"),
        format!("/replay/{OLD:016X}/{name}"),
        format!("/replay/abc/{name}"),
        "/replay/index".to_string(),
        format!("/replay/{OLD:016x}"),
    ] {
        assert_eq!(http_get(w.addr, &path, &[]).await.status, 404, "{path}");
    }
}

#[tokio::test]
async fn a_worker_without_an_archive_serves_no_replay() {
    let w = Worker::start(&["--board-size", "1000"]);
    for path in ["/replay", "/replay/index.json", "/replay/0000000000000abc/2026-01-01T00.seg"] {
        let r = http_get(w.addr, path, &[]).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(String::from_utf8_lossy(&r.body).contains("--archive-dir"), "{path}");
    }
}

/// A segment written by crates/archive's writer, with what it holds, in
/// `web/test/golden/`: web/test/timeline.test.mjs decodes it with the page's
/// decoder (web/timeline.js), so the two cannot drift apart. Four blocks:
/// every kind of change, a gap, boxes far apart, a clock that steps back.
#[test]
fn golden_segment_matches_the_committed_files() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/test/golden");
    let dir = tempfile::tempdir().unwrap();
    const EPOCH: u64 = 0x0123_4567_89ab_cdef;
    let hour = 1_795_668_000_000; // 2026-11-26T05
    let mut w = Writer::open(dir.path(), EPOCH).unwrap();
    let mut records = Vec::new();
    let mut seq = 0;
    let mut x: u64 = 12345;
    for block in 0..4 {
        for k in 0..80 {
            seq += 1;
            if block == 2 && k == 40 {
                records.push(Record::Gap { from: seq, to: seq + 9 });
                seq += 9;
                continue;
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let index = ((x >> 33) % 1000) as u32 + if k % 7 == 0 { 999_000 } else { 0 };
            let op = match (x >> 20) % 5 {
                0 => Op::Freeze,
                1 | 2 => Op::Set(false),
                _ => Op::Set(true),
            };
            // Mostly forward, now and then 3 ms back (a store clock's step).
            let ms = hour + seq * 10 - if k % 11 == 5 { 3 } else { 0 };
            records.push(Record::Change { seq, ms, index, op, origin: (x >> 40) % 3 });
        }
        for r in &records[records.len() - 80..] {
            w.push(*r).unwrap();
        }
        w.flush(hour).unwrap();
    }
    let seg = &Reader::open(dir.path()).unwrap().segments().unwrap()[0];
    let bytes = std::fs::read(&seg.path).unwrap();
    let expected: Vec<serde_json::Value> = records
        .iter()
        .map(|r| match *r {
            Record::Gap { from, to } => serde_json::json!({"gap": [from, to]}),
            Record::Change { seq, ms, index, op, .. } => {
                let kind = match op {
                    Op::Set(false) => 0,
                    Op::Set(true) => 1,
                    Op::Freeze => 2,
                };
                serde_json::json!({"seq": seq, "ms": ms, "index": index, "kind": kind})
            }
        })
        .collect();
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "epoch": format!("{EPOCH:016x}"),
        "name": seg.path.file_name().unwrap().to_str().unwrap(),
        "records": expected,
    }))
    .unwrap()
        + "\n";
    let (seg_path, json_path) = (golden.join("segment.seg"), golden.join("segment.json"));
    if std::env::var_os("OMCB_UPDATE_GOLDEN").is_some() {
        std::fs::write(&seg_path, &bytes).unwrap();
        std::fs::write(&json_path, &json).unwrap();
        return;
    }
    let same = std::fs::read(&seg_path).ok() == Some(bytes)
        && std::fs::read_to_string(&json_path).ok() == Some(json);
    assert!(
        same,
        "{} or {} differs from what omcb-archive writes now; if the change is deliberate, rerun \
         with OMCB_UPDATE_GOLDEN=1 and check web/timeline.js",
        seg_path.display(),
        json_path.display()
    );
}

/// Through the fleet's nginx (deploy/nginx/omcb.conf.template): `/replay`
/// reaches the workers, and a sealed segment and the index are served from
/// nginx's cache the second time, as the workers' `Cache-Control` allows.
#[test]
fn through_nginx_the_replay_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let key = dir.path().join("origin.key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let args = format!(
        "{} --archive-dir {} --origin-key-file {}",
        common::fleet::WORKER_ARGS,
        dir.path().display(),
        key.display()
    );
    let fleet = common::fleet::Fleet::up(2, &[("OMCB_WORKER_ARGS", &args)]);
    let addr = fleet.addr();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let index = http_get(addr, "/replay/index.json", &[]).await;
        assert_eq!(index.status, 200);
        let index: serde_json::Value = serde_json::from_slice(&index.body).unwrap();
        let old = format!("{OLD:016x}");
        let epoch = index["epochs"].as_array().unwrap().iter().find(|e| e["epoch"] == old.as_str());
        let sealed = epoch.unwrap()["segments"][0]["url"].as_str().unwrap().to_string();
        for path in ["/replay/index.json", sealed.as_str()] {
            let first = http_get(addr, path, &[]).await;
            assert_eq!(first.status, 200, "{path}");
            let again = http_get(addr, path, &[]).await;
            assert_eq!(again.header("x-cache"), Some("HIT"), "{path} the second time");
            assert_eq!(again.body, first.body, "{path}");
        }
        let page = http_get(addr, "/replay", &[]).await;
        assert_eq!(page.status, 200);
        assert!(String::from_utf8_lossy(&page.body).contains("/replay.js"));
    });
}
