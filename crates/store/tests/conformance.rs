//! One suite of store semantics, run against every backend: the Memory store
//! (the embedded default) and the Redis store against a real redis-server.
//! A behaviour is written once, as a function of `mod suite` taking a `Store`;
//! `conformance!` makes each one a test per backend, on the board config it
//! names.

use std::time::{Duration, Instant};

use omcb_proto::{Board, Op};
use omcb_store::{BoardConfig, FeedEvent, Refusal, SetOutcome, Store};
use omcb_testkit::{RedisServer, poll};

const SMALL: BoardConfig = BoardConfig { size: 1000, max_checked: None, freeze_after_ms: 0 };

/// Keeps whatever backs a store alive for the test.
#[allow(dead_code)]
enum Guard {
    None,
    Redis(RedisServer),
}

async fn memory(config: BoardConfig) -> (Store, Guard) {
    let store = omcb_store::memory::MemoryStore::open(config, None).await.unwrap();
    (Store::Memory(store), Guard::None)
}

async fn redis(config: BoardConfig) -> (Store, Guard) {
    let (store, server) = redis_server(config).await;
    (store, Guard::Redis(server))
}

/// A Redis store and its server, for tests that act on the server.
async fn redis_server(config: BoardConfig) -> (Store, RedisServer) {
    let server = RedisServer::start().unwrap();
    (redis_store(&server, config).await, server)
}

/// A store on `server`'s board: a second one is another worker.
async fn redis_store(server: &RedisServer, config: BoardConfig) -> Store {
    Store::Redis(
        omcb_store::redis::RedisStore::connect(&server.url(), "main", config).await.unwrap(),
    )
}

async fn set(store: &Store, index: u32, checked: bool) -> SetOutcome {
    store.set(index, checked, 0).await.unwrap()
}

/// Checks each of `boxes`.
async fn check_all(store: &Store, boxes: impl IntoIterator<Item = u32>) {
    for i in boxes {
        set(store, i, true).await;
    }
}

/// Checks boxes `0..n`, then returns the board and a feed from seq 0 that has
/// read those `n` changes.
async fn checked_and_read(store: &Store, n: u32) -> (Board, omcb_store::ChangeFeed) {
    check_all(store, 0..n).await;
    let board = store.snapshot().await.unwrap();
    let mut feed = store.feed(board.epoch, 0);
    drain(&mut feed, n.into()).await;
    (board, feed)
}

/// Polls `f` until true; time-based rules need real time to pass.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    poll(what, async || f().await.then_some(())).await
}

/// Reads the feed until it reaches `seq`, returning every change.
async fn drain(feed: &mut omcb_store::ChangeFeed, seq: u64) -> Vec<omcb_proto::Change> {
    let mut out = Vec::new();
    while out.last().is_none_or(|c: &omcb_proto::Change| c.seq < seq) {
        match tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap() {
            FeedEvent::Changes(cs) => out.extend(cs),
            FeedEvent::Reset(b) => panic!("unexpected reset at seq {}", b.seq),
        }
    }
    out
}

mod suite {
    use super::*;

    pub async fn new_board_is_empty_with_an_epoch(store: Store) {
        let b = store.snapshot().await.unwrap();
        assert_ne!(b.epoch, 0);
        assert_eq!((b.seq, b.size, b.checked_count, b.frozen_count), (0, 1000, 0, 0));
        assert_eq!(b.checked.len(), 1000);
    }

    pub async fn set_not_flip(store: Store) {
        assert_eq!(set(&store, 5, true).await, SetOutcome::Changed { seq: 1, checked: true });
        assert_eq!(set(&store, 5, true).await, SetOutcome::Unchanged { checked: true });
        assert_eq!(set(&store, 6, false).await, SetOutcome::Unchanged { checked: false });
        assert_eq!(set(&store, 5, false).await, SetOutcome::Changed { seq: 2, checked: false });
        let b = store.snapshot().await.unwrap();
        assert_eq!((b.seq, b.checked_count), (2, 0));
    }

    pub async fn index_is_validated_and_the_board_never_grows(store: Store) {
        for index in [1000, 1001, 1 << 20, u32::MAX] {
            let r = set(&store, index, true).await;
            assert_eq!(r, SetOutcome::Refused { reason: Refusal::OutOfRange, checked: false });
        }
        assert_eq!(set(&store, 999, true).await, SetOutcome::Changed { seq: 1, checked: true });
        let b = store.snapshot().await.unwrap();
        assert_eq!((b.seq, b.size, b.checked.len(), b.checked_count), (1, 1000, 1000, 1));
        assert!(b.checked[999]);
    }

    pub async fn full_board_refuses_checks_but_not_unchecks(store: Store) {
        assert!(matches!(set(&store, 1, true).await, SetOutcome::Changed { .. }));
        assert!(matches!(set(&store, 2, true).await, SetOutcome::Changed { .. }));
        assert_eq!(
            set(&store, 3, true).await,
            SetOutcome::Refused { reason: Refusal::BoardFull, checked: false }
        );
        assert!(matches!(set(&store, 1, false).await, SetOutcome::Changed { checked: false, .. }));
        assert!(matches!(set(&store, 3, true).await, SetOutcome::Changed { checked: true, .. }));
        assert_eq!(store.snapshot().await.unwrap().checked_count, 2);
    }

    pub async fn unchecking_a_box_checked_too_long_freezes_it(store: Store) {
        set(&store, 7, true).await;
        set(&store, 8, true).await;
        // Freshly checked boxes can still be unchecked.
        assert!(matches!(set(&store, 8, false).await, SetOutcome::Changed { .. }));
        let since = Instant::now();
        eventually("freeze_after to pass", async || since.elapsed() >= Duration::from_millis(80))
            .await;
        assert_eq!(
            set(&store, 7, false).await,
            SetOutcome::Refused { reason: Refusal::Frozen, checked: true }
        );
        let b = store.snapshot().await.unwrap();
        assert!(b.frozen[7] && b.checked[7]);
        assert_eq!(
            (b.frozen_count, b.checked_count, b.seq),
            (1, 1, 4),
            "the freeze is a change with its own seq"
        );
        // Frozen is final: both directions refuse, nothing changes.
        assert_eq!(
            set(&store, 7, true).await,
            SetOutcome::Refused { reason: Refusal::Frozen, checked: true }
        );
        assert_eq!(
            set(&store, 7, false).await,
            SetOutcome::Refused { reason: Refusal::Frozen, checked: true }
        );
        assert_eq!(store.snapshot().await.unwrap().seq, 4);
    }

    pub async fn sweep_freezes_due_boxes_bounded_per_call(store: Store) {
        check_all(&store, (0..5).map(|i| i * 10)).await;
        let since = Instant::now();
        eventually("freeze_after to pass", async || since.elapsed() >= Duration::from_millis(80))
            .await;
        set(&store, 999, true).await; // not due yet
        assert_eq!(store.sweep(2).await.unwrap(), 2);
        assert_eq!(store.sweep(10).await.unwrap(), 3);
        assert_eq!(store.sweep(10).await.unwrap(), 0);
        let b = store.snapshot().await.unwrap();
        assert_eq!((b.frozen_count, b.checked_count, b.seq), (5, 6, 11));
        assert!((0..5).all(|i| b.frozen[i * 10]) && !b.frozen[999]);
    }

    pub async fn sweep_is_a_no_op_when_freezing_is_off(store: Store) {
        set(&store, 1, true).await;
        assert_eq!(store.sweep(100).await.unwrap(), 0);
        assert_eq!(store.snapshot().await.unwrap().frozen_count, 0);
    }

    pub async fn feed_yields_every_change_once_in_order(store: Store) {
        let start = store.snapshot().await.unwrap();
        let mut feed = store.feed(start.epoch, 0);
        let mut expected = Vec::new();
        for i in 0..60u32 {
            let index = (i * 37) % 50;
            if let SetOutcome::Changed { seq, checked } = set(&store, index, i % 3 != 0).await {
                expected.push((seq, index, Op::Set(checked)));
            }
        }
        let last = expected.last().unwrap().0;
        let got = drain(&mut feed, last).await;
        let got: Vec<_> = got.iter().map(|c| (c.seq, c.index, c.op)).collect();
        assert_eq!(got, expected);
        // Replaying the feed onto an empty board gives the snapshot.
        let mut replay = Board::new(1000, start.epoch, 0);
        for c in drain(&mut store.feed(start.epoch, 0), last).await {
            replay.apply_change(&c).unwrap();
        }
        assert_eq!(replay, store.snapshot().await.unwrap());
    }

    /// A feed with nothing to read reports "caught up" (no changes) after a
    /// while (Redis: once a blocked read times out): the heartbeat that turns
    /// `/readyz` back to 200 after an outage and shows a quiet board from a
    /// stuck feed (`omcb_feed_last_read_timestamp_seconds`).
    pub async fn quiet_feed_reports_caught_up(store: Store) {
        set(&store, 1, true).await;
        let b = store.snapshot().await.unwrap();
        let mut feed = store.feed(b.epoch, b.seq);
        let event =
            tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap();
        assert_eq!(event, FeedEvent::Changes(Vec::new()));
    }

    /// Each change carries the time the store committed it (the worker's feed
    /// lag is measured from it): a toggle's and a sweep's freeze alike.
    pub async fn changes_carry_their_commit_time(store: Store) {
        let epoch = store.snapshot().await.unwrap().epoch;
        let before = omcb_store::now_ms();
        set(&store, 3, true).await;
        let since = Instant::now();
        eventually("freeze_after to pass", async || since.elapsed() >= Duration::from_millis(80))
            .await;
        assert_eq!(store.sweep(10).await.unwrap(), 1);
        let after = omcb_store::now_ms();
        let changes = drain(&mut store.feed(epoch, 0), 2).await;
        assert_eq!(changes.iter().map(|c| c.op).collect::<Vec<_>>(), [Op::Set(true), Op::Freeze]);
        // Redis' clock is this machine's clock here; a second of slack for
        // its ms rounding.
        for c in &changes {
            assert!(
                (before.saturating_sub(1000)..=after + 1000).contains(&c.committed_ms),
                "change {} committed at {} outside [{before}, {after}]",
                c.seq,
                c.committed_ms
            );
        }
        assert!(changes[1].committed_ms >= changes[0].committed_ms + 60, "{changes:?}");
    }

    /// Each change carries the origin its set was given (the archive's
    /// record of who made it), exactly, through the feed; the sweep's
    /// freezes and sets without a client carry 0.
    pub async fn changes_carry_their_origin(store: Store) {
        let epoch = store.snapshot().await.unwrap().epoch;
        let origin = 0xfedc_ba98_7654_3210_u64;
        store.set(3, true, origin).await.unwrap();
        store.set(4, true, 0).await.unwrap();
        store.set(5, true, 1).await.unwrap();
        let since = Instant::now();
        eventually("freeze_after to pass", async || since.elapsed() >= Duration::from_millis(80))
            .await;
        // An uncheck that freezes is the client's change: its origin.
        let refused = store.set(3, false, 7).await.unwrap();
        assert!(matches!(refused, SetOutcome::Refused { reason: Refusal::Frozen, .. }));
        assert_eq!(store.sweep(10).await.unwrap(), 2);
        let changes = drain(&mut store.feed(epoch, 0), 6).await;
        let got: Vec<(u32, Op, u64)> = changes.iter().map(|c| (c.index, c.op, c.origin)).collect();
        assert_eq!(
            got[..4],
            [
                (3, Op::Set(true), origin),
                (4, Op::Set(true), 0),
                (5, Op::Set(true), 1),
                (3, Op::Freeze, 7)
            ]
        );
        assert!(got[4..].iter().all(|&(_, op, origin)| op == Op::Freeze && origin == 0), "{got:?}");
    }

    /// A sunset started on a live board (`omcb admin sunset start`): boxes
    /// checked longer ago than the new setting cannot be unchecked and the
    /// sweep freezes them; stopping it makes unchecking possible again.
    pub async fn a_sunset_started_on_a_live_board_applies_at_once(store: Store) {
        check_all(&store, [1, 2, 3]).await;
        assert_eq!(store.sweep(10).await.unwrap(), 0, "freezing is off");
        let since = Instant::now();
        eventually("the boxes to be 60 ms old", async || {
            since.elapsed() >= Duration::from_millis(80)
        })
        .await;
        let config = store.set_freeze_after(60).await.unwrap();
        assert_eq!(config.freeze_after_ms, 60);
        assert_eq!(store.config().freeze_after_ms, 60);
        assert_eq!(store.current_config().await.unwrap().freeze_after_ms, 60);
        assert_eq!(store.snapshot().await.unwrap().freeze_after_ms, 60);
        let refused = set(&store, 1, false).await;
        assert_eq!(refused, SetOutcome::Refused { reason: Refusal::Frozen, checked: true });
        assert_eq!(store.sweep(10).await.unwrap(), 2, "boxes 2 and 3 froze");
        // Stopped: a box checked now stays uncheckable however long ago.
        assert_eq!(store.set_freeze_after(0).await.unwrap().freeze_after_ms, 0);
        set(&store, 4, true).await;
        let since = Instant::now();
        eventually("box 4 to be 60 ms old", async || since.elapsed() >= Duration::from_millis(80))
            .await;
        assert_eq!(store.sweep(10).await.unwrap(), 0);
        assert!(matches!(set(&store, 4, false).await, SetOutcome::Changed { checked: false, .. }));
        assert_eq!(store.snapshot().await.unwrap().frozen_count, 3);
    }

    /// `read_now` takes every change so far in one read and answers at once
    /// when there is nothing new: how a hub reads a busy board once per tick
    /// (issue 13, part 1) rather than once per change.
    pub async fn read_now_takes_every_change_so_far_without_waiting(store: Store) {
        let b = store.snapshot().await.unwrap();
        let mut feed = store.feed(b.epoch, b.seq);
        check_all(&store, 0..100).await;
        match feed.read_now().await.unwrap() {
            FeedEvent::Changes(cs) => {
                let seqs: Vec<u64> = cs.iter().map(|c| c.seq).collect();
                assert_eq!(seqs, (b.seq + 1..=b.seq + 100).collect::<Vec<_>>(), "one read");
            }
            FeedEvent::Reset(b) => panic!("unexpected reset at seq {}", b.seq),
        }
        // Well under a blocking read's wait (a second for Redis, more in memory).
        let nothing = tokio::time::timeout(Duration::from_millis(500), feed.read_now()).await;
        assert_eq!(nothing.expect("no wait").unwrap(), FeedEvent::Changes(Vec::new()));
        set(&store, 100, true).await;
        match feed.next().await.unwrap() {
            FeedEvent::Changes(cs) => {
                assert_eq!(cs.iter().map(|c| c.index).collect::<Vec<_>>(), [100])
            }
            FeedEvent::Reset(b) => panic!("unexpected reset at seq {}", b.seq),
        }
    }

    pub async fn feed_from_a_wrong_epoch_resets(store: Store) {
        set(&store, 1, true).await;
        let b = store.snapshot().await.unwrap();
        let board = next_reset(&mut store.feed(b.epoch ^ 1, 0)).await;
        assert_eq!(board, b);
    }
}

/// Reads the feed until it resets (a backend may first report that it is
/// caught up, or yield changes it had not yet seen were lost).
async fn next_reset(feed: &mut omcb_store::ChangeFeed) -> Board {
    poll("a reset", async || {
        match tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap() {
            Ok(FeedEvent::Reset(board)) => Some(*board),
            Ok(FeedEvent::Changes(_)) => None,
            // Redis restarting under the feed: it retries.
            Err(e) => {
                eprintln!("feed: {e}");
                None
            }
        }
    })
    .await
}

/// Instantiates every `suite` function as a test for each backend, on a
/// board of the given config.
macro_rules! conformance {
    ($($test:ident($config:expr)),* $(,)?) => {
        conformance!(@backend memory: $($test($config)),*);
        conformance!(@backend redis: $($test($config)),*);
    };
    (@backend $backend:ident: $($test:ident($config:expr)),*) => {
        mod $backend {
            use super::*;
            $(
                #[tokio::test]
                async fn $test() {
                    let (s, _g) = super::$backend($config).await;
                    suite::$test(s).await;
                }
            )*
        }
    };
}

conformance! {
    new_board_is_empty_with_an_epoch(SMALL),
    set_not_flip(SMALL),
    index_is_validated_and_the_board_never_grows(SMALL),
    full_board_refuses_checks_but_not_unchecks(BoardConfig { max_checked: Some(2), ..SMALL }),
    unchecking_a_box_checked_too_long_freezes_it(BoardConfig { freeze_after_ms: 60, ..SMALL }),
    sweep_freezes_due_boxes_bounded_per_call(BoardConfig { freeze_after_ms: 60, ..SMALL }),
    sweep_is_a_no_op_when_freezing_is_off(SMALL),
    feed_yields_every_change_once_in_order(SMALL),
    quiet_feed_reports_caught_up(SMALL),
    changes_carry_their_commit_time(BoardConfig { freeze_after_ms: 60, ..SMALL }),
    changes_carry_their_origin(BoardConfig { freeze_after_ms: 60, ..SMALL }),
    feed_from_a_wrong_epoch_resets(SMALL),
    read_now_takes_every_change_so_far_without_waiting(SMALL),
    a_sunset_started_on_a_live_board_applies_at_once(SMALL),
}

/// Redis forgets its scripts on a restart, a failover or `SCRIPT FLUSH`; a set
/// must still succeed, even when flushes come faster than a load-and-retry
/// round trip (fred's `evalsha_with_reload` loses that race).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sets_survive_script_flushes_in_a_tight_loop() {
    let (store, server) = redis_server(SMALL).await;
    let port = server.port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut reply = std::io::BufReader::new(conn.try_clone().unwrap());
            let (mut conn, mut line, mut n) = (conn, String::new(), 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                conn.write_all(b"*2\r\n$6\r\nSCRIPT\r\n$5\r\nFLUSH\r\n").unwrap();
                line.clear();
                reply.read_line(&mut line).unwrap();
                assert_eq!(line, "+OK\r\n");
                n += 1;
            }
            n
        })
    };
    for i in 0..400u32 {
        let out = set(&store, i % 1000, i % 2 == 0).await;
        assert!(!matches!(out, SetOutcome::Refused { .. }), "set {i} beside flushes: {out:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flushes = flusher.join().unwrap();
    assert!(flushes > 10, "only {flushes} flushes ran beside the sets");
}

/// `set.lua` calls Redis ran since its stats were reset (`EVALSHA`, and
/// `EVAL` after a `NOSCRIPT`).
fn script_calls(server: &RedisServer) -> u64 {
    let info = server.command(&["INFO", "commandstats"]).unwrap();
    let omcb_testkit::Resp::Bulk(Some(info)) = info else { panic!("INFO: {info:?}") };
    String::from_utf8(info)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .map(|l| {
            let calls = l.split("calls=").nth(1).unwrap().split(',').next().unwrap();
            calls.parse::<u64>().unwrap()
        })
        .sum()
}

/// Toggles that queue while a `set.lua` call is out share the next call
/// (group commit): 500 concurrent toggles take far fewer calls, and each
/// is still answered as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_toggles_share_script_calls() {
    let (store, server) = redis_server(SMALL).await;
    server.command(&["CONFIG", "RESETSTAT"]).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500 {
        let store = store.clone();
        tasks.spawn(async move { set(&store, i, true).await });
    }
    let mut seqs = Vec::new();
    while let Some(out) = tasks.join_next().await {
        match out.unwrap() {
            SetOutcome::Changed { seq, checked: true } => seqs.push(seq),
            other => panic!("a toggle of an unchecked box answered {other:?}"),
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=500).collect::<Vec<u64>>(), "each toggle got its own seq");
    let calls = script_calls(&server);
    assert!(calls < 250, "500 concurrent toggles took {calls} script calls");
    let board = store.snapshot().await.unwrap();
    assert_eq!((board.seq, board.checked_count), (500, 500));
}

/// Toggles carried by one `set.lua` call are answered in the order they were
/// asked, each as if it had had its own call: the same box twice, a refusal
/// between changes, a box made room for by an earlier toggle of the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_toggles_of_one_call_are_answered_in_order() {
    let (store, server) = redis_server(BoardConfig { max_checked: Some(2), ..SMALL }).await;
    let Store::Redis(redis) = &store else { unreachable!() };
    // Long enough for all seven to queue, whatever the machine's load.
    redis.set_toggle_gather(Duration::from_millis(200));
    // Redis learns the script first (a NOSCRIPT and an EVAL), then counts.
    set(&store, 999, false).await;
    server.command(&["CONFIG", "RESETSTAT"]).unwrap();
    let s = |i, v| store.set(i, v, 0);
    let out = tokio::join!(
        s(1, true),
        s(1, true),
        s(2, true),
        s(3, true),
        s(1000, true),
        s(1, false),
        s(3, true)
    );
    let full = SetOutcome::Refused { reason: Refusal::BoardFull, checked: false };
    let out_of_range = SetOutcome::Refused { reason: Refusal::OutOfRange, checked: false };
    assert_eq!(
        [out.0, out.1, out.2, out.3, out.4, out.5, out.6].map(Result::unwrap),
        [
            SetOutcome::Changed { seq: 1, checked: true },
            SetOutcome::Unchanged { checked: true },
            SetOutcome::Changed { seq: 2, checked: true },
            full,
            out_of_range,
            SetOutcome::Changed { seq: 3, checked: false },
            SetOutcome::Changed { seq: 4, checked: true },
        ]
    );
    assert_eq!(script_calls(&server), 1, "the seven toggles went in one call");
    let changes = drain(&mut store.feed(store.snapshot().await.unwrap().epoch, 0), 4).await;
    let counts: Vec<u32> = changes.iter().map(|c| c.checked_count).collect();
    assert_eq!(counts, [1, 2, 1, 2]);
}

/// While Redis does not answer, the toggles queued for `set.lua` calls all
/// fail `Unavailable` within about two command timeouts (2 s each), however
/// many queued: a toggle that waited a timeout behind failed calls is not
/// sent; otherwise 600 toggles would wait for five calls of 128, one after
/// the other (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_toggles_queued_behind_a_stalled_redis_fail_in_bounded_time() {
    let (store, server) = redis_server(SMALL).await;
    set(&store, 1, true).await;
    // Redis takes commands but runs none (longer than the test).
    server.command(&["CLIENT", "PAUSE", "60000", "ALL"]).unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..600 {
        let store = store.clone();
        tasks.spawn(async move { store.set(i, false, 0).await });
    }
    while let Some(out) = tasks.join_next().await {
        let out = out.unwrap();
        assert!(matches!(out, Err(omcb_store::StoreError::Unavailable(_))), "{out:?}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(7), "600 toggles took {took:?} to fail");
}

/// One worker of a fleet runs the freeze sweep: the one holding the lease,
/// and it says so (`Store::sweep_leased`, behind `omcb_sweep_lease_held`).
#[tokio::test]
async fn redis_only_the_lease_holder_says_it_sweeps() {
    let config = BoardConfig { freeze_after_ms: 60_000, ..SMALL };
    let (a, guard) = redis(config).await;
    let Guard::Redis(server) = &guard else { unreachable!() };
    let b = Store::Redis(
        omcb_store::redis::RedisStore::connect(&server.url(), "main", config).await.unwrap(),
    );
    assert_eq!(a.sweep_leased(10).await.unwrap(), Some(0), "the first to ask takes the lease");
    assert_eq!(b.sweep_leased(10).await.unwrap(), None, "while it is held");
    assert_eq!(a.sweep_leased(10).await.unwrap(), Some(0), "and keeps it");
}

/// A log entry written before entries carried their commit time (a fleet
/// upgraded under traffic) still reads, with the time unknown (0).
#[tokio::test]
async fn redis_feed_reads_entries_without_a_commit_time() {
    let (store, guard) = redis(SMALL).await;
    let Guard::Redis(server) = &guard else { unreachable!() };
    let b = store.snapshot().await.unwrap();
    set(&store, 1, true).await;
    let epoch = b.epoch.to_string();
    let old = ["XADD", "{main}:log", "2-0", "i", "2", "o", "1", "c", "2", "f", "0", "e", &epoch];
    server.command(&old).unwrap();
    server.command(&["SET", "{main}:seq", "2"]).unwrap();
    let changes = drain(&mut store.feed(b.epoch, 0), 2).await;
    assert!(changes[0].committed_ms > 0, "a new entry has its time");
    assert_eq!((changes[1].seq, changes[1].index, changes[1].committed_ms), (2, 2, 0));
}

/// In process nothing can be lost behind a reader's back: a feed from a seq
/// the board never had is the caller's mistake, and it gets the board as is.
#[tokio::test]
async fn memory_feed_from_the_future_resets_to_the_board() {
    let (store, _g) = memory(SMALL).await;
    set(&store, 1, true).await;
    let b = store.snapshot().await.unwrap();
    assert_eq!(next_reset(&mut store.feed(b.epoch, 99)).await, b);
}

/// A Redis behind a position a reader holds lost changes that reader saw:
/// the board moves to a new epoch with what Redis still has.
#[tokio::test]
async fn redis_feed_from_the_future_moves_the_board_to_a_new_epoch() {
    let (store, _g) = redis(SMALL).await;
    set(&store, 1, true).await;
    let b = store.snapshot().await.unwrap();
    let board = next_reset(&mut store.feed(b.epoch, 99)).await;
    assert_ne!(board.epoch, b.epoch);
    assert_eq!(board, Board { epoch: board.epoch, ..b });
    assert_eq!(store.snapshot().await.unwrap(), board);
}

/// After `FLUSHALL` the next board starts at seq 1 and soon passes a reader's
/// old seq: its entries must read as another board (a Reset), never as changes
/// of the old one, even on a connection that never dropped.
#[tokio::test]
async fn redis_feed_never_takes_a_flushed_board_s_successor_for_its_own() {
    let (store, server) = redis_server(SMALL).await;
    let (old, mut feed) = checked_and_read(&store, 5).await;
    server.command(&["FLUSHALL"]).unwrap();
    check_all(&store, 100..110).await;
    let new = store.snapshot().await.unwrap();
    assert_ne!(new.epoch, old.epoch);
    match tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap() {
        FeedEvent::Reset(board) => assert_eq!(*board, new),
        FeedEvent::Changes(c) => panic!("the new board's changes read as the old one's: {c:?}"),
    }
}

/// Plays a restore of older files: `SAVE`, `work`, then kill -9 and restart
/// on the saved RDB.
async fn roll_back(server: &mut RedisServer, work: impl AsyncFnOnce(&RedisServer)) {
    server.command(&["SAVE"]).unwrap();
    let rdb = server.dir().join("dump.rdb");
    let saved = std::fs::read(&rdb).unwrap();
    work(server).await;
    server.kill().unwrap();
    std::fs::write(&rdb, saved).unwrap();
    server.start_again().unwrap();
}

/// Sets until Redis answers again after a restart.
async fn set_when_back(store: &Store, index: u32) -> SetOutcome {
    poll("Redis to be back", async || store.set(index, true, 0).await.ok()).await
}

/// Checks each of `boxes` once Redis answers again, each a change.
async fn change_when_back(store: &Store, boxes: std::ops::Range<u32>) {
    for i in boxes {
        assert!(matches!(set_when_back(store, i).await, SetOutcome::Changed { .. }));
    }
}

/// Redis restored from older files keeps the epoch in its data; two readers
/// that applied changes it lost both reset to ONE new epoch (the first to
/// notice moves the board, the other finds it moved) holding what Redis has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rollback_moves_the_board_to_a_new_epoch_once() {
    let (a, mut server) = redis_server(SMALL).await;
    let b = redis_store(&server, SMALL).await;
    let (start, mut fa) = checked_and_read(&a, 10).await;
    let mut fb = b.feed(start.epoch, 0);
    drain(&mut fb, 10).await;
    roll_back(&mut server, async |_| {
        check_all(&a, 10..15).await;
        drain(&mut fa, 15).await;
        drain(&mut fb, 15).await;
    })
    .await;
    // The restored board keeps the epoch and reuses seqs 11.. for other boxes.
    change_when_back(&b, 500..503).await;
    let ra = next_reset(&mut fa).await;
    let rb = next_reset(&mut fb).await;
    assert_ne!(ra.epoch, start.epoch, "a board that lost changes moves to a new epoch");
    assert_eq!(rb.epoch, ra.epoch, "the board moved to a new epoch once");
    let now = a.snapshot().await.unwrap();
    assert_eq!(now.epoch, ra.epoch);
    assert!((0..10).chain(500..503).all(|i| now.checked[i]) && !now.checked[10]);
    assert_eq!((now.seq, now.checked_count), (13, 13), "the seq continues from Redis' seq");
    // The new epoch's log is read on from there.
    set(&a, 900, true).await;
    assert_eq!(drain(&mut fa, 14).await.last().unwrap().index, 900);
}

/// A change this worker acknowledged and Redis lost is noticed even when the
/// worker's feed never read it, and even after Redis reused its seq for
/// another change: the entry at the acknowledged seq is not that change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_an_acknowledged_change_moves_the_board_to_a_new_epoch() {
    let (a, mut server) = redis_server(SMALL).await;
    let b = redis_store(&server, SMALL).await;
    let (start, mut fa) = checked_and_read(&a, 10).await;
    roll_back(&mut server, async |_| {
        // Acknowledged (seqs 11..15), never read by `fa`.
        check_all(&a, 10..15).await;
    })
    .await;
    // Another worker takes Redis past seq 15 with other boxes.
    change_when_back(&b, 500..510).await;
    let reset = next_reset(&mut fa).await;
    assert_ne!(reset.epoch, start.epoch, "acknowledged changes were lost under the same epoch");
    assert_eq!(reset, a.snapshot().await.unwrap());
}

/// A backup from before the board's last epoch change, restored: the old
/// epoch shows up again, and its clients may hold seqs the backup lacks. A
/// reader that left that epoch moves the board to a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_epoch_that_comes_back_from_a_backup_is_moved_on() {
    let (store, mut server) = redis_server(SMALL).await;
    let (old, mut feed) = checked_and_read(&store, 5).await;
    roll_back(&mut server, async |server| {
        set(&store, 5, true).await;
        drain(&mut feed, 6).await;
        server.command(&["FLUSHALL"]).unwrap();
        set(&store, 700, true).await;
        assert_ne!(next_reset(&mut feed).await.epoch, old.epoch);
    })
    .await;
    set_when_back(&store, 600).await;
    let reset = next_reset(&mut feed).await;
    assert_ne!(reset.epoch, old.epoch, "the restored epoch is moved on");
    assert!(reset.checked[4] && !reset.checked[5] && reset.checked[600]);
    assert_eq!(reset, store.snapshot().await.unwrap());
}

/// The worker's feed keeps a replica (`feed_from`), and a board that lost
/// changes is restored from it under a new epoch: after a rollback every
/// change survives, including those made on the older data before the feed
/// noticed (the store that acknowledged them makes them again); a board that
/// is gone (`FLUSHALL`) is restored too, and meanwhile a toggle answers
/// `Unavailable` rather than create an empty board.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_feed_with_a_replica_restores_a_board_that_lost_changes() {
    let (a, mut server) = redis_server(SMALL).await;
    check_all(&a, 0..10).await;
    let start = a.snapshot().await.unwrap();
    let mut feed = a.feed_from(&start);
    roll_back(&mut server, async |_| {
        check_all(&a, 10..15).await;
        drain(&mut feed, 15).await;
    })
    .await;
    // Reused seqs 11..13 on the older data, before the feed notices.
    change_when_back(&a, 500..503).await;
    let restored = next_reset(&mut feed).await;
    assert_ne!(restored.epoch, start.epoch);
    assert!((0..15).all(|i| restored.checked[i]), "the replica's changes are back");
    eventually("the changes made on the older data are made again", async || {
        let now = a.snapshot().await.unwrap();
        (0..15).chain(500..503).all(|i| now.checked[i]) && now.checked_count == 18
    })
    .await;

    let before = a.snapshot().await.unwrap();
    server.command(&["FLUSHALL"]).unwrap();
    assert!(matches!(a.set(700, true, 0).await, Err(omcb_store::StoreError::Unavailable(_))));
    let again = next_reset(&mut feed).await;
    assert_ne!(again.epoch, before.epoch);
    // The feed had not read the changes made again above: the restored board
    // lacks them, and the store that acknowledged them makes them again.
    eventually("the board is back, not empty", async || {
        a.snapshot().await.unwrap().checked == before.checked
    })
    .await;
    assert!(matches!(set(&a, 700, true).await, SetOutcome::Changed { .. }));
}

/// A sunset set through one worker's store is the board's: another worker
/// learns it with its next `current_config` (the hub's tick), and one that
/// starts later with other flags takes the board's setting.
#[tokio::test]
async fn redis_a_sunset_set_through_one_worker_reaches_the_others() {
    let (a, server) = redis_server(SMALL).await;
    let b = redis_store(&server, SMALL).await;
    assert_eq!(a.set_freeze_after(600_000).await.unwrap().freeze_after_ms, 600_000);
    assert_eq!(b.config().freeze_after_ms, 0, "b has not read it yet");
    assert_eq!(b.current_config().await.unwrap().freeze_after_ms, 600_000);
    assert_eq!(b.config().freeze_after_ms, 600_000);
    let late = redis_store(&server, BoardConfig { freeze_after_ms: 5, ..SMALL }).await;
    assert_eq!(late.config().freeze_after_ms, 600_000);
}
