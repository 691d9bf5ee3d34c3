//! The Lua scripts (`lua/*.lua`, loaded with `include_str!`), run by SHA
//! with a fallback to their source, and the metrics of every Redis round
//! trip: `omcb_store_commands_total{purpose}`,
//! `omcb_store_command_seconds{script}`, `omcb_store_errors_total{kind}`.

use fred::prelude::*;
use fred::types::scripts::Script;

use super::RedisStore;

/// The Lua scripts, by SHA.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) init: Named,
    pub(super) set: Named,
    pub(super) snapshot: Named,
    pub(super) sweep: Named,
    pub(super) lease: Named,
    pub(super) position: Named,
    pub(super) rebirth: Named,
    pub(super) restore: Named,
    pub(super) settings: Named,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let named =
            |lua: &str, name, purpose| Named { script: Script::from_lua(lua), name, purpose };
        Self {
            init: named(lua::INIT, "init", Purpose::Snapshot),
            set: named(lua::SET, "set", Purpose::Toggle),
            snapshot: named(lua::SNAPSHOT, "snapshot", Purpose::Snapshot),
            sweep: named(lua::SWEEP, "sweep", Purpose::Sweep),
            lease: named(lua::LEASE, "lease", Purpose::Sweep),
            position: named(lua::POSITION, "position", Purpose::Feed),
            rebirth: named(lua::REBIRTH, "rebirth", Purpose::Snapshot),
            restore: named(lua::RESTORE, "restore", Purpose::Snapshot),
            settings: named(lua::SETTINGS, "settings", Purpose::Admin),
        }
    }
}

/// A script and what its calls count as in the metrics.
#[derive(Debug)]
pub(super) struct Named {
    script: Script,
    /// The `script` label of `omcb_store_command_seconds`.
    name: &'static str,
    purpose: Purpose,
}

/// Why a Redis command was issued: the `purpose` label of
/// `omcb_store_commands_total`, the metric that shows Redis work grows with
/// toggles and workers, never with clients or page loads.
#[derive(Debug, Clone, Copy)]
pub(super) enum Purpose {
    /// `set.lua`.
    Toggle,
    /// `snapshot.lua`, `init.lua`, `rebirth.lua`, `restore.lua` and a reset's
    /// read of where a restored board came from (worker start, feed resets).
    Snapshot,
    /// `XREAD` and `position.lua` of the one change feed, and the read of
    /// the board's settings each tick.
    Feed,
    /// Lease and sweep calls.
    Sweep,
    /// `settings.lua`: an operator's `omcb admin` change (rare).
    Admin,
    /// The change archiver's reads of the stream (`XRANGE`).
    Archive,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::Toggle => "toggle",
            Purpose::Snapshot => "snapshot",
            Purpose::Feed => "feed",
            Purpose::Sweep => "sweep",
            Purpose::Admin => "admin",
            Purpose::Archive => "archive",
        }
    }
}

/// Counts and times one Redis round trip (`script` names it in
/// `omcb_store_command_seconds`), and counts its failure by kind.
pub(super) async fn measured<T>(
    script: &'static str,
    purpose: Purpose,
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let started = std::time::Instant::now();
    let result = call.await;
    metrics::counter!("omcb_store_commands_total", "purpose" => purpose.label()).increment(1);
    metrics::histogram!("omcb_store_command_seconds", "script" => script)
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        crate::count_error(error_kind(e));
    }
    result
}

/// The `kind` of `omcb_store_errors_total` for a failed command: Redis
/// could not be reached or answered too late (`unavailable`), its reply
/// could not be read (`data`), or it answered with an error, such as a
/// script's refusal (`script`).
fn error_kind(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Routing
        | ErrorKind::Cluster
        | ErrorKind::Backpressure
        | ErrorKind::Auth
        | ErrorKind::Config => "unavailable",
        ErrorKind::Parse | ErrorKind::Protocol | ErrorKind::NotFound => "data",
        // A Redis that is still loading its data, or a replica without a
        // primary, answers with an error but is simply not there yet.
        _ if e.details().starts_with("LOADING") || e.details().starts_with("MASTERDOWN") => {
            "unavailable"
        }
        _ => "script",
    }
}

/// The sources of the scripts, for tools and tests.
pub mod lua {
    /// `lua/init.lua`.
    pub const INIT: &str = include_str!("../../lua/init.lua");
    /// `lua/set.lua`.
    pub const SET: &str = include_str!("../../lua/set.lua");
    /// `lua/snapshot.lua`.
    pub const SNAPSHOT: &str = include_str!("../../lua/snapshot.lua");
    /// `lua/sweep.lua`.
    pub const SWEEP: &str = include_str!("../../lua/sweep.lua");
    /// `lua/lease.lua`.
    pub const LEASE: &str = include_str!("../../lua/lease.lua");
    /// `lua/position.lua`.
    pub const POSITION: &str = include_str!("../../lua/position.lua");
    /// `lua/rebirth.lua`.
    pub const REBIRTH: &str = include_str!("../../lua/rebirth.lua");
    /// `lua/restore.lua`.
    pub const RESTORE: &str = include_str!("../../lua/restore.lua");
    /// `lua/settings.lua`.
    pub const SETTINGS: &str = include_str!("../../lua/settings.lua");
}

impl RedisStore {
    /// Runs `script` on the toggles' connection. A call counts as one command
    /// even when a `NOSCRIPT` makes it two.
    pub(super) async fn eval(
        &self,
        script: &Named,
        keys: Vec<&str>,
        args: Vec<impl Into<Value>>,
    ) -> Result<Value, Error> {
        self.eval_on(&self.inner.client, script, keys, args).await
    }

    /// Runs `script` on `client` (the toggles' connection, or the feed's own).
    pub(super) async fn eval_on(
        &self,
        client: &Client,
        script: &Named,
        keys: Vec<&str>,
        args: Vec<impl Into<Value>>,
    ) -> Result<Value, Error> {
        // Values, not strings: `restore.lua` takes bitsets, which are not UTF-8.
        let args: Vec<Value> = args.into_iter().map(Into::into).collect();
        let Named { script, name, purpose } = script;
        measured(name, *purpose, async {
            match client.evalsha(script.sha1().clone(), keys.clone(), args.clone()).await {
                // Redis forgot the script (restart, failover, SCRIPT FLUSH). EVAL
                // runs it and caches it in one command; a SCRIPT LOAD + EVALSHA
                // pair (fred's evalsha_with_reload) fails when a second flush
                // lands between the two.
                Err(e) if e.details().starts_with("NOSCRIPT") => {
                    let lua = script.lua().expect("scripts are built from their source").clone();
                    client.eval(lua, keys, args).await
                }
                result => result,
            }
        })
        .await
    }
}
