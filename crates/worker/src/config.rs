//! The worker's configuration: one struct, built by clap from flags and `OMCB_*` variables.
//!
//! Every value is checked where clap parses it (its range, or a duration's
//! bounds), so a value that would panic or misbehave later (a zero ping
//! interval, a duration past what `Instant` arithmetic holds, a zero queue)
//! is refused at start with clap's message and exit code 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `omcb serve` can be told. Each flag has an `OMCB_*` environment
/// variable (the systemd unit's environment file uses them).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address for HTTP and WebSocket clients (port 0 picks a free port).
    #[arg(long, env = "OMCB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address for Prometheus `/metrics` and the operator's `/admin/` routes
    /// (`omcb admin`); off when not given. Keep it private: it has no login.
    #[arg(long, env = "OMCB_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Fleet mode: keep the board in this Redis (`redis://HOST:PORT`), shared by
    /// every worker pointed at it. Without it the board is embedded in this process.
    /// `rediss://` is TLS; `USER:PASSWORD@` (or `:PASSWORD@`) logs in. Checked by
    /// the store, not here: clap's message would print the password.
    #[arg(long, env = "OMCB_REDIS")]
    pub redis: Option<String>,

    /// For `rediss://`: trust only the CA certificates in this PEM file (a
    /// private CA, such as a managed Redis' downloadable CA) instead of the
    /// system's CA store.
    #[arg(long, env = "OMCB_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Fleet mode: space this worker's toggle script calls at least this far
    /// apart, so that under load each carries the toggles of an interval
    /// (less Redis CPU per toggle, up to this much more latency per toggle;
    /// none after a quiet spell). `0ms`: a call goes as soon as the one
    /// before it returned, with every toggle that queued meanwhile.
    #[arg(long, env = "OMCB_TOGGLE_GATHER", default_value = "5ms",
          value_parser = duration(Duration::ZERO, Duration::from_millis(100)))]
    pub toggle_gather: Duration,

    /// Name of the board in Redis (its keys are `{NAME}:bits`, ...).
    #[arg(long, env = "OMCB_BOARD", default_value = "main")]
    pub board: String,

    /// Where the embedded store keeps the board; without it the board lives
    /// only in memory and is lost on exit.
    #[arg(long, env = "OMCB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Number of boxes on the board (fixed once the board exists).
    #[arg(long, env = "OMCB_BOARD_SIZE", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub board_size: u32,

    /// A box checked for this long can no longer be unchecked and freezes
    /// (e.g. `90s`, `10m`, `1h`); off when not given.
    #[arg(long, env = "OMCB_FREEZE_AFTER", value_parser = duration(Duration::from_millis(1), YEARS_100))]
    pub freeze_after: Option<Duration>,

    /// Refuse checking when this many boxes are checked.
    #[arg(long, env = "OMCB_MAX_CHECKED")]
    pub max_checked: Option<u32>,

    /// Fan-out tick: changes are coalesced into one Batch per tick. The
    /// shortest tick, and the tick while `--egress-budget` asks for no
    /// longer one (see `tick.rs`).
    #[arg(long, env = "OMCB_BATCH_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_ms: u64,

    /// From a change's commit to its last socket write: the tick grows for
    /// `--egress-budget` only while changes still reach every socket within
    /// this. Must be longer than `--batch-ms`.
    #[arg(long, env = "OMCB_LATENCY_BUDGET", default_value = "250ms",
          value_parser = duration(Duration::from_millis(2), Duration::from_secs(60)))]
    pub latency_budget: Duration,

    /// Sustained toggles per second allowed per connection.
    #[arg(long, env = "OMCB_TOGGLE_RATE", default_value_t = 20.0, value_parser = positive)]
    pub toggle_rate: f64,

    /// Toggles a connection may send at once before the rate applies.
    #[arg(long, env = "OMCB_TOGGLE_BURST", default_value_t = 40.0, value_parser = positive)]
    pub toggle_burst: f64,

    /// Rate-limited toggles a connection may send (beyond its burst) before it
    /// is closed with 1008 as abusive; refills at the toggle rate.
    #[arg(long, env = "OMCB_ABUSE_BURST", default_value_t = 200.0, value_parser = positive)]
    pub abuse_burst: f64,

    /// Frames per second a connection may send on top of what its toggle
    /// allowance admits (pings, pongs, Resyncs); five seconds' worth may come
    /// at once. A connection over its receive budget is closed with 1008.
    #[arg(long, env = "OMCB_RECV_FRAME_RATE", default_value_t = 20.0, value_parser = positive)]
    pub recv_frame_rate: f64,

    /// Payload bytes per second a connection may send on top of what its
    /// toggle allowance admits; five seconds' worth may come at once. Over it: 1008.
    #[arg(long, env = "OMCB_RECV_BYTE_RATE", default_value_t = 16_384.0, value_parser = positive)]
    pub recv_byte_rate: f64,

    /// WebSocket connections this worker holds at most; more get close 1013.
    #[arg(long, env = "OMCB_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = sizes().range(1..=10_000_000))]
    pub max_connections: usize,

    /// WebSocket connections one client address may hold on this worker (a
    /// second line behind nginx's `limit_conn`); more get close 1013. 0 = no cap.
    #[arg(long, env = "OMCB_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    pub max_connections_per_ip: usize,

    /// Addresses of proxies (nginx) whose `X-Forwarded-For` is believed; from
    /// anyone else the header is ignored and the peer address is the client.
    /// Repeat the flag or separate with commas.
    #[arg(long, env = "OMCB_TRUSTED_PROXY", value_delimiter = ',')]
    pub trusted_proxy: Vec<std::net::IpAddr>,

    /// Largest client frame (or fragmented message) accepted; larger closes with 1009.
    #[arg(long, env = "OMCB_MAX_FRAME", default_value_t = 1024,
          value_parser = sizes().range(16..=16 * 1024 * 1024))]
    pub max_frame: usize,

    /// Batches a socket may fall behind before it gets a Snapshot instead.
    #[arg(long, env = "OMCB_SEND_QUEUE", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub send_queue: u64,

    /// A socket that does not finish writing a frame (its oldest queued one)
    /// within this long cannot keep up and is closed (1013). Bytes trickling
    /// out do not count: a 250 KB snapshot needs 25 KB/s at the default.
    #[arg(long, env = "OMCB_SEND_TIMEOUT", default_value = "10s",
          value_parser = duration(Duration::from_millis(10), HOUR))]
    pub send_timeout: Duration,

    /// Server pings this often; a client silent for three intervals is closed.
    /// Well inside nginx's default 60 s proxy_read_timeout.
    #[arg(long, env = "OMCB_PING_INTERVAL", default_value = "20s",
          value_parser = duration(Duration::from_millis(10), HOUR))]
    pub ping_interval: Duration,

    /// Kernel send buffer per client socket (SO_SNDBUF), bounding what a
    /// stalled client can pin in kernel memory; 0 leaves the kernel's autotuning
    /// (up to `net.ipv4.tcp_wmem`'s max, 4 MiB by default, per socket).
    #[arg(long, env = "OMCB_SOCKET_SEND_BUFFER", default_value_t = 131_072,
          value_parser = sizes().range(0..=1 << 30))]
    pub socket_send_buffer: usize,

    /// Recent batches kept so a reconnecting client resumes with `?since=`
    /// instead of a snapshot (1200 x 50 ms = one minute of changes).
    #[arg(long, env = "OMCB_RESUME_BATCHES", default_value_t = 1200,
          value_parser = sizes().range(0..=1_000_000))]
    pub resume_batches: usize,

    /// Serve the web client from this directory instead of the copy built into the binary.
    #[arg(long, env = "OMCB_WEB_DIR")]
    pub web_dir: Option<PathBuf>,

    /// How long shutdown waits for sockets to take their close frame.
    #[arg(long, env = "OMCB_SHUTDOWN_GRACE", default_value = "5s",
          value_parser = duration(Duration::ZERO, HOUR))]
    pub shutdown_grace: Duration,

    /// IPv6 clients are counted per prefix of this many bits (one home or host
    /// gets a /64); IPv4 clients per address.
    #[arg(long, env = "OMCB_IPV6_PREFIX", default_value_t = 64,
          value_parser = clap::value_parser!(u8).range(1..=128))]
    pub ipv6_prefix: u8,

    /// Sustained toggles per second one client address may send across all of
    /// its sockets; 0 = no per-address budget. Default: 2 x `--toggle-rate`.
    #[arg(long, env = "OMCB_IP_TOGGLE_RATE", value_parser = parse_rate)]
    pub ip_toggle_rate: Option<f64>,

    /// Toggles one client address may send at once across its sockets.
    /// Default: 5 x `--toggle-burst`.
    #[arg(long, env = "OMCB_IP_TOGGLE_BURST", value_parser = parse_rate)]
    pub ip_toggle_burst: Option<f64>,

    /// New WebSockets per second one client address may open (more get HTTP
    /// 429 before the upgrade); 0 = no budget.
    #[arg(long, env = "OMCB_IP_CONNECT_RATE", default_value_t = 10.0, value_parser = parse_rate)]
    pub ip_connect_rate: f64,

    /// New WebSockets one client address may open at once.
    #[arg(long, env = "OMCB_IP_CONNECT_BURST", default_value_t = 64.0, value_parser = parse_rate)]
    pub ip_connect_burst: f64,

    /// Snapshot bytes per second one client address may pull (connect
    /// snapshots and Resyncs); 0 = no budget. A million boxes is 250 KB a snapshot.
    #[arg(long, env = "OMCB_IP_SNAPSHOT_RATE", default_value_t = 1_000_000.0, value_parser = parse_rate)]
    pub ip_snapshot_rate: f64,

    /// Snapshot bytes one client address may pull at once (the default is the
    /// connect snapshots of 64 sockets on a million boxes).
    #[arg(long, env = "OMCB_IP_SNAPSHOT_BURST", default_value_t = 16_777_216.0, value_parser = parse_rate)]
    pub ip_snapshot_burst: f64,

    /// Client addresses whose budgets are remembered at most (~250 bytes each).
    #[arg(long, env = "OMCB_ADDRESS_TABLE_SIZE", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub address_table_size: u64,

    /// Plain HTTP connections one client address may hold (more get 429); 0 =
    /// no cap. Not applied to `--trusted-proxy` peers (nginx limits per client).
    #[arg(long, env = "OMCB_MAX_HTTP_CONNECTIONS_PER_IP", default_value_t = 32)]
    pub max_http_connections_per_ip: usize,

    /// An HTTP response the client does not take for this long (the kernel
    /// buffer stays full) closes the connection.
    #[arg(long, env = "OMCB_HTTP_WRITE_TIMEOUT", default_value = "10s",
          value_parser = duration(Duration::from_millis(10), HOUR))]
    pub http_write_timeout: Duration,

    /// More page origins allowed to open `/ws` (e.g. `https://board.example`),
    /// besides the board's own host; `*` allows any. Repeat or separate with commas.
    #[arg(long, env = "OMCB_ALLOW_ORIGIN", value_delimiter = ',', value_parser = parse_origin)]
    pub allow_origin: Vec<String>,

    /// Bytes per second this worker may send to its sockets (its share of
    /// the droplet's egress, e.g. `30MB`; K/M/G are powers of 1000,
    /// KiB/MiB/GiB of 1024). Over it, the tick grows (up to what
    /// `--latency-budget` allows) so batches coalesce more and the bytes fit.
    /// Exported as `omcb_egress_budget_bytes_per_second`.
    #[arg(long, env = "OMCB_EGRESS_BUDGET", value_parser = parse_byte_rate)]
    pub egress_budget: Option<u64>,

    /// The board's public address (`https://board.example`), used in what
    /// the widget hands to other sites (`/oembed`'s HTML and provider URL).
    /// Without it the address is taken from each request's `Host` (and
    /// `X-Forwarded-Proto` from a `--trusted-proxy`); set it in production,
    /// so no request can choose the address a cache keeps.
    #[arg(long, env = "OMCB_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,

    /// The operator's secret key for the origin of changes (a keyed hash of
    /// the client's address, kept in the change archive instead of the
    /// address): a file of 32 hex digits (`openssl rand -hex 16`). Every
    /// worker of a fleet and `omcb admin` need the same one. Embedded
    /// without it, a key made once in `--data-dir`; a fleet worker without
    /// it records no origins (see `origin.rs`).
    #[arg(long, env = "OMCB_ORIGIN_KEY_FILE")]
    pub origin_key_file: Option<PathBuf>,

    /// Keep every change of the board in this directory (the change archive:
    /// hourly segment files per epoch; see docs/OPERATIONS.md). In a fleet
    /// one worker at a time writes it, under a lease; give every worker that
    /// may take over the same directory.
    #[arg(long, env = "OMCB_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,

    /// Delete archive segments whose hour is older than this (e.g. `30d`).
    #[arg(long, env = "OMCB_ARCHIVE_KEEP", default_value = "30d",
          value_parser = duration(HOUR, YEARS_100))]
    pub archive_keep: Duration,

    /// Log lines as `text` or `json` (one object per line, with the
    /// connection id of socket lines); the level comes from `OMCB_LOG`.
    #[arg(long, env = "OMCB_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: crate::logging::LogFormat,
}

/// Parses a byte rate above zero: a count with an optional unit (`B`, `KB`,
/// `MB`, `GB` in powers of 1000; `KiB`, `MiB`, `GiB` in powers of 1024; `K`,
/// `M`, `G` alone as 1000s) and an optional `/s`: `30MB`, `30 MB/s`, `250000`.
pub fn parse_byte_rate(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a byte rate above 0 like 30MB, 512KiB or 250000");
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = (number * scale).round();
    if !(1.0..=1e15).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Parses an `--allow-origin` entry: `*`, or an origin as browsers send it
/// (`scheme://host[:port]`, no path), compared case-insensitively.
pub fn parse_origin(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    if s == "*" {
        return Ok(s.to_owned());
    }
    match s.split_once("://") {
        Some((scheme, host))
            if !scheme.is_empty()
                && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                && !host.is_empty()
                && !host.contains(['/', '?', '#', ' ', '@']) =>
        {
            Ok(s.to_ascii_lowercase())
        }
        _ => Err(format!("`{s}` is not an origin like https://board.example or http://host:8080")),
    }
}

/// Parses `--public-url`: an `http` or `https` origin (no path), kept
/// lower-case and without a trailing slash.
pub fn parse_public_url(s: &str) -> Result<String, String> {
    let origin = parse_origin(s)?;
    if origin.starts_with("http://") || origin.starts_with("https://") {
        Ok(origin)
    } else {
        Err(format!("`{s}` is not a public URL like https://board.example or http://host:8080"))
    }
}

/// Parses a non-negative, finite rate or amount.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a non-negative number")),
    }
}

const HOUR: Duration = Duration::from_secs(3600);
pub(crate) const YEARS_100: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a duration (`250ms`, `20s`, `10m`, `1h 30m`, humantime's syntax, or
/// bare seconds) and refuses one outside `min..=max`. The bounds keep every
/// `Instant + duration` (and `ping_interval * 3`) far from overflow.
pub fn parse_duration(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("`{s}` is not a duration like 500ms, 20s, 10m, 1h ({e})"))?,
    };
    if d < min || d > max {
        return Err(format!(
            "`{s}` is out of range: between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A clap value parser for durations in `min..=max`.
fn duration(min: Duration, max: Duration) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |s| parse_duration(s, min, max)
}

/// A clap value parser for counts and sizes, given a range.
fn sizes() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new()
}

/// A finite number above zero (a rate or a burst; 0 or NaN would refuse or admit everything).
fn positive(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e12 => Ok(v),
        _ => Err(format!("`{s}` is not a number above 0")),
    }
}

impl Config {
    /// The board settings this config asks the store for.
    pub fn board(&self) -> omcb_store::BoardConfig {
        omcb_store::BoardConfig {
            size: self.board_size,
            max_checked: self.max_checked,
            freeze_after_ms: self.freeze_after.map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Per-address toggle rate (`--ip-toggle-rate`, or its default).
    pub fn ip_toggle_rate(&self) -> f64 {
        self.ip_toggle_rate.unwrap_or(2.0 * self.toggle_rate)
    }

    /// Per-address toggle burst (`--ip-toggle-burst`, or its default).
    pub fn ip_toggle_burst(&self) -> f64 {
        self.ip_toggle_burst.unwrap_or(5.0 * self.toggle_burst)
    }

    /// The fan-out tick (the shortest; see [`Config::tick_budgets`]).
    pub fn batch_interval(&self) -> Duration {
        Duration::from_millis(self.batch_ms)
    }

    /// What the hub's tick follows (`tick.rs`).
    pub fn tick_budgets(&self) -> crate::tick::Budgets {
        crate::tick::Budgets {
            min_tick: self.batch_interval(),
            latency: self.latency_budget,
            egress: self.egress_budget,
        }
    }

    /// Checks what clap cannot check flag by flag: the message for a
    /// configuration the worker refuses to start with.
    pub fn check(&self) -> Result<(), String> {
        if self.latency_budget <= self.batch_interval() {
            return Err(format!(
                "--latency-budget {} must be longer than --batch-ms {}: a change can wait a whole tick",
                humantime::format_duration(self.latency_budget),
                self.batch_ms
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &str) -> Result<Config, clap::Error> {
        let argv = std::iter::once("omcb").chain(args.split_whitespace());
        Cli::try_parse_from(argv).map(|c| c.config)
    }

    #[test]
    fn durations() {
        let any = |s| parse_duration(s, Duration::ZERO, YEARS_100);
        assert_eq!(any("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(any("20s").unwrap(), Duration::from_secs(20));
        assert_eq!(any("20").unwrap(), Duration::from_secs(20));
        assert_eq!(any("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(any("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(any("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(any("ten").is_err());
        assert!(any("5q").is_err());
        assert!(any("-1s").is_err());
    }

    #[test]
    fn defaults_parse() {
        let c = parse("").unwrap();
        assert_eq!(c.ping_interval, Duration::from_secs(20));
        assert_eq!(c.send_timeout, Duration::from_secs(10));
    }

    /// Values that used to panic a socket or the parser, or make the worker
    /// refuse (or admit) everything, are refused with clap's error (exit 2).
    #[test]
    fn values_that_would_panic_or_misbehave_are_refused() {
        for args in [
            "--ping-interval 0",
            "--ping-interval 0s",
            "--ping-interval 1ms",
            "--ping-interval 99999999999999999999",
            "--ping-interval 18446744073709551615s",
            "--ping-interval 500000000000000h",
            "--send-timeout 0",
            "--send-timeout 100000000000y",
            "--shutdown-grace 9999999999999999999",
            "--freeze-after 0",
            "--freeze-after 584942417355y",
            "--batch-ms 0",
            "--send-queue 0",
            "--max-frame 0",
            "--max-frame 18446744073709551615",
            "--max-connections 0",
            "--toggle-rate 0",
            "--toggle-rate NaN",
            "--toggle-rate inf",
            "--toggle-burst=-1",
            "--abuse-burst 0",
            "--recv-frame-rate 0",
            "--recv-byte-rate=-5",
            "--resume-batches 18446744073709551615",
            "--socket-send-buffer 18446744073709551615",
        ] {
            let err = parse(args).expect_err(args);
            assert_eq!(err.exit_code(), 2, "{args}: {err}");
            assert!(err.to_string().contains("invalid value"), "{args}: {err}");
        }
    }

    #[test]
    fn limits_flags() {
        assert_eq!(parse_origin("https://Board.Example/").unwrap(), "https://board.example");
        assert_eq!(parse_origin("*").unwrap(), "*");
        assert!(parse_origin("board.example").is_err());
        assert!(parse_origin("https://board.example/page").is_err());
        assert!(parse("--http-write-timeout 0s").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("inf").is_err());
        assert_eq!(parse_rate("2.5").unwrap(), 2.5);
    }

    #[test]
    fn public_url_is_an_http_origin() {
        assert_eq!(parse_public_url("https://Board.Example/").unwrap(), "https://board.example");
        assert_eq!(parse_public_url("http://host:8080").unwrap(), "http://host:8080");
        for bad in ["*", "board.example", "ftp://board.example", "https://board.example/page"] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
        assert!(parse("--public-url board.example").is_err());
    }

    #[test]
    fn the_latency_budget_must_leave_room_for_a_tick() {
        let c = parse("").unwrap();
        assert_eq!(c.latency_budget, Duration::from_millis(250));
        assert_eq!(c.check(), Ok(()));
        let err = parse("--batch-ms 250").unwrap().check().unwrap_err();
        assert!(err.contains("--latency-budget 250ms must be longer than --batch-ms 250"), "{err}");
        assert_eq!(parse("--batch-ms 100 --latency-budget 1s").unwrap().check(), Ok(()));
        assert_eq!(parse("--latency-budget 1ms").unwrap_err().exit_code(), 2);
        assert_eq!(parse("--latency-budget 2m").unwrap_err().exit_code(), 2);
    }

    #[test]
    fn egress_budget_takes_human_sizes() {
        assert_eq!(parse_byte_rate("30MB").unwrap(), 30_000_000);
        assert_eq!(parse_byte_rate("30 MB/s").unwrap(), 30_000_000);
        assert_eq!(parse_byte_rate("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_byte_rate("512KiB").unwrap(), 524_288);
        assert_eq!(parse_byte_rate("250000").unwrap(), 250_000);
        for bad in ["0", "0MB", "-1MB", "30XB", "MB", "", "1e400", "NaN"] {
            assert!(parse_byte_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("--egress-budget 30MB").unwrap().egress_budget, Some(30_000_000));
        assert_eq!(parse("").unwrap().egress_budget, None);
        assert_eq!(parse("--egress-budget nope").unwrap_err().exit_code(), 2);
        assert_eq!(parse("--log-format json").unwrap().log_format, crate::logging::LogFormat::Json);
        assert!(parse("--log-format xml").is_err());
    }
}
