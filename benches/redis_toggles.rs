//! Toggles per second one worker pushes through Redis (set.lua via fred, with
//! many calls in flight so fred pipelines them), beside `redis-benchmark`
//! running the same script with `-P 16` against the same server in the same
//! run: the ceiling. Target: at least 0.75 of it.
//!
//! `cargo bench -p omcb-benches --bench redis_toggles -- [seconds] [in-flight]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use omcb_store::BoardConfig;
use omcb_store::redis::{RedisStore, lua};
use omcb_testkit::RedisServer;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let in_flight: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let redis = RedisServer::start().expect("redis-server");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = BoardConfig { size: 1_000_000, ..Default::default() };

    let ours = rt.block_on(async {
        let store = RedisStore::connect(&redis.url(), "main", config).await.unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let stop = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..in_flight)
            .map(|t| {
                let (store, done) = (store.clone(), done.clone());
                tokio::spawn(async move {
                    let mut rng =
                        omcb_testkit::rng::XorShift64::new(0x9e37_79b9_7f4a_7c15u64 ^ t as u64);
                    while Instant::now() < stop {
                        let x = rng.next_u64();
                        // A client's toggle carries its origin (one per task here),
                        // as the worker's do: the `a` field costs what it costs.
                        store.set((x % 1_000_000) as u32, x & 1 == 1, t as u64 + 1).await.unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let started = Instant::now();
        let mut last = 0;
        while Instant::now() < stop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = done.load(Ordering::Relaxed);
            eprint!("\romcb set.lua via fred: {:>8} toggles/s", n - last);
            last = n;
        }
        for t in tasks {
            t.await.unwrap();
        }
        eprintln!();
        done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
    });

    // The ceiling: redis-benchmark, same script by SHA, 16-deep pipelines.
    let sha = match redis.command(&["SCRIPT", "LOAD", lua::SET]).unwrap() {
        omcb_testkit::Resp::Bulk(Some(b)) => String::from_utf8(b).unwrap(),
        other => panic!("SCRIPT LOAD: {other:?}"),
    };
    let total = (ours as u64 * seconds).max(100_000).to_string();
    let port = redis.port().to_string();
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-p", &port, "-n", &total, "-P", "16", "-c", "16", "-r", "1000000", "-q", "EVALSHA",
            &sha, "9",
        ])
        .args([
            "{main}:config",
            "{main}:bits",
            "{main}:frozen",
            "{main}:count",
            "{main}:frozen_count",
        ])
        .args(["{main}:seq", "{main}:log", "{main}:checked_at", "{main}:op:bench:__rand_int__"])
        .args(["__rand_int__", "1", "100000", "60000"])
        .output()
        .expect("redis-benchmark (Debian redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    let ceiling: f64 = text
        .split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .find(|(_, unit)| unit.starts_with("requests"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("could not read redis-benchmark output: {text}"));
    println!("omcb (fred, {in_flight} in flight, 1 runtime thread): {ours:.0} toggles/s");
    println!("redis-benchmark EVALSHA set.lua -P 16 -c 16:        {ceiling:.0} calls/s");
    println!("ratio: {:.2} (target >= 0.75)", ours / ceiling);
}
