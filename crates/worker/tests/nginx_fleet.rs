//! The fleet as operators run it, on loopback: `scripts/fleet` starts real
//! redis-server, workers and nginx (rendered from deploy/nginx); clients go
//! through nginx.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::fleet::{Fleet, running};
use common::*;
use omcb_proto::v1::{ToggleResult, server_message::Msg};

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

/// One client's toggles through nginx, its answers and its reconnects.
type Traffic = tokio::task::JoinHandle<(Client, Vec<(u32, ToggleResult)>, usize)>;

/// Six clients through nginx, each toggling `n` times in its own task
/// (`traffic`, seeds `seed..seed + 6`).
async fn start_traffic(fleet: &Fleet, seed: u64, n: usize) -> Vec<Traffic> {
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = connect_fleet(fleet).await;
        tasks.push(tokio::spawn(traffic(fleet.ws(""), c, seed + i, n)));
    }
    tasks
}

/// Waits for every client's toggles: the clients, all the answers, and how
/// many times the clients reconnected in all.
async fn finish_traffic(tasks: Vec<Traffic>) -> (Vec<Client>, Vec<(u32, ToggleResult)>, usize) {
    let (mut clients, mut results, mut reconnects) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        let (c, r, n) = t.await.unwrap();
        clients.push(c);
        results.extend(r);
        reconnects += n;
    }
    (clients, results, reconnects)
}

/// Waits until `workers` (`Fleet::workers` rows) agree on a seq, then checks
/// that every client holds the board at that seq and that each box's last
/// accepted toggle holds in it.
async fn assert_converged(
    workers: &[(u16, u32, u16)],
    clients: &mut [Client],
    results: &[(u32, ToggleResult)],
) {
    let seq = poll("workers to agree on the seq", || async {
        let mut seqs = Vec::new();
        for (port, _, _) in workers {
            seqs.push(stats(([127, 0, 0, 1], *port).into()).await?["seq"].as_u64()?);
        }
        (!seqs.is_empty() && seqs.iter().all(|s| *s == seqs[0])).then(|| seqs[0])
    })
    .await;
    let (truth, _) = api_state(([127, 0, 0, 1], workers[0].0).into()).await;
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
    let tasks = start_traffic(&fleet, 11, 400).await;
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
    let (mut clients, results, reconnects) = finish_traffic(tasks).await;
    assert!(reconnects >= 1, "the killed worker had clients");
    // New connections keep working.
    clients.push(connect_fleet(&fleet).await);
    let live: Vec<_> = fleet.workers().into_iter().filter(|(_, pid, _)| *pid != victim).collect();
    assert_eq!(live.len(), 2);
    assert_converged(&live, &mut clients, &results).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_3_to_5_to_2_under_traffic_converges_at_each_step() {
    let fleet = Fleet::up(3, &[]);
    for (target, seed) in [(5usize, 100u64), (2, 200)] {
        let tasks = start_traffic(&fleet, seed, 300).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        fleet.script(&["scale", &target.to_string()]);
        assert_eq!(fleet.workers().len(), target);
        assert_eq!(
            fleet.scrape_targets(),
            fleet.metrics_addresses(),
            "Prometheus follows the scale"
        );
        let status = fleet.script(&["status"]);
        assert_eq!(
            status.lines().filter(|l| l.starts_with("worker ") && l.ends_with(" ready")).count(),
            target
        );
        let (mut clients, results, _) = finish_traffic(tasks).await;
        assert_converged(&fleet.workers(), &mut clients, &results).await;
    }
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

/// Clock ticks since boot now (the unit of /proc/PID/stat's start time).
fn uptime_ticks() -> u64 {
    let up = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = up.split_whitespace().next().unwrap().parse().unwrap();
    let hz = String::from_utf8(
        std::process::Command::new("getconf").arg("CLK_TCK").output().unwrap().stdout,
    )
    .unwrap()
    .trim()
    .parse::<f64>()
    .unwrap();
    (secs * hz).ceil() as u64
}

/// When process `pid` started, in clock ticks since boot (None once it is gone).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's closing parenthesis; start time is field 22.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// The pids listening on TCP `port` (from `ss`).
fn listeners(port: u16) -> Vec<u32> {
    let out = std::process::Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split("pid=")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
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
    // Nothing of the fleet listens any more (an nginx worker process would
    // outlive its master's pid). Tests run in parallel and bind port 0, so a
    // freed port may be taken again at once: a listener that started after
    // `down` returned is another test's, not a leftover.
    let down_at = uptime_ticks();
    let deadline = Instant::now() + Duration::from_secs(5);
    for port in ports {
        loop {
            let leftovers: Vec<u32> = listeners(port)
                .into_iter()
                .filter(|pid| start_ticks(*pid).is_some_and(|t| t <= down_at))
                .collect();
            if leftovers.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "port {port} still listens: pids {leftovers:?}");
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

/// `curl ARGS`: (exit status success, stdout).
fn curl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// nginx with a certificate (deploy/nginx's `#tls:` lines, rendered by
/// deploy/render through scripts/fleet): the page, the API (micro-cache
/// included) and the WebSocket over TLS, a client that does not trust the
/// certificate refused, plain HTTP on the HTTPS port refused, and the HTTP
/// port redirecting everything to HTTPS except ACME challenges (certbot
/// --webroot) and the balancer's own health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_page_api_and_websocket_and_http_redirects_to_https() {
    omcb_testkit::require("curl");
    let ca = omcb_testkit::tls::TestCa::new().unwrap();
    let server = ca.issue("nginx").unwrap();
    let (cert, key) = (server.cert.to_str().unwrap(), server.key.to_str().unwrap());
    let ca_cert = ca.cert();
    let trusted = ca_cert.to_str().unwrap();
    let fleet = Fleet::up(1, &[("OMCB_NGINX_TLS_CERT", cert), ("OMCB_NGINX_TLS_KEY", key)]);
    let https = format!("https://127.0.0.1:{}", fleet.port);
    let http_port: u16 = std::fs::read_to_string(fleet.run_dir.path().join("http-port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let http = format!("http://127.0.0.1:{http_port}");

    let (ok, page) = curl(&["--cacert", trusted, &format!("{https}/")]);
    assert!(ok && page.contains("<html"), "the page over https: {page}");
    let (ok, stats) = curl(&["--cacert", trusted, &format!("{https}/api/stats")]);
    assert!(ok && stats.contains("checked_count"), "{stats}");
    let (ok, head) =
        curl(&["--cacert", trusted, "-D", "-", "-o", "/dev/null", &format!("{https}/api/state")]);
    assert!(ok && head.to_ascii_lowercase().contains("x-cache:"), "the micro-cache: {head}");
    let (ok, _) = curl(&[&format!("{https}/api/stats")]);
    assert!(!ok, "a client that does not trust the certificate is refused");
    let (_, plain) = curl(&[&format!("http://127.0.0.1:{}/api/stats", fleet.port)]);
    assert!(!plain.contains("checked_count"), "plain HTTP on the HTTPS port: {plain}");

    let (ok, redirect) = curl(&["-D", "-", "-o", "/dev/null", &format!("{http}/api/stats?x=1")]);
    assert!(ok && redirect.starts_with("HTTP/1.1 301"), "{redirect}");
    assert!(redirect.contains(&format!("Location: {https}/api/stats?x=1\r\n")), "{redirect}");
    let www = std::fs::read_to_string(fleet.run_dir.path().join("nginx-www")).unwrap();
    let challenges = std::path::Path::new(www.trim()).join("acme/.well-known/acme-challenge");
    std::fs::create_dir_all(&challenges).unwrap();
    std::fs::write(challenges.join("token1"), "token1.thumbprint").unwrap();
    let (ok, token) = curl(&[&format!("{http}/.well-known/acme-challenge/token1")]);
    assert!(ok && token == "token1.thumbprint", "the ACME challenge over plain HTTP: {token}");
    let (ok, health) = curl(&[&format!("{http}/nginx-healthz")]);
    assert!(ok && health == "ok\n");

    // WSS: the upgrade through TLS, then the worker's first frame (the Snapshot,
    // a binary frame) arrives.
    let mut s_client = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-CAfile", trusted, "-connect"])
        .arg(format!("127.0.0.1:{}", fleet.port))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::{Read, Write};
    let mut stdin = s_client.stdin.take().unwrap();
    write!(
        stdin,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        fleet.port
    )
    .unwrap();
    stdin.flush().unwrap();
    let mut stdout = s_client.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the header and the first frame's first byte, or EOF.
        loop {
            let end = got.windows(4).position(|w| w == b"\r\n\r\n");
            if end.is_some_and(|e| got.len() > e + 4) {
                return got;
            }
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "no WebSocket answer over TLS within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = reader.join().unwrap();
    let _ = s_client.kill();
    let _ = s_client.wait();
    drop(stdin);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert_eq!(got[end + 4], 0x82, "the first frame is a binary one (the Snapshot)");
}

/// `GET url` with `Accept-Encoding: accept` (none when empty): the response
/// headers (lowercased) and the body exactly as sent (curl does not decode it).
fn fetch_raw(url: &str, accept: &str) -> (String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-D"]).arg(&head).arg("-o").arg(&body);
    if !accept.is_empty() {
        cmd.args(["-H", &format!("Accept-Encoding: {accept}")]);
    }
    let out = cmd.arg(url).output().unwrap();
    assert!(out.status.success(), "{url}: {}", String::from_utf8_lossy(&out.stderr));
    (std::fs::read_to_string(head).unwrap().to_ascii_lowercase(), std::fs::read(body).unwrap())
}

/// Behind nginx a visitor gets the page the workers make (stripped, bundled,
/// brotli or zopfli gzip: web/test/pageload.test.mjs holds a first visit under
/// 10 KB), not nginx's own gzip of the files on disk: byte for byte the
/// worker's answer for the same encoding, cached once per encoding (a second
/// visit is a cache hit), and the ?v= files cached for a year by browsers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_through_nginx_is_the_workers_compressed_page_cached_per_encoding() {
    omcb_testkit::require("curl");
    let fleet = Fleet::up(2, &[]);
    let nginx = format!("http://127.0.0.1:{}", fleet.port);
    let (worker_port, _, _) = fleet.workers()[0];
    let worker = format!("http://127.0.0.1:{worker_port}");

    for (accept, coding) in [("gzip, deflate, br, zstd", "br"), ("gzip, deflate", "gzip")] {
        let (head, body) = fetch_raw(&format!("{nginx}/"), accept);
        assert!(head.contains(&format!("content-encoding: {coding}\r\n")), "{accept}: {head}");
        let (_, direct) = fetch_raw(&format!("{worker}/"), accept);
        assert_eq!(body, direct, "nginx serves the worker's {coding} page unchanged");
        // Another browser with another Accept-Encoding line that takes the same
        // encoding gets the cached copy.
        let other = if coding == "br" { "br" } else { "gzip" };
        let (again, body_again) = fetch_raw(&format!("{nginx}/"), other);
        assert!(again.contains("x-cache: hit\r\n"), "the second {coding} visit is cached: {again}");
        assert_eq!(body_again, body);
    }
    let (head, body) = fetch_raw(&format!("{nginx}/"), "");
    assert!(!head.contains("content-encoding"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("<html"),
        "the plain page for a client without encodings"
    );

    let (head, _) = fetch_raw(&format!("{nginx}/grid.js"), "br");
    assert!(head.contains("cache-control: no-cache\r\n"), "{head}");
    let (head, _) = fetch_raw(&format!("{nginx}/widget.js?v=1"), "br");
    assert!(head.contains("cache-control: public, max-age=31536000, immutable\r\n"), "{head}");
    assert_eq!(head.matches("cache-control").count(), 1, "one Cache-Control: {head}");
}
