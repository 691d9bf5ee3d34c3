//! Limits by client address, not by socket (issue 8, findings 4-8), against
//! the real binary: toggles, connects and snapshots budgeted per address
//! across sockets and reconnects; refused sockets take no slot; HTTP write
//! timeout and per-address HTTP cap; the Origin allowlist of `/ws`.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use omcb_proto::v1::{Reason, Resync, client_message, server_message::Msg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

/// Opens `/ws` with extra headers; the HTTP status when the upgrade is refused.
async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Client, u16> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await.unwrap() {
        Ok((ws, _)) => Ok(Client::new(ws)),
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect failed: {e}"),
    }
}

/// A socket from `client`, as nginx (a trusted proxy on 127.0.0.1) forwards it.
async fn connect_from(w: &Worker, query: &str, client: &str) -> Result<Client, u16> {
    try_connect(&w.ws_url(query), &[("X-Forwarded-For", client)]).await
}

#[tokio::test]
async fn toggles_are_budgeted_per_address_across_sockets_and_reconnects() {
    // Each socket alone could send 1000 at once; the address only 10.
    let w = Worker::start(&flags(
        "--board-size 1000 --trusted-proxy 127.0.0.1 --toggle-rate 1000 --toggle-burst 1000 \
         --ip-toggle-rate 0.001 --ip-toggle-burst 10",
    ));
    let mut sockets = Vec::new();
    for _ in 0..4 {
        let mut c = connect_from(&w, "", "198.51.100.7").await.unwrap();
        c.recv().await;
        sockets.push(c);
    }
    let mut accepted = 0;
    for i in 0..20u32 {
        let r = sockets[i as usize % 4].set(i, true).await;
        if r.accepted {
            accepted += 1;
        } else {
            assert_eq!(r.reason, Reason::RateLimited as i32);
        }
    }
    assert_eq!(accepted, 10, "four sockets of one address share one budget");
    // Reconnecting refills nothing.
    drop(sockets);
    let mut again = connect_from(&w, "", "198.51.100.7").await.unwrap();
    again.recv().await;
    let r = again.set(500, true).await;
    assert!(!r.accepted && r.reason == Reason::RateLimited as i32, "a new socket, the same budget");
    // An IPv6 client's neighbours in its /64 share its budget; another /64 does not.
    let mut v6 = connect_from(&w, "", "2001:db8:0:1::1").await.unwrap();
    v6.recv().await;
    for i in 0..10 {
        assert!(v6.set(600 + i, true).await.accepted);
    }
    let mut neighbour = connect_from(&w, "", "2001:db8:0:1::ffff").await.unwrap();
    neighbour.recv().await;
    assert!(!neighbour.set(700, true).await.accepted, "same /64, same budget");
    let mut other = connect_from(&w, "", "2001:db8:0:2::1").await.unwrap();
    other.recv().await;
    assert!(other.set(701, true).await.accepted, "another /64 has its own");
}

#[tokio::test]
async fn new_sockets_are_budgeted_per_address_before_the_upgrade() {
    let w = Worker::start(&flags(
        "--board-size 1000 --trusted-proxy 127.0.0.1 --ip-connect-rate 0.001 --ip-connect-burst 3",
    ));
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect_from(&w, "", "198.51.100.1").await.unwrap());
    }
    assert_eq!(connect_from(&w, "", "198.51.100.1").await.err(), Some(429));
    // Closing sockets gives no connects back; another address is unaffected.
    drop(open);
    assert_eq!(connect_from(&w, "", "198.51.100.1").await.err(), Some(429));
    let mut b = connect_from(&w, "", "198.51.100.2").await.unwrap();
    assert!(matches!(b.recv().await, Msg::Snapshot(_)));
    assert_eq!(w.metric("omcb_connections_refused_total{reason=\"connect_rate\"}").await, 2.0);
}

#[tokio::test]
async fn connect_snapshots_are_budgeted_per_address() {
    // A million boxes: 250 KB a snapshot; the address may pull two at once.
    let w = Worker::start(&flags(
        "--trusted-proxy 127.0.0.1 --ip-snapshot-rate 1 --ip-snapshot-burst 600000",
    ));
    let mut a = connect_from(&w, "", "198.51.100.1").await.unwrap();
    let mut b = connect_from(&w, "", "198.51.100.1").await.unwrap();
    assert!(matches!(a.recv().await, Msg::Snapshot(_)));
    assert!(matches!(b.recv().await, Msg::Snapshot(_)));
    assert_eq!(connect_from(&w, "", "198.51.100.1").await.err(), Some(429));
    // A resuming socket needs no snapshot and is not charged one.
    let s = w.stats().await;
    let resume = format!("?since={}&epoch={}", s["seq"], s["epoch"]);
    let mut r = connect_from(&w, &resume, "198.51.100.1").await.unwrap();
    assert!(r.set(1, true).await.accepted);
    // A socket subscribed at connect is charged its range Snapshot (65,536
    // boxes: 16,448 bytes), not the board's: six fit in the ~100 KB left.
    for i in 0..7 {
        let c = connect_from(&w, "?first=0&count=65536", "198.51.100.1").await;
        assert_eq!(
            c.as_ref().err(),
            if i < 6 { None } else { Some(&429) },
            "subscribed socket {i}"
        );
    }
}

#[tokio::test]
async fn a_resync_flood_waits_for_the_address_budget_or_is_closed_1008() {
    // 1000 boxes: a snapshot counts 314 bytes. One a second, four at once.
    let w = Worker::start(&flags(
        "--board-size 1000 --trusted-proxy 127.0.0.1 --ip-snapshot-rate 314 --ip-snapshot-burst 1256",
    ));
    let s = w.stats().await;
    let resume = format!("?since={}&epoch={}", s["seq"], s["epoch"]);
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(connect_from(&w, &resume, "198.51.100.1").await.unwrap());
    }
    let start = std::time::Instant::now();
    for c in &mut sockets {
        c.send_msg(client_message::Msg::Resync(Resync {})).await;
    }
    let sending = start.elapsed().as_secs_f64();
    // Four from the burst, then one a second for up to 5 s of waiting (plus
    // what refilled while the Resyncs were being sent); the rest of the queue
    // is closed with 1008.
    let mut snapshots = 0u32;
    let mut policy = 0;
    for c in &mut sockets {
        loop {
            match c.next().await {
                Ok(Msg::Snapshot(_)) => {
                    snapshots += 1;
                    break;
                }
                Ok(_) => {}
                Err(Ended::Closed(Some(1008))) => {
                    policy += 1;
                    break;
                }
                Err(e) => panic!("unexpected end {e:?}"),
            }
        }
    }
    let budget = 4.0 + 5.0 + sending.ceil() + 1.0;
    assert!(f64::from(snapshots) <= budget, "{snapshots} snapshots went out, budget {budget}");
    assert!(policy >= 2, "only {policy} of the flood were closed");
    assert_eq!(snapshots + policy, 20);
}

#[tokio::test]
async fn a_refused_socket_takes_no_slot_so_one_address_cannot_lock_out_another() {
    let w = Worker::start(&flags(
        "--board-size 1000 --trusted-proxy 127.0.0.1 --max-connections 4 --max-connections-per-ip 2 \
         --ip-connect-rate 10000 --ip-connect-burst 10000",
    ));
    let url = w.ws_url("");
    let mut a = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from(&w, "", "198.51.100.1").await.unwrap();
        c.recv().await;
        a.push(c);
    }
    // Address A hammers its cap: refused sockets that never answer their
    // close frame, so each lingers on the worker.
    let hammer = tokio::spawn(async move {
        let mut lingering = Vec::new();
        loop {
            if let Ok(c) = try_connect(&url, &[("X-Forwarded-For", "198.51.100.1")]).await {
                lingering.push(c);
            }
            if lingering.len() > 200 {
                lingering.drain(..100);
            }
        }
    });
    poll("A's refused sockets to pile up", || async {
        (w.metric("omcb_connections_refused_total{reason=\"over_limit\"}").await >= 10.0)
            .then_some(())
    })
    .await;
    // Refused sockets are bounded too: past --max-connections of them, 429.
    poll("refusals to be answered 429 before the upgrade", || async {
        (w.metric("omcb_connections_refused_total{reason=\"refusals_full\"}").await >= 1.0)
            .then_some(())
    })
    .await;
    // Address B still gets in, every time.
    for i in 0..2 {
        let mut b = connect_from(&w, "", &format!("198.51.100.{}", 10 + i)).await.unwrap();
        assert!(matches!(b.next().await, Ok(Msg::Snapshot(_))), "B was locked out");
        a.push(b);
    }
    hammer.abort();
}

/// A plain TCP connection from `source` with a tiny receive buffer.
async fn tcp_from(source: [u8; 4], addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(source), 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// The status of `GET path` from `source` (0 when no response came).
async fn get_from(source: [u8; 4], addr: SocketAddr, path: &str) -> u16 {
    let s = tcp_from(source, addr).await;
    omcb_testkit::http::get_on(s, &addr.to_string(), path, &[]).await.map_or(0, |r| r.status)
}

#[tokio::test]
async fn a_client_that_never_reads_its_response_is_cut_at_the_write_timeout() {
    let w = Worker::start(&flags("--http-write-timeout 500ms --socket-send-buffer 4096"));
    let mut s = tcp_from([127, 0, 0, 1], w.addr).await;
    let req = format!("GET /api/state HTTP/1.1\r\nHost: {}\r\n\r\n", w.addr);
    s.write_all(req.as_bytes()).await.unwrap();
    // It reads nothing; the worker gives up on it.
    poll("the write timeout", || async {
        (w.metric("omcb_http_write_timeouts_total").await >= 1.0).then_some(())
    })
    .await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    assert!(raw.len() < 250_000, "the 250 KB response was cut ({} bytes came)", raw.len());
    // A client that reads gets the whole of it.
    let (snapshot, _) = api_state(w.addr).await;
    assert_eq!(snapshot.size, 1_000_000);
}

#[tokio::test]
async fn a_client_that_drips_its_response_out_slowly_is_cut_too() {
    let w = Worker::start(&flags("--http-write-timeout 1s --socket-send-buffer 4096"));
    let mut s = tcp_from([127, 0, 0, 1], w.addr).await;
    let req = format!("GET /api/state HTTP/1.1\r\nHost: {}\r\n\r\n", w.addr);
    s.write_all(req.as_bytes()).await.unwrap();
    // 256 bytes every 20 ms: ~13 KB/s, the 250 KB response would take 20 s.
    let start = std::time::Instant::now();
    let mut got = 0;
    let mut buf = [0u8; 256];
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        assert!(start.elapsed() < WAIT, "still connected after {got} bytes");
    }
    assert!(got < 250_000, "the whole response came ({got} bytes)");
    assert!(w.metric("omcb_http_write_timeouts_total").await >= 1.0);
}

/// A connection from 127.0.0.1 that had one `GET /healthz` answered and is
/// kept alive, so the worker holds it in its address's count.
async fn kept_alive(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tcp_from([127, 0, 0, 1], addr).await;
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"ok\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before its answer: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    s
}

#[tokio::test]
async fn plain_http_connections_are_capped_per_address() {
    let w = Worker::start(&flags("--max-http-connections-per-ip 2"));
    // Each held connection is answered once (and kept alive) before the
    // third is made: the worker counts a connection when its task runs, so a
    // bare connect could be counted after the third one.
    let held = [kept_alive(w.addr).await, kept_alive(w.addr).await];
    poll("the third connection to be refused", || async {
        (get_from([127, 0, 0, 1], w.addr, "/healthz").await == 429).then_some(())
    })
    .await;
    assert_eq!(get_from([127, 0, 0, 2], w.addr, "/healthz").await, 200, "another address");
    drop(held);
    poll("the address to get in again", || async {
        (get_from([127, 0, 0, 1], w.addr, "/healthz").await == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn only_the_board_s_own_origin_and_allowed_ones_may_open_the_socket() {
    let w = Worker::start(&flags("--board-size 1000 --allow-origin https://mirror.example"));
    let url = w.ws_url("");
    let own = format!("http://{}", w.addr);
    assert!(try_connect(&url, &[]).await.is_ok(), "no Origin: not a browser");
    assert!(try_connect(&url, &[("Origin", &own)]).await.is_ok(), "the board's own page");
    assert!(try_connect(&url, &[("Origin", "https://mirror.example")]).await.is_ok());
    assert_eq!(try_connect(&url, &[("Origin", "https://evil.example")]).await.err(), Some(403));
    assert_eq!(w.metric("omcb_connections_refused_total{reason=\"origin\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_flood_from_64_sockets_pulls_no_more_than_the_address_budget() {
    // Defaults: a million boxes (250 KB snapshots), 1 MB/s per address after
    // a 16 MiB burst, which the 64 connect snapshots use up.
    let w = Worker::start(&[]);
    let mut sockets = Vec::new();
    for _ in 0..64 {
        let mut c = connect(&w.ws_url("")).await;
        assert!(matches!(c.recv().await, Msg::Snapshot(_)));
        sockets.push(c);
    }
    let flood = std::time::Duration::from_secs(4);
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for mut c in sockets {
        tasks.push(tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut bytes = 0usize;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            while start.elapsed() < flood {
                tokio::select! {
                    _ = tick.tick() => {
                        use futures_util::SinkExt;
                        let m = omcb_proto::v1::ClientMessage {
                            msg: Some(client_message::Msg::Resync(Resync {})),
                        };
                        let b = prost::Message::encode_to_vec(&m);
                        if c.ws.send(tungstenite::Message::Binary(b.into())).await.is_err() {
                            break;
                        }
                    }
                    m = c.ws.next() => match m {
                        Some(Ok(tungstenite::Message::Binary(b))) => bytes += b.len(),
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
            bytes
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = bytes as f64 / secs;
    eprintln!("Resync flood, 64 sockets: {bytes} bytes in {secs:.1} s = {:.2} MB/s", rate / 1e6);
    // 1 MB/s, plus the one snapshot a socket may be owed when it starts.
    assert!(rate <= 1_000_000.0 + 260_000.0 / secs, "{rate:.0} B/s pulled");
}

#[tokio::test]
async fn a_connect_loop_from_one_address_gets_its_budget_and_no_more() {
    // Defaults: 10 connects/s after 64, a million boxes (250 KB snapshots).
    let w = Worker::start(&[]);
    let url = w.ws_url("");
    let start = std::time::Instant::now();
    let (mut opened, mut refused, mut bytes) = (0u32, 0u32, 0usize);
    while start.elapsed() < std::time::Duration::from_secs(3) {
        match try_connect(&url, &[]).await {
            Ok(mut c) => {
                let Msg::Snapshot(s) = c.recv().await else { panic!("expected a Snapshot") };
                bytes += s.checked.len() + s.frozen.len();
                opened += 1;
                let _ = c.ws.close(None).await;
            }
            Err(status) => {
                assert_eq!(status, 429);
                refused += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "connect loop: {opened} opened ({:.0}/s, {:.1} MB/s of snapshots), {refused} refused 429 in {secs:.1} s",
        f64::from(opened) / secs,
        bytes as f64 / secs / 1e6
    );
    assert!(f64::from(opened) <= 64.0 + 10.0 * secs + 1.0, "{opened} connects in {secs:.1} s");
    assert!(refused > 0);
}
