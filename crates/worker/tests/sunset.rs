//! The sunset as an operator action (`omcb admin`, issue 11 part 1): set on
//! a live board through a worker's private listener or straight to Redis,
//! learned by every worker and every connected client within a tick, kept
//! with the board, swept by one worker of a fleet. The real binary, a real
//! redis-server.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use omcb_testkit::RedisServer;

const OPEN: &str = "--board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms 20";

/// Runs `omcb admin ARGS`: its stdout (the board's settings as JSON) when it
/// succeeds, its stderr as the error when it fails.
fn admin(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_omcb")).arg("admin").args(args).output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("omcb admin prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn private(w: &Worker) -> String {
    format!("http://{}", w.metrics)
}

/// Waits until every worker's `/api/stats` and every client say
/// `freeze_after_ms` is `ms`; how long that took after `since`.
async fn all_agree(
    workers: &[Worker],
    clients: &mut [Client],
    ms: u64,
    since: Instant,
) -> Duration {
    for w in workers {
        poll("every worker's /api/stats to show the sunset", || async {
            (w.stats().await["freeze_after_ms"] == ms).then_some(())
        })
        .await;
    }
    for c in clients.iter_mut() {
        tokio::time::timeout(WAIT, c.until_freeze_after(ms)).await.expect("the client learns it");
    }
    since.elapsed()
}

/// `omcb admin` on a running three-worker fleet: a sunset started straight
/// in Redis and changed through one worker's private listener reaches every
/// worker's `/api/stats`, `omcb_freeze_after_seconds` and connected client;
/// the sweep then runs on exactly one worker (the lease holder) and freezes
/// every box checked longer than the setting; a stop reaches everyone too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_the_sunset_on_a_running_fleet() {
    let redis = RedisServer::start().unwrap();
    let args = format!("--redis {} {OPEN}", redis.url());
    let workers: Vec<Worker> = (0..3).map(|_| Worker::start(&flags(&args))).collect();
    let mut clients = Vec::new();
    for w in &workers {
        let mut c = connect(&w.ws_url("")).await;
        c.recv().await;
        assert_eq!(c.freeze_after_ms, Some(0), "no sunset yet");
        clients.push(c);
    }
    // Boxes checked before the sunset starts: they freeze once it does.
    for i in 0..10 {
        assert!(clients[0].set(i, true).await.accepted);
    }

    let url = redis.url();
    let started = Instant::now();
    let s = admin(&["--redis", &url, "sunset", "start", "10m"]).unwrap();
    assert_eq!((s["freeze_after_ms"].as_u64(), s["size"].as_u64()), (Some(600_000), Some(1000)));
    let answered = Instant::now();
    let took = all_agree(&workers, &mut clients, 600_000, answered).await;
    eprintln!("fleet agreed on the started sunset {took:?} after the command answered");
    // A tick is 20 ms here; the slack is for a busy machine. Without the
    // settings loop a worker would learn it only at its next start.
    assert!(took < Duration::from_secs(2), "the fleet took {took:?} to agree");
    assert!(started.elapsed() < Duration::from_secs(10));
    for w in &workers {
        assert_eq!(w.metric("omcb_freeze_after_seconds").await, 600.0);
    }
    let refused = admin(&["--redis", &url, "sunset", "start", "5m"]).unwrap_err();
    assert!(refused.contains("already running"), "{refused}");

    // Changed through one worker: the others learn it from Redis.
    let started = Instant::now();
    let s = admin(&["--worker", &private(&workers[1]), "sunset", "set", "150ms"]).unwrap();
    assert_eq!(s["freeze_after_ms"], 150);
    all_agree(&workers, &mut clients, 150, started).await;
    let settings = admin(&["--worker", &private(&workers[2]), "settings"]).unwrap();
    assert_eq!(settings["freeze_after_ms"], 150);

    // The sweep freezes the ten boxes, and only one worker sweeps. The
    // sweeper slept for a quarter of the old 10 minutes (5 s at most): the
    // shorter setting wakes it, so the boxes freeze well within that.
    for w in &workers {
        poll("every worker to see the ten boxes frozen", || async {
            (w.stats().await["frozen_count"] == 10).then_some(())
        })
        .await;
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "the shortened sunset froze the boxes after {took:?}");
    let ok = r#"omcb_sweeps_total{result="ok"}"#;
    let mut sweeping = Vec::new();
    for w in &workers {
        let (sweeps, held) = (w.metric(ok).await, w.metric("omcb_sweep_lease_held").await);
        sweeping.push((sweeps > 0.0, held == 1.0));
    }
    assert_eq!(
        sweeping.iter().filter(|&&(swept, held)| swept && held).count(),
        1,
        "one worker sweeps and holds the lease: {sweeping:?}"
    );
    assert!(
        sweeping.iter().filter(|&&(swept, _)| !swept).count() == 2,
        "the others never swept: {sweeping:?}"
    );

    let started = Instant::now();
    let s = admin(&["--redis", &url, "sunset", "stop"]).unwrap();
    assert_eq!(s["freeze_after_ms"], 0);
    all_agree(&workers, &mut clients, 0, started).await;
    for w in &workers {
        assert_eq!(w.metric("omcb_freeze_after_seconds").await, 0.0);
    }
    let refused = admin(&["--redis", &url, "sunset", "set", "5m"]).unwrap_err();
    assert!(refused.contains("no sunset is running"), "{refused}");
    // A mistyped board name is an error, never a new board.
    let refused =
        admin(&["--redis", &url, "--board", "mian", "sunset", "start", "1m"]).unwrap_err();
    assert!(refused.contains(r#"there is no board named "mian""#), "{refused}");
    assert_eq!(redis.command(&["EXISTS", "{mian}:config"]).unwrap(), omcb_testkit::Resp::Int(0));
}

/// The admin routes live on the private listener only: the public one
/// answers 404 and the board's setting does not move.
#[tokio::test]
async fn admin_routes_are_not_on_the_public_listener() {
    let w = Worker::start(&flags(OPEN));
    let public = format!("http://{}", w.addr);
    let refused = admin(&["--worker", &public, "sunset", "start", "10m"]).unwrap_err();
    assert!(refused.contains("404"), "{refused}");
    assert_eq!(http_get(w.addr, "/admin/settings", &[]).await.status, 404);
    assert_eq!(w.stats().await["freeze_after_ms"], 0);
    // The private listener has them.
    assert_eq!(http_get(w.metrics, "/admin/settings", &[]).await.status, 200);
    let bad = admin(&["--worker", &private(&w), "sunset", "start", "soon"]).unwrap_err();
    assert!(bad.contains("not a duration"), "{bad}");
    // A bad body is refused with the reason, and changes nothing.
    let bodies = [
        "",
        "{}",
        r#"{"freeze_after_ms": -1}"#,
        r#"{"freeze_after_ms": "10m"}"#,
        r#"{"freeze_after_ms": 4000000000000}"#,
    ];
    for body in bodies {
        let (status, answer) = post(w.metrics, "/admin/sunset", body).await;
        assert_eq!(status, 400, "{body:?}: {answer}");
        assert!(answer.contains("freeze_after_ms"), "{body:?}: {answer}");
    }
    let (status, answer) = post(w.metrics, "/admin/sunset", r#"{"freeze_after_ms": 1e99}"#).await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = post(w.metrics, "/admin/settings", "").await;
    assert_eq!(status, 405);
    assert_eq!(w.stats().await["freeze_after_ms"], 0);
}

/// The embedded store keeps the sunset in its board file, written before the
/// admin call answers: it survives a kill -9 and a clean restart, and wins
/// over `--freeze-after` (which only sets up a new board). A client that
/// resumes with `?since=` learns the setting at the end of its start.
#[tokio::test]
async fn an_embedded_sunset_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Worker::start_in(dir.path(), &flags(OPEN));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    let s = admin(&["--worker", &private(&w), "sunset", "start", "10m"]).unwrap();
    assert_eq!(s["freeze_after_ms"], 600_000);
    assert_eq!(w.stats().await["freeze_after_ms"], 600_000, "the answering worker has it");
    tokio::time::timeout(WAIT, c.until_freeze_after(600_000)).await.unwrap();
    w.kill9();

    let mut w = Worker::start_in(dir.path(), &flags(&format!("{OPEN} --freeze-after 1h")));
    assert_eq!(w.stats().await["freeze_after_ms"], 600_000, "the board's setting wins");
    assert_eq!(w.metric("omcb_freeze_after_seconds").await, 600.0);
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    assert_eq!(c.freeze_after_ms, Some(600_000), "in the snapshot");
    let (epoch, seq) = c.board.as_ref().map(|b| (b.epoch, b.seq)).unwrap();
    drop(c);
    admin(&["--worker", &private(&w), "sunset", "set", "20m"]).unwrap();
    let mut resumed = connect(&w.ws_url(&format!("?since={seq}&epoch={epoch}"))).await;
    tokio::time::timeout(WAIT, resumed.until_freeze_after(1_200_000)).await.unwrap();
    assert_eq!(resumed.snapshots, 0, "it resumed, without a snapshot");
    w.terminate();

    let w = Worker::start_in(dir.path(), &flags(OPEN));
    assert_eq!(w.stats().await["freeze_after_ms"], 1_200_000);
}

/// A board with `--max-checked` says its limit in a `Settings` message right
/// after the start's Snapshot (the Snapshot has no field for it), so a page
/// can tell when the board is full; a board without one sends none there.
#[tokio::test]
async fn a_board_with_a_limit_says_so_after_the_snapshot() {
    use omcb_proto::v1::server_message::Msg;
    let w = Worker::start(&flags(&format!("{OPEN} --max-checked 3")));
    let mut c = connect(&w.ws_url("")).await;
    assert!(matches!(c.next_any().await.unwrap(), Msg::Snapshot(_)));
    let Msg::Settings(s) = c.next_any().await.unwrap() else { panic!("Settings next") };
    assert_eq!((s.max_checked, s.freeze_after_ms), (3, 0));
    assert!(s.server_time_ms > 0);

    let w = Worker::start(&flags(OPEN));
    let mut c = connect(&w.ws_url("")).await;
    assert!(matches!(c.next_any().await.unwrap(), Msg::Snapshot(_)));
    c.toggle(1, true).await;
    let next = c.next_any().await.unwrap();
    assert!(matches!(next, Msg::ToggleResult(_)), "the answer, no Settings: {next:?}");
}
