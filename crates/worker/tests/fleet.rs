//! Fleet mode against a real redis-server: workers as replicas of one board,
//! convergence across workers, worker and Redis failures, script reloads.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use omcb_proto::v1::{Reason, ToggleResult, server_message::Msg};
use omcb_testkit::{RedisOptions, RedisServer};

const OPEN: &str = "--board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms 20";

fn fleet_flags(redis: &RedisServer) -> String {
    let ca = redis.ca_file().map(|f| format!("--redis-ca-file {}", f.display()));
    format!("--redis {} {} {OPEN}", redis.url(), ca.unwrap_or_default())
}

/// Sends `n` toggles on boxes `0..hot` in windows of 50 and returns every answer.
async fn hammer(
    mut c: Client,
    seed: u64,
    n: usize,
    hot: u32,
) -> (Client, Vec<(u32, ToggleResult)>) {
    // Deterministic, so a failure replays.
    let mut rng = omcb_testkit::rng::XorShift64::new(seed);
    let mut results = Vec::new();
    let mut sent = 0;
    while sent < n {
        let mut ids = Vec::new();
        for _ in 0..50.min(n - sent) {
            let index = (rng.next_u64() % u64::from(hot)) as u32;
            ids.push((index, c.toggle(index, rng.next_u64().is_multiple_of(2)).await));
            sent += 1;
        }
        for (index, id) in ids {
            results.push((index, c.result_for(id).await));
        }
    }
    (c, results)
}

/// The board as Redis holds it.
fn redis_board(redis: &RedisServer, size: u32) -> (omcb_proto::bits::Bits, u64, u64) {
    let bits = redis.command(&["GET", "{main}:bits"]).unwrap();
    let bits = omcb_proto::bits::from_bytes(bits.as_bytes().unwrap_or_default(), size).unwrap();
    let seq =
        redis.command(&["GET", "{main}:seq"]).unwrap().as_str().map_or(0, |s| s.parse().unwrap());
    let count =
        redis.command(&["GET", "{main}:count"]).unwrap().as_str().map_or(0, |s| s.parse().unwrap());
    (bits, seq, count)
}

/// Every client reaches Redis's seq and holds exactly Redis's board.
async fn assert_converged(redis: &RedisServer, clients: &mut [Client]) {
    let (bits, seq, count) = redis_board(redis, 1000);
    for (i, c) in clients.iter_mut().enumerate() {
        c.until_seq(seq).await;
        let board = c.board.as_ref().unwrap();
        assert_eq!(board.seq, seq, "client {i} seq");
        assert!(board.checked == bits, "client {i} bits differ from Redis");
        assert_eq!(u64::from(board.checked_count), count, "client {i} count");
    }
}

/// Every accepted change is in the final state unless a later seq overwrote it.
fn assert_no_accepted_toggle_lost(redis: &RedisServer, results: &[(u32, ToggleResult)]) {
    let (bits, _, _) = redis_board(redis, 1000);
    let mut last: HashMap<u32, &ToggleResult> = HashMap::new();
    for (index, r) in results.iter().filter(|(_, r)| r.accepted && r.seq > 0) {
        if last.get(index).is_none_or(|prev| prev.seq < r.seq) {
            last.insert(*index, r);
        }
    }
    assert!(!last.is_empty());
    for (index, r) in last {
        assert_eq!(bits[index as usize], r.checked, "box {index}: accepted seq {} lost", r.seq);
    }
}

async fn clients_on(workers: &[Worker], per_worker: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for w in workers {
        for _ in 0..per_worker {
            let mut c = connect(&w.ws_url("")).await;
            assert!(matches!(c.recv().await, Msg::Snapshot(_)));
            clients.push(c);
        }
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_converge_under_concurrent_toggles_on_a_hot_region() {
    converge_under_concurrent_toggles(RedisServer::start().unwrap()).await;
}

/// The same over `rediss://` with an ACL user's password, against a Redis
/// that listens for TLS only: the fleet path works over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_converge_over_rediss_with_a_password() {
    let user = Some(("omcb".to_string(), "fleet-pw".to_string()));
    let opts = RedisOptions { tls: true, user, ..Default::default() };
    converge_under_concurrent_toggles(RedisServer::start_with(opts).unwrap()).await;
}

async fn converge_under_concurrent_toggles(redis: RedisServer) {
    let workers: Vec<Worker> =
        (0..3).map(|_| Worker::start(&flags(&fleet_flags(&redis)))).collect();
    let clients = clients_on(&workers, 2).await;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(hammer(c, 7 + i as u64, 1500, 48)))
        .collect();
    let mut clients = Vec::new();
    let mut results = Vec::new();
    for t in tasks {
        let (c, r) = t.await.unwrap();
        clients.push(c);
        results.extend(r);
    }
    assert!(results.iter().all(|(_, r)| r.accepted || r.reason != Reason::Unavailable as i32));
    assert_converged(&redis, &mut clients).await;
    assert_no_accepted_toggle_lost(&redis, &results);
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.gaps, 0, "client {i} saw a gap while nothing failed");
        assert_eq!(c.snapshots, 1, "client {i} needed another snapshot while nothing failed");
    }
    // Every worker's replica is at Redis's seq too.
    let (_, seq, _) = redis_board(&redis, 1000);
    for w in &workers {
        assert_eq!(w.stats_at(seq).await["seq"], seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_loads_cost_redis_nothing() {
    let redis = RedisServer::start().unwrap();
    let w = Worker::start(&flags(&fleet_flags(&redis)));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    c.set(1, true).await;
    let series = |p: &str| format!("omcb_store_commands_total{{purpose=\"{p}\"}}");
    // The store counts a command when its reply arrives, before the toggle's answer.
    assert!(w.metric(&series("toggle")).await >= 1.0, "the toggle was counted");
    let before = (w.metric(&series("toggle")).await, w.metric(&series("snapshot")).await);
    for _ in 0..50 {
        api_state(w.addr).await;
        assert_eq!(http_get(w.addr, "/", &[]).await.status, 200);
    }
    for _ in 0..20 {
        let mut c = connect(&w.ws_url("")).await;
        assert!(matches!(c.recv().await, Msg::Snapshot(_)));
    }
    let after = (w.metric(&series("toggle")).await, w.metric(&series("snapshot")).await);
    assert_eq!(before, after, "page loads and connects issued Redis commands");
}

/// The store reports its own round trips and failures, and the hub how far
/// its replica trails the store (a change's commit in Redis to its
/// application), so an operator sees Redis latency, errors and feed lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_latency_errors_and_feed_lag_are_exported() {
    let mut redis = RedisServer::start().unwrap();
    let w = Worker::start(&flags(&fleet_flags(&redis)));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    for i in 0..5 {
        assert!(c.set(i, true).await.accepted);
    }
    let set_calls = w.metric("omcb_store_command_seconds_count{script=\"set\"}").await;
    assert!(set_calls >= 5.0, "set.lua round trips timed: {set_calls}");
    poll("the feed lag of the five changes", || async {
        (w.metric("omcb_feed_lag_seconds_count").await >= 5.0).then_some(())
    })
    .await;
    // Each change travelled through Redis and waited at most a tick (20 ms
    // here): far under 5 s on average, whatever the machine's load.
    let (sum, count) = (
        w.metric("omcb_feed_lag_seconds_sum").await,
        w.metric("omcb_feed_lag_seconds_count").await,
    );
    assert!(sum / count < 5.0, "feed lag {sum} s over {count} changes");
    let read_at = w.metric("omcb_feed_last_read_timestamp_seconds").await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    assert!((now.as_secs_f64() - read_at).abs() < 10.0, "last feed read at {read_at}");
    let unavailable = "omcb_store_errors_total{kind=\"unavailable\"}";
    assert_eq!(w.metric(unavailable).await, 0.0, "no store errors while Redis is up");

    redis.kill().unwrap();
    assert_eq!(c.set(10, true).await.reason, Reason::Unavailable as i32);
    poll("store errors counted", || async { (w.metric(unavailable).await >= 1.0).then_some(()) })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_clients_resume_elsewhere_and_it_catches_up_on_restart() {
    let redis = RedisServer::start().unwrap();
    let f = fleet_flags(&redis);
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::start(&flags(&f))).collect();
    let mut clients = clients_on(&workers, 1).await;
    let orphan = clients.remove(0);
    let traffic: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(hammer(c, 99 + i as u64, 1500, 64)))
        .collect();
    let mut orphan = orphan;
    orphan.until_seq(50).await;
    workers[0].kill9();
    assert_eq!(orphan.until_closed().await, Ended::Eof);
    // It reconnects to another worker with ?since: batches, no snapshot.
    let (since, epoch) = (orphan.seq(), orphan.board.as_ref().unwrap().epoch);
    let mut resumed = connect(&workers[1].ws_url(&format!("?since={since}&epoch={epoch}"))).await;
    resumed.board = orphan.board.take();
    assert!(matches!(resumed.recv().await, Msg::Batch(_)), "resume sends batches");
    let mut clients = vec![resumed];
    let mut results = Vec::new();
    for t in traffic {
        let (c, r) = t.await.unwrap();
        clients.push(c);
        results.extend(r);
    }
    assert_converged(&redis, &mut clients).await;
    assert_no_accepted_toggle_lost(&redis, &results);
    assert_eq!(clients[0].snapshots, 0, "the resumed client needed no snapshot");
    // The killed worker comes back and catches up from Redis.
    workers[0] = Worker::start(&flags(&f));
    let (_, seq, _) = redis_board(&redis, 1000);
    assert_eq!(workers[0].stats_at(seq).await["seq"], seq);
    let mut fresh = clients_on(&workers[..1], 1).await;
    assert_converged(&redis, &mut fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_with_aof_and_workers_recover_on_their_own() {
    let mut redis =
        RedisServer::start_with(RedisOptions { aof: true, ..Default::default() }).unwrap();
    let f = fleet_flags(&redis);
    let workers: Vec<Worker> = (0..2).map(|_| Worker::start(&flags(&f))).collect();
    let mut clients = clients_on(&workers, 1).await;
    let mut toggler = clients.pop().unwrap();
    for i in 0..20 {
        assert!(toggler.set(i, true).await.accepted);
    }
    // A clean restart (SIGTERM: the AOF is flushed): nothing acknowledged is lost.
    redis.restart().unwrap();
    let mut results = Vec::new();
    for i in 20..60u32 {
        let r = toggler.set(i, true).await;
        results.push((i, r));
    }
    let accepted = results.iter().filter(|(_, r)| r.accepted).count();
    assert!(accepted > 0, "toggles succeed again after the restart");
    clients.push(toggler);
    assert_converged(&redis, &mut clients).await;
    assert_no_accepted_toggle_lost(&redis, &results);

    // Redis down: toggles answer UNAVAILABLE (promptly, not hanging), /readyz says 503.
    redis.kill().unwrap();
    let started = Instant::now();
    let r = clients[0].set(900, true).await;
    assert!(!r.accepted);
    assert_eq!(r.reason, Reason::Unavailable as i32);
    assert!(started.elapsed() < Duration::from_secs(5));
    poll("readyz 503", || async {
        (http_get(workers[0].addr, "/readyz", &[]).await.status == 503).then_some(())
    })
    .await;
    // Reads keep working from the replica.
    assert_eq!(api_state(workers[0].addr).await.0.checked_count, 60);
    redis.start_again().unwrap();
    poll("readyz 200", || async {
        (http_get(workers[0].addr, "/readyz", &[]).await.status == 200).then_some(())
    })
    .await;
    // The worker reconnects with backoff: retry until a toggle is accepted.
    set_acked(&mut clients[1], 901, true).await;
    assert_converged(&redis, &mut clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_under_traffic_keeps_toggles_succeeding() {
    let redis = RedisServer::start().unwrap();
    let w = Worker::start(&flags(&fleet_flags(&redis)));
    let mut clients = clients_on(std::slice::from_ref(&w), 2).await;
    let c1 = clients.pop().unwrap();
    let traffic = tokio::spawn(hammer(c1, 5, 3000, 200));
    for _ in 0..20 {
        redis.command(&["SCRIPT", "FLUSH"]).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (c1, results) = traffic.await.unwrap();
    let refused: Vec<_> = results.iter().filter(|(_, r)| !r.accepted).collect();
    assert!(refused.is_empty(), "a flushed script is reloaded, never refused: {refused:?}");
    clients.push(c1);
    assert_converged(&redis, &mut clients).await;
}

/// Reads until the client holds a board of an epoch other than `old` (only a
/// Snapshot changes a client's epoch); returns that epoch.
async fn until_new_epoch(c: &mut Client, old: u64) -> u64 {
    loop {
        match c.board.as_ref().map(|b| b.epoch) {
            Some(e) if e != old => return e,
            _ => c.recv().await,
        };
    }
}

/// The board's epoch in Redis.
fn redis_epoch(redis: &RedisServer) -> u64 {
    let epoch = redis.command(&["HGET", "{main}:config", "epoch"]).unwrap();
    epoch.as_str().unwrap().parse().unwrap()
}

/// Sets box `index` to `value`, again while the worker answers UNAVAILABLE
/// (Redis away, or the board being restored), until it is acknowledged.
async fn set_acked(c: &mut Client, index: u32, value: bool) {
    // A loop, not `poll`: an async closure holding `c` makes the spawned
    // callers' futures not `Send` (rustc's higher-ranked lifetime limits).
    let deadline = Instant::now() + WAIT;
    loop {
        let r = c.set(index, value).await;
        if r.accepted {
            return;
        }
        assert_eq!(r.reason, Reason::Unavailable as i32, "box {index}: refused {r:?}");
        assert!(Instant::now() < deadline, "box {index}: never acknowledged again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Flips random boxes of `boxes`, which this client alone touches, `n` times,
/// each until acknowledged; returns the value each box was last acknowledged
/// with, which the board must show whatever Redis lost meanwhile.
async fn own_boxes(
    mut c: Client,
    seed: u64,
    boxes: std::ops::Range<u32>,
    n: usize,
) -> (Client, HashMap<u32, bool>) {
    let mut rng = omcb_testkit::rng::XorShift64::new(seed);
    let mut acked = HashMap::new();
    for _ in 0..n {
        let index = boxes.start + (rng.next_u64() % u64::from(boxes.end - boxes.start)) as u32;
        let value = !acked.get(&index).copied().unwrap_or(false);
        set_acked(&mut c, index, value).await;
        acked.insert(index, value);
    }
    (c, acked)
}

/// Every box holds the value it was last acknowledged with.
fn assert_every_ack_on_board(redis: &RedisServer, acked: &HashMap<u32, bool>) {
    let (bits, _, _) = redis_board(redis, 1000);
    assert!(!acked.is_empty());
    let lost: Vec<_> = acked.iter().filter(|&(&i, &v)| bits[i as usize] != v).collect();
    assert!(lost.is_empty(), "{} acknowledged toggles lost: {lost:?}", lost.len());
}

/// Issue 8, finding 1: Redis restored from older files (a backup, an AOF that
/// lost its last second, a lagging replica promoted) lost acknowledged
/// changes but keeps the epoch in its data, and reuses their seqs for other
/// changes. The board comes back restored from the workers' replicas, under a
/// new epoch: every acknowledged toggle stays (those the restore lost, and
/// those made on the older data before a worker noticed), and a client
/// resuming with the old epoch and a seq the restore lost takes a Snapshot,
/// never the batches that now carry those seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restored_from_older_files_keeps_every_acknowledged_toggle_under_a_new_epoch() {
    let mut redis = RedisServer::start().unwrap();
    let f = fleet_flags(&redis);
    let workers: Vec<Worker> = (0..2).map(|_| Worker::start(&flags(&f))).collect();
    let mut clients = clients_on(&workers, 1).await;
    let mut leaving = clients.pop().unwrap(); // on worker 1
    let mut toggler = clients.pop().unwrap(); // on worker 0
    let epoch = toggler.board.as_ref().unwrap().epoch;
    let mut acked = HashMap::new();
    for i in 0..20 {
        assert!(toggler.set(i, true).await.accepted);
        acked.insert(i, true);
    }
    redis.command(&["SAVE"]).unwrap();
    let rdb = redis.dir().join("dump.rdb");
    let saved = std::fs::read(&rdb).unwrap();
    for i in 20..40 {
        assert!(toggler.set(i, true).await.accepted);
        acked.insert(i, true);
    }
    leaving.until_seq(40).await;
    let since = leaving.seq();
    let board = leaving.board.take();
    drop(leaving);

    redis.kill().unwrap();
    std::fs::write(&rdb, saved).unwrap();
    redis.start_again().unwrap();
    // The older data has seq 20; its next changes reuse seqs 21.. for other
    // boxes, past the leaving client's seq, until a worker notices.
    for i in 500..530 {
        set_acked(&mut toggler, i, true).await;
        acked.insert(i, true);
    }
    let mut resumed = connect(&workers[1].ws_url(&format!("?since={since}&epoch={epoch}"))).await;
    resumed.board = board;
    let new_epoch = until_new_epoch(&mut resumed, epoch).await;
    assert_eq!(until_new_epoch(&mut toggler, epoch).await, new_epoch, "one new epoch");
    assert_eq!(redis_epoch(&redis), new_epoch);
    set_acked(&mut resumed, 700, true).await;
    acked.insert(700, true);
    let mut clients = vec![toggler, resumed];
    assert_converged(&redis, &mut clients).await;
    assert_every_ack_on_board(&redis, &acked);
    assert_eq!(redis_epoch(&redis), new_epoch, "restored once");
}

/// Starts `owners` clients flipping boxes of their own on `workers`, and one
/// watcher that only reads; `fault` runs once the traffic is under way. Then
/// every client ends on one new epoch, holding Redis' board, and every
/// acknowledged toggle is on it.
async fn every_ack_survives(redis: &mut RedisServer, fault: impl FnOnce(&mut RedisServer)) {
    let workers: Vec<Worker> = (0..2).map(|_| Worker::start(&flags(&fleet_flags(redis)))).collect();
    let mut clients = clients_on(&workers, 2).await;
    let epoch = clients[0].board.as_ref().unwrap().epoch;
    // Boxes the traffic never touches, only on the board before the fault.
    let mut acked = HashMap::new();
    for i in 900..930 {
        assert!(clients[0].set(i, true).await.accepted);
        acked.insert(i, true);
    }
    let watcher = clients.pop().unwrap();
    let traffic: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let boxes = i as u32 * 200..(i as u32 + 1) * 200;
            tokio::spawn(own_boxes(c, 31 + i as u64, boxes, 600))
        })
        .collect();
    poll("traffic under way", || async { (redis_board(redis, 1000).1 >= 90).then_some(()) }).await;
    fault(redis);
    let mut clients = vec![watcher];
    for t in traffic {
        let (c, a) = t.await.unwrap();
        clients.push(c);
        acked.extend(a);
    }
    let new_epoch = redis_epoch(redis);
    assert_ne!(new_epoch, epoch);
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(until_new_epoch(c, epoch).await, new_epoch, "client {i} on the new board");
    }
    assert_converged(redis, &mut clients).await;
    assert_every_ack_on_board(redis, &acked);
    assert_eq!(redis_epoch(redis), new_epoch, "restored once");
}

/// Issue 8: Redis restarted with no data under traffic. The workers' replicas
/// hold the board: the first worker to notice writes its replica back under a
/// new epoch (toggles answer UNAVAILABLE until then, rather than create an
/// empty board), and no acknowledged toggle is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_redis_is_restored_from_the_replicas_under_a_new_epoch() {
    let mut redis = RedisServer::start().unwrap();
    every_ack_survives(&mut redis, |r| r.restart_empty().unwrap()).await;
}

/// Issue 8, finding 11: `FLUSHALL` under traffic, on connections that never
/// drop. No worker takes another board's changes for its own, and no worker
/// creates an empty board: the board is restored from a replica under a new
/// epoch, every client ends on a Snapshot of it, and no acknowledged toggle is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_under_traffic_restores_the_board_under_a_new_epoch() {
    let mut redis = RedisServer::start().unwrap();
    every_ack_survives(&mut redis, |r| {
        assert_eq!(r.command(&["FLUSHALL"]).unwrap().as_str(), Some("OK"));
    })
    .await;
}

/// Calls of `cmd` since the last `CONFIG RESETSTAT`, from `INFO commandstats`.
fn redis_calls(redis: &RedisServer, cmd: &str) -> u64 {
    let info = redis.command(&["INFO", "commandstats"]).unwrap();
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// A busy board is read once per tick, not once per change: a blocking
/// `XREAD` wakes on every `XADD`, so a worker that read again at once after
/// each answer made Redis answer a read per change (issue 13, part 1). Every
/// change still reaches the clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_board_is_read_once_per_tick() {
    const TICK_MS: u64 = 200;
    let redis = RedisServer::start().unwrap();
    let args = format!(
        "--redis {} --board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms {TICK_MS}",
        redis.url()
    );
    let w = Worker::start(&flags(&args));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    redis.command(&["CONFIG", "RESETSTAT"]).unwrap();
    let started = Instant::now();
    // A change every few milliseconds for about a second: about 200, so
    // several per tick.
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(1) {
        assert_eq!(c.set(i, true).await.seq, u64::from(i) + 1);
        i += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    c.until_seq(u64::from(i)).await;
    let elapsed = started.elapsed();
    let reads = redis_calls(&redis, "xread");
    // One read per tick, plus the first change's wake-up and the read a
    // quiet board blocks in.
    let most = elapsed.as_millis() as u64 / TICK_MS + 3;
    assert!(i >= 20 && i as u64 > 3 * most, "too few changes to tell: {i}");
    assert!(reads <= most, "{reads} XREADs for {i} changes in {elapsed:?}: at most {most}");
}
