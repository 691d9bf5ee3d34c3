//! Abusive clients for `scripts/chaos`: what a hostile visitor would run
//! against the board, each from one source address, for `--duration`
//! seconds, reporting what the server did to them as one JSON line.
//!
//! - `flood`: `--clients` sockets toggling as fast as the server answers
//!   (16 toggles in flight per socket), reconnecting at once when closed:
//!   what one address can push through the per-address budget.
//! - `ping-flood`: `--clients` sockets sending 125-byte pings at
//!   `--ping-rate` per second while reading `--read-rate` bytes a second:
//!   what the server queues for a client that sends more than it reads.
//! - `slow-read`: `--clients` sockets reading `--read-rate` bytes a second
//!   and sending nothing: a client that cannot keep up with the board.
//!   `--stagger-ms` spreads their connects, so they fall behind at different
//!   seqs and the server cannot share one snapshot's bytes among them.
//!
//! Ping and slow sockets speak raw WebSocket over TCP with a small receive
//! buffer, so nothing on this side reads ahead of the chosen rate.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use omcb_proto::v1::{ClientMessage, ServerMessage, Toggle, client_message, server_message::Msg};
use prost::Message as _;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::Args;

/// Which abuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Flood,
    PingFlood,
    SlowRead,
}

/// Runs `--clients` hostile sockets of `mode` for `--duration` seconds.
pub async fn run(mode: Mode, args: &Args) -> anyhow::Result<serde_json::Value> {
    let url = args.urls.first().ok_or_else(|| anyhow::anyhow!("--url is required"))?.clone();
    let until = Instant::now() + Duration::from_secs_f64(args.duration);
    match mode {
        Mode::Flood => flood(&url, args, until).await,
        Mode::PingFlood | Mode::SlowRead => raw(mode, &url, args, until).await,
    }
}

#[derive(Debug, Default)]
struct FloodCounts {
    sent: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    connects: AtomicU64,
    closes: AtomicU64,
    close_1008: AtomicU64,
    connect_failures: AtomicU64,
}

async fn flood(url: &str, args: &Args, until: Instant) -> anyhow::Result<serde_json::Value> {
    let counts = Arc::new(FloodCounts::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..args.clients {
        let (url, counts, source, region) =
            (url.to_string(), counts.clone(), args.source, args.region);
        tasks.push(tokio::spawn(async move {
            let mut rng = omcb_testkit::rng::XorShift64::new(0x5eed + k as u64);
            while Instant::now() < until {
                let Ok(Ok(ws)) =
                    tokio::time::timeout_at(until.into(), crate::client::connect(&url, source))
                        .await
                else {
                    counts.connect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                counts.connects.fetch_add(1, Ordering::Relaxed);
                let (mut tx, mut rx) = ws.split();
                let mut size = 0u32;
                let mut in_flight = 0u32;
                let mut id = 0u32;
                loop {
                    // Keep 16 toggles in flight once the snapshot told the size.
                    while size > 0 && in_flight < 16 {
                        id = id.wrapping_add(1);
                        let r = rng.next_u64();
                        // The top `--region` boxes: far from the clients' own boxes.
                        let index = size - 1 - (r % u64::from(region.clamp(1, size))) as u32;
                        let msg = ClientMessage {
                            msg: Some(client_message::Msg::Toggle(Toggle {
                                index,
                                checked: r >> 63 == 1,
                                request_id: id,
                            })),
                        };
                        if tx.send(Message::Binary(msg.encode_to_vec().into())).await.is_err() {
                            break;
                        }
                        counts.sent.fetch_add(1, Ordering::Relaxed);
                        in_flight += 1;
                    }
                    let next = tokio::time::timeout_at(until.into(), rx.next()).await;
                    match next {
                        Err(_) => return,
                        Ok(Some(Ok(Message::Binary(b)))) => match ServerMessage::decode(b.as_ref())
                        {
                            Ok(ServerMessage { msg: Some(Msg::Snapshot(s)) }) => size = s.size,
                            Ok(ServerMessage { msg: Some(Msg::ToggleResult(r)) }) => {
                                in_flight = in_flight.saturating_sub(1);
                                let c = if r.accepted { &counts.accepted } else { &counts.refused };
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        },
                        Ok(Some(Ok(Message::Close(f)))) => {
                            if f.is_some_and(|f| u16::from(f.code) == 1008) {
                                counts.close_1008.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                        Ok(Some(Ok(_))) => {}
                        Ok(None | Some(Err(_))) => break,
                    }
                }
                counts.closes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok(json!({
        "mode": "flood", "source": args.source.to_string(), "sockets": args.clients, "seconds": secs,
        "toggles_sent": g(&counts.sent), "toggles_accepted": g(&counts.accepted),
        "toggles_refused": g(&counts.refused), "accepted_per_s": g(&counts.accepted) as f64 / secs,
        "connects": g(&counts.connects), "closes": g(&counts.closes), "closes_1008": g(&counts.close_1008),
        "connect_failures": g(&counts.connect_failures),
    }))
}

/// One raw socket's fate.
#[derive(Debug, serde::Serialize)]
struct RawOutcome {
    /// Seconds from the upgrade until the server closed it (None: open at the end).
    closed_after_s: Option<f64>,
    bytes_sent: u64,
    bytes_read: u64,
    error: Option<String>,
}

async fn raw(
    mode: Mode,
    url: &str,
    args: &Args,
    until: Instant,
) -> anyhow::Result<serde_json::Value> {
    let mut tasks = Vec::new();
    let stagger = Duration::from_millis(args.stagger_ms);
    for k in 0..args.clients {
        let (url, source, read_rate, ping_rate) =
            (url.to_string(), args.source, args.read_rate, args.ping_rate);
        let pings = if mode == Mode::PingFlood { ping_rate } else { 0 };
        let start = Instant::now() + stagger * k as u32;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            match raw_socket(&url, source, read_rate, pings, until).await {
                Ok(o) => o,
                Err(e) => RawOutcome {
                    closed_after_s: None,
                    bytes_sent: 0,
                    bytes_read: 0,
                    error: Some(format!("{e:#}")),
                },
            }
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await?);
    }
    let closed: Vec<f64> = outcomes.iter().filter_map(|o| o.closed_after_s).collect();
    let name = if mode == Mode::PingFlood { "ping-flood" } else { "slow-read" };
    Ok(json!({
        "mode": name, "source": args.source.to_string(), "sockets": args.clients,
        "read_rate": args.read_rate, "ping_rate": if mode == Mode::PingFlood { args.ping_rate } else { 0 },
        "closed": closed.len(),
        "closed_after_max_s": closed.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
        "errors": outcomes.iter().filter(|o| o.error.is_some()).count(),
        "sockets_detail": outcomes,
    }))
}

/// Upgrades by hand, then sends pings at `pings`/s (0 = none) and reads at
/// `read_rate` B/s until `until` or until the server closes.
async fn raw_socket(
    url: &str,
    source: Ipv4Addr,
    read_rate: u64,
    pings: u64,
    until: Instant,
) -> anyhow::Result<RawOutcome> {
    let (socket, addr, hostport, path) = crate::client::bound_socket(url, source).await?;
    // A small window: the server's bytes wait on its side, not in our kernel.
    socket.set_recv_buffer_size(4096)?;
    let mut s: TcpStream = socket.connect(addr).await?;
    let req = format!(
        "GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(s.read(&mut byte).await? == 1, "closed during the upgrade");
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head);
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 101"),
        "no upgrade: {}",
        status.lines().next().unwrap_or("")
    );
    let upgraded = Instant::now();
    // 64 masked pings with 125-byte payloads, written in one go.
    let mut frames = Vec::new();
    for _ in 0..64 {
        frames.extend_from_slice(&[0x89, 0x80 | 125, 1, 2, 3, 4]);
        frames.extend((0..125u8).map(|i| i ^ [1, 2, 3, 4][usize::from(i % 4)]));
    }
    let (mut rd, mut wr) = s.into_split();
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            if pings == 0 {
                return;
            }
            // 64 pings per write, paced to the rate.
            let gap = Duration::from_secs_f64(64.0 / pings as f64);
            let mut next = Instant::now();
            while Instant::now() < until {
                if wr.write_all(&frames).await.is_err() {
                    return;
                }
                sent.fetch_add(frames.len() as u64, Ordering::Relaxed);
                next += gap;
                tokio::time::sleep_until(next.into()).await;
            }
        })
    };
    let mut read = 0u64;
    let mut buf = vec![0u8; 1024];
    let mut closed = None;
    // Reads in 100 ms slices of the rate.
    let slice = (read_rate / 10) as usize;
    'outer: while Instant::now() < until {
        let tick = Instant::now() + Duration::from_millis(100);
        let mut left = slice;
        while left > 0 {
            let n = left.min(buf.len());
            match tokio::time::timeout_at(tick.into(), rd.read(&mut buf[..n])).await {
                Err(_) => break,
                Ok(Ok(0) | Err(_)) => {
                    closed = Some(upgraded.elapsed().as_secs_f64());
                    break 'outer;
                }
                Ok(Ok(k)) => {
                    read += k as u64;
                    left -= k;
                }
            }
        }
        if slice == 0 && writer.is_finished() && pings > 0 {
            // Reading nothing: the writer failing is how we learn of the close.
            closed = Some(upgraded.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep_until(tick.into()).await;
    }
    if closed.is_none() && pings > 0 && writer.is_finished() && Instant::now() < until {
        closed = Some(upgraded.elapsed().as_secs_f64());
    }
    writer.abort();
    Ok(RawOutcome {
        closed_after_s: closed,
        bytes_sent: sent.load(Ordering::Relaxed),
        bytes_read: read,
        error: None,
    })
}
