//! The Redis backend: the board in one Redis, shared by many workers.
//!
//! Every write is one Lua script (`lua/*.lua`, loaded with `include_str!`,
//! run by SHA and reloaded on `NOSCRIPT` after a restart, failover or
//! `SCRIPT FLUSH`). Keys of a board share one hash tag (`{main}:bits`, ...) so
//! Redis Cluster can shard boards later. The change feed is the `{B}:log`
//! stream read with `XREAD BLOCK` from the last applied id: pub/sub is lossy
//! and carries no state here.
//!
//! Stream entry ids are `<seq>-0`, so "the stream position a state is at" and
//! "the seq a state is at" are the same number.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::scripts::Script;
use omcb_proto::bits;
use tokio::sync::broadcast::error::TryRecvError;

use crate::{Board, BoardConfig, Change, FeedEvent, Op, Refusal, SetOutcome, StoreError};

/// Most log entries kept (`XADD MAXLEN ~`): about a minute at a thousand toggles a second.
pub const LOG_MAXLEN: u64 = 100_000;
/// Changes per `XREAD`.
pub const FEED_CHUNK: u64 = 4096;
/// How long an `XREAD BLOCK` waits before the feed checks the board's epoch.
pub const FEED_BLOCK_MS: u64 = 1000;
/// How long `set.lua` remembers an answer for a retried call.
pub const OP_MEMORY_MS: u64 = 60_000;
/// A command that takes longer fails the toggle with `Unavailable`.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The keys of one board.
#[derive(Debug, Clone)]
pub struct Keys {
    config: String,
    bits: String,
    frozen: String,
    count: String,
    frozen_count: String,
    seq: String,
    log: String,
    checked_at: String,
    lease: String,
    /// `{B}:op:` + a per-call id.
    op_prefix: String,
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
            op_prefix: k("op:"),
        }
    }

    /// The eight keys of the board's state, in the order `init.lua` and
    /// `set.lua` take them (KEYS[1..8]).
    fn board(&self) -> Vec<&str> {
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

/// The Lua scripts, by SHA.
#[derive(Debug)]
struct Scripts {
    init: Script,
    set: Script,
    snapshot: Script,
    sweep: Script,
    lease: Script,
}

/// The sources of the scripts, for tools and tests.
pub mod lua {
    /// `lua/init.lua`.
    pub const INIT: &str = include_str!("../lua/init.lua");
    /// `lua/set.lua`.
    pub const SET: &str = include_str!("../lua/set.lua");
    /// `lua/snapshot.lua`.
    pub const SNAPSHOT: &str = include_str!("../lua/snapshot.lua");
    /// `lua/sweep.lua`.
    pub const SWEEP: &str = include_str!("../lua/sweep.lua");
    /// `lua/lease.lua`.
    pub const LEASE: &str = include_str!("../lua/lease.lua");
}

/// A board in Redis. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Commands for toggles, snapshots and sweeps (fred pipelines concurrent calls).
    client: Client,
    /// What to build the feed's own connection from (XREAD BLOCK must not
    /// hold up the toggles' connection).
    builder: Builder,
    keys: Keys,
    scripts: Scripts,
    /// The settings this worker asked for (the board in Redis wins).
    wanted: BoardConfig,
    /// The settings of the board in Redis, learned from init.
    config: std::sync::RwLock<BoardConfig>,
    /// This worker's id, for op ids and the sweep lease.
    owner: String,
    /// Calls made by this worker, for op ids.
    ops: AtomicU64,
    /// Redis commands issued, by what for (a script call counts one).
    commands: CommandCounts,
}

fn unavailable(e: Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn builder(url: &str) -> Result<Builder, StoreError> {
    let config =
        Config::from_url(url).map_err(|e| StoreError::Data(format!("bad Redis URL {url}: {e}")))?;
    let mut b = Builder::from_config(config);
    // Reconnect forever with backoff: a worker outlives Redis restarts.
    b.set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    b.with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT);
    b.with_connection_config(|c| {
        c.connection_timeout = Duration::from_secs(2);
        c.internal_command_timeout = Duration::from_secs(2);
    });
    Ok(b)
}

impl RedisStore {
    /// Connects (waiting, with backoff, until Redis answers) and creates the
    /// board `name` if it does not exist.
    pub async fn connect(url: &str, name: &str, wanted: BoardConfig) -> Result<Self, StoreError> {
        let builder = builder(url)?;
        let client = builder.build().map_err(unavailable)?;
        let mut errors = client.error_rx();
        client.connect();
        // fred retries by itself; say why each attempt failed, or a worker
        // that cannot reach Redis waits in silence.
        {
            let connected = client.wait_for_connect();
            tokio::pin!(connected);
            loop {
                tokio::select! {
                    result = &mut connected => {
                        result.map_err(unavailable)?;
                        break;
                    }
                    Ok((error, server)) = errors.recv() => {
                        tracing::warn!(%error, ?server, "cannot reach Redis yet; retrying");
                    }
                }
            }
        }
        let store = Self {
            inner: Arc::new(Inner {
                client,
                builder,
                keys: Keys::new(name),
                scripts: Scripts {
                    init: Script::from_lua(lua::INIT),
                    set: Script::from_lua(lua::SET),
                    snapshot: Script::from_lua(lua::SNAPSHOT),
                    sweep: Script::from_lua(lua::SWEEP),
                    lease: Script::from_lua(lua::LEASE),
                },
                wanted,
                config: std::sync::RwLock::new(wanted),
                owner: format!("{:016x}", crate::new_epoch()),
                ops: AtomicU64::new(0),
                commands: CommandCounts::default(),
            }),
        };
        // Redis may be up but still loading its AOF (`LOADING`): wait for it
        // rather than exit, within reason.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match store.init().await {
                Ok(_) => return Ok(store),
                Err(StoreError::Unavailable(why)) if std::time::Instant::now() < deadline => {
                    tracing::warn!(why, "Redis is not ready yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The board's settings (as stored in Redis).
    pub fn config(&self) -> BoardConfig {
        *self.inner.config.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The board's keys.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Redis commands this worker has issued, by purpose.
    pub fn commands(&self) -> &CommandCounts {
        &self.inner.commands
    }

    async fn eval(
        &self,
        script: &Script,
        keys: Vec<&str>,
        args: Vec<String>,
    ) -> Result<Value, Error> {
        let counter = if std::ptr::eq(script, &self.inner.scripts.set) {
            &self.inner.commands.toggle
        } else if std::ptr::eq(script, &self.inner.scripts.snapshot)
            || std::ptr::eq(script, &self.inner.scripts.init)
        {
            &self.inner.commands.snapshot
        } else {
            &self.inner.commands.sweep
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let client = &self.inner.client;
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
    }

    /// Creates the board if it does not exist (with a new epoch); learns its settings.
    pub async fn init(&self) -> Result<u64, StoreError> {
        let k = &self.inner.keys;
        let w = self.inner.wanted;
        let reply = self
            .eval(
                &self.inner.scripts.init,
                k.board(),
                vec![
                    w.size.to_string(),
                    w.max_checked.unwrap_or(0).to_string(),
                    w.freeze_after_ms.to_string(),
                    crate::new_epoch().to_string(),
                ],
            )
            .await
            .map_err(|e| {
                if e.details().contains("BOARDSIZE") {
                    StoreError::Data(e.details().to_string())
                } else {
                    unavailable(e)
                }
            })?;
        let v = array(reply)?;
        let created = int(&v, 0)? == 1;
        let config = BoardConfig {
            size: int(&v, 1)? as u32,
            max_checked: Some(int(&v, 2)? as u32).filter(|&m| m > 0),
            freeze_after_ms: int(&v, 3)? as u64,
        };
        let epoch = uint(&v, 4)?;
        if created {
            tracing::info!(epoch, size = config.size, "created the board in Redis");
        } else if config != w {
            tracing::warn!(?config, wanted = ?w, "the board in Redis has other settings than this worker's flags; using the board's");
        }
        *self.inner.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(epoch)
    }

    /// Sets box `index` to `checked` (the rules are in `lua/set.lua`).
    pub async fn set(&self, index: u32, checked: bool) -> Result<SetOutcome, StoreError> {
        let op = self.inner.ops.fetch_add(1, Ordering::Relaxed);
        let k = &self.inner.keys;
        let op_key = format!("{}{}:{op}", k.op_prefix, self.inner.owner);
        let mut keys = k.board();
        keys.push(&op_key);
        let args = vec![
            index.to_string(),
            u8::from(checked).to_string(),
            LOG_MAXLEN.to_string(),
            OP_MEMORY_MS.to_string(),
        ];
        let reply = match self.eval(&self.inner.scripts.set, keys.clone(), args.clone()).await {
            Err(e) if e.details().contains("NOBOARD") => {
                // The board is gone (Redis restarted empty, FLUSHALL): make a new one.
                self.init().await?;
                self.eval(&self.inner.scripts.set, keys, args).await
            }
            other => other,
        }
        .map_err(unavailable)?;
        let v = array(reply)?;
        let (status, value, seq) = (int(&v, 0)?, int(&v, 1)? == 1, int(&v, 2)? as u64);
        Ok(match status {
            1 => SetOutcome::Changed { seq, checked: value },
            0 => SetOutcome::Unchanged { checked: value },
            -1 => SetOutcome::Refused { reason: Refusal::OutOfRange, checked: false },
            -2 => SetOutcome::Refused { reason: Refusal::Frozen, checked: value },
            -3 => SetOutcome::Refused { reason: Refusal::BoardFull, checked: value },
            other => return Err(StoreError::Data(format!("set.lua returned status {other}"))),
        })
    }

    /// The whole board, read atomically.
    pub async fn snapshot(&self) -> Result<Board, StoreError> {
        let k = &self.inner.keys;
        // snapshot.lua takes the first six.
        let keys = k.board()[..6].to_vec();
        let reply = match self.eval(&self.inner.scripts.snapshot, keys.clone(), vec![]).await {
            Err(e) if e.details().contains("NOBOARD") => {
                self.init().await?;
                self.eval(&self.inner.scripts.snapshot, keys, vec![]).await
            }
            other => other,
        }
        .map_err(unavailable)?;
        let v = array(reply)?;
        let size = int(&v, 6)? as u32;
        let checked =
            bits::from_bytes(&bytes(&v, 0)?, size).map_err(|e| StoreError::Data(e.to_string()))?;
        let frozen =
            bits::from_bytes(&bytes(&v, 1)?, size).map_err(|e| StoreError::Data(e.to_string()))?;
        Ok(Board {
            epoch: uint(&v, 5)?,
            seq: uint(&v, 4)?,
            size,
            checked,
            frozen,
            checked_count: int(&v, 2)? as u32,
            frozen_count: int(&v, 3)? as u32,
            freeze_after_ms: int(&v, 8)? as u64,
        })
    }

    /// Runs the freeze sweep if this worker holds (or takes) the fleet-wide lease.
    pub async fn sweep(&self, limit: usize) -> Result<usize, StoreError> {
        if self.config().freeze_after_ms == 0 {
            return Ok(0);
        }
        let k = &self.inner.keys;
        let held = self
            .eval(
                &self.inner.scripts.lease,
                vec![&k.lease],
                vec![self.inner.owner.clone(), "10000".into()],
            )
            .await
            .map_err(unavailable)?;
        if held.as_i64() != Some(1) {
            return Ok(0);
        }
        let frozen = self
            .eval(
                &self.inner.scripts.sweep,
                vec![
                    &k.config,
                    &k.frozen,
                    &k.count,
                    &k.frozen_count,
                    &k.seq,
                    &k.log,
                    &k.checked_at,
                ],
                vec![limit.to_string(), LOG_MAXLEN.to_string()],
            )
            .await
            .map_err(unavailable)?;
        Ok(frozen.as_i64().unwrap_or(0) as usize)
    }

    /// The board's `(epoch, seq)` in Redis; epoch `None` when the board does not exist.
    async fn position_now(&self, client: &Client) -> Result<(Option<u64>, u64), StoreError> {
        self.inner.commands.feed.fetch_add(2, Ordering::Relaxed);
        let epoch: Option<String> =
            client.hget(&self.inner.keys.config, "epoch").await.map_err(unavailable)?;
        let seq: Option<u64> = client.get(&self.inner.keys.seq).await.map_err(unavailable)?;
        Ok((epoch.and_then(|s| s.parse().ok()), seq.unwrap_or(0)))
    }

    /// A reader of the change stream after `seq` of `epoch`, on its own connection.
    pub fn feed(&self, epoch: u64, seq: u64) -> RedisFeed {
        // Verify before the first read: the caller's position may be of another
        // epoch, or ahead of the board.
        RedisFeed { store: self.clone(), client: None, epoch, seq, last: None, verify: true }
    }

    /// Closes the connections.
    pub async fn close(&self) -> Result<(), StoreError> {
        let _ = self.inner.client.quit().await;
        Ok(())
    }
}

/// Redis commands issued by one worker, by purpose: the metric that shows Redis
/// work grows with toggles and workers, never with clients or page loads.
#[derive(Debug, Default)]
pub struct CommandCounts {
    /// `set.lua` calls.
    pub toggle: AtomicU64,
    /// `snapshot.lua` and `init.lua` calls (worker start, feed resets).
    pub snapshot: AtomicU64,
    /// `XREAD`, `XRANGE` and epoch checks of the one change feed.
    pub feed: AtomicU64,
    /// Lease and sweep calls.
    pub sweep: AtomicU64,
}

/// Reads `{B}:log` with `XREAD BLOCK` from the last applied id.
#[derive(Debug)]
pub struct RedisFeed {
    store: RedisStore,
    /// Its own connection, made on first use.
    client: Option<(Client, tokio::sync::broadcast::Receiver<Server>)>,
    epoch: u64,
    /// Seq of the last change returned.
    seq: u64,
    /// The last change returned, to check after a reconnect that Redis still
    /// has it (an AOF restart can lose the last second and reuse seqs).
    last: Option<Change>,
    /// Check continuity before reading on.
    verify: bool,
}

impl RedisFeed {
    async fn client(&mut self) -> Result<Client, StoreError> {
        if self.client.is_none() {
            let client = self.store.inner.builder.build().map_err(unavailable)?;
            // The block time must not count as a timeout.
            let reconnects = client.reconnect_rx();
            client.connect();
            client.wait_for_connect().await.map_err(unavailable)?;
            self.client = Some((client, reconnects));
        }
        let (client, reconnects) = self.client.as_mut().expect("set above");
        // Any reconnect since the last look: Redis may have restarted and lost writes.
        while let Ok(_) | Err(TryRecvError::Lagged(_)) = reconnects.try_recv() {
            self.verify = true;
        }
        Ok(client.clone())
    }

    /// The next changes, a `Reset` when continuity is lost (trimmed log, new
    /// epoch, Redis lost writes), an empty `Changes` after a quiet block (the
    /// heartbeat), or `Unavailable` while Redis is away. Run it in a task of its
    /// own: a dropped call loses nothing, but wastes a blocking read.
    pub async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        let client = self.client().await?;
        if self.verify {
            if !self.still_continuous(&client).await? {
                return self.reset().await;
            }
            self.verify = false;
        }
        let read = client
            .with_options(&Options {
                timeout: Some(Duration::from_millis(FEED_BLOCK_MS) + COMMAND_TIMEOUT),
                ..Default::default()
            })
            .xread::<Value, _, _>(
                Some(FEED_CHUNK),
                Some(FEED_BLOCK_MS),
                &self.store.inner.keys.log,
                format!("{}-0", self.seq),
            )
            .await;
        self.store.inner.commands.feed.fetch_add(1, Ordering::Relaxed);
        let reply = read.map_err(|e| {
            self.verify = true;
            unavailable(e)
        })?;
        let changes = parse_xread(reply)?;
        if let Some(first) = changes.first() {
            if first.seq != self.seq + 1 {
                // The log was trimmed past us (or seqs jumped): start over from a snapshot.
                return self.reset().await;
            }
            self.seq = changes.last().map_or(self.seq, |c| c.seq);
            self.last = changes.last().copied();
            return Ok(FeedEvent::Changes(changes));
        }
        // Quiet for a whole block: is this still the same board? If so, say we
        // are caught up (the heartbeat that turns /readyz back to 200 after an outage).
        match self.store.position_now(&client).await? {
            (Some(e), seq) if e == self.epoch && seq >= self.seq => {
                Ok(FeedEvent::Changes(Vec::new()))
            }
            // Another board, or this one went back in time (lost writes).
            _ => self.reset().await,
        }
    }

    /// Whether Redis still holds the change we applied last, at its seq.
    async fn still_continuous(&self, client: &Client) -> Result<bool, StoreError> {
        match self.store.position_now(client).await? {
            (Some(e), seq) if e == self.epoch && seq >= self.seq => {}
            _ => return Ok(false),
        }
        let Some(last) = self.last else { return Ok(true) };
        let id = format!("{}-0", last.seq);
        self.store.inner.commands.feed.fetch_add(1, Ordering::Relaxed);
        let reply: Value = client
            .xrange(&self.store.inner.keys.log, &id, &id, Some(1))
            .await
            .map_err(unavailable)?;
        let entries = parse_entries(reply)?;
        // Trimmed away is fine (the next XREAD shows whether we were trimmed past);
        // present but different means Redis lost writes and reused the seq.
        Ok(entries.first().is_none_or(|c| *c == last))
    }

    async fn reset(&mut self) -> Result<FeedEvent, StoreError> {
        let board = self.store.snapshot().await?;
        tracing::info!(
            from_epoch = self.epoch,
            from_seq = self.seq,
            epoch = board.epoch,
            seq = board.seq,
            "feed reset"
        );
        self.epoch = board.epoch;
        self.seq = board.seq;
        self.last = None;
        Ok(FeedEvent::Reset(Box::new(board)))
    }
}

fn bad(what: &str) -> StoreError {
    StoreError::Data(format!("unexpected reply from Redis: {what}"))
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(v) => Ok(v),
        other => Err(bad(&format!("{other:?} is not an array"))),
    }
}

fn int(v: &[Value], i: usize) -> Result<i64, StoreError> {
    match v.get(i) {
        Some(Value::Integer(n)) => Ok(*n),
        Some(Value::Null) => Ok(0),
        Some(other) => other
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("item {i} not a number"))),
        None => Err(bad(&format!("no item {i}"))),
    }
}

/// A u64 sent as a string (Lua numbers are doubles: epochs and seqs would lose digits).
fn uint(v: &[Value], i: usize) -> Result<u64, StoreError> {
    match v.get(i) {
        Some(Value::Integer(n)) if *n >= 0 => Ok(*n as u64),
        Some(Value::Null) => Ok(0),
        Some(other) => other
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("item {i} not a u64"))),
        None => Err(bad(&format!("no item {i}"))),
    }
}

fn bytes(v: &[Value], i: usize) -> Result<Bytes, StoreError> {
    match v.get(i) {
        Some(Value::Bytes(b)) => Ok(b.clone()),
        Some(Value::String(s)) => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Some(Value::Null) => Ok(Bytes::new()),
        _ => Err(bad(&format!("item {i} not bytes"))),
    }
}

/// Parses an `XREAD` reply for one stream (RESP2 arrays or RESP3 maps).
fn parse_xread(v: Value) -> Result<Vec<Change>, StoreError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(streams) => match streams.into_iter().next() {
            None => Ok(Vec::new()),
            Some(Value::Array(mut pair)) if pair.len() == 2 => {
                parse_entries(pair.pop().expect("len 2"))
            }
            Some(other) => Err(bad(&format!("xread stream {other:?}"))),
        },
        Value::Map(map) => match map.inner().into_iter().next() {
            None => Ok(Vec::new()),
            Some((_, entries)) => parse_entries(entries),
        },
        other => Err(bad(&format!("xread {other:?}"))),
    }
}

/// Parses stream entries `[[id, [field, value, ...]], ...]` into changes.
fn parse_entries(v: Value) -> Result<Vec<Change>, StoreError> {
    let Value::Array(entries) = v else {
        return if v.is_null() { Ok(Vec::new()) } else { Err(bad("entries")) };
    };
    entries
        .into_iter()
        .map(|entry| {
            let Value::Array(mut e) = entry else { return Err(bad("entry")) };
            let fields = e.pop().ok_or_else(|| bad("entry fields"))?;
            let id = e.pop().and_then(|id| id.as_string()).ok_or_else(|| bad("entry id"))?;
            let seq: u64 =
                id.split('-').next().and_then(|s| s.parse().ok()).ok_or_else(|| bad("entry id"))?;
            let fields: Vec<String> = match fields {
                Value::Array(f) => f.into_iter().filter_map(|x| x.as_string()).collect(),
                _ => return Err(bad("entry fields")),
            };
            let field = |name: &str| -> Result<&str, StoreError> {
                fields
                    .chunks(2)
                    .find(|kv| kv[0] == name)
                    .and_then(|kv| kv.get(1))
                    .map(String::as_str)
                    .ok_or_else(|| bad(&format!("entry without {name}")))
            };
            let num = |name: &str| -> Result<u64, StoreError> {
                field(name)?.parse().map_err(|_| bad(&format!("entry field {name}")))
            };
            let op = match field("o")? {
                "1" => Op::Set(true),
                "0" => Op::Set(false),
                "f" => Op::Freeze,
                other => return Err(bad(&format!("entry op {other}"))),
            };
            Ok(Change {
                seq,
                index: num("i")? as u32,
                op,
                checked_count: num("c")? as u32,
                frozen_count: num("f")? as u32,
            })
        })
        .collect()
}
