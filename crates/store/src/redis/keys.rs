//! The names of a board's keys: all under the hash tag `{B}`, so Redis
//! Cluster could shard boards later.

/// The keys of one board.
#[derive(Debug, Clone)]
pub struct Keys {
    pub(super) config: String,
    pub(super) bits: String,
    pub(super) frozen: String,
    pub(super) count: String,
    pub(super) frozen_count: String,
    pub(super) seq: String,
    pub(super) log: String,
    pub(super) checked_at: String,
    pub(super) lease: String,
    /// The change archiver's lease (`lease.lua`, like the sweep's).
    pub(super) archive_lease: String,
    /// `{B}:op:` + a per-call id.
    pub(super) op_prefix: String,
}

impl Keys {
    /// The keys of board `name`, all under the hash tag `{name}`.
    pub fn new(name: &str) -> Self {
        let k = |suffix: &str| format!("{{{name}}}:{suffix}");
        Self {
            config: k("config"),
            bits: k("bits"),
            frozen: k("frozen"),
            count: k("count"),
            frozen_count: k("frozen_count"),
            seq: k("seq"),
            log: k("log"),
            checked_at: k("checked_at"),
            lease: k("sweep_lease"),
            archive_lease: k("archive_lease"),
            op_prefix: k("op:"),
        }
    }

    /// The eight keys of the board's state, in the order `init.lua` and
    /// `set.lua` take them (KEYS[1..8]).
    pub(super) fn board(&self) -> Vec<&str> {
        vec![
            &self.config,
            &self.bits,
            &self.frozen,
            &self.count,
            &self.frozen_count,
            &self.seq,
            &self.log,
            &self.checked_at,
        ]
    }

    /// The bits key (for tests and tools that read Redis directly).
    pub fn bits(&self) -> &str {
        &self.bits
    }

    /// The change stream key.
    pub fn log(&self) -> &str {
        &self.log
    }
}
