//! The worker's configuration: one struct, built by clap from flags and `OMCB_*` variables.

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

    /// Address for Prometheus `/metrics`; off when not given. Keep it private.
    #[arg(long, env = "OMCB_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Fleet mode: keep the board in this Redis (`redis://HOST:PORT`), shared by
    /// every worker pointed at it. Without it the board is embedded in this process.
    #[arg(long, env = "OMCB_REDIS")]
    pub redis: Option<String>,

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
    #[arg(long, env = "OMCB_FREEZE_AFTER", value_parser = parse_duration)]
    pub freeze_after: Option<Duration>,

    /// Refuse checking when this many boxes are checked.
    #[arg(long, env = "OMCB_MAX_CHECKED")]
    pub max_checked: Option<u32>,

    /// Fan-out tick: changes are coalesced into one Batch per tick.
    #[arg(long, env = "OMCB_BATCH_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_ms: u64,

    /// Sustained toggles per second allowed per connection.
    #[arg(long, env = "OMCB_TOGGLE_RATE", default_value_t = 20.0)]
    pub toggle_rate: f64,

    /// Toggles a connection may send at once before the rate applies.
    #[arg(long, env = "OMCB_TOGGLE_BURST", default_value_t = 40.0)]
    pub toggle_burst: f64,

    /// Rate-limited toggles a connection may send (beyond its burst) before it
    /// is closed with 1008 as abusive; refills at the toggle rate.
    #[arg(long, env = "OMCB_ABUSE_BURST", default_value_t = 200.0)]
    pub abuse_burst: f64,

    /// WebSocket connections this worker holds at most; more get close 1013.
    #[arg(long, env = "OMCB_MAX_CONNECTIONS", default_value_t = 10_000)]
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
    #[arg(long, env = "OMCB_MAX_FRAME", default_value_t = 1024)]
    pub max_frame: usize,

    /// Batches a socket may fall behind before it gets a Snapshot instead.
    #[arg(long, env = "OMCB_SEND_QUEUE", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub send_queue: u64,

    /// A socket whose queued bytes make no progress for this long cannot keep up and is closed (1013).
    #[arg(long, env = "OMCB_SEND_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub send_timeout: Duration,

    /// Server pings this often; a client silent for three intervals is closed.
    /// Well inside nginx's default 60 s proxy_read_timeout.
    #[arg(long, env = "OMCB_PING_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// Kernel send buffer per client socket (SO_SNDBUF), bounding what a
    /// stalled client can pin in kernel memory; 0 leaves the kernel's autotuning
    /// (up to `net.ipv4.tcp_wmem`'s max, 4 MiB by default, per socket).
    #[arg(long, env = "OMCB_SOCKET_SEND_BUFFER", default_value_t = 131_072)]
    pub socket_send_buffer: usize,

    /// Recent batches kept so a reconnecting client resumes with `?since=`
    /// instead of a snapshot (1200 x 50 ms = one minute of changes).
    #[arg(long, env = "OMCB_RESUME_BATCHES", default_value_t = 1200)]
    pub resume_batches: usize,

    /// Serve the web client from this directory instead of the copy built into the binary.
    #[arg(long, env = "OMCB_WEB_DIR")]
    pub web_dir: Option<PathBuf>,

    /// How long shutdown waits for sockets to take their close frame.
    #[arg(long, env = "OMCB_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
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
    #[arg(long, env = "OMCB_HTTP_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_write_timeout)]
    pub http_write_timeout: Duration,

    /// More page origins allowed to open `/ws` (e.g. `https://board.example`),
    /// besides the board's own host; `*` allows any. Repeat or separate with commas.
    #[arg(long, env = "OMCB_ALLOW_ORIGIN", value_delimiter = ',', value_parser = parse_origin)]
    pub allow_origin: Vec<String>,
}

/// Parses `--http-write-timeout`: a duration above zero (zero would cut every
/// response the kernel cannot take at once).
pub fn parse_write_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("the HTTP write timeout must be above zero".into());
    }
    Ok(d)
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

/// Parses a non-negative, finite rate or amount.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a non-negative number")),
    }
}

/// Parses `250ms`, `20s`, `10m`, `2h`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 =
        num.parse().map_err(|_| format!("`{s}` is not a duration like 500ms, 20s, 10m, 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m, h, d)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
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

    /// The fan-out tick.
    pub fn batch_interval(&self) -> Duration {
        Duration::from_millis(self.batch_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("20").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn limits_flags() {
        assert_eq!(parse_origin("https://Board.Example/").unwrap(), "https://board.example");
        assert_eq!(parse_origin("*").unwrap(), "*");
        assert!(parse_origin("board.example").is_err());
        assert!(parse_origin("https://board.example/page").is_err());
        assert!(parse_write_timeout("0s").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("inf").is_err());
        assert_eq!(parse_rate("2.5").unwrap(), 2.5);
    }
}
