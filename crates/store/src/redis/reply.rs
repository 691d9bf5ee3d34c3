//! Reading Redis replies: script results as the typed shapes their headers
//! document (fred's `FromValue`), and change stream entries.

use std::collections::HashMap;

use fred::prelude::*;

use crate::{Change, Op, StoreError};

/// A stream entry as `XREAD` and `XRANGE` return it: its id and its fields.
pub(super) type RawEntry = (String, HashMap<String, String>);

/// A log entry: a change and the epoch it was written in (`None` for entries
/// written before entries carried one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Entry {
    pub(super) epoch: Option<u64>,
    pub(super) change: Change,
}

impl Entry {
    /// Whether the entry may belong to board `epoch`.
    pub(super) fn of(&self, epoch: u64) -> bool {
        self.epoch.is_none_or(|e| e == epoch)
    }
}

pub(super) fn bad(what: &str) -> StoreError {
    crate::count_error("data");
    StoreError::Data(format!("unexpected reply from Redis: {what}"))
}

/// A script's reply as the shape its header documents (a tuple for an
/// array): a reply of another shape is a data error.
pub(super) fn typed<T: FromValue>(reply: Value, what: &str) -> Result<T, StoreError> {
    reply.convert().map_err(|e| bad(&format!("{what}: {e}")))
}

impl Entry {
    /// Reads a `{B}:log` entry: id `<seq>-0`, fields `i`, `o`, `c`, `f`, and
    /// `e`, `t` and `a` when the writer had them.
    pub(super) fn parse((id, fields): RawEntry) -> Result<Entry, StoreError> {
        let seq: u64 =
            id.split('-').next().and_then(|s| s.parse().ok()).ok_or_else(|| bad("entry id"))?;
        let field = |name: &str| fields.get(name).map(String::as_str);
        let num = |name: &str| -> Result<Option<u64>, StoreError> {
            field(name)
                .map(|v| v.parse().map_err(|_| bad(&format!("entry field {name}"))))
                .transpose()
        };
        let need = |name: &str| num(name)?.ok_or_else(|| bad(&format!("entry without {name}")));
        let op = match field("o") {
            Some("1") => Op::Set(true),
            Some("0") => Op::Set(false),
            Some("f") => Op::Freeze,
            other => return Err(bad(&format!("entry op {other:?}"))),
        };
        Ok(Entry {
            epoch: num("e")?,
            change: Change {
                seq,
                index: need("i")? as u32,
                op,
                checked_count: need("c")? as u32,
                frozen_count: need("f")? as u32,
                // Entries written before entries carried their commit time (a
                // fleet upgraded under traffic) read as time unknown.
                committed_ms: num("t")?.unwrap_or(0),
                // 16 hex digits; absent when the change had no client (or
                // was written before entries carried it).
                origin: field("a")
                    .map(|v| u64::from_str_radix(v, 16).map_err(|_| bad("entry field a")))
                    .transpose()?
                    .unwrap_or(0),
            },
        })
    }
}

/// Reads stream entries.
pub(super) fn entries(raw: Vec<RawEntry>) -> Result<Vec<Entry>, StoreError> {
    raw.into_iter().map(Entry::parse).collect()
}
