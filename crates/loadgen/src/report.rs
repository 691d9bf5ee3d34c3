//! What a run measured, mergeable across processes, as a table and as JSON.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::Args;
use crate::client::{Audit, Shared};

/// One process's (or the merged) results. Histograms travel as
/// `(microseconds, count)` pairs so children can send them to the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub clients: usize,
    pub clients_connected: u64,
    pub ramp_s: f64,
    pub traffic_s: f64,
    pub toggles_sent: u64,
    pub toggles_accepted: u64,
    pub refusals: HashMap<String, u64>,
    pub reconnects: u64,
    /// Clients by how many times their socket ended (0 included).
    pub reconnects_by_count: BTreeMap<u64, u64>,
    /// Attempts to resume that got no working socket (see
    /// `Shared::failed_reconnects`).
    pub failed_reconnects: u64,
    pub snapshots: u64,
    pub errors: u64,
    pub rx_bytes: u64,
    pub rx_frames: u64,
    /// Box changes the clients applied from Batches and region frames (each
    /// client counted): the "delivered changes" server CPU is divided by.
    #[serde(default)]
    pub rx_changes: u64,
    /// `--viewport` (0: the full stream).
    #[serde(default)]
    pub viewport: u32,
    /// Range Snapshots received (viewport mode: one per Subscribe that
    /// brought new regions, and per resync).
    #[serde(default)]
    pub range_snapshots: u64,
    /// Toggle sent -> a sampled receiver applied the batch with it, µs.
    pub delivery_us: Vec<(u64, u64)>,
    /// Toggle sent -> its ToggleResult, µs.
    pub result_us: Vec<(u64, u64)>,
    pub converged: bool,
    pub convergence_detail: String,
    /// Snapshots that replaced a socket's state after its first (resets, lag).
    pub mid_snapshots: u64,
    /// Toggles whose socket ended before their answer.
    pub unanswered: u64,
    /// Disruptions clients noticed (see `Shared::disruptions`), the first and
    /// the last in Unix ms (0 = none).
    pub disruptions: u64,
    pub first_disruption_ms: u64,
    pub last_disruption_ms: u64,
    /// Times a client saw the board's epoch change.
    pub epoch_changes: u64,
    /// Unix ms when traffic started and stopped.
    pub traffic_start_ms: u64,
    pub traffic_end_ms: u64,
    /// The end-of-run check: convergence and the ack audit.
    pub audit: Audit,
}

const REASONS: [&str; 6] =
    ["unspecified", "out_of_range", "frozen", "rate_limited", "board_full", "unavailable"];

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")
}

fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

fn from_pairs(p: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = histogram();
    for &(v, n) in p {
        let _ = h.record_n(v.max(1), n);
    }
    h
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        args: &Args,
        s: &Shared,
        clients: usize,
        ramp_s: f64,
        traffic_s: f64,
        rx_bytes: u64,
        rx_frames: u64,
        (traffic_start_ms, traffic_end_ms): (u64, u64),
        audit: Audit,
    ) -> Report {
        // Delivery latency: for each sampled toggle and each receiving client,
        // the first batch that client applied reaching the toggle's seq.
        let mut delivery = histogram();
        let samples = s.samples.lock().expect("lock").clone();
        let mut receipts: HashMap<usize, Vec<(u64, std::time::Instant)>> = HashMap::new();
        for (id, seq, at) in s.receipts.lock().expect("lock").iter() {
            receipts.entry(*id).or_default().push((*seq, *at));
        }
        for list in receipts.values() {
            for &(seq, sent) in &samples {
                let i = list.partition_point(|&(s, _)| s < seq);
                if let Some(&(_, at)) = list.get(i)
                    && at >= sent
                {
                    let _ = delivery.record((at - sent).as_micros() as u64);
                }
            }
        }
        let refusals = REASONS
            .iter()
            .zip(&s.refused)
            .filter(|(_, c)| c.load(Ordering::Relaxed) > 0)
            .map(|(r, c)| ((*r).to_string(), c.load(Ordering::Relaxed)))
            .collect();
        Report {
            clients,
            clients_connected: s.connected.load(Ordering::Relaxed),
            ramp_s,
            traffic_s,
            toggles_sent: s.sent.load(Ordering::Relaxed),
            toggles_accepted: s.accepted.load(Ordering::Relaxed),
            refusals,
            reconnects: s.reconnects.load(Ordering::Relaxed),
            reconnects_by_count: {
                let by_client = s.reconnects_by_client.lock().expect("lock");
                let mut m = BTreeMap::new();
                for n in by_client.values() {
                    *m.entry(*n).or_default() += 1;
                }
                let quiet = clients.saturating_sub(by_client.len()) as u64;
                if quiet > 0 {
                    m.insert(0, quiet);
                }
                m
            },
            failed_reconnects: s.failed_reconnects.load(Ordering::Relaxed),
            snapshots: s.snapshots.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            rx_bytes,
            rx_frames,
            rx_changes: s.changes.load(Ordering::Relaxed),
            viewport: args.viewport,
            range_snapshots: s.range_snapshots.load(Ordering::Relaxed),
            delivery_us: pairs(&delivery),
            result_us: pairs(&s.result_latency.lock().expect("lock")),
            converged: audit.converged(),
            convergence_detail: audit.detail.clone(),
            mid_snapshots: s.mid_snapshots.load(Ordering::Relaxed),
            unanswered: s.unanswered.load(Ordering::Relaxed),
            disruptions: s.disruptions.load(Ordering::Relaxed),
            first_disruption_ms: match s.first_disruption_ms.load(Ordering::Relaxed) {
                u64::MAX => 0,
                t => t,
            },
            last_disruption_ms: s.last_disruption_ms.load(Ordering::Relaxed),
            epoch_changes: s.epoch_changes.load(Ordering::Relaxed),
            traffic_start_ms,
            traffic_end_ms,
            audit,
        }
    }

    /// Combines two processes' reports.
    pub fn merge(mut self, o: Report) -> Report {
        self.clients += o.clients;
        self.clients_connected += o.clients_connected;
        self.ramp_s = self.ramp_s.max(o.ramp_s);
        self.traffic_s = self.traffic_s.max(o.traffic_s);
        self.toggles_sent += o.toggles_sent;
        self.toggles_accepted += o.toggles_accepted;
        for (k, v) in o.refusals {
            *self.refusals.entry(k).or_default() += v;
        }
        self.reconnects += o.reconnects;
        for (n, c) in o.reconnects_by_count {
            *self.reconnects_by_count.entry(n).or_default() += c;
        }
        self.failed_reconnects += o.failed_reconnects;
        self.snapshots += o.snapshots;
        self.errors += o.errors;
        self.rx_bytes += o.rx_bytes;
        self.rx_frames += o.rx_frames;
        self.rx_changes += o.rx_changes;
        self.range_snapshots += o.range_snapshots;
        let mut d = from_pairs(&self.delivery_us);
        let _ = d.add(from_pairs(&o.delivery_us));
        self.delivery_us = pairs(&d);
        let mut r = from_pairs(&self.result_us);
        let _ = r.add(from_pairs(&o.result_us));
        self.result_us = pairs(&r);
        self.converged &= o.converged;
        if !o.converged {
            self.convergence_detail = o.convergence_detail;
        }
        self.mid_snapshots += o.mid_snapshots;
        self.unanswered += o.unanswered;
        self.disruptions += o.disruptions;
        self.first_disruption_ms = match (self.first_disruption_ms, o.first_disruption_ms) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.last_disruption_ms = self.last_disruption_ms.max(o.last_disruption_ms);
        self.epoch_changes += o.epoch_changes;
        self.traffic_start_ms = self.traffic_start_ms.min(o.traffic_start_ms);
        self.traffic_end_ms = self.traffic_end_ms.max(o.traffic_end_ms);
        self.audit = self.audit.merge(o.audit);
        self.converged = self.audit.converged();
        self
    }

    fn per_client_per_s(&self, total: u64) -> f64 {
        total as f64 / self.clients.max(1) as f64 / self.traffic_s.max(1e-9)
    }

    fn percentiles_ms(p: &[(u64, u64)]) -> serde_json::Value {
        let h = from_pairs(p);
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        serde_json::json!({
            "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": h.max() as f64 / 1000.0, "samples": h.len(),
        })
    }

    /// The JSON summary (the last stdout line with `--json`).
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "clients": self.clients,
            "clients_connected": self.clients_connected,
            "ramp_s": self.ramp_s,
            "duration_s": self.traffic_s,
            "toggles_sent": self.toggles_sent,
            "toggles_accepted": self.toggles_accepted,
            "toggles_per_s": self.toggles_sent as f64 / self.traffic_s.max(1e-9),
            "refusals": self.refusals,
            "latency_ms": Self::percentiles_ms(&self.delivery_us),
            "toggle_result_ms": Self::percentiles_ms(&self.result_us),
            "bytes_per_client_per_s": self.per_client_per_s(self.rx_bytes),
            "frames_per_client_per_s": self.per_client_per_s(self.rx_frames),
            "changes_per_client_per_s": self.per_client_per_s(self.rx_changes),
            "delivered_changes": self.rx_changes,
            "viewport": self.viewport,
            "range_snapshots": self.range_snapshots,
            "delivered_toggle_events_per_s": self.toggles_accepted as f64 * self.clients as f64 / self.traffic_s.max(1e-9),
            "reconnects": self.reconnects,
            "reconnects_by_count": self.reconnects_by_count,
            "max_reconnects_per_client": self.reconnects_by_count.keys().max().copied().unwrap_or(0),
            "failed_reconnects": self.failed_reconnects,
            "snapshots": self.snapshots,
            "errors": self.errors,
            "converged": self.converged,
            "convergence": self.convergence_detail,
            "mid_snapshots": self.mid_snapshots,
            "unanswered": self.unanswered,
            "disruptions": self.disruptions,
            "first_disruption_ms": self.first_disruption_ms,
            "last_disruption_ms": self.last_disruption_ms,
            "epoch_changes": self.epoch_changes,
            "traffic_start_ms": self.traffic_start_ms,
            "traffic_end_ms": self.traffic_end_ms,
            "audit": self.audit,
        })
    }

    /// A human table.
    pub fn table(&self) -> String {
        let s = self.summary();
        let lat = |k: &str| {
            let v = &s[k];
            format!(
                "p50 {:.1} / p90 {:.1} / p99 {:.1} / max {:.1} ms ({} samples)",
                v["p50"].as_f64().unwrap_or(0.0),
                v["p90"].as_f64().unwrap_or(0.0),
                v["p99"].as_f64().unwrap_or(0.0),
                v["max"].as_f64().unwrap_or(0.0),
                v["samples"]
            )
        };
        format!(
            "\n  clients connected       {} / {}\n  traffic                 {:.1} s, {} toggles sent ({:.0}/s), {} accepted, refused {:?}\n  toggle -> other clients {}\n  toggle -> its result    {}\n  received per client     {:.0} B/s in {:.1} frames/s, {:.1} changes/s ({})\n  reconnects / snapshots  {} / {} (at most {} per client; {} attempts failed)\n  errors                  {}\n  converged               {} ({})\n",
            self.clients_connected,
            self.clients,
            self.traffic_s,
            self.toggles_sent,
            s["toggles_per_s"].as_f64().unwrap_or(0.0),
            self.toggles_accepted,
            self.refusals,
            lat("latency_ms"),
            lat("toggle_result_ms"),
            s["bytes_per_client_per_s"].as_f64().unwrap_or(0.0),
            s["frames_per_client_per_s"].as_f64().unwrap_or(0.0),
            s["changes_per_client_per_s"].as_f64().unwrap_or(0.0),
            if self.viewport > 0 {
                format!(
                    "viewport of {} boxes, {} range snapshots",
                    self.viewport, self.range_snapshots
                )
            } else {
                "full stream".to_string()
            },
            self.reconnects,
            self.snapshots,
            s["max_reconnects_per_client"],
            self.failed_reconnects,
            self.errors,
            if self.converged { "yes" } else { "NO" },
            self.convergence_detail,
        ) + &self.audit_lines()
    }

    /// The ack audit's lines, when clients owned boxes (`--own-boxes`).
    fn audit_lines(&self) -> String {
        let a = &self.audit;
        if a.own_boxes == 0 {
            return String::new();
        }
        format!(
            "  acknowledged boxes      {} of {} ({} unanswered, left out)\n  acks lost               {} silently, {} with a new epoch; {} refused but applied, {} unexplained changes\n",
            a.acked_boxes,
            a.own_boxes,
            a.tainted_boxes,
            a.acks_lost_silent,
            a.acks_lost_new_epoch,
            a.refused_applied,
            a.phantom_changes,
        )
    }
}
