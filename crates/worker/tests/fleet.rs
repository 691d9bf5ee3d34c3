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
    format!("--redis {} {OPEN}", redis.url())
}

/// Sends `n` toggles on boxes `0..hot` in windows of 50 and returns every answer.
async fn hammer(
    mut c: Client,
    seed: u64,
    n: usize,
    hot: u32,
) -> (Client, Vec<(u32, ToggleResult)>) {
    // Deterministic, so a failure replays.
    let mut rng = omcb_proto::rng::XorShift64::new(seed);
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
    let redis = RedisServer::start().unwrap();
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
    // Counters are copied on the hub's tick: wait for them to include the toggle.
    poll("toggle counted", || async { (w.metric(&series("toggle")).await >= 1.0).then_some(()) })
        .await;
    let before = (w.metric(&series("toggle")).await, w.metric(&series("snapshot")).await);
    for _ in 0..50 {
        api_state(w.addr).await;
        assert_eq!(http_get(w.addr, "/", &[]).await.status, 200);
    }
    for _ in 0..20 {
        let mut c = connect(&w.ws_url("")).await;
        assert!(matches!(c.recv().await, Msg::Snapshot(_)));
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // two ticks, so the counters are current
    let after = (w.metric(&series("toggle")).await, w.metric(&series("snapshot")).await);
    assert_eq!(before, after, "page loads and connects issued Redis commands");
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
    let mut redis = RedisServer::start_with(RedisOptions { aof: true }).unwrap();
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
    let deadline = Instant::now() + WAIT;
    while !clients[1].set(901, true).await.accepted {
        assert!(Instant::now() < deadline, "toggles never accepted again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_converged(&redis, &mut clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_redis_means_a_new_epoch_and_every_client_ends_on_the_new_board() {
    let mut redis = RedisServer::start().unwrap();
    let f = fleet_flags(&redis);
    let workers: Vec<Worker> = (0..2).map(|_| Worker::start(&flags(&f))).collect();
    let mut clients = clients_on(&workers, 1).await;
    let old_epoch = clients[0].board.as_ref().unwrap().epoch;
    for i in 0..10 {
        assert!(clients[0].set(i, true).await.accepted);
    }
    redis.restart_empty().unwrap();
    // Every client gets a Snapshot of a new epoch.
    for c in clients.iter_mut() {
        loop {
            if let Msg::Snapshot(s) = c.recv().await
                && s.epoch != old_epoch
            {
                break;
            }
        }
    }
    let new_epoch = clients[0].board.as_ref().unwrap().epoch;
    assert_eq!(
        clients[1].board.as_ref().unwrap().epoch,
        new_epoch,
        "both workers agree on the new board"
    );
    assert!(clients[1].set(500, true).await.accepted);
    assert_converged(&redis, &mut clients).await;
    assert_eq!(clients[0].board.as_ref().unwrap().checked_count, 1, "the new board starts empty");
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
