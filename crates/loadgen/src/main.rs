//! `omcb-loadgen`: opens many WebSocket clients against omcb workers (or nginx),
//! drives toggles at a fixed total rate, measures what the clients see, and
//! checks at the end that every client converged to the board.
//!
//! One process holds at most ~19,000 sockets here (20,000 open files per
//! process), so `--procs P` runs P copies of itself, each with its share of
//! clients and rate, and merges their reports. `--source-ips N` spreads
//! clients over 127.0.0.1..N so a run can pass 64k sockets on loopback.
//!
//! For `scripts/chaos`: `--own-boxes K` gives each client its own K boxes and
//! audits at the end that the board holds each box's last acknowledged
//! value; `--truth-redis` reads the board from Redis instead of a worker;
//! SIGUSR1 drops every socket at once (they resume: a reconnect storm);
//! `--hostile` runs one of the abusive clients instead (see `hostile.rs`).

mod client;
mod hostile;
mod report;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};

use client::{ClientHandle, Shared};
use report::Report;

/// Load generator and convergence checker for omcb.
#[derive(Debug, Clone, Parser)]
#[command(name = "omcb-loadgen", version)]
pub struct Args {
    /// WebSocket URL of a worker or of nginx (`ws://HOST:PORT/ws`); repeat to
    /// spread clients round-robin over several.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// WebSocket clients in total (over all processes).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// New connections per second while ramping up (in total).
    #[arg(long, default_value_t = 1000.0)]
    pub ramp: f64,
    /// Toggles per second in total, spread over the clients (0 = idle sockets).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of traffic after the ramp.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Which boxes toggles hit: uniform over the board, a small hot region
    /// where toggles collide, or a window moving like people scrolling.
    #[arg(long, value_enum, default_value_t = Pattern::Uniform)]
    pub pattern: Pattern,
    /// Boxes in the hot region (`--pattern hot`) or the window (`sweep`).
    #[arg(long, default_value_t = 1000)]
    pub region: u32,
    /// Processes to spread the clients over (each holds clients/procs sockets).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Bind clients to source addresses 127.0.0.1 ..= 127.0.0.N (loopback
    /// allows ~64k connections per source address and destination).
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Clients whose receive times are sampled for toggle-to-client latency.
    #[arg(long, default_value_t = 32)]
    pub receivers: usize,
    /// Sample every Nth toggle for latency.
    #[arg(long, default_value_t = 5)]
    pub sample_every: u64,
    /// Clients that keep the whole board and are checked for convergence
    /// (0 = all; each costs ~250 KB of memory).
    #[arg(long, default_value_t = 0)]
    pub verify_clients: usize,
    /// Seconds to wait for convergence at the end.
    #[arg(long, default_value_t = 30.0)]
    pub converge_timeout: f64,
    /// Seed for the toggle targets (default: from the clock, so repeated runs
    /// against one board keep changing it instead of repeating no-op sets).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object as the last line of stdout (after the table).
    #[arg(long)]
    pub json: bool,
    /// Give each client its own K boxes (client n owns `n*K .. n*K+K`) and
    /// toggle only those, flipping one at a time, so the last acknowledged
    /// value of each is what the board must hold at the end (the ack audit).
    /// 0 = toggles follow `--pattern`.
    #[arg(long, default_value_t = 0)]
    pub own_boxes: u32,
    /// Read the board's truth for the convergence check from this Redis
    /// (`redis://HOST:PORT`) instead of the first URL's `/api/state`.
    #[arg(long)]
    pub truth_redis: Option<String>,
    /// The board's name in Redis (with `--truth-redis`).
    #[arg(long, default_value = "main")]
    pub board: String,
    /// Write the Unix time in ms to this file when traffic starts (every
    /// client connected), so a harness can time its faults.
    #[arg(long)]
    pub ready_file: Option<std::path::PathBuf>,
    /// Run abusive clients instead of the normal ones.
    #[arg(long, value_enum)]
    pub hostile: Option<hostile::Mode>,
    /// Hostile clients: the source address all their sockets come from.
    #[arg(long, default_value = "127.0.0.1")]
    pub source: Ipv4Addr,
    /// Hostile clients: bytes per second each reads (`slow-read`,
    /// `ping-flood`; 0 = reads nothing).
    #[arg(long, default_value_t = 2500)]
    pub read_rate: u64,
    /// Hostile clients: milliseconds between one socket's connect and the next.
    #[arg(long, default_value_t = 0)]
    pub stagger_ms: u64,
    /// `ping-flood`: pings per second per socket (125-byte payloads).
    #[arg(long, default_value_t = 15000)]
    pub ping_rate: u64,
    /// Viewport mode (docs/PROTOCOL.md, "Viewport subscriptions"): each
    /// client subscribes to a window of this many boxes at a random place
    /// and scrolls it like a reader (see `--scroll-ms`); 0 = every client
    /// takes the full stream. Each verifying client checks its window at the end.
    #[arg(long, default_value_t = 0)]
    pub viewport: u32,
    /// Viewport mode: mean milliseconds between one client's scrolls (each
    /// 50-150% of it). Nine scrolls in ten move the window by 100-800 boxes,
    /// up or down; one in ten jumps to a random place.
    #[arg(long, default_value_t = 2000)]
    pub scroll_ms: u64,
    /// Internal: this process is child K of --procs (its share of the work).
    #[arg(long, hide = true)]
    pub child: Option<usize>,
}

/// Toggle target patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Pattern {
    /// Uniform over the whole board.
    Uniform,
    /// A small region where many toggles hit the same boxes.
    Hot,
    /// A window that moves across the board, like people scrolling.
    Sweep,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(mode) = args.hostile {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let out = rt.block_on(hostile::run(mode, &args))?;
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if args.procs > 1 && args.child.is_none() {
        return parent(&args);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(run(args.clone()))?;
    if args.child.is_some() {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    finish(&args, &report)
}

/// Prints the table (and JSON); fails when convergence failed.
fn finish(args: &Args, report: &Report) -> anyhow::Result<()> {
    print!("{}", report.table());
    if args.json {
        println!("{}", serde_json::to_string(&report.summary())?);
    }
    if !report.converged {
        bail!("clients did not converge to the board: {}", report.convergence_detail);
    }
    Ok(())
}

/// Runs `--procs` children, each with its share, and merges their reports.
fn parent(args: &Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for k in 0..args.procs {
        let share = |n: usize| n / args.procs + usize::from(k < n % args.procs);
        let mut cmd = std::process::Command::new(&exe);
        for url in &args.urls {
            cmd.args(["--url", url]);
        }
        cmd.args(["--clients", &share(args.clients).to_string()])
            .args(["--ramp", &(args.ramp / args.procs as f64).to_string()])
            .args(["--rate", &(args.rate / args.procs as f64).to_string()])
            .args(["--duration", &args.duration.to_string()])
            .args(["--pattern", args.pattern.to_possible_value().expect("value").get_name()])
            .args(["--region", &args.region.to_string()])
            .args(["--source-ips", &args.source_ips.to_string()])
            .args(["--receivers", &share(args.receivers).max(1).to_string()])
            .args(["--sample-every", &args.sample_every.to_string()])
            .args(["--verify-clients", &share(args.verify_clients).to_string()])
            .args(["--converge-timeout", &args.converge_timeout.to_string()])
            .args(["--own-boxes", &args.own_boxes.to_string(), "--board", &args.board])
            .args(["--viewport", &args.viewport.to_string()])
            .args(["--scroll-ms", &args.scroll_ms.to_string()]);
        if let Some(r) = &args.truth_redis {
            cmd.args(["--truth-redis", r]);
        }
        if let Some(f) = &args.ready_file {
            // Each child writes its own; the harness waits for the first.
            cmd.arg("--ready-file").arg(f.with_extension(k.to_string()));
        }
        cmd.args(["--procs", &args.procs.to_string(), "--child", &k.to_string()])
            .stdout(std::process::Stdio::piped());
        children.push(cmd.spawn().context("starting a child process")?);
    }
    let mut merged: Option<Report> = None;
    for child in children {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().context("a child printed no report")?;
        let r: Report = serde_json::from_str(line).context("a child's report")?;
        merged = Some(match merged {
            None => r,
            Some(m) => m.merge(r),
        });
    }
    let report = merged.context("no children")?;
    finish(args, &report)
}

/// One process's share of the run.
async fn run(args: Args) -> anyhow::Result<Report> {
    let quiet = args.child.is_some();
    let child = args.child.unwrap_or(0);
    let shared = Arc::new(Shared::new(args.sample_every));
    let truth = client::Truth::new(args.truth_redis.as_deref(), &args.board, &args.urls)?;
    // SIGUSR1: every client drops its socket at once and resumes.
    let (drop_tx, drop_rx) = tokio::sync::watch::channel(0u64);
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    tokio::spawn(async move {
        let mut n = 0;
        while usr1.recv().await.is_some() {
            n += 1;
            let _ = drop_tx.send(n);
        }
    });
    // Clients, connected at the ramp rate.
    let mut clients: Vec<ClientHandle> = Vec::with_capacity(args.clients);
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / args.ramp.max(0.001));
    let mut progress = Progress::new(quiet);
    for i in 0..args.clients {
        let global = child + i * args.procs.max(1);
        let url = args.urls[global % args.urls.len()].clone();
        let source =
            Ipv4Addr::new(127, 0, 0, 1 + (global % usize::from(args.source_ips.max(1))) as u8);
        let receiver = i < args.receivers;
        let verify = args.verify_clients == 0 || i < args.verify_clients;
        let own = (args.own_boxes > 0).then(|| (global as u32 * args.own_boxes, args.own_boxes));
        let viewport = (args.viewport > 0).then(|| client::Viewport {
            count: args.viewport,
            scroll_ms: args.scroll_ms.max(1),
            seed: (global as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ args.seed.unwrap_or(0),
        });
        let spec = client::ClientSpec { url, source, receiver, verify, own, viewport };
        clients.push(client::spawn(spec, shared.clone(), drop_rx.clone()));
        tokio::time::sleep_until((started + gap * (i as u32 + 1)).into()).await;
        progress.tick(&shared, &clients, "ramp");
    }
    // Wait until every client has its first snapshot.
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.connected.load(Ordering::Relaxed) < clients.len() as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} clients connected",
                shared.connected.load(Ordering::Relaxed),
                clients.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        progress.tick(&shared, &clients, "connect");
    }
    let ramp_s = started.elapsed().as_secs_f64();
    let size = shared.board_size.load(Ordering::Relaxed);
    let owned = (args.clients * args.procs.max(1)) as u64 * u64::from(args.own_boxes);
    if owned > size {
        bail!(
            "--own-boxes {} for every client needs {owned} boxes; the board has {size}",
            args.own_boxes
        );
    }
    let traffic_start_ms = client::unix_ms();
    if let Some(f) = &args.ready_file {
        std::fs::write(f, traffic_start_ms.to_string()).context("writing --ready-file")?;
    }

    // Traffic: toggles at the total rate, round-robin over clients.
    shared.reset_traffic_counters();
    let traffic_start = Instant::now();
    let end = traffic_start + Duration::from_secs_f64(args.duration);
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut picker = client::Picker::new(
        args.pattern,
        args.region,
        seed ^ (child as u64).wrapping_mul(0x9e37_79b9),
    );
    let per = Duration::from_secs_f64(1.0 / args.rate.max(1e-9));
    let mut n: u64 = 0;
    let mut next = traffic_start;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if args.rate > 0.0 && now >= next {
            let c = &clients[(n as usize) % clients.len()];
            if args.own_boxes > 0 {
                c.toggle_own();
            } else {
                let size = shared.board_size.load(Ordering::Relaxed) as u32;
                let (index, checked) = picker.next(size.max(1), traffic_start.elapsed());
                c.toggle(index, checked);
            }
            n += 1;
            next += per;
            continue;
        }
        let wake =
            if args.rate > 0.0 { next.min(end) } else { end.min(now + Duration::from_secs(1)) };
        tokio::time::sleep_until(wake.into()).await;
        progress.tick(&shared, &clients, "traffic");
    }
    let traffic_s = traffic_start.elapsed().as_secs_f64();
    let traffic_end_ms = client::unix_ms();
    let rx_bytes = shared.bytes.load(Ordering::Relaxed);
    let rx_frames = shared.frames.load(Ordering::Relaxed);

    // Convergence: every verifying client holds exactly the board at the final seq.
    let audit = client::converge(&truth, &clients, args.converge_timeout).await;
    for c in &clients {
        c.stop();
    }
    Ok(Report::build(
        &args,
        &shared,
        clients.len(),
        ramp_s,
        traffic_s,
        rx_bytes,
        rx_frames,
        (traffic_start_ms, traffic_end_ms),
        audit,
    ))
}

/// The live progress line on stderr, once a second.
struct Progress {
    quiet: bool,
    last: Instant,
    started: Instant,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self { quiet, last: Instant::now(), started: Instant::now() }
    }

    fn tick(&mut self, s: &Shared, clients: &[ClientHandle], phase: &str) {
        if self.quiet || self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = Instant::now();
        eprintln!(
            "[{:>5.1}s] {phase:<8} clients {}/{}  toggles sent {} accepted {}  received {:.1} MB  reconnects {}",
            self.started.elapsed().as_secs_f64(),
            s.connected.load(Ordering::Relaxed),
            clients.len(),
            s.sent.load(Ordering::Relaxed),
            s.accepted.load(Ordering::Relaxed),
            s.bytes.load(Ordering::Relaxed) as f64 / 1e6,
            s.reconnects.load(Ordering::Relaxed),
        );
    }
}
