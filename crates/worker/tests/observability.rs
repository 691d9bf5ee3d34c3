//! What an operator sees: the worker's `/metrics` (issue 9) and its logs,
//! from the real binary.

mod common;

use common::*;
use futures_util::SinkExt as _;
use omcb_proto::v1::{Resync, client_message, server_message::Msg};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Every sample of `/metrics` as (series with labels, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// The value of `series`, which must be exported.
fn value(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .unwrap_or_else(|| panic!("{series} is not exported"))
        .1
}

/// The soft `Max open files` limit of process `pid`, from /proc.
fn max_open_files(pid: u32) -> f64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// `git rev-parse --short HEAD` of this checkout, or "unknown" like build.rs.
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A WebSocket upgrade request's headers, from a page of `origin`.
fn upgrade_from(origin: &str) -> [(&str, &str); 5] {
    [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Origin", origin),
    ]
}

/// One client's session exercises each new series, then `/metrics` must show
/// it with its labels and the value the session implies.
#[tokio::test]
async fn metrics_answer_an_operators_questions() {
    let w = Worker::start(&flags(
        "--board-size 1000 --toggle-rate 0.001 --toggle-burst 3 --abuse-burst 100 \
         --freeze-after 1h --egress-budget 30MB --max-connections 500",
    ));

    // Five toggles against a burst of three: three answered, two refused by
    // the socket's limiter; all five get a ToggleResult.
    let mut c = connect(&w.ws_url("")).await;
    assert!(matches!(c.recv().await, Msg::Snapshot(_)));
    let mut accepted = 0;
    for i in 0..5 {
        if c.set(i, true).await.accepted {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 3);
    // A Resync: a snapshot sent for `resync`.
    c.send_msg(client_message::Msg::Resync(Resync {})).await;
    while !matches!(c.recv().await, Msg::Snapshot(_)) {}
    // A clean close (1000), answered by the worker's echo.
    c.ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await.unwrap();
    assert_eq!(c.until_closed().await, Ended::Closed(Some(1000)));

    // A socket that just goes away: no close frame.
    let mut gone = connect(&w.ws_url("")).await;
    assert!(matches!(gone.recv().await, Msg::Snapshot(_)));
    drop(gone);

    // A page of a foreign origin is refused before the upgrade.
    let r = http_get(w.addr, "/ws", &upgrade_from("https://evil.example")).await;
    assert_eq!(r.status, 403);

    let text = poll("both sockets ended and a sweep ran", || async {
        let text = w.metrics_text().await;
        let s = samples(&text);
        let ended = value(&s, r#"omcb_disconnects_total{code="1000"}"#) == 1.0
            && value(&s, r#"omcb_disconnects_total{code="none"}"#) == 1.0;
        let delivered = value(&s, "omcb_delivery_seconds_count") >= 1.0;
        (ended && delivered && value(&s, r#"omcb_sweeps_total{result="ok"}"#) >= 1.0)
            .then_some(text)
    })
    .await;
    let s = samples(&text);
    let v = |series: &str| value(&s, series);

    // Process metrics, read from /proc at the scrape.
    let pid = w.pid();
    assert_eq!(v("process_max_fds"), max_open_files(pid));
    assert!(v("process_open_fds") >= 5.0, "listeners, store, epoll: {}", v("process_open_fds"));
    assert!(v("process_open_fds") < v("process_max_fds"));
    assert!(v("process_resident_memory_bytes") > 1e6);
    assert!(v("process_virtual_memory_bytes") >= v("process_resident_memory_bytes"));
    assert!(v("process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let started = v("process_start_time_seconds");
    assert!((now.as_secs_f64() - started).abs() < 600.0, "started at {started}");

    let build = format!(
        r#"omcb_build_info{{version="{}",git="{}"}}"#,
        env!("CARGO_PKG_VERSION"),
        git_commit()
    );
    assert_eq!(v(&build), 1.0, "{build} in\n{text}");

    // The toggle round trip: one observation per ToggleResult.
    assert_eq!(v("omcb_toggle_seconds_count"), 5.0);
    assert!(v("omcb_toggle_seconds_sum") > 0.0);
    assert!(v(r#"omcb_toggle_seconds_bucket{le="5"}"#) == 5.0, "buckets per the spec");
    assert!(s.iter().any(|(k, _)| k == r#"omcb_toggle_seconds_bucket{le="0.0025"}"#));

    assert_eq!(v(r#"omcb_disconnects_total{code="1000"}"#), 1.0);
    assert_eq!(v(r#"omcb_disconnects_total{code="none"}"#), 1.0);
    assert_eq!(v(r#"omcb_disconnects_total{code="1013"}"#), 0.0);

    // Two connect snapshots and one Resync of a 1,000-box board (two
    // 125-byte bitsets and the frame's envelope each).
    let connect = v(r#"omcb_snapshot_bytes_sent_total{reason="connect"}"#);
    assert!((2.0 * 250.0..2.0 * 400.0).contains(&connect), "connect: {connect}");
    let resync = v(r#"omcb_snapshot_bytes_sent_total{reason="resync"}"#);
    assert!((250.0..400.0).contains(&resync), "resync: {resync}");
    assert_eq!(v(r#"omcb_snapshot_bytes_sent_total{reason="lagged"}"#), 0.0);
    assert_eq!(v(r#"omcb_snapshot_bytes_sent_total{reason="reset"}"#), 0.0);

    assert_eq!(v(r#"omcb_limiter_refusals_total{kind="toggle_socket"}"#), 2.0);
    assert_eq!(v(r#"omcb_limiter_refusals_total{kind="origin"}"#), 1.0);
    for kind in [
        "toggle_address",
        "connect_address",
        "snapshot_address",
        "http_address",
        "recv_budget",
        "max_connections",
    ] {
        assert_eq!(v(&format!(r#"omcb_limiter_refusals_total{{kind="{kind}"}}"#)), 0.0, "{kind}");
    }

    // The embedded store always holds the sweep lease.
    assert_eq!(v("omcb_sweep_lease_held"), 1.0);
    assert_eq!(v(r#"omcb_sweeps_total{result="error"}"#), 0.0);
    assert_eq!(v("omcb_freeze_after_seconds"), 3600.0);
    assert_eq!(v("omcb_egress_budget_bytes_per_second"), 30e6);
    assert_eq!(v("omcb_max_connections"), 500.0);
    // The tick: at --batch-ms (a 30 MB/s budget does not press it), under
    // the default latency budget; the accepted toggles' batches delivered.
    assert_eq!(v("omcb_tick_seconds"), 0.05);
    assert_eq!(v("omcb_latency_budget_seconds"), 0.25);
    assert!(v(r#"omcb_delivery_seconds_bucket{le="5"}"#) >= 1.0, "buckets per the spec");
}

/// `/metrics` is served on `--metrics-listen` only: the public listener
/// answers it like any unknown path. Without `--egress-budget` there is no
/// budget series (an alert on it must not compare against 0), and with
/// freezing off no sweep runs.
#[tokio::test]
async fn metrics_never_answer_on_the_public_listener() {
    let w = Worker::start(&flags("--board-size 1000"));
    let public = http_get(w.addr, "/metrics", &[]).await;
    assert_eq!(public.status, 404);
    assert!(!String::from_utf8_lossy(&public.body).contains("omcb_"));
    let text = w.metrics_text().await;
    let s = samples(&text);
    assert_eq!(value(&s, "omcb_freeze_after_seconds"), 0.0);
    assert_eq!(value(&s, "omcb_sweep_lease_held"), 0.0);
    assert!(!text.contains("omcb_egress_budget_bytes_per_second"));
}

/// Starts a worker with its stderr in `dir/worker.log`; returns it and the path.
fn logging_worker(dir: &std::path::Path, args: &[&str]) -> (Worker, std::path::PathBuf) {
    let log = dir.join("worker.log");
    let bin = env!("CARGO_BIN_EXE_omcb");
    (Worker(WorkerProcess::start_logging_to(bin, dir, &log, args).unwrap()), log)
}

/// One socket's life: opened, a toggle, a bad frame (closed with 1003).
async fn a_socket_that_misbehaves(w: &Worker) {
    let mut c = connect(&w.ws_url("")).await;
    assert!(matches!(c.recv().await, Msg::Snapshot(_)));
    c.set(1, true).await;
    c.ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(c.until_closed().await, Ended::Closed(Some(1003)));
}

/// Polls the log file until a line contains `needle`.
async fn log_with(path: &std::path::Path, needle: &str) -> String {
    poll(needle, || async {
        let log = std::fs::read_to_string(path).unwrap();
        log.contains(needle).then_some(log)
    })
    .await
}

/// Under systemd or in a file, stderr is no terminal: no colour codes.
#[tokio::test]
async fn text_logs_have_no_colour_codes_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (w, path) = logging_worker(dir.path(), &flags("--board-size 1000"));
    a_socket_that_misbehaves(&w).await;
    let log = log_with(&path, "closing on bad input").await;
    assert!(!log.contains('\x1b'), "escape codes in the log:\n{log}");
    let log = log_with(&path, "socket closed").await;
    // The socket's lines name its connection.
    let closed = log.lines().find(|l| l.contains("socket closed")).unwrap();
    assert!(closed.contains("conn{conn=") && closed.contains("peer=127.0.0.1:"), "{closed}");
}

/// `--log-format json`: every line is a JSON object, and every line about a
/// socket carries its connection's id and peer; the lines of two sockets
/// have different ids.
#[tokio::test]
async fn json_logs_parse_and_name_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (w, path) = logging_worker(dir.path(), &flags("--board-size 1000 --log-format json"));
    a_socket_that_misbehaves(&w).await;
    a_socket_that_misbehaves(&w).await;
    let log = poll("two sockets closed", || async {
        let log = std::fs::read_to_string(&path).unwrap();
        (log.matches("socket closed").count() == 2).then_some(log)
    })
    .await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "board loaded"));
    let about_sockets = ["socket opened", "closing on bad input", "socket closed"];
    let mut ids = std::collections::BTreeSet::new();
    for line in &lines {
        let message = line["fields"]["message"].as_str().unwrap_or_default();
        // Whatever the connection code logs is about a connection.
        let from_conn = line["target"] == "omcb_worker::conn";
        if !about_sockets.contains(&message) && !from_conn {
            continue;
        }
        let span = &line["span"];
        assert_eq!(span["name"], "conn", "{line}");
        assert!(span["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
        let id = span["conn"].as_u64().expect("a numeric id");
        if about_sockets.contains(&message) {
            ids.insert((id, message.to_owned()));
        }
    }
    assert_eq!(ids.len(), 6, "three lines for each of two connections: {ids:?}");
    let conns: std::collections::BTreeSet<u64> = ids.iter().map(|(id, _)| *id).collect();
    assert_eq!(conns.len(), 2, "each socket its own id: {ids:?}");
    let closed = lines.iter().find(|l| l["fields"]["message"] == "socket closed").unwrap();
    assert_eq!(closed["fields"]["code"], "1003");
}

/// In a fleet one worker holds the sweep lease and sweeps; the other says it
/// does not hold it and counts no sweep (`omcb_sweeps_total` counts sweeps as
/// the holder, so summed over the fleet it is the sweep rate).
#[tokio::test]
async fn one_worker_of_a_fleet_holds_the_sweep_lease() {
    let redis = omcb_testkit::RedisServer::start().unwrap();
    let args = format!("--redis {} --board-size 1000 --freeze-after 1s", redis.url());
    let workers = [Worker::start(&flags(&args)), Worker::start(&flags(&args))];
    let held = |s: &[(String, f64)]| value(s, "omcb_sweep_lease_held");
    let ok = |s: &[(String, f64)]| value(s, r#"omcb_sweeps_total{result="ok"}"#);
    // Each worker sweeps every 250 ms: wait for the holder's third.
    let (holder, other) = poll("a worker to sweep three times", || async {
        let [a, b] = [&workers[0], &workers[1]];
        let (a, b) = (samples(&a.metrics_text().await), samples(&b.metrics_text().await));
        if ok(&a) >= 3.0 {
            Some((a, b))
        } else if ok(&b) >= 3.0 {
            Some((b, a))
        } else {
            None
        }
    })
    .await;
    assert_eq!(held(&holder), 1.0);
    assert_eq!(held(&other), 0.0);
    assert_eq!(ok(&other), 0.0);
    for s in [&holder, &other] {
        assert_eq!(value(s, r#"omcb_sweeps_total{result="error"}"#), 0.0);
        assert_eq!(value(s, "omcb_freeze_after_seconds"), 1.0);
    }
}
