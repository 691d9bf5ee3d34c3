//! Metric names, the handles the hot paths increment, and the Prometheus recorder.
//!
//! Handles are looked up once and kept in [`Metrics`]: an increment on the
//! per-socket path is then one atomic add, not a registry lookup.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use omcb_store::Refusal;

/// Histogram buckets (seconds) for latencies measured against the 50 ms tick:
/// feed lag, toggle to send, toggle round trip.
const TICK_LATENCY: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Histogram buckets (seconds) for one store round trip (Redis on a private
/// network answers in a fraction of a millisecond).
const STORE_LATENCY: [f64; 12] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// Installs the process-wide Prometheus recorder. Call before [`Metrics::new`];
/// handles made earlier record nothing.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let mut builder = PrometheusBuilder::new();
    for name in [
        "omcb_toggle_to_send_seconds",
        "omcb_toggle_seconds",
        "omcb_feed_lag_seconds",
        "omcb_delivery_seconds",
    ] {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), &TICK_LATENCY)?;
    }
    let handle = builder
        .set_buckets_for_metric(Matcher::Full("omcb_store_command_seconds".into()), &STORE_LATENCY)?
        .set_buckets_for_metric(
            Matcher::Full("omcb_batch_changes".into()),
            &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0],
        )?
        .install_recorder()?;
    crate::process::describe();
    Ok(handle)
}

/// The `/metrics` page: the process metrics read now, then every series.
pub fn render(handle: &PrometheusHandle) -> String {
    crate::process::collect();
    handle.render()
}

/// The crate version and the git commit it was built from (`build.rs`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// See [`VERSION`]; "unknown" when built outside a git checkout.
pub const GIT_COMMIT: &str = env!("OMCB_GIT_COMMIT");

/// The per-socket and per-address limiters, as `omcb_limiter_refusals_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limiter {
    /// A socket over `--toggle-rate`/`--toggle-burst` (its toggle is answered rate_limited).
    ToggleSocket,
    /// An address over `--ip-toggle-rate`/`--ip-toggle-burst`.
    ToggleAddress,
    /// An address over `--ip-connect-rate` (HTTP 429 before the upgrade).
    ConnectAddress,
    /// An address over `--ip-snapshot-rate`: at connect (429) or on Resync (1008).
    SnapshotAddress,
    /// An address over `--max-http-connections-per-ip` (429).
    HttpAddress,
    /// A socket over its receive budget (`--recv-frame-rate`/`--recv-byte-rate`, 1008).
    RecvBudget,
    /// The worker at `--max-connections` (1013, or 429 when too many wait for theirs).
    MaxConnections,
    /// An address at `--max-connections-per-ip` (1013, or 429 likewise).
    ConnectionsAddress,
    /// The address table (`--address-table-size`) full of connected addresses (429).
    AddressTable,
    /// A page of a foreign origin opening `/ws` (403).
    Origin,
}

impl Limiter {
    /// Every kind, in declaration order (so `kind as usize` indexes it).
    const ALL: [Limiter; 10] = [
        Limiter::ToggleSocket,
        Limiter::ToggleAddress,
        Limiter::ConnectAddress,
        Limiter::SnapshotAddress,
        Limiter::HttpAddress,
        Limiter::RecvBudget,
        Limiter::MaxConnections,
        Limiter::ConnectionsAddress,
        Limiter::AddressTable,
        Limiter::Origin,
    ];

    /// Its `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Limiter::ToggleSocket => "toggle_socket",
            Limiter::ToggleAddress => "toggle_address",
            Limiter::ConnectAddress => "connect_address",
            Limiter::SnapshotAddress => "snapshot_address",
            Limiter::HttpAddress => "http_address",
            Limiter::RecvBudget => "recv_budget",
            Limiter::MaxConnections => "max_connections",
            Limiter::ConnectionsAddress => "connections_address",
            Limiter::AddressTable => "address_table",
            Limiter::Origin => "origin",
        }
    }
}

/// The `code` labels of `omcb_disconnects_total`: PROTOCOL.md's close codes,
/// 1005 (a client close frame without a code), "other" (any other code a
/// client sent: clients choose them, and a label per code would let them
/// grow the series without bound) and "none" (no close frame: EOF, reset).
const DISCONNECT_CODES: [&str; 13] = [
    "1000", "1001", "1002", "1003", "1005", "1007", "1008", "1009", "1011", "1012", "1013",
    "other", "none",
];

/// Index into [`DISCONNECT_CODES`] of a socket's close code.
fn disconnect_index(code: Option<u16>) -> usize {
    match code {
        None => 12,
        Some(c) => DISCONNECT_CODES[..11].iter().position(|l| l.parse() == Ok(c)).unwrap_or(11),
    }
}

/// Every metric the worker exports, except the store's own
/// (`omcb_store_commands_total`, `omcb_store_command_seconds`,
/// `omcb_store_errors_total`, `omcb_feed_last_read_timestamp_seconds`,
/// `omcb_persist_failures_total`, `omcb_persist_ok`), which omcb-store
/// records itself through the same `metrics` facade.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// WebSocket connections accepted since start.
    pub connections_opened: Counter,
    /// Connections refused because the worker was at `--max-connections`.
    pub connections_over_limit: Counter,
    /// Toggles by outcome.
    pub toggles_changed: Counter,
    pub toggles_unchanged: Counter,
    pub toggles_out_of_range: Counter,
    pub toggles_frozen: Counter,
    pub toggles_board_full: Counter,
    pub toggles_rate_limited: Counter,
    pub toggles_unavailable: Counter,
    /// Batches published by the hub (once each, whatever the number of sockets).
    pub batches_published: Counter,
    /// Changes per published batch.
    pub batch_changes: Histogram,
    /// Frames and payload bytes written to sockets (each socket counted).
    pub frames_sent: Counter,
    /// Ticks that found the fan-out still writing the previous batch.
    pub ticks_deferred: Counter,
    pub bytes_sent: Counter,
    /// Snapshots sent over sockets, by why.
    pub snapshots_connect: Counter,
    pub snapshots_lagged: Counter,
    pub snapshots_resync: Counter,
    pub snapshots_reset: Counter,
    /// Connections resumed from the recent-batch ring without a snapshot.
    pub resumes: Counter,
    /// Sockets closed because even a snapshot could not be written in time.
    pub slow_closed: Counter,
    /// Bad client input, closed with 1003/1007/1009/1008.
    pub bad_input_closed: Counter,
    /// `GET /api/state` answers: full body and 304.
    pub api_state_full: Counter,
    pub api_state_not_modified: Counter,
    /// Snapshot encodings (once per seq however many readers).
    pub snapshot_encodes: Counter,
    /// From a change reaching the hub to its batch being handed to the sockets.
    pub toggle_to_send: Histogram,
    /// From the commit of a tick's oldest change to the last socket write of
    /// its batch: what `--latency-budget` bounds.
    pub delivery: Histogram,
    /// The tick's length now (`tick.rs`).
    pub tick: Gauge,
    /// Bytes written to sockets, for the tick's egress law (the same bytes as
    /// `omcb_bytes_sent_total`, which cannot be read back).
    pub egress: Arc<AtomicU64>,
    /// The replica's seq.
    pub seq: Gauge,
    /// Store feed resets (trimmed past, new epoch).
    pub feed_resets: Counter,
    /// From a change's commit in the store to its application to the replica.
    pub feed_lag: Histogram,
    /// From a Toggle frame read to its ToggleResult handed to the socket's
    /// sink (written at once unless earlier frames still wait in it).
    pub toggle_seconds: Histogram,
    /// Connect snapshot bytes queued to sockets (the other reasons are in [`SinkMetrics`]).
    pub snapshot_bytes_connect: Counter,
    snapshot_bytes_lagged: Counter,
    snapshot_bytes_reset: Counter,
    snapshot_bytes_resync: Counter,
    /// Viewport subscriptions (docs/PROTOCOL.md): `Subscribe`s taken and
    /// refused (`omcb_subscribes_total{result}`), the range Snapshots they
    /// brought (`omcb_snapshots_sent_total{reason="subscribe"}` and its bytes).
    pub subscribes_ok: Counter,
    pub subscribes_too_large: Counter,
    pub subscribes_out_of_range: Counter,
    pub snapshots_subscribe: Counter,
    pub snapshot_bytes_subscribe: Counter,
    /// Region frames encoded (once per region with changes per tick, for all
    /// the sockets subscribed there).
    pub region_frames: Counter,
    /// Counts frames published to subscribed sockets (about one a second).
    pub counts_frames: Counter,
    /// Sockets ended, by close code (see [`DISCONNECT_CODES`]).
    disconnects: [Counter; 13],
    /// Refusals, by [`Limiter`] (in the order of [`Limiter::ALL`]).
    limiter_refusals: [Counter; 10],
    /// 1 while this worker holds the sweep lease.
    sweep_lease_held: Gauge,
    /// Sweeps run as the lease holder, and sweeps that failed.
    sweeps_ok: Counter,
    sweeps_error: Counter,
}

impl Metrics {
    /// Looks every handle up once.
    pub fn new() -> Self {
        let toggles = |outcome: &'static str| counter!("omcb_toggles_total", "outcome" => outcome);
        let snapshots = |why: &'static str| counter!("omcb_snapshots_sent_total", "reason" => why);
        let snapshot_bytes =
            |why: &'static str| counter!("omcb_snapshot_bytes_sent_total", "reason" => why);
        Self {
            connections: gauge!("omcb_connections"),
            connections_opened: counter!("omcb_connections_opened_total"),
            connections_over_limit: counter!("omcb_connections_refused_total", "reason" => "over_limit"),
            toggles_changed: toggles("changed"),
            toggles_unchanged: toggles("unchanged"),
            toggles_out_of_range: toggles("out_of_range"),
            toggles_frozen: toggles("frozen"),
            toggles_board_full: toggles("board_full"),
            toggles_rate_limited: toggles("rate_limited"),
            toggles_unavailable: toggles("unavailable"),
            batches_published: counter!("omcb_batches_published_total"),
            batch_changes: histogram!("omcb_batch_changes"),
            frames_sent: counter!("omcb_frames_sent_total"),
            ticks_deferred: counter!("omcb_ticks_deferred_total"),
            bytes_sent: counter!("omcb_bytes_sent_total"),
            snapshots_connect: snapshots("connect"),
            snapshots_lagged: snapshots("lagged"),
            snapshots_resync: snapshots("resync"),
            snapshots_reset: snapshots("reset"),
            resumes: counter!("omcb_resumes_total"),
            slow_closed: counter!("omcb_slow_clients_closed_total"),
            bad_input_closed: counter!("omcb_bad_input_closed_total"),
            api_state_full: counter!("omcb_api_state_total", "status" => "200"),
            api_state_not_modified: counter!("omcb_api_state_total", "status" => "304"),
            snapshot_encodes: counter!("omcb_snapshot_encodes_total"),
            toggle_to_send: histogram!("omcb_toggle_to_send_seconds"),
            delivery: histogram!("omcb_delivery_seconds"),
            tick: gauge!("omcb_tick_seconds"),
            egress: Arc::default(),
            seq: gauge!("omcb_seq"),
            feed_resets: counter!("omcb_feed_resets_total"),
            feed_lag: histogram!("omcb_feed_lag_seconds"),
            toggle_seconds: histogram!("omcb_toggle_seconds"),
            snapshot_bytes_connect: snapshot_bytes("connect"),
            snapshot_bytes_lagged: snapshot_bytes("lagged"),
            snapshot_bytes_reset: snapshot_bytes("reset"),
            snapshot_bytes_resync: snapshot_bytes("resync"),
            subscribes_ok: counter!("omcb_subscribes_total", "result" => "ok"),
            subscribes_too_large: counter!("omcb_subscribes_total", "result" => "too_large"),
            subscribes_out_of_range: counter!("omcb_subscribes_total", "result" => "out_of_range"),
            snapshots_subscribe: snapshots("subscribe"),
            snapshot_bytes_subscribe: snapshot_bytes("subscribe"),
            region_frames: counter!("omcb_region_frames_encoded_total"),
            counts_frames: counter!("omcb_counts_frames_published_total"),
            disconnects: std::array::from_fn(
                |i| counter!("omcb_disconnects_total", "code" => DISCONNECT_CODES[i]),
            ),
            limiter_refusals: Limiter::ALL
                .map(|k| counter!("omcb_limiter_refusals_total", "kind" => k.label())),
            sweep_lease_held: gauge!("omcb_sweep_lease_held"),
            sweeps_ok: counter!("omcb_sweeps_total", "result" => "ok"),
            sweeps_error: counter!("omcb_sweeps_total", "result" => "error"),
        }
    }

    /// Sets the gauges that describe how this worker was started: build,
    /// board config (as the store holds it: in a fleet the board's own), limits.
    pub fn configured(&self, config: &crate::config::Config, board: &omcb_store::BoardConfig) {
        gauge!("omcb_build_info", "version" => VERSION, "git" => GIT_COMMIT).set(1.0);
        omcb_store::register_metrics();
        gauge!("omcb_freeze_after_seconds").set(board.freeze_after_ms as f64 / 1000.0);
        gauge!("omcb_max_connections").set(config.max_connections as f64);
        gauge!("omcb_latency_budget_seconds").set(config.latency_budget.as_secs_f64());
        self.tick.set(config.batch_interval().as_secs_f64());
        if let Some(budget) = config.egress_budget {
            gauge!("omcb_egress_budget_bytes_per_second").set(budget as f64);
        }
    }

    /// The board's live `freeze_after` (an `omcb admin` change) in
    /// `omcb_freeze_after_seconds`.
    pub fn freeze_after(&self, freeze_after_ms: u64) {
        gauge!("omcb_freeze_after_seconds").set(freeze_after_ms as f64 / 1000.0);
    }

    /// Counts a refusal by `limiter`.
    pub fn limited(&self, limiter: Limiter) {
        self.limiter_refusals[limiter as usize].increment(1);
    }

    /// Counts an address refused before its connection was served.
    /// [`Refused::Busy`](crate::limits::Refused::Busy) is not counted here:
    /// the cap that made the socket wait for its 1013 was counted when it came.
    pub fn limited_address(&self, why: crate::limits::Refused) {
        use crate::limits::Refused;
        match why {
            Refused::Connects => self.limited(Limiter::ConnectAddress),
            Refused::Snapshots => self.limited(Limiter::SnapshotAddress),
            Refused::HttpConnections => self.limited(Limiter::HttpAddress),
            Refused::TableFull => self.limited(Limiter::AddressTable),
            Refused::Busy => {}
        }
    }

    /// Records one run of the sweep loop: `Some(frozen)` as the lease holder,
    /// `None` when another worker holds the lease.
    ///
    /// A failed call leaves `omcb_sweep_lease_held` as it was: whether this
    /// worker still holds the lease is unknown (it lapses in 10 s if it cannot
    /// renew), and a holder that blinked to 0 at every slow Redis call would
    /// raise OmcbFreezingWithoutSweep on a fleet that sweeps.
    pub fn swept(&self, result: &Result<Option<usize>, omcb_store::StoreError>) {
        match result {
            Ok(Some(_)) => {
                self.sweep_lease_held.set(1.0);
                self.sweeps_ok.increment(1);
            }
            Ok(None) => self.sweep_lease_held.set(0.0),
            Err(_) => self.sweeps_error.increment(1),
        }
    }

    /// Counts a socket's end by its close code (`None`: it ended without a
    /// close frame) and logs it, in the connection's span.
    pub fn disconnected(&self, code: Option<u16>) {
        let i = disconnect_index(code);
        self.disconnects[i].increment(1);
        tracing::debug!(target: "omcb_worker::conn", code = DISCONNECT_CODES[i], "socket closed");
    }

    /// The handles a socket's sink writes through.
    pub fn sink(&self) -> SinkMetrics {
        SinkMetrics {
            frames_sent: self.frames_sent.clone(),
            bytes_sent: self.bytes_sent.clone(),
            egress: self.egress.clone(),
            snapshots_lagged: self.snapshots_lagged.clone(),
            snapshots_reset: self.snapshots_reset.clone(),
            snapshot_bytes_lagged: self.snapshot_bytes_lagged.clone(),
            snapshot_bytes_reset: self.snapshot_bytes_reset.clone(),
            snapshot_bytes_resync: self.snapshot_bytes_resync.clone(),
        }
    }

    /// The counter for a refused toggle.
    pub fn refused(&self, reason: Refusal) -> &Counter {
        match reason {
            Refusal::OutOfRange => &self.toggles_out_of_range,
            Refusal::Frozen => &self.toggles_frozen,
            Refusal::BoardFull => &self.toggles_board_full,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The counters a sink adds to (handles into the worker's metrics).
#[derive(Debug, Clone)]
pub struct SinkMetrics {
    /// Frames written.
    pub frames_sent: metrics::Counter,
    /// Bytes written (frame headers included).
    pub bytes_sent: metrics::Counter,
    /// The same bytes, for the tick's egress law ([`Metrics::egress`]).
    pub egress: Arc<AtomicU64>,
    /// Snapshots sent because the socket lagged.
    pub snapshots_lagged: metrics::Counter,
    /// Snapshots sent because the board was reset.
    pub snapshots_reset: metrics::Counter,
    /// Bytes of the snapshots queued, by why (connect snapshots are the hub's).
    pub snapshot_bytes_lagged: metrics::Counter,
    pub snapshot_bytes_reset: metrics::Counter,
    pub snapshot_bytes_resync: metrics::Counter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiters_index_their_own_counter() {
        for (i, kind) in Limiter::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "{}", kind.label());
        }
    }

    #[test]
    fn close_codes_map_to_a_bounded_set_of_labels() {
        assert_eq!(DISCONNECT_CODES[disconnect_index(Some(1000))], "1000");
        assert_eq!(DISCONNECT_CODES[disconnect_index(Some(1013))], "1013");
        assert_eq!(DISCONNECT_CODES[disconnect_index(Some(1005))], "1005");
        assert_eq!(DISCONNECT_CODES[disconnect_index(Some(4321))], "other");
        assert_eq!(DISCONNECT_CODES[disconnect_index(None)], "none");
    }
}
