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
//!
//! # Layout
//! - this file: [`RedisStore`], its connection and the board operations
//!   (init, set, snapshot, sweep).
//! - `toggles`: the queue through which this worker's toggles share
//!   `set.lua` calls (group commit).
//! - `keys`: the names of a board's keys.
//! - `scripts`: the Lua scripts, run by SHA with a fallback to their source,
//!   each call counted and timed in the store's metrics.
//! - `feed`: [`RedisFeed`], the change stream reader and its continuity check.
//! - `recovery`: what this worker remembers of its answers, and how a board
//!   that lost changes is restored, moved to a new epoch or made again.
//! - `reply`: reading replies and stream entries.
//! - `target`: [`RedisTarget`], the checked URL, TLS roots and the password
//!   kept out of logs; which connection errors stop a worker at start.

mod feed;
mod keys;
mod recovery;
mod reply;
mod scripts;
mod target;
mod toggles;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;
use omcb_proto::bits;

pub use feed::RedisFeed;
pub use keys::Keys;
pub use scripts::lua;
pub use target::{RedisTarget, redact};
pub use toggles::MAX_TOGGLES_PER_CALL;

use crate::{Board, BoardConfig, SetOutcome, StoreError};
use recovery::{Acked, Recent};
use reply::typed;
use scripts::Scripts;
use toggles::Toggle;

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
    target: RedisTarget,
    keys: Keys,
    scripts: Scripts,
    /// The settings this worker asked for (the board in Redis wins).
    wanted: BoardConfig,
    /// The settings of the board in Redis, learned from init.
    config: parking_lot::RwLock<BoardConfig>,
    /// This worker's id, for op ids and the sweep lease.
    owner: String,
    /// Calls made by this worker, for op ids.
    ops: AtomicU64,
    /// The queue of toggles for `set.lua` calls (see `toggles`).
    toggles: tokio::sync::mpsc::UnboundedSender<Toggle>,
    /// How long a `set.lua` call waits for more toggles, in microseconds.
    gather_us: AtomicU64,
    /// The change with the highest seq this worker acknowledged, so the feed
    /// notices when Redis lost it even if no worker ever read it back.
    acked: parking_lot::Mutex<Option<Acked>>,
    /// A feed of this worker holds a replica of the board: a board that is
    /// gone from Redis is restored from it (`restore.lua`), never created
    /// empty by `init.lua`.
    replicated: AtomicBool,
    /// The last [`RECENT_ACKS`] changes this worker acknowledged (and sets
    /// it accepted that changed nothing), oldest first: after another worker
    /// restored the board from a replica that had not read them yet, this
    /// worker makes them again.
    recent: parking_lot::Mutex<VecDeque<Recent>>,
    /// `(epoch, seq)` the feed has read up to: an acknowledged change with a
    /// seq at or below it (or below an earlier acknowledgement) was made on a
    /// board that went back in time, under a reused seq.
    read: parking_lot::Mutex<(u64, u64)>,
}

/// A script's refusal of the board's settings (`BOARDSIZE`: the board in Redis
/// has another size) is a data error; anything else means Redis is unavailable.
pub(super) fn board_error(e: Error) -> StoreError {
    if e.details().contains("BOARDSIZE") {
        StoreError::Data(e.details().to_string())
    } else {
        unavailable(e)
    }
}

pub(super) fn unavailable(e: Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// `snapshot.lua`'s answer: bits, frozen, count, frozen_count, seq, epoch,
/// size, max_checked, freeze_after_ms.
type SnapshotReply = (Bytes, Bytes, u32, u32, u64, u64, u32, u32, u64);

impl RedisStore {
    /// [`connect_to`](Self::connect_to) a plain URL (or `rediss://` trusting
    /// the system's CA store).
    pub async fn connect(url: &str, name: &str, wanted: BoardConfig) -> Result<Self, StoreError> {
        Self::connect_to(&RedisTarget::new(url, None)?, name, wanted).await
    }

    /// Connects (waiting, with backoff, until Redis answers) and creates the
    /// board `name` if it does not exist. A wrong user or password, or a
    /// failed TLS handshake, is [`StoreError::Config`] at once.
    pub async fn connect_to(
        target: &RedisTarget,
        name: &str,
        wanted: BoardConfig,
    ) -> Result<Self, StoreError> {
        let store = Self::connect_only(target, name, wanted).await?;
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

    /// Connects to the board `name` that exists in Redis, for an operator's
    /// tool (`omcb admin`): never creates one (a mistyped name must not make
    /// an empty board); [`StoreError::Data`] when there is none.
    pub async fn open_existing(target: &RedisTarget, name: &str) -> Result<Self, StoreError> {
        let store = Self::connect_only(target, name, BoardConfig::default()).await?;
        let client = &store.inner.client;
        let (size, max_checked, freeze_after_ms): (Option<u32>, Option<u32>, Option<u64>) = client
            .hmget(store.inner.keys.config.as_str(), vec!["size", "max_checked", "freeze_after_ms"])
            .await
            .map_err(unavailable)?;
        let Some(size) = size else {
            return Err(StoreError::Data(format!(
                "there is no board named {name:?} in {}",
                target.redacted()
            )));
        };
        *store.inner.config.write() = BoardConfig {
            size,
            max_checked: max_checked.filter(|&m| m > 0),
            freeze_after_ms: freeze_after_ms.unwrap_or(0),
        };
        Ok(store)
    }

    /// Connects, waiting with backoff until Redis answers; touches no key.
    async fn connect_only(
        target: &RedisTarget,
        name: &str,
        wanted: BoardConfig,
    ) -> Result<Self, StoreError> {
        let client = target.builder()?.build().map_err(unavailable)?;
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
                        if let Err(error) = &result
                            && let Some(why) = target.fatal(error)
                        {
                            return Err(StoreError::Config(why));
                        }
                        result.map_err(unavailable)?;
                        break;
                    }
                    Ok((error, server)) = errors.recv() => {
                        if let Some(why) = target.fatal(&error) {
                            return Err(StoreError::Config(why));
                        }
                        tracing::warn!(%error, ?server, "cannot reach Redis yet; retrying");
                    }
                }
            }
        }
        let (toggles, start_toggles) = toggles::start();
        let store = Self {
            inner: Arc::new(Inner {
                client,
                target: target.clone(),
                keys: Keys::new(name),
                scripts: Scripts::new(),
                wanted,
                config: parking_lot::RwLock::new(wanted),
                owner: format!("{:016x}", crate::new_epoch()),
                ops: AtomicU64::new(0),
                toggles,
                gather_us: AtomicU64::new(0),
                acked: parking_lot::Mutex::new(None),
                replicated: AtomicBool::new(false),
                recent: parking_lot::Mutex::new(VecDeque::new()),
                read: parking_lot::Mutex::new((0, 0)),
            }),
        };
        start_toggles(Arc::downgrade(&store.inner));
        Ok(store)
    }

    /// The board's settings (as stored in Redis).
    pub fn config(&self) -> BoardConfig {
        *self.inner.config.read()
    }

    /// The board's keys.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
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
        let (created, size, max_checked, freeze_after_ms, epoch): (u8, u32, u32, u64, u64) =
            typed(reply, "init.lua")?;
        let created = created == 1;
        let config = BoardConfig {
            size,
            max_checked: Some(max_checked).filter(|&m| m > 0),
            freeze_after_ms,
        };
        if created {
            tracing::info!(epoch, size = config.size, "created the board in Redis");
        } else if config != w {
            tracing::warn!(?config, wanted = ?w, "the board in Redis has other settings than this worker's flags; using the board's");
        }
        *self.inner.config.write() = config;
        Ok(epoch)
    }

    /// Sets box `index` to `checked` (the rules are in `lua/set.lua`);
    /// `origin` is written in the change's log entry (field `a`, none when 0).
    /// Concurrent calls share `set.lua` calls (group commit, see `toggles.rs`).
    pub async fn set(
        &self,
        index: u32,
        checked: bool,
        origin: u64,
    ) -> Result<SetOutcome, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let toggle = Toggle { index, checked, origin, queued: Instant::now(), reply };
        if self.inner.toggles.send(toggle).is_err() {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the store stopped before answering".into()))?
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
        let (checked, frozen, checked_count, frozen_count, seq, epoch, size, _, freeze_after_ms): SnapshotReply =
            typed(reply, "snapshot.lua")?;
        let bits =
            |b: &[u8]| bits::from_bytes(b, size).map_err(|e| StoreError::Data(e.to_string()));
        Ok(Some(Board {
            epoch,
            seq,
            size,
            checked: bits(&checked)?,
            frozen: bits(&frozen)?,
            checked_count,
            frozen_count,
            freeze_after_ms,
        }))
    }

    /// Runs the freeze sweep if this worker holds (or takes) the fleet-wide
    /// lease: how many boxes froze, or `None` when another worker holds it.
    pub async fn sweep(&self, limit: usize) -> Result<Option<usize>, StoreError> {
        if self.config().freeze_after_ms == 0 {
            return Ok(Some(0));
        }
        let k = &self.inner.keys;
        let held = self
            .eval(
                &self.inner.scripts.lease,
                vec![&k.lease],
                vec![self.inner.owner.clone(), "10000".into()],
            )
            .await
            .map(|held| held.as_i64() == Some(1));
        if !held.map_err(unavailable)? {
            return Ok(None);
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
        Ok(Some(frozen.as_i64().unwrap_or(0) as usize))
    }

    /// Takes or renews the fleet-wide archiver lease for `ms`: whether this
    /// worker holds it now.
    pub async fn archive_lease(&self, ms: u64) -> Result<bool, StoreError> {
        let k = &self.inner.keys;
        let held = self
            .eval(
                &self.inner.scripts.lease,
                vec![&k.archive_lease],
                vec![self.inner.owner.clone(), ms.to_string()],
            )
            .await
            .map_err(unavailable)?;
        Ok(held.as_i64() == Some(1))
    }

    /// What the change stream holds after `after`: the board's epoch and
    /// seq (read first), then up to `max` entries of that epoch from
    /// `after + 1` on (`XRANGE`). Entries of other epochs are passed over:
    /// after a rebirth or a restore the stream still holds the old epoch's
    /// entries, under seqs the new epoch continues from.
    pub async fn log_after(&self, after: u64, max: usize) -> Result<crate::LogRead, StoreError> {
        let client = &self.inner.client;
        let k = &self.inner.keys;
        // The seq before the entries: a seq the entries then lack was
        // trimmed, not written after the read.
        let (epoch, seq): (Option<u64>, Option<u64>) =
            scripts::measured("archive", scripts::Purpose::Archive, async {
                let epoch: Option<u64> = client.hget(k.config.as_str(), "epoch").await?;
                let seq: Option<u64> = client.get(k.seq.as_str()).await?;
                Ok((epoch, seq))
            })
            .await
            .map_err(unavailable)?;
        let Some(epoch) = epoch else {
            return Err(StoreError::Unavailable("the board does not exist in Redis".into()));
        };
        let mut from = after + 1;
        let changes = loop {
            let raw: Vec<reply::RawEntry> = scripts::measured(
                "archive",
                scripts::Purpose::Archive,
                client.xrange(k.log.as_str(), format!("{from}-0"), "+", Some(max as u64)),
            )
            .await
            .map_err(unavailable)?;
            let full = raw.len() >= max;
            let entries = reply::entries(raw)?;
            let last = entries.last().map(|e| e.change.seq);
            let mine: Vec<_> =
                entries.into_iter().filter(|e| e.of(epoch)).map(|e| e.change).collect();
            match last {
                // A whole chunk of another epoch's entries: look past it.
                Some(last) if mine.is_empty() && full => from = last + 1,
                _ => break mine,
            }
        };
        Ok(crate::LogRead { epoch, seq: seq.unwrap_or(0), changes })
    }

    /// Sets the board's `freeze_after_ms` in Redis (the sunset; 0 stops it):
    /// `set.lua` and `sweep.lua` follow it from their next call, and every
    /// worker's [`reload_config`](Self::reload_config) learns it.
    pub async fn set_freeze_after(&self, freeze_after_ms: u64) -> Result<BoardConfig, StoreError> {
        let reply = self
            .eval(
                &self.inner.scripts.settings,
                vec![&self.inner.keys.config],
                vec![freeze_after_ms.to_string()],
            )
            .await
            .map_err(|e| {
                if e.details().contains("NOBOARD") {
                    StoreError::Unavailable("the board does not exist in Redis yet".into())
                } else {
                    unavailable(e)
                }
            })?;
        let (size, max_checked, freeze_after_ms): (u32, u32, u64) = typed(reply, "settings.lua")?;
        let config = BoardConfig {
            size,
            max_checked: Some(max_checked).filter(|&m| m > 0),
            freeze_after_ms,
        };
        *self.inner.config.write() = config;
        Ok(config)
    }

    /// Reads the board's live settings from Redis (one `HGET`, counted as
    /// feed work): how a worker learns an `omcb admin` change made through
    /// another worker or Redis. A board that is gone keeps the last known.
    pub async fn reload_config(&self) -> Result<BoardConfig, StoreError> {
        let client = &self.inner.client;
        let key = &self.inner.keys.config;
        let value: Option<u64> = scripts::measured(
            "settings",
            scripts::Purpose::Feed,
            client.hget(key.as_str(), "freeze_after_ms"),
        )
        .await
        .map_err(unavailable)?;
        let mut config = self.inner.config.write();
        if let Some(freeze_after_ms) = value {
            config.freeze_after_ms = freeze_after_ms;
        }
        Ok(*config)
    }

    /// Closes the connections.
    pub async fn close(&self) -> Result<(), StoreError> {
        let _ = self.inner.client.quit().await;
        Ok(())
    }
}
