//! Metric names, the handles the hot paths increment, and the Prometheus recorder.
//!
//! Handles are looked up once and kept in [`Metrics`]: an increment on the
//! per-socket path is then one atomic add, not a registry lookup.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use omcb_store::Refusal;

/// Installs the process-wide Prometheus recorder. Call before [`Metrics::new`];
/// handles made earlier record nothing.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let latency = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("omcb_toggle_to_send_seconds".into()), &latency)?
        .set_buckets_for_metric(
            Matcher::Full("omcb_feed_lag_seconds".into()),
            &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("omcb_store_command_seconds".into()),
            &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("omcb_batch_changes".into()),
            &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0],
        )?
        .install_recorder()
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
    /// The replica's seq.
    pub seq: Gauge,
    /// Store feed resets (trimmed past, new epoch).
    pub feed_resets: Counter,
    /// From a change's commit in the store to its application to the replica.
    pub feed_lag: Histogram,
}

impl Metrics {
    /// Looks every handle up once.
    pub fn new() -> Self {
        let toggles = |outcome: &'static str| counter!("omcb_toggles_total", "outcome" => outcome);
        let snapshots = |why: &'static str| counter!("omcb_snapshots_sent_total", "reason" => why);
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
            seq: gauge!("omcb_seq"),
            feed_resets: counter!("omcb_feed_resets_total"),
            feed_lag: histogram!("omcb_feed_lag_seconds"),
        }
    }

    /// The handles a socket's sink writes through.
    pub fn sink(&self) -> crate::sink::SinkMetrics {
        crate::sink::SinkMetrics {
            frames_sent: self.frames_sent.clone(),
            bytes_sent: self.bytes_sent.clone(),
            snapshots_lagged: self.snapshots_lagged.clone(),
            snapshots_reset: self.snapshots_reset.clone(),
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
