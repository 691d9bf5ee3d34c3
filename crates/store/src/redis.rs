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
//!
//! # Epochs: a board that lost changes is another board
//! Every log entry carries the epoch it was written in (field `e`), and the
//! feed refuses entries of any other epoch: after a `FLUSHALL` the next board
//! starts again at seq 1, and its entries past the old position must not read
//! as a continuation of the old board. Redis can also go back in time while
//! keeping the epoch (a restore of older files, an AOF that lost its last
//! second, a failover to a lagging replica). The feed notices when Redis' seq
//! is behind a seq this worker applied or acknowledged, or when the entry at
//! such a seq is not the change it saw. An epoch the feed had left that shows
//! up again (a backup from before a `FLUSHALL` or an earlier move) is a loss
//! too, and so is a board that is gone (Redis restarted empty, `FLUSHALL`).
//!
//! # Restoring a board that lost changes
//! The worker's feed keeps a replica ([`RedisStore::feed_from`]). The feed
//! that notices a loss first writes its replica back under a new epoch
//! (`restore.lua`, a compare-and-set on the old epoch or on the board being
//! gone), so the board is restored once; every worker resets its replica on
//! it, so every client takes a Snapshot and no `?since=S&epoch=OLD` resumes
//! across the loss. Each worker then makes again its own recent answers that
//! the restorer's replica had not read (`Inner::recent`). While the board is
//! gone, a worker with a replica answers toggles `Unavailable` rather than
//! create an empty board (`init.lua`) that would win over the restore. A feed
//! without a replica (`feed`) moves the board to a new epoch with what Redis
//! still has (`rebirth.lua`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    init: Named,
    set: Named,
    snapshot: Named,
    sweep: Named,
    lease: Named,
    position: Named,
    rebirth: Named,
    restore: Named,
}

impl Scripts {
    fn new() -> Self {
        let named = |lua: &str, name, purpose| Named { script: Script::from_lua(lua), name, purpose };
        Self {
            init: named(lua::INIT, "init", Purpose::Snapshot),
            set: named(lua::SET, "set", Purpose::Toggle),
            snapshot: named(lua::SNAPSHOT, "snapshot", Purpose::Snapshot),
            sweep: named(lua::SWEEP, "sweep", Purpose::Sweep),
            lease: named(lua::LEASE, "lease", Purpose::Sweep),
            position: named(lua::POSITION, "position", Purpose::Feed),
            rebirth: named(lua::REBIRTH, "rebirth", Purpose::Snapshot),
            restore: named(lua::RESTORE, "restore", Purpose::Snapshot),
        }
    }
}

/// A script and what its calls count as in the metrics.
#[derive(Debug)]
struct Named {
    script: Script,
    /// The `script` label of `omcb_store_command_seconds`.
    name: &'static str,
    purpose: Purpose,
}

/// Why a Redis command was issued: the `purpose` label of
/// `omcb_store_commands_total`, the metric that shows Redis work grows with
/// toggles and workers, never with clients or page loads.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    /// `set.lua`.
    Toggle,
    /// `snapshot.lua`, `init.lua`, `rebirth.lua`, `restore.lua` (worker
    /// start, feed resets).
    Snapshot,
    /// `XREAD` and `position.lua` of the one change feed.
    Feed,
    /// Lease and sweep calls.
    Sweep,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::Toggle => "toggle",
            Purpose::Snapshot => "snapshot",
            Purpose::Feed => "feed",
            Purpose::Sweep => "sweep",
        }
    }
}

/// Counts and times one Redis round trip (`script` names it in
/// `omcb_store_command_seconds`), and counts its failure by kind.
async fn measured<T>(
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
    pub const INIT: &str = include_str!("../lua/init.lua");
    /// `lua/set.lua`.
    pub const SET: &str = include_str!("../lua/set.lua");
    /// `lua/snapshot.lua`.
    pub const SNAPSHOT: &str = include_str!("../lua/snapshot.lua");
    /// `lua/sweep.lua`.
    pub const SWEEP: &str = include_str!("../lua/sweep.lua");
    /// `lua/lease.lua`.
    pub const LEASE: &str = include_str!("../lua/lease.lua");
    /// `lua/position.lua`.
    pub const POSITION: &str = include_str!("../lua/position.lua");
    /// `lua/rebirth.lua`.
    pub const REBIRTH: &str = include_str!("../lua/rebirth.lua");
    /// `lua/restore.lua`.
    pub const RESTORE: &str = include_str!("../lua/restore.lua");
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
    /// The change with the highest seq this worker acknowledged, so the feed
    /// notices when Redis lost it even if no worker ever read it back.
    acked: std::sync::Mutex<Option<Acked>>,
    /// A feed of this worker holds a replica of the board: a board that is
    /// gone from Redis is restored from it (`restore.lua`), never created
    /// empty by `init.lua`.
    replicated: AtomicBool,
    /// The last [`RECENT_ACKS`] changes this worker acknowledged (and sets
    /// it accepted that changed nothing), oldest first: after another worker
    /// restored the board from a replica that had not read them yet, this
    /// worker makes them again.
    recent: std::sync::Mutex<VecDeque<Recent>>,
    /// `(epoch, seq)` the feed has read up to: an acknowledged change with a
    /// seq at or below it (or below an earlier acknowledgement) was made on a
    /// board that went back in time, under a reused seq.
    read: std::sync::Mutex<(u64, u64)>,
}

/// An acknowledged change in `Inner::recent`.
#[derive(Debug, Clone, Copy)]
struct Recent {
    change: Acked,
    /// Its seq was already used (see `Inner::read`): a board restored from a
    /// replica at a later seq may still lack it. Also set, harmlessly, when
    /// the feed read the change before its reply was handled.
    reused: bool,
}

/// Acknowledged changes a worker remembers for a restore (see `Inner::recent`):
/// far more than a worker acknowledges while another one's feed reads them.
const RECENT_ACKS: usize = 4096;

/// A change `set.lua` reported, as the feed checks it against the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Acked {
    epoch: u64,
    seq: u64,
    index: u32,
    op: Op,
}

/// A log entry: a change and the epoch it was written in (`None` for entries
/// written before entries carried one).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    epoch: Option<u64>,
    change: Change,
}

impl Entry {
    /// Whether the entry may belong to board `epoch`.
    fn of(&self, epoch: u64) -> bool {
        self.epoch.is_none_or(|e| e == epoch)
    }
}

/// What `position.lua` read, all of one moment.
#[derive(Debug)]
struct Position {
    /// `None` when the board does not exist.
    epoch: Option<u64>,
    seq: u64,
    /// The entry at the seq asked for as the last applied change, if Redis has it.
    last: Option<Entry>,
    /// The entry at the seq asked for as the highest acknowledged change.
    acked: Option<Entry>,
}

/// A script's refusal of the board's settings (`BOARDSIZE`: the board in Redis
/// has another size) is a data error; anything else means Redis is unavailable.
fn board_error(e: Error) -> StoreError {
    if e.details().contains("BOARDSIZE") {
        StoreError::Data(e.details().to_string())
    } else {
        unavailable(e)
    }
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
                scripts: Scripts::new(),
                wanted,
                config: std::sync::RwLock::new(wanted),
                owner: format!("{:016x}", crate::new_epoch()),
                ops: AtomicU64::new(0),
                acked: std::sync::Mutex::new(None),
                replicated: AtomicBool::new(false),
                recent: std::sync::Mutex::new(VecDeque::new()),
                read: std::sync::Mutex::new((0, 0)),
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

    async fn eval(
        &self,
        script: &Named,
        keys: Vec<&str>,
        args: Vec<impl Into<Value>>,
    ) -> Result<Value, Error> {
        self.eval_on(&self.inner.client, script, keys, args).await
    }

    /// Runs `script` on `client` (the toggles' connection, or the feed's own).
    async fn eval_on(
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
            .map_err(board_error)?;
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
                // The board is gone (Redis restarted empty, FLUSHALL): make a
                // new one, unless the feed restores it from its replica.
                self.board_gone().await?;
                self.eval(&self.inner.scripts.set, keys, args).await
            }
            other => other,
        }
        .map_err(unavailable)?;
        let v = array(reply)?;
        let (status, value, seq) = (int(&v, 0)?, int(&v, 1)? == 1, int(&v, 2)? as u64);
        let epoch = uint(&v, 5)?;
        if seq > 0 {
            let op = if status == -2 { Op::Freeze } else { Op::Set(value) };
            self.acknowledged(Acked { epoch, seq, index, op });
        } else if status == 0 {
            // No change, but what the client now believes the box is: an older
            // acknowledgement of the box must not be made again over it.
            let change = Acked { epoch, seq: 0, index, op: Op::Set(value) };
            self.remember(Recent { change, reused: false });
        }
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
        match self.read_board().await? {
            Some(board) => Ok(board),
            None => {
                self.board_gone().await?;
                self.read_board().await?.ok_or_else(|| {
                    StoreError::Unavailable("the board vanished again right after init".into())
                })
            }
        }
    }

    /// A board that is gone from Redis: created anew (`init.lua`, a new empty
    /// board) by a worker without a replica; a worker with one answers
    /// `Unavailable` instead, and its feed restores the board from the replica
    /// (an empty board created meanwhile would win over the restore and lose
    /// every acknowledged change).
    async fn board_gone(&self) -> Result<(), StoreError> {
        if self.inner.replicated.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(
                "the board is gone from Redis; it is being restored from the workers' replicas"
                    .into(),
            ));
        }
        self.init().await.map(|_| ())
    }

    /// The whole board, read atomically; `None` when it does not exist.
    async fn read_board(&self) -> Result<Option<Board>, StoreError> {
        let k = &self.inner.keys;
        // snapshot.lua takes the first six.
        let keys = k.board()[..6].to_vec();
        let reply = match self.eval(&self.inner.scripts.snapshot, keys, Vec::<String>::new()).await
        {
            Err(e) if e.details().contains("NOBOARD") => return Ok(None),
            other => other.map_err(unavailable)?,
        };
        let v = array(reply)?;
        let size = int(&v, 6)? as u32;
        let checked =
            bits::from_bytes(&bytes(&v, 0)?, size).map_err(|e| StoreError::Data(e.to_string()))?;
        let frozen =
            bits::from_bytes(&bytes(&v, 1)?, size).map_err(|e| StoreError::Data(e.to_string()))?;
        Ok(Some(Board {
            epoch: uint(&v, 5)?,
            seq: uint(&v, 4)?,
            size,
            checked,
            frozen,
            checked_count: int(&v, 2)? as u32,
            frozen_count: int(&v, 3)? as u32,
            freeze_after_ms: int(&v, 8)? as u64,
        }))
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

    /// Remembers a change `set.lua` made: in the ring of recent ones, and as
    /// the watermark if it is the newest of its epoch.
    fn acknowledged(&self, change: Acked) {
        let mut acked = self.inner.acked.lock().unwrap_or_else(|e| e.into_inner());
        let read = *self.inner.read.lock().unwrap_or_else(|e| e.into_inner());
        let reused = (read.0 == change.epoch && change.seq <= read.1)
            || acked.is_some_and(|a| a.epoch == change.epoch && change.seq <= a.seq);
        self.remember(Recent { change, reused });
        // Replies of two epochs may race (a FLUSHALL, a rebirth): the later
        // epoch usually wins; losing a watermark only skips one check.
        if acked.is_none_or(|a| a.epoch != change.epoch || a.seq < change.seq) {
            *acked = Some(change);
        }
    }

    /// Adds an answer to the ring of recent ones.
    fn remember(&self, answer: Recent) {
        let mut recent = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_ACKS {
            recent.pop_front();
        }
        recent.push_back(answer);
    }

    /// Notes where the feed has read up to (see `Inner::read`).
    fn read_up_to(&self, epoch: u64, seq: u64) {
        *self.inner.read.lock().unwrap_or_else(|e| e.into_inner()) = (epoch, seq);
    }

    /// The newest change this worker acknowledged on board `epoch`.
    fn acked(&self, epoch: u64) -> Option<Acked> {
        let acked = self.inner.acked.lock().unwrap_or_else(|e| e.into_inner());
        acked.filter(|a| a.epoch == epoch)
    }

    /// The board's epoch and seq in Redis, and the log entries at seqs `last`
    /// and `acked` (0 = none), in one atomic read.
    async fn position(
        &self,
        client: &Client,
        last: u64,
        acked: u64,
    ) -> Result<Position, StoreError> {
        let k = &self.inner.keys;
        let reply = self
            .eval_on(
                client,
                &self.inner.scripts.position,
                vec![&k.config, &k.seq, &k.log],
                vec![last.to_string(), acked.to_string()],
            )
            .await
            .map_err(unavailable)?;
        let mut v = array(reply)?;
        let epoch = Some(uint(&v, 0)?).filter(|&e| e > 0);
        let seq = uint(&v, 1)?;
        let acked = v.pop().map(parse_entries).transpose()?.and_then(|e| e.into_iter().next());
        let last = v.pop().map(parse_entries).transpose()?.and_then(|e| e.into_iter().next());
        Ok(Position { epoch, seq, last, acked })
    }

    /// Moves the board from `old` to a new epoch, unless someone already did
    /// (or the board is gone, which makes a new epoch anyway).
    async fn rebirth(&self, old: u64) -> Result<(), StoreError> {
        let new = crate::new_epoch();
        let reply = match self
            .eval(
                &self.inner.scripts.rebirth,
                vec![&self.inner.keys.config],
                vec![old.to_string(), new.to_string()],
            )
            .await
        {
            Err(e) if e.details().contains("NOBOARD") => return Ok(()),
            other => other.map_err(unavailable)?,
        };
        let v = array(reply)?;
        if int(&v, 0)? == 1 {
            tracing::warn!(
                from_epoch = old,
                epoch = new,
                "Redis lost changes this worker had applied or acknowledged; the board moved to a new epoch"
            );
        }
        Ok(())
    }

    /// Writes `replica` back as the board under a new epoch, if the board
    /// still has epoch `lost` or is gone (`restore.lua`, a compare-and-set).
    /// Counts are recounted from the bits: a replica that read changes under
    /// reused seqs before it noticed a rollback has bits right but counts of
    /// two histories.
    async fn restore(&self, replica: &Board, lost: u64) -> Result<(), StoreError> {
        let config = self.config();
        let new = crate::new_epoch();
        let mut args: Vec<Value> = vec![
            lost.to_string().into(),
            new.to_string().into(),
            replica.size.to_string().into(),
            config.max_checked.unwrap_or(0).to_string().into(),
            config.freeze_after_ms.to_string().into(),
            Bytes::copy_from_slice(bits::as_bytes(&replica.checked)).into(),
            Bytes::copy_from_slice(bits::as_bytes(&replica.frozen)).into(),
            replica.checked.count_ones().to_string().into(),
            replica.frozen.count_ones().to_string().into(),
            replica.seq.to_string().into(),
        ];
        if config.freeze_after_ms > 0 {
            args.extend(
                replica
                    .checked
                    .iter_ones()
                    .filter(|&i| !replica.frozen[i])
                    .map(|i| Value::from(i.to_string())),
            );
        }
        let reply = self
            .eval(&self.inner.scripts.restore, self.inner.keys.board(), args)
            .await
            .map_err(board_error)?;
        let v = array(reply)?;
        if int(&v, 0)? == 1 {
            tracing::warn!(
                from_epoch = lost,
                from_seq = replica.seq,
                epoch = new,
                checked = replica.checked.count_ones(),
                "Redis lost acknowledged changes; restored the board from this worker's replica under a new epoch"
            );
        }
        Ok(())
    }

    /// The epoch and seq board `epoch` was restored from (`restore.lua`), if it was.
    async fn restored_from(&self, epoch: u64) -> Result<Option<(u64, u64)>, StoreError> {
        let v: Vec<Option<String>> = self
            .inner
            .client
            .hmget(
                &self.inner.keys.config,
                vec!["epoch", "restored_from_epoch", "restored_from_seq"],
            )
            .await
            .map_err(unavailable)?;
        let num = |i: usize| v.get(i).cloned().flatten().and_then(|s| s.parse::<u64>().ok());
        Ok(match (num(0), num(1), num(2)) {
            (Some(e), Some(from), Some(seq)) if e == epoch => Some((from, seq)),
            _ => None,
        })
    }

    /// Makes again the changes this worker acknowledged on board `from` after
    /// its seq `seq`, or under a seq Redis had already used (after it went
    /// back in time): a board restored from another worker's replica at that
    /// position may lack them. In the order they were acknowledged; a box that
    /// already has the value costs nothing (set, not flip).
    async fn reapply(&self, board: &Board, from: u64, seq: u64) {
        let mine: Vec<Acked> = {
            let recent = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
            // Only a box's latest answer counts: the client may have set the
            // box again since (on the restored board, too).
            let mut latest = std::collections::HashMap::new();
            for (i, r) in recent.iter().enumerate() {
                latest.insert(r.change.index, i);
            }
            recent
                .iter()
                .enumerate()
                .filter(|&(i, r)| {
                    latest.get(&r.change.index) == Some(&i)
                        && r.change.epoch == from
                        && r.change.seq > 0
                        && (r.change.seq > seq || r.reused)
                })
                .map(|(_, r)| r.change)
                .collect()
        };
        let mut made = 0;
        for a in mine {
            let Op::Set(value) = a.op else { continue };
            if board.is_checked(a.index) == value {
                continue;
            }
            match self.set(a.index, value).await {
                Ok(_) => made += 1,
                Err(e) => {
                    tracing::warn!(error = %e, index = a.index, "could not make an acknowledged change again after a restore");
                }
            }
        }
        if made > 0 {
            tracing::warn!(
                changes = made,
                from_epoch = from,
                from_seq = seq,
                "made again acknowledged changes the restored board lacked"
            );
        }
    }

    /// A reader of the change stream after `seq` of `epoch`, on its own
    /// connection, without a replica: a board that lost changes moves to a
    /// new epoch with what Redis still has (`rebirth.lua`).
    pub fn feed(&self, epoch: u64, seq: u64) -> RedisFeed {
        // Verify before the first read: the caller's position may be of another
        // epoch, or ahead of the board.
        RedisFeed {
            store: self.clone(),
            client: None,
            epoch,
            seq,
            last: None,
            verify: true,
            left: VecDeque::new(),
            replica: None,
        }
    }

    /// A reader of the change stream after `board`, which keeps a replica of
    /// the board (`board` and the changes it read): when Redis lost
    /// acknowledged changes, or the board is gone, the replica is written back
    /// under a new epoch (`restore.lua`), and this worker's toggles never
    /// create an empty board in its place.
    pub fn feed_from(&self, board: &Board) -> RedisFeed {
        self.inner.replicated.store(true, Ordering::Relaxed);
        RedisFeed { replica: Some(board.clone()), ..self.feed(board.epoch, board.seq) }
    }

    /// Closes the connections.
    pub async fn close(&self) -> Result<(), StoreError> {
        let _ = self.inner.client.quit().await;
        Ok(())
    }
}

/// Reads `{B}:log` with `XREAD BLOCK` from the last applied id.
#[derive(Debug)]
pub struct RedisFeed {
    store: RedisStore,
    /// Its own connection, made on first use.
    client: Option<(Client, tokio::sync::broadcast::Receiver<Server>)>,
    epoch: u64,
    /// Seq of the last change returned, or of the board the feed started or
    /// reset from: the replica's position.
    seq: u64,
    /// The last entry returned, to check after a reconnect that Redis still
    /// has it (an AOF restart can lose the last second and reuse seqs).
    last: Option<Entry>,
    /// Check continuity before reading on.
    verify: bool,
    /// Epochs this feed moved away from, newest last: Redis showing one of
    /// them again was restored from data older than the move.
    left: VecDeque<u64>,
    /// The board as of `seq` (what the feed started from plus every change it
    /// returned since), when the feed was made with one: what a board that
    /// lost changes is restored from.
    replica: Option<Board>,
}

/// Epochs a feed remembers having left.
const LEFT_EPOCHS: usize = 16;

/// What a continuity check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continuity {
    /// Redis still holds every change of our epoch we applied or acknowledged.
    Intact,
    /// The board is gone or has another epoch.
    Moved,
    /// Same epoch, but Redis lost changes we applied or acknowledged.
    Lost,
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
        if self.reconnected() {
            // Redis may have restarted and lost writes.
            self.verify = true;
        }
        Ok(self.client.as_ref().expect("set above").0.clone())
    }

    /// Whether the feed's connection reconnected since the last look.
    fn reconnected(&mut self) -> bool {
        let Some((_, reconnects)) = self.client.as_mut() else { return false };
        let mut any = false;
        while let Ok(_) | Err(TryRecvError::Lagged(_)) = reconnects.try_recv() {
            any = true;
        }
        any
    }

    /// The next changes, a `Reset` when continuity is lost (trimmed log, new
    /// epoch, Redis lost writes), an empty `Changes` after a quiet block (the
    /// heartbeat), or `Unavailable` while Redis is away. Run it in a task of its
    /// own: a dropped call loses nothing, but wastes a blocking read.
    pub async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        loop {
            let client = self.client().await?;
            if self.verify {
                match self.continuity(&client).await? {
                    Continuity::Intact => self.verify = false,
                    other => return self.reset(other == Continuity::Lost).await,
                }
            }
            let options = Options {
                timeout: Some(Duration::from_millis(FEED_BLOCK_MS) + COMMAND_TIMEOUT),
                ..Default::default()
            };
            let read = measured(
                "feed",
                Purpose::Feed,
                client.with_options(&options).xread::<Value, _, _>(
                    Some(FEED_CHUNK),
                    Some(FEED_BLOCK_MS),
                    &self.store.inner.keys.log,
                    format!("{}-0", self.seq),
                ),
            )
            .await;
            let reply = read.map_err(|e| {
                self.verify = true;
                unavailable(e)
            })?;
            if self.reconnected() {
                // The read may have gone to a Redis that restarted with older
                // data: check, then read again.
                self.verify = true;
                continue;
            }
            let entries = parse_xread(reply)?;
            if let Some(first) = entries.first() {
                if entries.iter().any(|e| !e.of(self.epoch)) {
                    // Another board's entries (after a FLUSHALL its seqs start
                    // again at 1 and soon pass ours; after a rebirth they
                    // continue ours): never a continuation of this board.
                    return self.reset(false).await;
                }
                if first.change.seq != self.seq + 1 {
                    // The log was trimmed past us: start over from a snapshot.
                    return self.reset(false).await;
                }
                let last = *entries.last().expect("not empty");
                if let Some(replica) = self.replica.as_mut() {
                    for e in &entries {
                        if let Err(error) = replica.apply_change(&e.change) {
                            // Checked above: contiguous, of this epoch. If that
                            // ever breaks, a restore would write a wrong board.
                            tracing::error!(%error, "the feed's replica rejected a change; dropping it");
                            self.replica = None;
                            break;
                        }
                    }
                }
                self.seq = last.change.seq;
                self.last = Some(last);
                self.store.read_up_to(self.epoch, self.seq);
                return Ok(FeedEvent::Changes(entries.into_iter().map(|e| e.change).collect()));
            }
            // Quiet for a whole block: is this still the same board, with all
            // we applied and acknowledged? If so, say we are caught up (the
            // heartbeat that turns /readyz back to 200 after an outage).
            return match self.continuity(&client).await? {
                Continuity::Intact => Ok(FeedEvent::Changes(Vec::new())),
                other => self.reset(other == Continuity::Lost).await,
            };
        }
    }

    /// Whether Redis still has our epoch, a seq not behind what we applied or
    /// acknowledged, and the very changes we saw at those seqs.
    async fn continuity(&self, client: &Client) -> Result<Continuity, StoreError> {
        // Read the acknowledgement before asking Redis: a change acknowledged
        // before this line was in Redis before the script below runs, so a
        // seq behind it is a loss, never a race between two connections.
        // Checked even when the feed has read past it: after a restore, the
        // feed may have read other changes under those seqs before it noticed.
        let acked = self.store.acked(self.epoch);
        let last = self.last.map_or(0, |e| e.change.seq);
        let now = self.store.position(client, last, acked.map_or(0, |a| a.seq)).await?;
        if now.epoch != Some(self.epoch) {
            return Ok(Continuity::Moved);
        }
        if now.seq < acked.map_or(self.seq, |a| a.seq.max(self.seq)) {
            return Ok(Continuity::Lost);
        }
        // An entry trimmed away is fine (the next XREAD shows whether we were
        // trimmed past); present but different means Redis lost changes and
        // reused their seqs for others.
        if let (Some(mine), Some(theirs)) = (self.last, now.last)
            && mine != theirs
        {
            return Ok(Continuity::Lost);
        }
        if let (Some(mine), Some(theirs)) = (acked, now.acked)
            && !(theirs.of(self.epoch)
                && theirs.change.index == mine.index
                && theirs.change.op == mine.op)
        {
            return Ok(Continuity::Lost);
        }
        Ok(Continuity::Intact)
    }

    /// Starts over from a snapshot. With `lost` (or when the snapshot is of
    /// our epoch but behind what we applied or acknowledged) Redis lost
    /// changes of our epoch: the board moves to a new one first, so that no
    /// client resumes across the loss.
    async fn reset(&mut self, lost: bool) -> Result<FeedEvent, StoreError> {
        // Until a reset succeeds, whatever the next read brings is suspect.
        self.verify = true;
        // Read before the snapshot, as in `continuity`.
        let high = self.store.acked(self.epoch).map_or(self.seq, |a| a.seq.max(self.seq));
        let replica = self.replica.as_ref().filter(|r| r.epoch == self.epoch && r.seq == self.seq);
        let board = match self.store.read_board().await? {
            // The board is gone (Redis restarted empty, FLUSHALL): ours is the
            // board as of our seq, with every change acknowledged before it.
            None => match replica {
                Some(replica) => {
                    self.store.restore(replica, self.epoch).await?;
                    self.read_board_after_move().await?
                }
                // Without a replica there is nothing to restore: a new, empty board.
                None => {
                    self.store.init().await?;
                    self.read_board_after_move().await?
                }
            },
            Some(board) => {
                let behind = board.epoch == self.epoch && (lost || board.seq < high);
                // An epoch we left is back: Redis went back past the move, and its
                // clients may hold seqs of it the restored data does not have.
                let returned = self.left.contains(&board.epoch);
                if behind || returned {
                    match replica {
                        Some(replica) => self.store.restore(replica, board.epoch).await?,
                        None => self.store.rebirth(board.epoch).await?,
                    }
                    self.read_board_after_move().await?
                } else {
                    board
                }
            }
        };
        // A board restored from a replica (ours or another worker's) lacks
        // what that replica had not read: make our own such changes again.
        // They come back through this feed as changes after the board.
        if board.epoch != self.epoch
            && let Some((from, seq)) = self.store.restored_from(board.epoch).await?
        {
            self.store.reapply(&board, from, seq).await;
        }
        if board.epoch != self.epoch {
            if self.left.len() == LEFT_EPOCHS {
                self.left.pop_front();
            }
            self.left.push_back(self.epoch);
        }
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
        self.verify = false;
        self.store.read_up_to(self.epoch, self.seq);
        if self.replica.is_some() {
            self.replica = Some(board.clone());
        }
        Ok(FeedEvent::Reset(Box::new(board)))
    }

    /// The board after this feed moved or restored it; `Unavailable` when it
    /// is gone again (the next call starts over).
    async fn read_board_after_move(&self) -> Result<Board, StoreError> {
        self.store.read_board().await?.ok_or_else(|| {
            StoreError::Unavailable("the board is gone again right after a restore".into())
        })
    }
}

fn bad(what: &str) -> StoreError {
    crate::count_error("data");
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
fn parse_xread(v: Value) -> Result<Vec<Entry>, StoreError> {
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

/// Parses stream entries `[[id, [field, value, ...]], ...]`.
fn parse_entries(v: Value) -> Result<Vec<Entry>, StoreError> {
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
            let epoch = match field("e") {
                Ok(_) => Some(num("e")?),
                Err(_) => None,
            };
            // Entries written before entries carried their commit time (a
            // fleet upgraded under traffic) read as time unknown.
            let committed_ms = match field("t") {
                Ok(_) => num("t")?,
                Err(_) => 0,
            };
            Ok(Entry {
                epoch,
                change: Change {
                    seq,
                    index: num("i")? as u32,
                    op,
                    checked_count: num("c")? as u32,
                    frozen_count: num("f")? as u32,
                    committed_ms,
                },
            })
        })
        .collect()
}
