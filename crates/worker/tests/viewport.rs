//! Viewport subscriptions (docs/PROTOCOL.md) against the real binary: under
//! uniform load, subscribed sockets converge inside their ranges (also while
//! scrolling and after a jump) and full sockets get exactly the full stream;
//! refused `Subscribe`s keep the socket and its subscription; `count = 0`
//! returns a socket to the full board.

mod common;

use std::time::Duration;

use common::{Client, Worker, api_state, connect, flags};
use futures_util::SinkExt as _;
use omcb_proto::Board;
use omcb_proto::v1::{Code, Snapshot, Subscribe, client_message, server_message::Msg};
use omcb_proto::view::{self, View};
use omcb_testkit::rng::XorShift64;

const SIZE: u32 = 100_000;

/// A 100,000-box board (49 regions) that one test process may toggle as fast as it likes.
const OPEN: &str = "--board-size 100000 --batch-ms 20 --toggle-rate 100000 --toggle-burst 100000 \
     --abuse-burst 100000 --ip-toggle-rate 0 --ip-connect-rate 0 --ip-snapshot-rate 0 \
     --max-connections-per-ip 0 --recv-frame-rate 100000";

/// The board as `/api/state` has it now.
async fn truth(w: &Worker) -> Board {
    let (s, _) = api_state(w.addr).await;
    Board::from_snapshot(&s).unwrap()
}

/// Every box of `view`'s range equals the board's, and the counts too.
fn assert_view_matches(name: &str, view: &View, regions: std::ops::Range<u32>, board: &Board) {
    assert_eq!(view.regions().collect::<Vec<_>>(), regions.clone().collect::<Vec<_>>(), "{name}");
    let (first, count) = view::boxes(&regions, board.size);
    for i in first..first + count {
        assert_eq!(view.is_checked(i), Some(board.is_checked(i)), "{name}: box {i} checked");
        assert_eq!(view.is_frozen(i), Some(board.is_frozen(i)), "{name}: box {i} frozen");
    }
    assert_eq!((view.checked_count, view.frozen_count), (board.checked_count, board.frozen_count));
}

/// Reads everything until `stop`; a scroller also re-subscribes every 50 ms
/// along `scrolls` (first box of each window of `count`).
fn reader(
    mut c: Client,
    scrolls: Vec<u32>,
    count: u32,
    stop: &tokio::sync::watch::Sender<bool>,
) -> tokio::task::JoinHandle<Client> {
    let mut stop = stop.subscribe();
    tokio::spawn(async move {
        let mut scrolls = scrolls.into_iter();
        let mut every = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                () = async { drop(stop.wait_for(|s| *s).await) } => {
                    // The rest of the path at once (the load may end first).
                    for first in scrolls {
                        c.subscribe(first, count, SIZE).await;
                    }
                    return c;
                }
                _ = every.tick() => {
                    if let Some(first) = scrolls.next() {
                        c.subscribe(first, count, SIZE).await;
                    }
                }
                m = c.next() => { m.expect("the socket stays open"); }
            }
        }
    })
}

/// Sends `n` toggles of uniformly random boxes, 100 in flight at a time.
async fn uniform_load(c: &mut Client, n: u32, seed: u64) {
    let mut rng = XorShift64::new(seed);
    for _ in 0..n / 100 {
        let mut last = 0;
        for _ in 0..100 {
            let r = rng.next_u64();
            last = c.toggle((r % u64::from(SIZE)) as u32, r >> 63 == 1).await;
        }
        assert!(c.result_for(last).await.accepted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewport_sockets_converge_in_their_range_and_full_sockets_are_unchanged() {
    let w = Worker::start(&flags(OPEN));
    let mut full = Vec::new();
    for query in ["", "?snapshot=deflate"] {
        let mut c = connect(&w.ws_url(query)).await;
        assert!(matches!(c.recv().await, Msg::Snapshot(_)));
        full.push(c);
    }
    // (first, count) of each viewport socket; the last scrolls during the
    // load, 300 boxes at a time, then jumps.
    let windows = [(0, 2_000), (50_000, 2_000), (99_000, 2_000), (20_480, 65_536), (10_000, 2_000)];
    let mut viewports = Vec::new();
    for (i, &(first, count)) in windows.iter().enumerate() {
        let query = if i % 2 == 0 { "" } else { "?snapshot=deflate" };
        let mut c = connect(&w.ws_url(query)).await;
        assert!(matches!(c.recv().await, Msg::Snapshot(_)));
        c.subscribe(first, count, SIZE).await;
        viewports.push(c);
    }
    let scroller_path: Vec<u32> =
        (1..=10).map(|k| 10_000 + k * 300).chain([70_000, 70_300]).collect();
    let final_window = (70_300, 2_000);

    let (stop, _) = tokio::sync::watch::channel(false);
    let full_readers: Vec<_> = full.into_iter().map(|c| reader(c, vec![], 0, &stop)).collect();
    let last = viewports.len() - 1;
    let view_readers: Vec<_> = viewports
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let path = if i == last { scroller_path.clone() } else { vec![] };
            reader(c, path, 2_000, &stop)
        })
        .collect();
    let mut toggler = connect(&w.ws_url("")).await;
    toggler.recv().await;
    uniform_load(&mut toggler, 6_000, 7).await;
    stop.send_replace(true);

    // Every change got the next seq (a fresh board, no sunset): the replica
    // is done once it is at as many.
    let changes = w.metric(r#"omcb_toggles_total{outcome="changed"}"#).await as u64;
    w.stats_at(changes).await;
    let board = truth(&w).await;
    assert_eq!(board.seq, changes);
    assert!(board.seq > 2_000, "the load changed the board: seq {}", board.seq);
    for (i, r) in full_readers.into_iter().enumerate() {
        let mut c = r.await.unwrap();
        c.until_seq(board.seq).await;
        assert_eq!(c.board.as_ref().unwrap(), &board, "full socket {i}");
        // The full stream as before: one Snapshot, then contiguous full
        // Batches, none of them a region or counts frame.
        assert_eq!((c.snapshots, c.gaps), (1, 0), "full socket {i}");
        assert!(c.view.is_none());
        for pair in c.batches.windows(2) {
            assert_eq!(pair[1].0, pair[0].1 + 1, "full socket {i}: batches follow each other");
        }
    }
    for (i, r) in view_readers.into_iter().enumerate() {
        let mut c = r.await.unwrap();
        let (first, count) = if i == last { final_window } else { windows[i] };
        let regions = view::subscription(first, count, SIZE).unwrap().unwrap();
        // The last Subscribe's Snapshot is in (regions come only from
        // Snapshots), and the counts are at the end: a counts frame follows
        // the region frames of every tick before it, and one read before
        // that Snapshot means the Snapshot is at the end too.
        let deadline = std::time::Instant::now() + omcb_testkit::WAIT;
        while !c
            .view
            .as_ref()
            .is_some_and(|v| v.regions().eq(regions.clone()) && v.counts_seq >= board.seq)
        {
            assert!(std::time::Instant::now() < deadline, "viewport {i} did not reach the end");
            c.next().await.expect("the socket stays open");
        }
        assert_eq!(c.gaps, 0, "viewport socket {i} saw a gap");
        assert!(c.board.is_none(), "viewport socket {i} holds no full board");
        assert_view_matches(&format!("viewport {i}"), c.view.as_ref().unwrap(), regions, &board);
    }
    assert!(w.metric("omcb_region_frames_encoded_total").await > 0.0);
    assert!(w.metric(r#"omcb_subscribes_total{result="ok"}"#).await >= 17.0);
}

/// The next message that is not a ToggleResult.
async fn next_frame<S>(c: &mut Client<S>) -> Msg
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match c.recv().await {
            Msg::ToggleResult(_) => continue,
            m => return m,
        }
    }
}

#[tokio::test]
async fn refused_subscribes_keep_the_socket_and_its_subscription() {
    let w = Worker::start(&flags(OPEN));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    c.subscribe(4_096, 100, SIZE).await;
    let Msg::Snapshot(s) = next_frame(&mut c).await else { panic!("a range Snapshot") };
    assert_eq!((s.range_first, s.range_count, s.region_size), (4_096, 2_048, 2_048));
    assert_eq!(s.checked.len(), 256);

    let refusals: [(Subscribe, Code); 4] = [
        (Subscribe { first: 0, count: view::MAX_SUBSCRIBE + 1 }, Code::TooLarge),
        (Subscribe { first: 0, count: u32::MAX }, Code::TooLarge),
        (Subscribe { first: SIZE, count: 10 }, Code::BadMessage),
        (Subscribe { first: u32::MAX, count: 10 }, Code::BadMessage),
    ];
    for (sub, code) in refusals {
        c.send_msg(client_message::Msg::Subscribe(sub)).await;
        let Msg::Error(e) = next_frame(&mut c).await else { panic!("an Error for {sub:?}") };
        assert_eq!(e.code, code as i32, "{sub:?}: {}", e.message);
    }
    // A first sent as a varint wider than 32 bits reads as 4294967295.
    // ClientMessage field 3 (length 8): Subscribe{first: 2^32 + 5, count: 10}.
    let wide = vec![0x1a, 0x08, 0x08, 0x85, 0x80, 0x80, 0x80, 0x10, 0x10, 0x0a];
    c.ws.send(tokio_tungstenite::tungstenite::Message::Binary(wide.into())).await.unwrap();
    let Msg::Error(e) = next_frame(&mut c).await else { panic!("an Error for a wide first") };
    assert_eq!(e.code, Code::BadMessage as i32, "{}", e.message);

    // Still open and still subscribed to region 2: a change there comes as
    // its region frame, one elsewhere does not come at all.
    let mut other = connect(&w.ws_url("")).await;
    other.recv().await;
    assert!(other.set(10, true).await.accepted);
    assert!(other.set(5_000, true).await.accepted);
    let Msg::Batch(b) = next_frame(&mut c).await else { panic!("a region frame") };
    assert_eq!(b.region, Some(2));
    assert_eq!(omcb_proto::delta::decode(&b.checked).unwrap(), vec![5_000]);
    assert_eq!((b.from_seq, b.to_seq), (1, 2), "the region's chain covers seq 1 too");
    assert_eq!(c.view.as_ref().unwrap().is_checked(5_000), Some(true));
}

#[tokio::test]
async fn a_subscribe_with_count_0_returns_the_socket_to_the_full_board() {
    let w = Worker::start(&flags(OPEN));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    c.subscribe(0, 2_000, SIZE).await;
    assert!(matches!(next_frame(&mut c).await, Msg::Snapshot(Snapshot { range_count: 2_048, .. })));
    // Scrolling inside the same region sends nothing; into the next one,
    // only that region's Snapshot.
    c.subscribe(100, 1_900, SIZE).await;
    c.subscribe(1_000, 2_000, SIZE).await;
    let Msg::Snapshot(s) = next_frame(&mut c).await else { panic!("a range Snapshot") };
    assert_eq!((s.range_first, s.range_count), (2_048, 2_048));
    c.subscribe(0, 0, SIZE).await;
    let Msg::Snapshot(s) = next_frame(&mut c).await else { panic!("a full Snapshot") };
    assert_eq!((s.range_count, s.checked.len()), (0, 12_500));
    let mut other = connect(&w.ws_url("")).await;
    other.recv().await;
    assert!(other.set(90_000, true).await.accepted);
    let Msg::Batch(b) = next_frame(&mut c).await else { panic!("a full Batch") };
    assert_eq!((b.region, b.counts_only, b.checked_count), (None, false, 1));
    assert!(c.board.as_ref().unwrap().is_checked(90_000));
    // Another count = 0 on the full board changes nothing: the next frame
    // is the next change's Batch.
    c.subscribe(0, 0, SIZE).await;
    assert!(other.set(1, true).await.accepted);
    let Msg::Batch(b) = next_frame(&mut c).await else { panic!("a full Batch") };
    assert_eq!(omcb_proto::delta::decode(&b.checked).unwrap(), vec![1]);
}

/// A subscribed socket that stops reading falls behind `--send-queue` and,
/// when it reads again, gets a range Snapshot of its whole range (not the
/// backlog, not the full board) and converges; a `Resync` brings one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_or_resyncing_viewport_socket_gets_a_range_snapshot_of_its_range() {
    let open = OPEN.replace("--batch-ms 20", "--batch-ms 2");
    let w = Worker::start(&flags(&format!(
        "{open} --send-queue 2 --socket-send-buffer 4096 --send-timeout 60s"
    )));
    let mut slow = common::connect_small_buffer(w.addr, "/ws").await;
    slow.recv().await;
    slow.subscribe(0, 65_536, SIZE).await; // regions 0..32
    assert!(matches!(
        next_frame(&mut slow).await,
        Msg::Snapshot(Snapshot { range_count: 65_536, .. })
    ));
    let mut fast = connect(&w.ws_url("")).await;
    fast.recv().await;
    // Thousands of changes inside its range while it reads nothing: its
    // region frames back up past 2 queued and are dropped for a Snapshot.
    let mut rng = XorShift64::new(3);
    for _ in 0..120 {
        let mut last = 0;
        for _ in 0..200 {
            let r = rng.next_u64();
            last = fast.toggle((r % 65_536) as u32, r >> 63 == 1).await;
        }
        assert!(fast.result_for(last).await.accepted);
    }
    let changes = w.metric(r#"omcb_toggles_total{outcome="changed"}"#).await as u64;
    w.stats_at(changes).await;
    let board = truth(&w).await;
    let regions = 0..32;
    let deadline = std::time::Instant::now() + omcb_testkit::WAIT;
    while slow.view.as_ref().is_none_or(|v| v.counts_seq < board.seq) {
        assert!(std::time::Instant::now() < deadline, "the slow viewport did not catch up");
        slow.next().await.expect("the socket stays open");
    }
    assert!(w.metric(r#"omcb_snapshots_sent_total{reason="lagged"}"#).await >= 1.0);
    assert!(slow.snapshots >= 3, "a range Snapshot replaced the backlog");
    assert_eq!(slow.gaps, 0);
    assert_view_matches("slow viewport", slow.view.as_ref().unwrap(), regions.clone(), &board);

    // Frames already on the way (a late counts frame) come first.
    slow.send_msg(client_message::Msg::Resync(omcb_proto::v1::Resync {})).await;
    let s = loop {
        if let Msg::Snapshot(s) = next_frame(&mut slow).await {
            break s;
        }
    };
    assert_eq!((s.range_first, s.range_count, s.seq), (0, 65_536, board.seq));
}

/// A `Subscribe` sent right behind the upgrade, before the socket's start:
/// the start (a full Snapshot) comes first, then the range Snapshot.
#[tokio::test]
async fn a_subscribe_before_the_start_is_served_after_it() {
    let w = Worker::start(&flags(OPEN));
    for _ in 0..20 {
        let mut c = connect(&w.ws_url("")).await;
        c.subscribe(99_999, 1, SIZE).await;
        assert!(matches!(c.recv().await, Msg::Snapshot(Snapshot { range_count: 0, .. })));
        let Msg::Snapshot(s) = c.recv().await else { panic!("a range Snapshot") };
        assert_eq!((s.range_first, s.range_count), (98_304, 1_696));
        assert_eq!(s.checked.len(), 212);
    }
}

/// A socket opened with `/ws?first=F&count=N` (a subscription at connect)
/// starts with a range Snapshot of that range, deflated when it asked, never
/// a full Snapshot, also when its `since` and `epoch` would let it resume;
/// then it gets region and counts frames only and converges in its range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_subscribed_at_connect_starts_with_its_range_snapshot_and_converges() {
    let w = Worker::start(&flags(OPEN));
    let mut toggler = connect(&w.ws_url("")).await;
    toggler.recv().await;
    for i in [10, 5_000, 50_000] {
        assert!(toggler.set(i, true).await.accepted);
    }
    let stats = w.stats_at(3).await;
    let (epoch, seq) = (stats["epoch"].as_u64().unwrap(), stats["seq"].as_u64().unwrap());
    // (query, first, count, deflated): the range Snapshot each one starts with.
    let cases = [
        ("?first=4096&count=100".to_owned(), 4_096, 100, false),
        ("?first=49000&count=2000&snapshot=deflate".to_owned(), 49_000, 2_000, true),
        (format!("?since={seq}&epoch={epoch}&first=0&count=2000&snapshot=deflate"), 0, 2_000, true),
        ("?first=99999&count=65536".to_owned(), 99_999, 65_536, false),
    ];
    let mut sockets = Vec::new();
    for (query, first, count, deflated) in cases {
        let regions = view::subscription(first, count, SIZE).unwrap().unwrap();
        let mut c = connect(&w.ws_url(&query)).await;
        let mut v = View::new();
        v.subscribe(Some(&regions));
        c.view = Some(v);
        let Msg::Snapshot(s) = c.next_any().await.unwrap() else {
            panic!("{query}: a Snapshot first")
        };
        let (range_first, range_count) = view::boxes(&regions, SIZE);
        assert_eq!(
            (s.range_first, s.range_count, s.seq),
            (range_first, range_count, seq),
            "{query}"
        );
        assert_eq!(s.checked.is_empty(), deflated, "{query}: deflated only when asked");
        assert_eq!(c.snapshots, 1);
        assert_view_matches(&query, c.view.as_ref().unwrap(), regions.clone(), &truth(&w).await);
        sockets.push((query, regions, c));
    }
    let (stop, _) = tokio::sync::watch::channel(false);
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|(query, regions, mut c)| {
            let mut stop = stop.subscribe();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = async { drop(stop.wait_for(|s| *s).await) } => return (query, regions, c),
                        m = c.next() => match m.expect("the socket stays open") {
                            Msg::Snapshot(s) => panic!("{query}: another Snapshot at {}", s.seq),
                            Msg::Batch(b) => assert!(
                                b.region.is_some() || b.counts_only,
                                "{query}: a full Batch {}..={}", b.from_seq, b.to_seq
                            ),
                            _ => {}
                        },
                    }
                }
            })
        })
        .collect();
    uniform_load(&mut toggler, 4_000, 11).await;
    stop.send_replace(true);
    let changes = w.metric(r#"omcb_toggles_total{outcome="changed"}"#).await as u64;
    w.stats_at(changes).await;
    let board = truth(&w).await;
    for r in readers {
        let (query, regions, mut c) = r.await.unwrap();
        let deadline = std::time::Instant::now() + omcb_testkit::WAIT;
        while c.view.as_ref().is_none_or(|v| v.counts_seq < board.seq) {
            assert!(std::time::Instant::now() < deadline, "{query} did not reach the end");
            c.next().await.expect("the socket stays open");
        }
        assert_eq!((c.gaps, c.snapshots), (0, 1), "{query}");
        assert!(c.board.is_none(), "{query}: no full board");
        assert_view_matches(&query, c.view.as_ref().unwrap(), regions, &board);
    }
    assert_eq!(w.metric(r#"omcb_snapshots_sent_total{reason="connect"}"#).await, 5.0);
}

/// A subscription at connect is validated as a `Subscribe` (the same cap,
/// the same words) and a bad one is refused before the upgrade with HTTP
/// 400, as are a half or a non-number; `count=0` is the full board.
#[tokio::test]
async fn a_bad_subscription_at_connect_is_refused_with_400() {
    let w = Worker::start(&flags(OPEN));
    let refused = [
        ("?first=0&count=65537", "at most 65536 boxes"),
        ("?first=0&count=4294967296", "at most 65536 boxes, not 4294967295"),
        ("?first=100000&count=10", "outside a board of 100000"),
        ("?first=99999999999&count=10", "box 4294967295 is outside"),
        ("?first=0", "first and count go together"),
        ("?count=10&snapshot=deflate", "first and count go together"),
        ("?first=x&count=10", "first must be a whole number"),
        ("?first=0&count=-1", "count must be a whole number"),
        ("?first=0&count=", "count must be a whole number"),
    ];
    for (query, why) in refused {
        let err = tokio_tungstenite::connect_async(w.ws_url(query)).await.expect_err(query);
        let tokio_tungstenite::tungstenite::Error::Http(resp) = err else {
            panic!("{query}: {err}")
        };
        assert_eq!(resp.status(), 400, "{query}");
        let body = String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap();
        assert!(body.contains(why), "{query}: {body}");
    }
    assert_eq!(w.metric(r#"omcb_subscribes_total{result="too_large"}"#).await, 2.0);
    assert_eq!(w.metric(r#"omcb_subscribes_total{result="out_of_range"}"#).await, 2.0);
    let mut c = connect(&w.ws_url("?first=0&count=0")).await;
    let Msg::Snapshot(s) = c.recv().await else { panic!("a Snapshot") };
    assert_eq!((s.range_count, s.checked.len()), (0, 12_500), "count=0: the full board");
}
