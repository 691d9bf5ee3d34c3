//! The worker's log: `--log-format text` (the default) or `json`, filtered by
//! `OMCB_LOG` (`info` when unset; e.g. `OMCB_LOG=info,omcb_worker=debug`).
//!
//! Every line about a socket carries its connection's id: each accepted TCP
//! connection gets a span `conn{conn=N peer=ADDR}` entered by every task that
//! serves it (HTTP, then the WebSocket's reader and writer), so its lines can
//! be told apart among thousands, and grepped for together. In JSON the span
//! is the line's `span` object (`{"conn":N,"peer":"ADDR","name":"conn"}`).
//!
//! Colours only when stderr is a terminal: under systemd, or redirected to a
//! file, escape codes would land in journald and in log files.
//! Tests: `observability::text_logs_have_no_colour_codes_in_a_file`,
//! `observability::json_logs_parse_and_name_the_connection`.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

/// How log lines are written (`--log-format`, `OMCB_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, fields, span, target).
    Json,
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("OMCB_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// The span of one accepted connection: a process-wide sequence number (not
/// reused while the process lives) and the peer address.
///
/// A debug span: every line about one socket is a debug line (at the default
/// `info` nothing logs per socket), and an enabled span costs each idle
/// socket ~0.8 KiB in the subscriber's registry (docs/BENCHMARKS.md, idle
/// sockets). `OMCB_LOG=info,omcb_worker=debug` turns the lines and their
/// span on together.
pub fn connection_span(peer: SocketAddr) -> tracing::Span {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    tracing::debug_span!("conn", conn = id, peer = %peer)
}
