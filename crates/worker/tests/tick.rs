//! The tick follows its budgets (`tick.rs`): under an egress budget below
//! what `--batch-ms` ticks would send, longer ticks hold the budget while
//! every client still converges and none is dropped to a snapshot; and the
//! tick never grows past what `--latency-budget` allows.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Worker, api_state, connect, flags, inflate_snapshot, poll};
use omcb_proto::Board;
use omcb_proto::v1::server_message::Msg;

/// Flags that let one test process toggle as fast as it likes.
const OPEN: &str = "--board-size 1000 --toggle-rate 10000 --toggle-burst 10000 --abuse-burst 10000 \
     --ip-toggle-rate 0 --ip-connect-rate 0 --ip-snapshot-rate 0 --max-connections-per-ip 0";

/// Clients that read everything they are sent (applying it to their board)
/// until `stop`, then hand their boards back.
fn readers(
    clients: Vec<Client>,
    stop: &tokio::sync::watch::Sender<bool>,
) -> Vec<tokio::task::JoinHandle<Client>> {
    clients
        .into_iter()
        .map(|mut c| {
            let mut stop = stop.subscribe();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return c,
                        m = c.next() => { m.expect("the socket stays open"); }
                    }
                }
            })
        })
        .collect()
}

/// Toggles boxes `0..4` in turn (a hot spot: a longer tick coalesces them)
/// at about `rate` per second until `stop`; returns the last seq accepted.
fn toggler(
    mut c: Client,
    rate: f64,
    stop: &tokio::sync::watch::Sender<bool>,
) -> tokio::task::JoinHandle<u64> {
    let stop = stop.subscribe();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let (mut i, mut seq) = (0u32, 0);
        while !*stop.borrow() {
            every.tick().await;
            let r = c.set(i % 4, (i / 4) % 2 == 0).await;
            assert!(r.accepted, "{r:?}");
            seq = seq.max(r.seq);
            i += 1;
        }
        seq
    })
}

async fn connected(w: &Worker, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let mut c = connect(&w.ws_url("")).await;
        assert!(matches!(c.recv().await, Msg::Snapshot(_)));
        clients.push(c);
    }
    clients
}

/// An egress budget a quarter of what 20 ms ticks send to 100 sockets: the
/// tick grows until the bytes fit, bytes/s land within 10% of the budget,
/// and every client converges without a lagged snapshot. On a worker whose
/// tick ignores the budget (before `tick.rs`), the bytes are ~4x the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_budget_below_demand_is_held_by_longer_ticks_and_every_client_converges() {
    const BUDGET: f64 = 25_000.0;
    let w = Worker::start(&flags(&format!(
        "{OPEN} --batch-ms 20 --latency-budget 2s --egress-budget {BUDGET}"
    )));
    let clients = connected(&w, 100).await;
    let (stop_tx, _) = tokio::sync::watch::channel(false);
    let readers = readers(clients, &stop_tx);
    let toggles = toggler(connect(&w.ws_url("")).await, 200.0, &stop_tx);

    // Demand at 20 ms ticks is ~100 KB/s (50 batches of ~20 bytes to 100
    // sockets a second): the tick must grow well past --batch-ms.
    poll("the tick to grow for the egress budget", || async {
        (w.metric("omcb_tick_seconds").await >= 0.06).then_some(())
    })
    .await;
    // A rate is measured over time: a few of the law's one-second windows
    // to settle, then five seconds of bytes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (b0, t0) = (w.metric("omcb_bytes_sent_total").await, Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (b1, t1) = (w.metric("omcb_bytes_sent_total").await, Instant::now());
    let rate = (b1 - b0) / (t1 - t0).as_secs_f64();
    let tick = w.metric("omcb_tick_seconds").await;
    eprintln!("egress {rate:.0} B/s, budget {BUDGET}, tick {tick} s");
    assert!(
        (rate - BUDGET).abs() <= 0.1 * BUDGET,
        "{rate:.0} B/s against a budget of {BUDGET} (tick {tick} s)"
    );

    stop_tx.send_replace(true);
    let last = toggles.await.unwrap();
    // Every client converges to the worker's board, by batches alone.
    let truth = poll("the replica to publish the last toggle", || async {
        let (s, _) = api_state(w.addr).await;
        (s.seq >= last).then_some(s)
    })
    .await;
    let truth = Board::from_snapshot(&inflate_snapshot(&truth)).unwrap();
    for r in readers {
        let mut c = r.await.unwrap();
        c.until_seq(truth.seq).await;
        let board = c.board.as_ref().unwrap();
        assert_eq!(board.seq, truth.seq);
        for i in 0..1000 {
            assert_eq!(board.is_checked(i), truth.is_checked(i), "box {i}");
        }
        assert_eq!((c.snapshots, c.gaps), (1, 0), "only the connect snapshot, no gap");
    }
    assert_eq!(w.metric(r#"omcb_snapshots_sent_total{reason="lagged"}"#).await, 0.0);
}

/// An egress budget no tick can meet: the tick stops at the latency
/// budget's ceiling (the budget minus the feed and fan-out time), and the
/// worker's own measure of delivery stays within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tick_never_grows_past_the_latency_budget() {
    let w = Worker::start(&flags(&format!(
        "{OPEN} --batch-ms 20 --latency-budget 300ms --egress-budget 100"
    )));
    let clients = connected(&w, 20).await;
    let (stop_tx, _) = tokio::sync::watch::channel(false);
    let readers = readers(clients, &stop_tx);
    let toggles = toggler(connect(&w.ws_url("")).await, 100.0, &stop_tx);
    // Doubling from 20 ms each second: at the ceiling within ~5 s.
    let tick = poll("the tick to reach its ceiling", || async {
        let tick = w.metric("omcb_tick_seconds").await;
        (tick >= 0.15).then_some(tick)
    })
    .await;
    assert!(tick <= 0.3, "tick {tick} s past the 300 ms latency budget");
    // Stays there while the egress budget still presses.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let tick = w.metric("omcb_tick_seconds").await;
        assert!((0.02..=0.3).contains(&tick), "tick {tick} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send_replace(true);
    toggles.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }
    let count = w.metric("omcb_delivery_seconds_count").await;
    let within = w.metric(r#"omcb_delivery_seconds_bucket{le="0.5"}"#).await;
    assert!(count >= 10.0, "{count} deliveries measured");
    assert!(within >= 0.9 * count, "{within} of {count} deliveries within 500 ms");
}
