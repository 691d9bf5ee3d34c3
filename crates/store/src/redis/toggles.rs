//! Toggles carried several per `set.lua` call (group commit).
//!
//! Most of what a `set.lua` call costs Redis is per call, not per change:
//! running the script, reading the settings and counts, `TIME`, writing the
//! counts, the seq and the stored answer, and each write's `MULTI`/`EXEC`
//! wrapper in the AOF. So a worker's toggles go through one queue: one task
//! sends them, at most one call in flight, and every toggle that queued while
//! a call was out goes in the next one (up to [`MAX_TOGGLES_PER_CALL`]). A
//! quiet board pays nothing for it (a lone toggle goes at once); a busy one
//! sends fewer, larger calls. [`RedisStore::set_toggle_gather`] also spaces
//! the calls at least that far apart (`--toggle-gather`, 5 ms by default):
//! a toggle that finds the last call older than that goes at once, so a
//! quiet board still answers a toggle in one round trip, while a busy one
//! sends at most one call per interval, carrying every toggle that came in
//! it. At 500 toggles/s per worker that is two or three toggles per call,
//! where on their own they would queue behind each other about one time in
//! five (docs/BENCHMARKS.md, "Redis CPU per toggle").
//!
//! A toggle that waited [`COMMAND_TIMEOUT`] in the queue (behind calls to
//! a Redis that does not answer) fails `Unavailable` without being sent, so
//! an outage answers every toggle within about twice that.
//!
//! Each toggle still gets its own answer, as if it had had its own call:
//! `set.lua` applies the items in order. A call carries one op key, under
//! which it stores all its answers, so a call fred resends after a reconnect
//! answers every item as the first run did.
//!
//! `omcb_store_commands_total{purpose="toggle"}` counts the calls and
//! `omcb_store_toggles_total` the toggles they carried.

use std::sync::Weak;
use std::time::{Duration, Instant};

use fred::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::recovery::{Acked, Recent};
use super::{COMMAND_TIMEOUT, Inner, LOG_MAXLEN, OP_MEMORY_MS, RedisStore, unavailable};
use crate::{Op, Refusal, SetOutcome, StoreError};

/// Most toggles in one `set.lua` call: a script blocks Redis while it runs
/// (17-18 us per change, docs/BENCHMARKS.md), so a full call stays around
/// two milliseconds.
pub const MAX_TOGGLES_PER_CALL: usize = 128;

/// A toggle waiting for its call.
#[derive(Debug)]
pub(super) struct Toggle {
    pub(super) index: u32,
    pub(super) checked: bool,
    pub(super) origin: u64,
    /// When it queued: the gather window runs from the first toggle's.
    pub(super) queued: Instant,
    pub(super) reply: oneshot::Sender<Result<SetOutcome, StoreError>>,
}

/// One item's answer from `set.lua`: status, value, seq.
type Answer = (i64, i64, u64);

/// The queue's sending end and the task that empties it. The task holds the
/// store weakly: it ends when the last handle of the store is dropped.
pub(super) fn start() -> (mpsc::UnboundedSender<Toggle>, impl FnOnce(Weak<Inner>)) {
    let (send, queue) = mpsc::unbounded_channel();
    (send, move |inner: Weak<Inner>| {
        tokio::spawn(run(inner, queue));
    })
}

async fn run(inner: Weak<Inner>, mut queue: mpsc::UnboundedReceiver<Toggle>) {
    let mut call = Vec::with_capacity(MAX_TOGGLES_PER_CALL);
    // When the last call went out: the next one waits until `gather` after it.
    let mut last_sent: Option<Instant> = None;
    while let Some(first) = queue.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let store = RedisStore { inner };
        let gather = store.toggle_gather();
        let mut next = Some(first);
        let deadline = last_sent.map(|sent| sent + gather);
        loop {
            if let Some(toggle) = next.take() {
                // A toggle that waited this long behind calls to a Redis that
                // does not answer fails at once: the queue must not grow
                // while Redis is away, nor make its answers wait call after call.
                if toggle.queued.elapsed() >= COMMAND_TIMEOUT {
                    let late = "Redis did not take the toggle in time (earlier calls failed)";
                    let _ = toggle.reply.send(Err(StoreError::Unavailable(late.into())));
                } else {
                    call.push(toggle);
                }
            }
            if call.len() == MAX_TOGGLES_PER_CALL {
                break;
            }
            next = match queue.try_recv() {
                Ok(toggle) => Some(toggle),
                Err(_) => match deadline {
                    Some(deadline) if Instant::now() < deadline => {
                        match tokio::time::timeout_at(deadline.into(), queue.recv()).await {
                            Ok(Some(toggle)) => Some(toggle),
                            _ => break,
                        }
                    }
                    _ => break,
                },
            };
        }
        if !call.is_empty() {
            last_sent = Some(Instant::now());
            store.send(&mut call).await;
        }
    }
}

impl RedisStore {
    /// Spaces `set.lua` calls at least `gather` apart (a full call goes
    /// at once), so that under load each carries the toggles of an
    /// interval: fewer calls for Redis, up to `gather` more latency per
    /// toggle, none for a toggle after a quiet spell. Zero: a call goes as
    /// soon as the one before it returned.
    pub fn set_toggle_gather(&self, gather: Duration) {
        let micros = u64::try_from(gather.as_micros()).unwrap_or(u64::MAX);
        self.inner.gather_us.store(micros, std::sync::atomic::Ordering::Relaxed);
    }

    fn toggle_gather(&self) -> Duration {
        Duration::from_micros(self.inner.gather_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sends `call` as one `set.lua` call and answers each toggle; empties it.
    async fn send(&self, call: &mut Vec<Toggle>) {
        metrics::counter!("omcb_store_toggles_total").increment(call.len() as u64);
        match self.call_set(call).await {
            Ok((epoch, answers)) => {
                for (toggle, answer) in call.drain(..).zip(answers) {
                    let outcome = self.answered(toggle.index, epoch, answer);
                    // A caller that went away (its client left) loses nothing:
                    // the change is made and remembered all the same.
                    let _ = toggle.reply.send(outcome);
                }
            }
            Err(e) => {
                for toggle in call.drain(..) {
                    let _ = toggle.reply.send(Err(e.again()));
                }
            }
        }
    }

    /// One `set.lua` call for `call`'s toggles, in order: the board's epoch
    /// and each toggle's answer.
    async fn call_set(&self, call: &[Toggle]) -> Result<(u64, Vec<Answer>), StoreError> {
        let op = self.inner.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let k = &self.inner.keys;
        let op_key = format!("{}{}:{op}", k.op_prefix, self.inner.owner);
        let mut keys = k.board();
        keys.push(&op_key);
        let mut args = Vec::with_capacity(2 + 3 * call.len());
        args.push(LOG_MAXLEN.to_string());
        args.push(OP_MEMORY_MS.to_string());
        for t in call {
            args.push(t.index.to_string());
            args.push(u8::from(t.checked).to_string());
            args.push(if t.origin == 0 { "0".into() } else { format!("{:016x}", t.origin) });
        }
        let reply = match self.eval(&self.inner.scripts.set, keys.clone(), args.clone()).await {
            // The script refuses before it writes anything: the same call
            // (same op key) runs again on the new board.
            Err(e) if e.details().contains("NOBOARD") => {
                // The board is gone (Redis restarted empty, FLUSHALL): make a
                // new one, unless the feed restores it from its replica.
                self.board_gone().await?;
                self.eval(&self.inner.scripts.set, keys, args).await
            }
            other => other,
        }
        .map_err(unavailable)?;
        parse(reply, call.len())
    }

    /// Remembers what one item's answer says about the board and makes it a
    /// [`SetOutcome`].
    fn answered(
        &self,
        index: u32,
        epoch: u64,
        (status, value, seq): Answer,
    ) -> Result<SetOutcome, StoreError> {
        let value = value == 1;
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
}

/// `set.lua`'s reply for `items` toggles: `{epoch, status, value, seq, ...}`.
fn parse(reply: Value, items: usize) -> Result<(u64, Vec<Answer>), StoreError> {
    let bad = |what: String| super::reply::bad(&format!("set.lua: {what}"));
    let Value::Array(reply) = reply else {
        return Err(bad(format!("not an array: {reply:?}")));
    };
    if reply.len() != 1 + 3 * items {
        return Err(bad(format!("{} values for {items} toggles", reply.len())));
    }
    let mut values = reply.into_iter();
    let number = |v: Option<Value>| -> Result<i64, StoreError> {
        v.and_then(|v| v.as_i64())
            .ok_or_else(|| bad("a status, value or seq is not a number".into()))
    };
    let epoch = values
        .next()
        .and_then(|v| v.as_string())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("the epoch".into()))?;
    let mut answers = Vec::with_capacity(items);
    for _ in 0..items {
        let status = number(values.next())?;
        let value = number(values.next())?;
        let seq =
            u64::try_from(number(values.next())?).map_err(|_| bad("a negative seq".into()))?;
        answers.push((status, value, seq));
    }
    Ok((epoch, answers))
}

impl StoreError {
    /// The same error again, for each toggle of a call that failed.
    fn again(&self) -> StoreError {
        match self {
            StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
            StoreError::Data(why) => StoreError::Data(why.clone()),
            StoreError::Io(e) => StoreError::Io(std::io::Error::new(e.kind(), e.to_string())),
            StoreError::Config(why) => StoreError::Config(why.clone()),
        }
    }
}
