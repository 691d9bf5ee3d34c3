//! Reading Redis replies: script results by position, and change stream
//! entries.

use bytes::Bytes;
use fred::prelude::*;

use crate::{Change, Op, StoreError};

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

pub(super) fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(v) => Ok(v),
        other => Err(bad(&format!("{other:?} is not an array"))),
    }
}

pub(super) fn int(v: &[Value], i: usize) -> Result<i64, StoreError> {
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
pub(super) fn uint(v: &[Value], i: usize) -> Result<u64, StoreError> {
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

pub(super) fn bytes(v: &[Value], i: usize) -> Result<Bytes, StoreError> {
    match v.get(i) {
        Some(Value::Bytes(b)) => Ok(b.clone()),
        Some(Value::String(s)) => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Some(Value::Null) => Ok(Bytes::new()),
        _ => Err(bad(&format!("item {i} not bytes"))),
    }
}

/// Parses an `XREAD` reply for one stream (RESP2 arrays or RESP3 maps).
pub(super) fn parse_xread(v: Value) -> Result<Vec<Entry>, StoreError> {
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
pub(super) fn parse_entries(v: Value) -> Result<Vec<Entry>, StoreError> {
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
