//! The fleet as operators run it, on loopback: `scripts/fleet` starts real
//! redis-server, workers and nginx (rendered from deploy/nginx); clients go
//! through nginx.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use omcb_proto::v1::{ToggleResult, server_message::Msg};

const WORKER_ARGS: &str =
    "--board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms 20";

/// A fleet started by `scripts/fleet up`, stopped by `scripts/fleet down` on drop.
struct Fleet {
    run_dir: tempfile::TempDir,
    port: u16,
    env: Vec<(&'static str, String)>,
}

impl Fleet {
    fn up(workers: usize, env: &[(&'static str, &str)]) -> Fleet {
        let run_dir = tempfile::tempdir().unwrap();
        let port = omcb_testkit::free_port();
        let mut all = vec![
            ("OMCB_BIN", env!("CARGO_BIN_EXE_omcb").to_string()),
            ("OMCB_WORKER_ARGS", WORKER_ARGS.to_string()),
            ("OMCB_NGINX_WS_RATE", "1000".to_string()),
            ("OMCB_NGINX_WS_BURST", "1000".to_string()),
            ("OMCB_NGINX_API_RATE", "1000".to_string()),
            ("OMCB_NGINX_API_BURST", "1000".to_string()),
        ];
        for (k, v) in env {
            all.retain(|(key, _)| key != k);
            all.push((k, v.to_string()));
        }
        let fleet = Fleet { run_dir, port, env: all };
        let out =
            fleet.script(&["up", "--workers", &workers.to_string(), "--port", &port.to_string()]);
        assert_eq!(
            out.lines().last(),
            Some(format!("http://127.0.0.1:{port}").as_str()),
            "up prints the URL last"
        );
        fleet
    }

    fn script(&self, args: &[&str]) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new(root.join("scripts/fleet"))
            .args(args)
            .arg("--run-dir")
            .arg(self.run_dir.path())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "fleet {args:?} failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    fn ws(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws{query}", self.port)
    }

    fn workers_dir(&self) -> PathBuf {
        self.run_dir.path().join("workers")
    }

    /// `(port, pid, metrics port)` of each worker.
    fn workers(&self) -> Vec<(u16, u32, u16)> {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap().trim().parse::<u64>().unwrap();
        let mut out: Vec<_> = std::fs::read_dir(self.workers_dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".pid")?.parse::<u16>().ok())
            .map(|port| {
                let d = self.workers_dir();
                (
                    port,
                    read(d.join(format!("{port}.pid"))) as u32,
                    read(d.join(format!("{port}.metrics"))) as u16,
                )
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::process::Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fleet"),
        )
        .args(["down", "--run-dir"])
        .arg(self.run_dir.path())
        .output();
    }
}

/// Waits until every live worker is at the same seq and returns it.
async fn quiescent_seq(fleet: &Fleet) -> u64 {
    agreed_seq("workers to agree on the seq", || {
        fleet.workers().into_iter().filter(|&(_, pid, _)| running(pid)).map(|(p, _, _)| p).collect()
    })
    .await
}

/// Polls the `/api/stats` of the workers on `ports()` until all of them
/// answer with one seq; returns it.
async fn agreed_seq(what: &str, ports: impl Fn() -> Vec<u16>) -> u64 {
    poll(what, || async {
        let mut seqs = Vec::new();
        for port in ports() {
            seqs.push(stats(([127, 0, 0, 1], port).into()).await?["seq"].as_u64()?);
        }
        (!seqs.is_empty() && seqs.iter().all(|s| *s == seqs[0])).then(|| seqs[0])
    })
    .await
}

/// A client through nginx that reconnects (with ?since) when its socket ends.
async fn connect_fleet(fleet: &Fleet) -> Client {
    let mut c = connect(&fleet.ws("")).await;
    assert!(matches!(c.recv().await, Msg::Snapshot(_)));
    c
}

/// A client through nginx from the source address `src` (loopback is 127/8).
async fn connect_fleet_from(fleet: &Fleet, src: [u8; 4]) -> Client<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((src, 0))).unwrap();
    let stream = socket.connect(fleet.addr()).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(fleet.ws(""), stream).await.unwrap();
    let mut c = Client::new(ws);
    assert!(matches!(c.recv().await, Msg::Snapshot(_)));
    c
}

/// The sockets a worker holds (its `omcb_connections`).
async fn connections_of(metrics: u16) -> f64 {
    let text =
        String::from_utf8(http_get(([127, 0, 0, 1], metrics).into(), "/metrics", &[]).await.body)
            .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("omcb_connections "))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Whether every worker holds at least one socket.
async fn every_worker_has_clients(fleet: &Fleet) -> bool {
    for (_, _, metrics) in fleet.workers() {
        if connections_of(metrics).await < 1.0 {
            return false;
        }
    }
    true
}

/// Toggles through a client, reconnecting whenever its worker goes away.
async fn traffic(
    fleet_ws: String,
    mut c: Client,
    seed: u64,
    n: usize,
) -> (Client, Vec<(u32, ToggleResult)>, usize) {
    let mut rng = omcb_testkit::rng::XorShift64::new(seed);
    let mut results = Vec::new();
    let mut reconnects = 0;
    let mut i = 0;
    while i < n {
        let x = rng.next_u64();
        let index = (x % 64) as u32;
        let id = c.toggle(index, x & 2 == 2).await;
        loop {
            match c.next().await {
                Ok(Msg::ToggleResult(r)) if r.request_id == id => {
                    results.push((index, r));
                    i += 1;
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    // The worker left (killed, drained): resume elsewhere through nginx.
                    reconnects += 1;
                    let board = c.board.clone().unwrap();
                    let url = format!("{fleet_ws}?since={}&epoch={}", board.seq, board.epoch);
                    c = connect(&url).await;
                    c.board = Some(board);
                    i += 1; // the toggle in flight may or may not have landed; its answer is lost
                    break;
                }
            }
        }
    }
    (c, results, reconnects)
}

async fn assert_converged(fleet: &Fleet, clients: &mut [Client], results: &[(u32, ToggleResult)]) {
    let seq = quiescent_seq(fleet).await;
    let (port, _, _) = fleet.workers()[0];
    let (truth, _) = api_state(([127, 0, 0, 1], port).into()).await;
    let truth = omcb_proto::Board::from_snapshot(&truth).unwrap();
    assert_eq!(truth.seq, seq);
    for (i, c) in clients.iter_mut().enumerate() {
        c.until_seq(seq).await;
        assert!(c.board.as_ref() == Some(&truth), "client {i} differs from the board at seq {seq}");
    }
    let mut last: HashMap<u32, &ToggleResult> = HashMap::new();
    for (index, r) in results.iter().filter(|(_, r)| r.accepted && r.seq > 0) {
        if last.get(index).is_none_or(|p| p.seq < r.seq) {
            last.insert(*index, r);
        }
    }
    for (index, r) in last {
        assert_eq!(
            truth.is_checked(index),
            r.checked,
            "accepted toggle of box {index} at seq {} lost",
            r.seq
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_spread_over_three_workers_and_a_toggle_reaches_all() {
    let fleet = Fleet::up(3, &[]);
    // nginx hashes client addresses over the workers (an address's budgets
    // hold fleet-wide): clients from enough addresses reach every worker.
    let mut clients = Vec::new();
    for host in 1..=64u8 {
        clients.push(connect_fleet_from(&fleet, [127, 0, 0, host]).await);
        if host >= 6 && every_worker_has_clients(&fleet).await {
            break;
        }
    }
    assert!(every_worker_has_clients(&fleet).await, "64 addresses never reached every worker");
    let r = clients[0].set(33, true).await;
    assert!(r.accepted);
    for c in clients.iter_mut() {
        c.until_seq(r.seq).await;
        assert!(c.board.as_ref().unwrap().is_checked(33));
    }
    // The page and the API come through nginx, /api/state micro-cached.
    assert_eq!(http_get(fleet.addr(), "/", &[]).await.status, 200);
    let state = http_get(fleet.addr(), "/api/state", &[]).await;
    assert_eq!(state.status, 200);
    assert!(state.header("x-cache").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_clients_reconnect_through_nginx_and_nothing_accepted_is_lost() {
    let fleet = Fleet::up(3, &[]);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = connect_fleet(&fleet).await;
        tasks.push(tokio::spawn(traffic(fleet.ws(""), c, 11 + i, 400)));
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // let traffic flow before the kill
    // nginx hashes the clients' one address to one worker: kill that one.
    let mut victim = None;
    for (_, pid, metrics) in fleet.workers() {
        if connections_of(metrics).await >= 1.0 {
            victim = Some(pid);
        }
    }
    let victim = victim.expect("a worker holds the clients");
    std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap();
    let mut clients = Vec::new();
    let mut results = Vec::new();
    let mut reconnects = 0;
    for t in tasks {
        let (c, r, n) = t.await.unwrap();
        clients.push(c);
        results.extend(r);
        reconnects += n;
    }
    assert!(reconnects >= 1, "the killed worker had clients");
    // New connections keep working.
    clients.push(connect_fleet(&fleet).await);
    let live: Vec<_> = fleet.workers().into_iter().filter(|(_, pid, _)| *pid != victim).collect();
    assert_eq!(live.len(), 2);
    assert_converged_live(&fleet, &live, &mut clients, &results).await;
}

/// Like `assert_converged` but only over the given (live) workers.
async fn assert_converged_live(
    fleet: &Fleet,
    live: &[(u16, u32, u16)],
    clients: &mut [Client],
    results: &[(u32, ToggleResult)],
) {
    let seq =
        agreed_seq("live workers to agree", || live.iter().map(|&(port, _, _)| port).collect())
            .await;
    let _ = fleet;
    let (truth, _) = api_state(([127, 0, 0, 1], live[0].0).into()).await;
    let truth = omcb_proto::Board::from_snapshot(&truth).unwrap();
    assert_eq!(truth.seq, seq);
    for (i, c) in clients.iter_mut().enumerate() {
        c.until_seq(seq).await;
        assert!(c.board.as_ref() == Some(&truth), "client {i} differs from the board");
    }
    let mut last: HashMap<u32, &ToggleResult> = HashMap::new();
    for (index, r) in results.iter().filter(|(_, r)| r.accepted && r.seq > 0) {
        if last.get(index).is_none_or(|p| p.seq < r.seq) {
            last.insert(*index, r);
        }
    }
    for (index, r) in last {
        assert_eq!(truth.is_checked(index), r.checked, "accepted toggle of box {index} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_3_to_5_to_2_under_traffic_converges_at_each_step() {
    let fleet = Fleet::up(3, &[]);
    for (target, seed) in [(5usize, 100u64), (2, 200)] {
        let mut tasks = Vec::new();
        for i in 0..6 {
            let c = connect_fleet(&fleet).await;
            tasks.push(tokio::spawn(traffic(fleet.ws(""), c, seed + i, 300)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        fleet.script(&["scale", &target.to_string()]);
        assert_eq!(fleet.workers().len(), target);
        let status = fleet.script(&["status"]);
        assert_eq!(
            status.lines().filter(|l| l.starts_with("worker ") && l.ends_with(" ready")).count(),
            target
        );
        let mut clients = Vec::new();
        let mut results = Vec::new();
        for t in tasks {
            let (c, r, _) = t.await.unwrap();
            clients.push(c);
            results.extend(r);
        }
        assert_converged(&fleet, &mut clients, &results).await;
    }
}

/// Whether a process runs (a zombie waiting to be reaped by init does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// The status of a GET from a chosen loopback source address.
async fn get_from(src: [u8; 4], addr: SocketAddr, path: &str) -> u16 {
    omcb_testkit::http::get_from(src.into(), addr, path).await.unwrap().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_address_gets_429_while_another_is_served() {
    let fleet = Fleet::up(1, &[("OMCB_NGINX_API_RATE", "5"), ("OMCB_NGINX_API_BURST", "5")]);
    let mut statuses = HashMap::new();
    for _ in 0..40 {
        *statuses.entry(get_from([127, 0, 0, 1], fleet.addr(), "/api/stats").await).or_insert(0) +=
            1;
    }
    assert!(statuses.get(&429).copied().unwrap_or(0) >= 20, "the flood is limited: {statuses:?}");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 5,
        "within the burst it is served: {statuses:?}"
    );
    assert_eq!(
        get_from([127, 0, 0, 2], fleet.addr(), "/api/stats").await,
        200,
        "another address is served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_down_leaves_nothing_running() {
    let fleet = Fleet::up(2, &[]);
    let mut pids: Vec<u32> = fleet.workers().iter().map(|w| w.1).collect();
    let mut ports: Vec<u16> = fleet.workers().iter().map(|w| w.0).collect();
    let read = |f: &str| {
        std::fs::read_to_string(fleet.run_dir.path().join(f))
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    pids.push(read("nginx.pid"));
    pids.push(read("redis.pid"));
    ports.push(fleet.port);
    ports.push(read("redis.port") as u16);
    // Idempotent: a second up is a no-op that prints the URL again.
    assert!(fleet.script(&["up"]).trim_end().ends_with(&fleet.port.to_string()));
    fleet.script(&["down"]);
    for pid in pids {
        assert!(!running(pid), "pid {pid} still runs");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for port in ports {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(Instant::now() < deadline, "port {port} still listens");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(fleet.script(&["status"]).lines().all(|l| l.ends_with("down")));
    fleet.script(&["down"]); // and again: nothing to do, no error
}

/// One address with 64 sockets toggling through nginx, each at its own
/// socket's rate (20/s, 1,280/s in all): accepted toggles stay at the
/// address's budget (`--ip-toggle-rate`, 40/s after a burst of 200), because
/// nginx hashes the address to one worker; then all 64 reconnect and toggle
/// again: a fresh socket brings no fresh budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_held_to_its_toggle_budget_across_the_fleet_and_reconnects() {
    const RATE: f64 = 40.0;
    const BURST: f64 = 200.0;
    let fleet = Fleet::up(
        3,
        &[
            (
                "OMCB_WORKER_ARGS",
                "--board-size 1000 --batch-ms 20 --ip-toggle-rate 40 --ip-toggle-burst 200 --ip-connect-burst 200",
            ),
            ("OMCB_NGINX_CONN_PER_IP", "200"),
        ],
    );
    let round = |secs: f64| {
        let url = fleet.ws("");
        async move {
            let mut tasks = Vec::new();
            for s in 0..64u32 {
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let mut c = connect(&url).await;
                    c.recv().await;
                    let start = std::time::Instant::now();
                    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
                    let (mut sent, mut accepted) = (0u32, 0u32);
                    while start.elapsed().as_secs_f64() < secs {
                        tick.tick().await;
                        let r = c.set((s * 15 + sent) % 1000, sent % 2 == 0).await;
                        sent += 1;
                        accepted += u32::from(r.accepted);
                    }
                    (sent, accepted)
                }));
            }
            let start = std::time::Instant::now();
            let mut total = (0u32, 0u32);
            for t in tasks {
                let (s, a) = t.await.unwrap();
                total = (total.0 + s, total.1 + a);
            }
            (total.0, total.1, start.elapsed().as_secs_f64())
        }
    };
    let (sent, accepted, secs) = round(4.0).await;
    eprintln!("64 sockets, one address: {sent} sent, {accepted} accepted in {secs:.1} s");
    assert!(
        f64::from(accepted) <= BURST + RATE * secs + RATE,
        "{accepted} accepted in {secs:.1} s: over the address's budget"
    );
    let between = std::time::Instant::now();
    let (sent, accepted, secs) = round(3.0).await;
    let since = between.elapsed().as_secs_f64();
    eprintln!(
        "after reconnecting: {sent} sent, {accepted} accepted in {secs:.1} s ({:.0}/s)",
        f64::from(accepted) / secs
    );
    assert!(
        f64::from(accepted) <= RATE * since + RATE,
        "{accepted} accepted in {since:.1} s: reconnecting refilled the budget"
    );
}
