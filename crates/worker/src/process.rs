//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_virtual_memory_bytes`, `process_start_time_seconds`, ...), read
//! from `/proc/self` by the `metrics-process` crate when `/metrics` is
//! scraped, so they cost nothing between scrapes.
//!
//! `process_open_fds` against `process_max_fds` is the first wall a busy
//! worker meets (one descriptor per socket; the limit is the systemd unit's
//! `LimitNOFILE`).
//! `process_cpu_seconds_total` counts whole seconds (a `metrics` counter holds
//! an integer), which is exact enough for a rate over a minute or more.
//! Test: `observability::metrics_answer_an_operators_questions`.

use std::sync::OnceLock;

use metrics_process::Collector;

fn collector() -> &'static Collector {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    COLLECTOR.get_or_init(Collector::default)
}

/// Registers the metrics' help texts (once, after the recorder is installed).
pub fn describe() {
    collector().describe();
}

/// Reads `/proc/self` and sets the metrics.
pub fn collect() {
    collector().collect();
}
