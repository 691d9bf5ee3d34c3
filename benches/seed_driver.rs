//! `omcb-bench-seed`: drives the seed's toggle script (`seed_set_bit.lua`) on a
//! Redis at a fixed rate, the way the seed's fleet did: two servers each
//! sending toggles over their own connection (one `EVALSHA` per toggle), and
//! two subscribers (one per server) reading every published toggle. It is
//! the baseline of scripts/bench's `redis_cpu` part, which reads Redis's CPU
//! time and `INFO commandstats` around this run and around omcb's.
//!
//! ```text
//! omcb-bench-seed --redis 127.0.0.1:6379 --rate 1000 --duration 10
//! ```
//!
//! Prints one JSON object: toggles sent, those that changed a box, messages
//! the subscribers received, and the seconds of traffic.
//! Indices are uniform over a million boxes and values are random, like
//! omcb-loadgen's `--pattern uniform`, so about half the toggles change a box.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

const SCRIPT: &str = include_str!("seed_set_bit.lua");
const BOXES: u64 = 1_000_000;
const CHANNEL: &str = "bit_toggle_channel";
/// Servers in the seed's fleet: command connections and subscribers.
const SERVERS: usize = 2;

struct Args {
    redis: String,
    rate: f64,
    duration: f64,
    seed: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { redis: String::new(), rate: 1000.0, duration: 10.0, seed: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--redis" => a.redis = value()?.trim_start_matches("redis://").to_string(),
            "--rate" => a.rate = value()?.parse().context("--rate")?,
            "--duration" => a.duration = value()?.parse().context("--duration")?,
            "--seed" => a.seed = value()?.parse().context("--seed")?,
            _ => bail!(
                "unknown argument {flag}; usage: --redis HOST:PORT [--rate N] [--duration S] [--seed N]"
            ),
        }
    }
    ensure!(!a.redis.is_empty(), "--redis HOST:PORT is required");
    ensure!(a.rate > 0.0 && a.duration > 0.0, "--rate and --duration must be positive");
    Ok(a)
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    req
}

/// Reads one RESP reply; returns its integer (for `:n`) or 0, or the bulk
/// string's bytes in the second field. Errors become errors.
async fn reply(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> anyhow::Result<(i64, Option<Vec<u8>>)> {
    let mut line = String::new();
    ensure!(r.read_line(&mut line).await? > 0, "Redis closed the connection");
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1);
    Ok(match kind {
        ":" => (rest.parse()?, None),
        "+" => (0, None),
        "$" => {
            let n: i64 = rest.parse()?;
            if n < 0 {
                return Ok((0, None));
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf).await?;
            buf.truncate(n as usize);
            (0, Some(buf))
        }
        "*" => {
            // Subscription confirmations and messages: read and drop the parts.
            let n: i64 = rest.parse()?;
            for _ in 0..n.max(0) {
                Box::pin(reply(r)).await?;
            }
            (n, None)
        }
        _ => bail!("Redis answered {line}"),
    })
}

/// One subscriber: subscribes, then counts the messages it reads into `seen`.
async fn subscriber(addr: &str, seen: Arc<AtomicU64>) -> anyhow::Result<()> {
    let s = TcpStream::connect(addr).await?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(&command(&[b"SUBSCRIBE", CHANNEL.as_bytes()])).await?;
    reply(&mut r).await?;
    tokio::spawn(async move {
        let _keep = w;
        while reply(&mut r).await.is_ok() {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(())
}

/// One server's command connection: sends each toggle it is handed and waits
/// for its answer (the seed's Flask handler did the same); counts changes.
async fn server(
    addr: String,
    sha: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(u64, u8)>,
) -> anyhow::Result<(u64, u64)> {
    let s = TcpStream::connect(&addr).await?;
    let (r, mut w): (_, OwnedWriteHalf) = s.into_split();
    let mut r = BufReader::new(r);
    let (mut sent, mut changed) = (0, 0);
    while let Some((index, value)) = rx.recv().await {
        let index = index.to_string();
        let value = value.to_string();
        let message = format!("{{\"index\": {index}, \"value\": {value}}}");
        let req = command(&[
            b"EVALSHA",
            sha.as_bytes(),
            b"3",
            b"bitset",
            b"count",
            CHANNEL.as_bytes(),
            index.as_bytes(),
            value.as_bytes(),
            message.as_bytes(),
        ]);
        w.write_all(&req).await?;
        let (diff, _) = reply(&mut r).await?;
        sent += 1;
        changed += u64::from(diff != 0);
    }
    Ok((sent, changed))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let s =
        TcpStream::connect(&a.redis).await.with_context(|| format!("connecting to {}", a.redis))?;
    let mut s = BufReader::new(s);
    s.write_all(&command(&[b"SCRIPT", b"LOAD", SCRIPT.as_bytes()])).await?;
    let sha = String::from_utf8(reply(&mut s).await?.1.context("SCRIPT LOAD answered no sha")?)?;

    let seen = Arc::new(AtomicU64::new(0));
    for _ in 0..SERVERS {
        subscriber(&a.redis, seen.clone()).await?;
    }
    let mut senders = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..SERVERS {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        senders.push(tx);
        servers.push(tokio::spawn(server(a.redis.clone(), sha.clone(), rx)));
    }

    let mut rng = omcb_testkit::rng::XorShift64::new(a.seed);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.duration);
    let per = Duration::from_secs_f64(1.0 / a.rate);
    let mut next = start;
    let mut n = 0usize;
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let r = rng.next_u64();
        senders[n % SERVERS].send((r % BOXES, (r >> 63) as u8)).context("a server stopped")?;
        n += 1;
        next += per;
    }
    drop(senders);
    let (mut sent, mut changed) = (0, 0);
    for s in servers {
        let (a, b) = s.await??;
        sent += a;
        changed += b;
    }
    let traffic_s = start.elapsed().as_secs_f64();
    // Every published message reaches both subscribers: wait until they have
    // read them all (or a deadline passes; the count then tells).
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::Relaxed) < sent * SERVERS as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = seen.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "toggles": sent,
            "changed": changed,
            "subscriber_messages": received,
            "traffic_s": traffic_s,
        })
    );
    Ok(())
}
