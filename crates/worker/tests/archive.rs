//! The change archive's inputs and the archiver (issue 14): every change's
//! origin (a keyed hash of the client's address), the origin key's checks
//! at start, and the archiver in an embedded worker and a fleet.

mod common;

use common::*;
use omcb_archive::{Entry, Filter, Reader, rebuild};
use omcb_store::Store;
use omcb_testkit::{RedisServer, Resp};
use omcb_worker::archiver::Archiver;
use omcb_worker::origin::OriginKey;

/// The deadline of the long waits of the fleet test (a loaded machine).
const LONG: std::time::Duration = std::time::Duration::from_secs(60);
const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

const OPEN: &str = "--board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms 20";
const KEY: &str = "00112233445566778899aabbccddeeff";

fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("origin.key");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    path
}

/// A fleet worker writes each change's origin into the change stream as the
/// `a` field: the keyed hash of the client's address, never the address.
#[tokio::test]
async fn a_fleet_worker_writes_the_keyed_origin_of_each_change() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let args = format!("--redis {} {OPEN} --origin-key-file {}", redis.url(), key.display());
    let w = Worker::start(&flags(&args));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    assert!(c.set(7, true).await.accepted);
    let entry = redis.command(&["XRANGE", "{main}:log", "-", "+"]).unwrap();
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16).unwrap();
    }
    let want = OriginKey::from_bytes(bytes).origin("127.0.0.1".parse().unwrap());
    let Resp::Array(Some(entries)) = &entry else { panic!("{entry:?}") };
    let Resp::Array(Some(entry)) = &entries[0] else { panic!("{entry:?}") };
    let Resp::Array(Some(fields)) = &entry[1] else { panic!("{entry:?}") };
    let fields: Vec<&str> = fields.iter().map(|f| f.as_str().unwrap()).collect();
    let a = fields.chunks(2).find(|kv| kv[0] == "a").map(|kv| kv[1]);
    assert_eq!(a, Some(format!("{want:016x}").as_str()), "{fields:?}");
    assert!(!fields.iter().any(|f| f.contains("127.0.0.1")), "no address: {fields:?}");
}

/// A key file the worker cannot use is refused at start, with the reason;
/// so is an archiving fleet worker without a key (its origins would not
/// match its peers').
#[test]
fn an_unusable_origin_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, "0011").unwrap();
    let missing = dir.path().join("missing.key");
    let cases: [(Vec<String>, &str); 3] = [
        (vec!["--origin-key-file".into(), short.display().to_string()], "32 hex digits"),
        (vec!["--origin-key-file".into(), missing.display().to_string()], "cannot read"),
        (
            vec![
                "--redis".into(),
                "redis://127.0.0.1:1".into(),
                "--archive-dir".into(),
                dir.path().join("archive").display().to_string(),
            ],
            "--origin-key-file",
        ),
    ];
    for (args, why) in cases {
        let data = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_omcb"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(data.path()).args(&args);
        let out = refuses_to_start(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}

/// Every entry of the archive, failing on any problem it reports.
fn archived(dir: &std::path::Path) -> Vec<Entry> {
    let reader = Reader::open(dir).unwrap();
    reader.entries(Filter::all()).map(|e| e.unwrap_or_else(|e| panic!("archive: {e}"))).collect()
}

/// The last seq the archive holds for `epoch` (0 when none), read from its
/// files as a reader would.
fn archived_up_to(dir: &std::path::Path, epoch: u64) -> u64 {
    let Ok(reader) = Reader::open(dir) else { return 0 };
    reader
        .entries(Filter::epoch(epoch))
        .filter_map(Result::ok)
        .map(|e| match e {
            Entry::Change(c) => c.seq,
            Entry::Gap { to_seq, .. } => to_seq,
        })
        .last()
        .unwrap_or(0)
}

/// Checks that `entries` hold every seq of `epoch` from 1 to `seq` exactly
/// once and in order (a gap counts for the seqs it names); returns the gaps.
fn every_seq_once(entries: &[Entry], epoch: u64, seq: u64) -> Vec<(u64, u64)> {
    let mut next = 1;
    let mut gaps = Vec::new();
    for e in entries.iter().filter(|e| e.epoch() == epoch) {
        let (from, to) = match *e {
            Entry::Change(c) => (c.seq, c.seq),
            Entry::Gap { from_seq, to_seq, .. } => {
                gaps.push((from_seq, to_seq));
                (from_seq, to_seq)
            }
        };
        assert_eq!(from, next, "seq {next} expected, {e:?} found");
        next = to + 1;
    }
    assert_eq!(next, seq + 1, "the archive ends at {}, the board at {seq}", next - 1);
    gaps
}

/// The board `/api/state` serves once it has reached seq `seq`.
async fn state_at(addr: std::net::SocketAddr, seq: u64) -> omcb_proto::Board {
    poll("the worker's replica to reach the seq", async || {
        let (s, _) = api_state(addr).await;
        (s.seq >= seq).then(|| omcb_proto::Board::from_snapshot(&s).unwrap())
    })
    .await
}

/// Embedded: the worker archives its own store; what it archived rebuilds
/// the board `/api/state` serves, and after a restart it goes on after the
/// last archived seq, under a new epoch after a crash.
#[tokio::test]
async fn an_embedded_worker_archives_every_change_and_resumes_after_a_restart() {
    let archive = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let args = format!("{OPEN} --archive-dir {}", archive.path().display());
    let mut w = Worker::start_in(data.path(), &flags(&args));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    let mut seq = 0;
    for i in 0..50 {
        let r = c.set(i, i % 3 != 1).await;
        assert!(r.accepted);
        seq = seq.max(r.seq);
    }
    assert!(seq > 30);
    let epoch = state_at(w.addr, 0).await.epoch;
    poll("the archive to hold every change", async || {
        (archived_up_to(archive.path(), epoch) >= seq).then_some(())
    })
    .await;
    // The metrics say so: the holder, caught up, every change counted.
    poll("the lag to read 0", async || {
        (w.metric("omcb_archive_lag_changes").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(w.metric("omcb_archive_holder").await, 1.0);
    assert_eq!(w.metric("omcb_archive_changes_total").await, seq as f64);
    assert_eq!(w.metric("omcb_archive_gaps_total").await, 0.0);
    assert_eq!(w.metric("omcb_archive_lag_seconds").await, 0.0);
    assert_eq!(w.metric("omcb_archive_log_capacity_changes").await, 100_000.0);
    assert!(w.metric("omcb_archive_bytes_total").await > 0.0);
    let state = state_at(w.addr, seq).await;
    let rebuilt = rebuild(&Reader::open(archive.path()).unwrap(), epoch, 1000).unwrap();
    assert_eq!((rebuilt.board.checked, rebuilt.board.seq), (state.checked, state.seq));
    assert!(every_seq_once(&archived(archive.path()), epoch, seq).is_empty());
    // Every change carries the data dir's origin key's hash of 127.0.0.1.
    let key = OriginKey::read(&data.path().join("origin.key")).unwrap();
    let want = key.origin("127.0.0.1".parse().unwrap());
    assert!(
        archived(archive.path()).iter().all(|e| matches!(e, Entry::Change(c) if c.origin == want))
    );
    // Changes right before a clean stop are archived by it: the embedded
    // log does not survive the restart, so one missed would be a gap.
    for i in 100..110 {
        assert!(c.set(i, true).await.accepted);
    }
    drop(c);
    w.terminate();
    let stopped_at = archived_up_to(archive.path(), epoch);
    assert_eq!(stopped_at, seq + 10, "the stop archived the last changes");

    // A start: same epoch, the archive goes on.
    let w = Worker::start_in(data.path(), &flags(&args));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    let r = c.set(900, true).await;
    assert!(r.accepted && r.seq == stopped_at + 1, "{r:?}");
    let seq = r.seq;
    poll("the archive to go on after the restart", async || {
        (archived_up_to(archive.path(), epoch) >= seq).then_some(())
    })
    .await;
    assert!(every_seq_once(&archived(archive.path()), epoch, seq).is_empty());
}

/// Changes trimmed from the log before the archiver read them are recorded
/// as a gap, with exactly their seqs; the archiver goes on after it.
#[tokio::test]
async fn changes_trimmed_before_they_were_read_are_recorded_as_a_gap() {
    let redis = RedisServer::start().unwrap();
    let store = board_of_1000(&redis).await;
    let dir = tempfile::tempdir().unwrap();
    let mut archiver = Archiver::new(store.clone(), dir.path().to_path_buf(), YEAR);
    for i in 0..10 {
        store.set(i, true, 7).await.unwrap();
    }
    archiver.step(true).await.unwrap();
    let epoch = store.snapshot().await.unwrap().epoch;
    assert_eq!(archiver.position(), Some((epoch, 10)));
    for i in 10..30 {
        store.set(i, true, 8).await.unwrap();
    }
    // The log keeps the last 5 only: 11..=25 are gone before the archiver reads.
    redis.command(&["XTRIM", "{main}:log", "MAXLEN", "5"]).unwrap();
    archiver.step(true).await.unwrap();
    assert_eq!(archiver.position(), Some((epoch, 30)));
    let entries = archived(dir.path());
    assert_eq!(every_seq_once(&entries, epoch, 30), [(11, 25)]);
    assert!(
        entries.iter().any(
            |e| matches!(e, Entry::Change(c) if c.seq == 26 && c.index == 25 && c.origin == 8)
        )
    );
    // The whole log trimmed (a stream deleted): the gap reaches the board's seq.
    store.set(500, true, 9).await.unwrap();
    redis.command(&["DEL", "{main}:log"]).unwrap();
    archiver.step(true).await.unwrap();
    assert_eq!(every_seq_once(&archived(dir.path()), epoch, 31), [(11, 25), (31, 31)]);
}

/// Issue 14's test: 3 workers archiving in turn under the lease, changes
/// from many clients, the archiving worker killed -9 twice while it writes:
/// the archive holds every seq of the epoch exactly once, in order (or a
/// recorded gap where the log had trimmed), and rebuilds the board
/// `/api/state` serves, bit for bit. `OMCB_ARCHIVE_TEST_CHANGES` scales it
/// (100,000 by default). The changes go straight to Redis through the
/// store's `set` (what a worker does for a toggle, with one origin per
/// simulated client): the archiver reads the log, whoever wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_archive_survives_its_writer_killed_twice_and_rebuilds_the_board() {
    let total: u64 = std::env::var("OMCB_ARCHIVE_TEST_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let archive = dir.path().join("archive");
    let args = format!(
        "--redis {} {OPEN} --origin-key-file {} --archive-dir {}",
        redis.url(),
        key.display(),
        archive.display()
    );
    let test_started = std::time::Instant::now();
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::start(&flags(&args))).collect();
    let store = board_of_1000(&redis).await;
    let epoch = store.snapshot().await.unwrap().epoch;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clients = 32u64;
    let drivers: Vec<_> = (0..clients)
        .map(|client| {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                let mut rng = omcb_testkit::rng::XorShift64::new(client + 1);
                let origin = 0x1000 + client;
                // Each client draws runs of neighbouring boxes.
                while done.load(std::sync::atomic::Ordering::Relaxed) < total {
                    let start = (rng.next_u64() % 1000) as u32;
                    let value = !rng.next_u64().is_multiple_of(3);
                    for k in 0..8 {
                        let r = store.set((start + k) % 1000, value, origin).await.unwrap();
                        if matches!(r, omcb_store::SetOutcome::Changed { .. }) {
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    // Kill whoever archives, twice, while the changes come.
    let mut killed = 0;
    for at in [total / 3, 2 * total / 3] {
        let started = std::time::Instant::now();
        while done.load(std::sync::atomic::Ordering::Relaxed) < at {
            assert!(started.elapsed() < LONG, "changes too slow: {done:?} of {at}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let holder = poll("a worker to hold the archive lease", async || {
            for (i, w) in workers.iter().enumerate() {
                if w.metric("omcb_archive_holder").await == 1.0 {
                    return Some(i);
                }
            }
            None
        })
        .await;
        poll("the holder to have archived some", async || {
            (archived_up_to(&archive, epoch) > 0).then_some(())
        })
        .await;
        workers[holder].kill9();
        workers.remove(holder);
        killed += 1;
    }
    for d in drivers {
        d.await.unwrap();
    }
    assert_eq!(killed, 2);
    let seq = store.snapshot().await.unwrap().seq;
    assert!(seq >= total);
    eprintln!("{seq} changes in {:?}", test_started.elapsed());
    let survivor = &workers[0];
    // The lease moves to the survivor after the holder's expires.
    let started = std::time::Instant::now();
    while archived_up_to(&archive, epoch) < seq {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(40),
            "the archive stopped at {}",
            archived_up_to(&archive, epoch)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let entries = archived(&archive);
    let gaps = every_seq_once(&entries, epoch, seq);
    assert!(gaps.is_empty(), "the log did not trim past the archiver here: {gaps:?}");
    let state = state_at(survivor.addr, seq).await;
    let rebuilt = rebuild(&Reader::open(&archive).unwrap(), epoch, 1000).unwrap();
    assert_eq!(rebuilt.board.seq, state.seq);
    assert_eq!(rebuilt.board.checked, state.checked, "the archive rebuilds /api/state bit for bit");
    assert_eq!(rebuilt.board.frozen, state.frozen);
    // Every client's origin, and nothing else.
    assert!(
        entries.iter().all(
            |e| matches!(e, Entry::Change(c) if (0x1000..0x1000 + clients).contains(&c.origin))
        )
    );
    assert!(survivor.metric("omcb_archive_changes_total").await > 0.0);
}

/// A new epoch that continues an older board's seqs (Redis reborn after it
/// lost changes: the stream still holds the old epoch's entries) gets its own
/// directory, starting with a gap for the seqs before its first change; the
/// old epoch's archive keeps what it had.
#[tokio::test]
async fn a_new_epoch_gets_its_own_directory_and_a_gap_for_the_seqs_it_continues_from() {
    let redis = RedisServer::start().unwrap();
    let store = board_of_1000(&redis).await;
    let dir = tempfile::tempdir().unwrap();
    let mut archiver = Archiver::new(store.clone(), dir.path().to_path_buf(), YEAR);
    for i in 0..5 {
        store.set(i, true, 7).await.unwrap();
    }
    archiver.step(true).await.unwrap();
    let old = store.snapshot().await.unwrap().epoch;
    let new = old ^ 0xff;
    // Epochs that began in the same hour are ordered by their first change's
    // time: let the clock move past the old epoch's last change.
    let last = omcb_store::now_ms();
    while omcb_store::now_ms() <= last + 1 {
        tokio::task::yield_now().await;
    }
    redis.command(&["HSET", "{main}:config", "epoch", &new.to_string()]).unwrap();
    for i in 5..8 {
        store.set(i, true, 8).await.unwrap();
    }
    archiver.step(true).await.unwrap();
    archiver.step(true).await.unwrap();
    assert_eq!(archiver.position(), Some((new, 8)));
    let entries = archived(dir.path());
    assert!(every_seq_once(&entries, old, 5).is_empty());
    assert_eq!(every_seq_once(&entries, new, 8), [(1, 5)]);
    let reader = Reader::open(dir.path()).unwrap();
    assert_eq!(reader.epochs().unwrap(), [old, new]);
}

/// The fleet's board `main` of 1,000 boxes in `redis`, as a store of our own.
async fn board_of_1000(redis: &RedisServer) -> Store {
    let config = omcb_store::BoardConfig { size: 1000, ..Default::default() };
    Store::Redis(
        omcb_store::redis::RedisStore::connect(&redis.url(), "main", config).await.unwrap(),
    )
}
