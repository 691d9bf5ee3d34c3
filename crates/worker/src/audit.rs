//! Audit and revert (issue 14 part 2): what one client address did to the
//! board, from the change archive, and undoing it.
//!
//! - `omcb admin audit --origin ADDR --since T [--until T] --archive-dir DIR
//!   --origin-key-file F` reads the archive directly (no worker, no store)
//!   and lists every archived change whose origin is ADDR's keyed hash
//!   ([`OriginKey::origin`], the workers' own function), then a summary. It
//!   shows what the archive holds: the last block interval's changes may
//!   not be there yet. `--box N` lists who changed box N instead (or only
//!   ADDR's changes of it); `--box-range A..B` (both included) limits any
//!   audit to a region.
//! - `omcb admin audit --top N --since T [--until T] [--box-range A..B]`
//!   ([`top`]) lists the N origins with the most changes in the window
//!   (and region), each with its distinct boxes, first and last time and
//!   the range of boxes it touched: how an operator who sees a vandalised
//!   region finds the origin behind it when no log names the address.
//! - Wherever an address is asked for, an origin itself (16 hex digits, as
//!   audit prints it) does too ([`Who`]): the archive holds no address, so
//!   an origin found with `--top` or `--box` can be audited and reverted
//!   as it is.
//! - `omcb admin revert --origin ADDR --since T [--dry-run]` makes a
//!   [`Plan`] and [`apply`]s it: through a worker's private listener
//!   (`POST /admin/revert`, the embedded board, whose store has one writer),
//!   or in a fleet straight to Redis (`--redis`, with the archive and key
//!   given to the command).
//!
//! # What revert does
//! It works on the board's current epoch only (an earlier epoch's board is
//! gone: a new epoch means the board was lost and restored). For every box
//! the address changed since T, in seq order, it finds the value the box
//! had before the address's first change in the window (a change always
//! changes the value, so a check was made on an unchecked box and an
//! uncheck on a checked one) and the last change anyone made to it. Then:
//! - **restore**: nobody else changed the box after the address's last
//!   change, and its value differs from the one before: set back with
//!   [`Store::set`], an ordinary change every client receives in the next
//!   batch, made with origin [`OPERATOR`] (`ffffffffffffffff`; no client's
//!   hash is ever that value), without any rate limit.
//! - **kept**: another origin (another client, the sweep, the operator's
//!   own earlier revert) changed it after the address's last change: listed
//!   with who and when, not touched.
//! - **frozen**: the box is frozen and its value is not the one before (it
//!   was checked since and the sunset froze it): a frozen box cannot be
//!   unchecked, so it is listed, not touched.
//! - **unchanged**: its value is already the one before (the address set it
//!   back itself): nothing to do.
//!
//! # The archive's lag
//! The archive trails the store by up to its block interval. Rather than
//! wait for the archiver (which may be slow, stopped, or on another
//! machine), revert reads the archive up to its last archived seq and the
//! rest, up to the seq of the board it compares against, from the store's
//! log (the Redis stream, the embedded log: [`Store::log_after`], what the
//! archiver itself reads), which carries the same origins. It works whether
//! or not the archiver keeps up, as long as the log still holds the seqs the
//! archive lacks; when it does not (the archiver is behind the log's trim),
//! revert fails and says so. The plan
//! compares against a snapshot of the board taken first: a change someone
//! makes between that snapshot and the revert's own set of the same box is
//! overwritten (the window is one round trip per box).
//!
//! # Failing loudly
//! Any problem the archive reader reports (a torn or corrupt block, missing
//! or repeated seqs) stops audit and revert with its file and offset;
//! nothing is skipped. A recorded gap (seqs the stream had trimmed before
//! the archiver read them) is listed by audit, and stops revert when it
//! may fall in the window, as revert cannot know who changed what there (a
//! gap has no time: one followed by a change from before the window is
//! before it; see [`check_gaps`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use omcb_archive::{ArchiveError, ArchivedChange, Entry, Filter, Reader};
use omcb_store::{Board, Op, Refusal, SetOutcome, Store};

use crate::origin::{OPERATOR, OriginKey};

/// How many of the revert's sets are in flight at once (Redis round trips).
const SETS_IN_FLIGHT: usize = 32;

/// Whose changes: a client's IP address (hashed with the origin key) or an
/// origin itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// A client address.
    Address(IpAddr),
    /// An origin, as the archive holds it.
    Origin(u64),
}

impl std::str::FromStr for Who {
    type Err = String;

    /// An IP address, or 16 hex digits (an origin as audit prints it).
    fn from_str(s: &str) -> Result<Who, String> {
        let s = s.trim();
        if let Ok(ip) = s.parse() {
            return Ok(Who::Address(ip));
        }
        match u64::from_str_radix(s, 16) {
            Ok(o) if s.len() == 16 => Ok(Who::Origin(o)),
            _ => Err(format!(
                "`{s}` is neither an IP address nor an origin (16 hex digits, as audit prints it)"
            )),
        }
    }
}

impl Who {
    /// The origin its changes carry; an address needs the origin key.
    pub fn origin(&self, key: Option<&OriginKey>) -> Result<u64, String> {
        match (self, key) {
            (Who::Origin(o), _) => Ok(*o),
            (Who::Address(ip), Some(key)) if key.is_set() => Ok(key.origin(*ip)),
            (Who::Address(_), _) => {
                Err("an address needs the workers' origin key (--origin-key-file, \
                 OMCB_ORIGIN_KEY_FILE) to be found in the archive"
                    .into())
            }
        }
    }

    fn address(&self) -> Option<String> {
        match self {
            Who::Address(ip) => Some(ip.to_string()),
            Who::Origin(_) => None,
        }
    }
}

/// Parses a time for `--since`/`--until`: RFC 3339 (`2026-11-26T05:00:00Z`,
/// an offset like `+02:00`, or none for UTC; a space for the `T` and
/// fractions of a second are fine), or a duration before `now_ms` (`2h` is
/// two hours ago, humantime's syntax). Returns ms since the Unix epoch.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, String> {
    let s = s.trim();
    let looks_like_a_date = s.len() >= 10 && s.as_bytes()[4] == b'-' && s.as_bytes()[7] == b'-';
    if !looks_like_a_date {
        let ago = crate::config::parse_duration(s, Duration::ZERO, crate::config::YEARS_100)
            .map_err(|e| format!("{e}, or a time like 2026-11-26T05:00:00Z"))?;
        return Ok(now_ms.saturating_sub(ago.as_millis() as u64));
    }
    let bad = |why: &str| {
        format!(
            "`{s}` is not an RFC 3339 time like 2026-11-26T05:00:00Z or a duration like 2h: {why}"
        )
    };
    // humantime reads UTC (`Z` or none); an offset is applied here.
    let (local, offset_ms) = match s.len().checked_sub(6).map(|i| s.split_at(i)) {
        Some((local, off))
            if local.len() > 10
                && (off.starts_with('+') || off.starts_with('-'))
                && off.as_bytes()[3] == b':' =>
        {
            let h: i64 = off[1..3].parse().map_err(|_| bad("bad offset"))?;
            let m: i64 = off[4..6].parse().map_err(|_| bad("bad offset"))?;
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (local, sign * (h * 60 + m) * 60_000)
        }
        _ => (s, 0),
    };
    let t = humantime::parse_rfc3339_weak(local).map_err(|e| bad(&e.to_string()))?;
    let ms = t.duration_since(UNIX_EPOCH).map_err(|_| bad("before 1970"))?.as_millis() as i64;
    u64::try_from(ms - offset_ms).map_err(|_| bad("before 1970"))
}

/// A time for people: RFC 3339 in UTC, to the ms.
pub fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// An origin as the archive and the JSON show it.
pub fn origin_hex(origin: u64) -> String {
    format!("{origin:016x}")
}

/// Who made a change, for people: the operator, the sweep, or an origin.
fn who(origin: u64) -> String {
    match origin {
        0 => "no client (the sweep)".into(),
        OPERATOR => "the operator (a revert)".into(),
        o => format!("origin {}", origin_hex(o)),
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Set(true) => "check",
        Op::Set(false) => "uncheck",
        Op::Freeze => "freeze",
    }
}

/// An archive problem as one line: the reader's message names the file and
/// the byte offset.
fn archive_error(e: &ArchiveError) -> String {
    match e {
        ArchiveError::Io { .. } => format!("reading the archive: {e}"),
        _ => format!("the archive is damaged, nothing was skipped: {e}"),
    }
}

/// Boxes `first..=last`, both ends included: `--box-range`, and the range
/// of boxes an origin touched as `audit --top` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoxRange {
    /// The first box.
    pub first: u32,
    /// The last box (included).
    pub last: u32,
}

impl std::str::FromStr for BoxRange {
    type Err = String;

    /// `A..B` (A up to and including B), or one box `N`.
    fn from_str(s: &str) -> Result<BoxRange, String> {
        let bad = || format!("`{s}` is not a range of boxes like 1000..1999 (both included)");
        let (a, b) = s.trim().split_once("..").unwrap_or((s.trim(), s.trim()));
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first > last {
            return Err(format!("`{s}`: the first box is after the last"));
        }
        Ok(BoxRange { first, last })
    }
}

impl std::fmt::Display for BoxRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.first, self.last)
    }
}

impl BoxRange {
    fn contains(&self, index: u32) -> bool {
        (self.first..=self.last).contains(&index)
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({ "first": self.first, "last": self.last })
    }
}

/// Which archived changes an audit looks at: a time window, and optionally
/// one box or a range of boxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// From this time, ms since the Unix epoch.
    pub since_ms: u64,
    /// Up to (not including) this time; `None` = to the archive's end.
    pub until_ms: Option<u64>,
    /// Only this box.
    pub index: Option<u32>,
    /// Only boxes in this range.
    pub range: Option<BoxRange>,
}

impl Scope {
    fn takes(&self, c: &ArchivedChange) -> bool {
        self.index.is_none_or(|i| i == c.index) && self.range.is_none_or(|r| r.contains(c.index))
    }

    /// The scope's fields of the audit JSON.
    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "index": self.index,
            "box_range": self.range.map(BoxRange::to_json),
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
        })
    }

    /// Reads the archive's changes in the scope, every epoch, in order, into
    /// `each`; the gaps that may hold changes of the window (whatever their
    /// boxes: a gap has none), as JSON. Any archive problem stops it.
    fn read(
        &self,
        root: &Path,
        mut each: impl FnMut(&ArchivedChange),
    ) -> Result<Vec<serde_json::Value>, String> {
        let reader = Reader::open(root).map_err(|e| archive_error(&e))?;
        let filter = Filter { epoch: None, since_ms: Some(self.since_ms), until_ms: self.until_ms };
        let mut gaps = Vec::new();
        // The reader gives every gap that may hold changes of the window.
        for entry in reader.entries(filter) {
            match entry.map_err(|e| archive_error(&e))? {
                Entry::Change(c) if self.takes(&c) => each(&c),
                Entry::Change(_) => {}
                Entry::Gap { epoch, from_seq, to_seq } => gaps.push(serde_json::json!({
                    "epoch": origin_hex(epoch), "from_seq": from_seq, "to_seq": to_seq,
                })),
            }
        }
        Ok(gaps)
    }
}

/// Merges `extra`'s fields into the object `v`.
fn merge(mut v: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v
}

/// `omcb admin audit`: the archived changes in the scope of `origin` (when
/// given), every epoch, as the JSON the command prints (`render_audit` for
/// people). `address` is the address `origin` was hashed from, for the
/// report.
pub fn audit(
    root: &Path,
    address: Option<String>,
    origin: Option<u64>,
    scope: &Scope,
) -> Result<serde_json::Value, String> {
    let mut changes = Vec::new();
    let mut boxes = std::collections::HashSet::new();
    let gaps = scope.read(root, |c| {
        if origin.is_none_or(|o| o == c.origin) {
            boxes.insert(c.index);
            changes.push(serde_json::json!({
                "ms": c.ms,
                "time": format_ms(c.ms),
                "epoch": origin_hex(c.epoch),
                "seq": c.seq,
                "index": c.index,
                "op": op_name(c.op),
                "origin": origin_hex(c.origin),
            }));
        }
    })?;
    let first = changes.first().map(|c| c["ms"].clone());
    let last = changes.last().map(|c| c["ms"].clone());
    let report = serde_json::json!({
        "address": address,
        "origin": origin.map(origin_hex),
        "changes": changes,
        "gaps": gaps,
        "summary": {
            "changes": changes.len(),
            "boxes": boxes.len(),
            "first_ms": first,
            "last_ms": last,
        },
    });
    Ok(merge(report, scope.to_json()))
}

/// The distinct boxes one origin changed: a hash set while it is small, a
/// bitmap once that is smaller, so an origin costs at most about a bit per
/// box of the board however much it drew.
#[derive(Debug, Default)]
struct BoxSet {
    small: std::collections::HashSet<u32>,
    /// The largest box in `small`.
    max: u32,
    bits: Vec<u64>,
    len: usize,
}

impl BoxSet {
    fn insert(&mut self, index: u32) {
        if self.bits.is_empty() {
            if self.small.insert(index) {
                self.len += 1;
            }
            self.max = self.max.max(index);
            // About 8 bytes an entry in the set, a bit a box in the bitmap.
            if self.small.len() > 64 && self.small.len() * 64 > self.max as usize + 1 {
                for i in std::mem::take(&mut self.small) {
                    self.set_bit(i);
                }
            }
            return;
        }
        if self.set_bit(index) {
            self.len += 1;
        }
    }

    /// Sets box `index`'s bit; whether it was clear.
    fn set_bit(&mut self, index: u32) -> bool {
        let (word, bit) = (index as usize / 64, 1u64 << (index % 64));
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        let clear = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        clear
    }
}

/// What one origin did in an audit's scope.
#[derive(Debug)]
struct OriginStats {
    changes: u64,
    boxes: BoxSet,
    first_ms: u64,
    last_ms: u64,
    first_index: u32,
    last_index: u32,
}

/// `omcb admin audit --top N`: the `n` origins with the most changes in the
/// scope (ties by origin), each with its changes, distinct boxes,
/// first and last time and the range of boxes it touched, as the JSON the
/// command prints (`render_top` for people). Finds the abuser when only the
/// damage is known: the time, and the region (`--box-range`).
pub fn top(root: &Path, n: usize, scope: &Scope) -> Result<serde_json::Value, String> {
    let mut origins: std::collections::HashMap<u64, OriginStats> = Default::default();
    let mut total = 0u64;
    let gaps = scope.read(root, |c| {
        total += 1;
        let s = origins.entry(c.origin).or_insert(OriginStats {
            changes: 0,
            boxes: BoxSet::default(),
            first_ms: c.ms,
            last_ms: c.ms,
            first_index: c.index,
            last_index: c.index,
        });
        s.changes += 1;
        s.boxes.insert(c.index);
        // A store clock that steps back makes seq order and time order differ.
        s.first_ms = s.first_ms.min(c.ms);
        s.last_ms = s.last_ms.max(c.ms);
        s.first_index = s.first_index.min(c.index);
        s.last_index = s.last_index.max(c.index);
    })?;
    let count = origins.len();
    let mut ranked: Vec<(u64, OriginStats)> = origins.into_iter().collect();
    ranked.sort_unstable_by(|a, b| b.1.changes.cmp(&a.1.changes).then(a.0.cmp(&b.0)));
    ranked.truncate(n);
    let listed: Vec<serde_json::Value> = ranked
        .iter()
        .map(|(origin, s)| {
            serde_json::json!({
                "origin": origin_hex(*origin),
                "changes": s.changes,
                "boxes": s.boxes.len,
                "first_ms": s.first_ms,
                "first_time": format_ms(s.first_ms),
                "last_ms": s.last_ms,
                "last_time": format_ms(s.last_ms),
                "box_range": BoxRange { first: s.first_index, last: s.last_index }.to_json(),
            })
        })
        .collect();
    let report = serde_json::json!({
        "top": n,
        "origins": listed,
        "gaps": gaps,
        "summary": { "changes": total, "origins": count },
    });
    Ok(merge(report, scope.to_json()))
}

/// The range of boxes a scope names, for people: ` to box N`, ` to boxes
/// A..B`, or nothing.
fn scope_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    if let Some(i) = v["index"].as_u64() {
        out.push_str(&format!(" to box {i}"));
    }
    if let (Some(a), Some(b)) = (v["box_range"]["first"].as_u64(), v["box_range"]["last"].as_u64())
    {
        out.push_str(&format!(" to boxes {a}..{b}"));
    }
    out
}

/// The gap lines of an audit, for people.
fn gap_lines(out: &mut String, v: &serde_json::Value) {
    use std::fmt::Write as _;
    for g in v["gaps"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "gap: epoch {} seqs {}..={} are not archived (the stream trimmed them before the \
             archiver read them); the changes there, if any, are unknown",
            g["epoch"].as_str().unwrap_or(""),
            g["from_seq"],
            g["to_seq"],
        );
    }
}

/// The `--top` JSON for people: one line per origin, most changes first.
pub fn render_top(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let until = v["until_ms"].as_u64().map_or("now".into(), format_ms);
    let _ = writeln!(
        out,
        "top {} origins by changes{} from {} to {until}",
        v["top"],
        scope_text(v),
        format_ms(v["since_ms"].as_u64().unwrap_or(0)),
    );
    let _ = writeln!(
        out,
        "{:<16}  {:>9}  {:>8}  {:<24}  {:<24}  boxes touched",
        "origin", "changes", "boxes", "first", "last"
    );
    for o in v["origins"].as_array().into_iter().flatten() {
        let hex = o["origin"].as_str().unwrap_or("");
        // The sweep's freezes and the operator's reverts are no client's.
        let note = match u64::from_str_radix(hex, 16) {
            Ok(o @ (0 | OPERATOR)) => format!("  ({})", who(o)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{hex:<16}  {:>9}  {:>8}  {:<24}  {:<24}  {}..{}{note}",
            o["changes"],
            o["boxes"],
            o["first_time"].as_str().unwrap_or(""),
            o["last_time"].as_str().unwrap_or(""),
            o["box_range"]["first"],
            o["box_range"]["last"],
        );
    }
    gap_lines(&mut out, v);
    let s = &v["summary"];
    let _ = writeln!(out, "summary: {} changes by {} origins", s["changes"], s["origins"]);
    out
}

/// The audit JSON for people: one line per change, then the summary.
pub fn render_audit(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let until = v["until_ms"].as_u64().map_or("now".into(), format_ms);
    let by = match (v["address"].as_str(), v["origin"].as_str()) {
        (Some(a), Some(o)) => format!(" by {a} (origin {o})"),
        (None, Some(o)) => format!(" by origin {o}"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "changes{by}{} from {} to {until}",
        scope_text(v),
        format_ms(v["since_ms"].as_u64().unwrap_or(0)),
    );
    let _ = writeln!(
        out,
        "{:<24}  {:<16}  {:>10}  {:>8}  {:<7}  origin",
        "time", "epoch", "seq", "box", "op"
    );
    for c in v["changes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<24}  {:<16}  {:>10}  {:>8}  {:<7}  {}",
            c["time"].as_str().unwrap_or(""),
            c["epoch"].as_str().unwrap_or(""),
            c["seq"].as_u64().unwrap_or(0),
            c["index"].as_u64().unwrap_or(0),
            c["op"].as_str().unwrap_or(""),
            c["origin"].as_str().unwrap_or(""),
        );
    }
    gap_lines(&mut out, v);
    let s = &v["summary"];
    let span = match (s["first_ms"].as_u64(), s["last_ms"].as_u64()) {
        (Some(f), Some(l)) => format!(", first {}, last {}", format_ms(f), format_ms(l)),
        _ => String::new(),
    };
    let _ = writeln!(out, "summary: {} changes to {} boxes{span}", s["changes"], s["boxes"]);
    out
}

/// What happens to one box the address changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Restore,
    Kept { by: u64, seq: u64, ms: u64 },
    Frozen,
    Unchanged,
}

/// One box the address changed in the window.
#[derive(Debug, Clone, Copy)]
struct Touched {
    /// Its value before the address's first change in the window.
    before: bool,
    first_seq: u64,
    last_seq: u64,
    /// The latest change by someone else after the address's last one.
    since: Option<ArchivedChange>,
}

/// What revert will do (or, after [`apply`], did).
#[derive(Debug, Clone)]
pub struct Plan {
    who: Who,
    origin: u64,
    since_ms: u64,
    /// The board compared against: its epoch and seq.
    epoch: u64,
    seq: u64,
    /// Where the window's changes came from.
    archived_to: u64,
    from_log: usize,
    boxes: BTreeMap<u32, (Touched, Fate)>,
    applied: Vec<(u32, bool, u64)>,
    refused: Vec<(u32, String)>,
}

/// Makes the revert's plan: the board (a snapshot), the archive's window of
/// its epoch and the store's log for what the archive does not have yet.
pub async fn plan(
    store: &Store,
    root: &Path,
    key: Option<&OriginKey>,
    who: Who,
    since_ms: u64,
) -> Result<Plan, String> {
    let origin = who.origin(key)?;
    let board = store.snapshot().await.map_err(|e| format!("reading the board: {e}"))?;
    let (epoch, upto) = (board.epoch, board.seq);
    let root_owned: PathBuf = root.to_path_buf();
    let window =
        tokio::task::spawn_blocking(move || read_window(&root_owned, epoch, since_ms, upto))
            .await
            .map_err(|e| format!("reading the archive: {e}"))??;
    let archived_to = window.archived_to;
    let tail =
        if archived_to < upto { read_log(store, epoch, archived_to, upto).await? } else { vec![] };
    let from_log = tail.len();
    let mut changes = window.changes.clone();
    changes.extend(tail.into_iter().filter(|c| c.ms >= since_ms));
    let first = changes.first().map_or(upto + 1, |c| c.seq);
    check_gaps(epoch, &window, first, upto)?;
    Ok(make_plan(who, origin, since_ms, &board, &changes, archived_to, from_log))
}

/// The archive's changes of `epoch` in the window up to seq `upto`, the
/// last seq the archive holds, and the gaps the reader met. A torn block at
/// the very end of the epoch's last segment may be the archiver writing it
/// now: read again a few times before calling it damage.
fn read_window(root: &Path, epoch: u64, since_ms: u64, upto: u64) -> Result<Window, String> {
    retry_torn_tail(|| read_window_once(root, epoch, since_ms, upto))
}

/// Runs `read` again (at most 5 times, 100 ms apart) while it fails with a
/// torn block in the epoch's last segment.
fn retry_torn_tail<T>(
    mut read: impl FnMut() -> Result<T, (ArchiveError, bool)>,
) -> Result<T, String> {
    let mut tries = 0;
    loop {
        match read() {
            Err((ArchiveError::Truncated { .. }, true)) if tries < 5 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err((e, _)) => return Err(archive_error(&e)),
            Ok(window) => return Ok(window),
        }
    }
}

/// What [`read_window`] found.
#[derive(Debug)]
struct Window {
    /// The window's changes, in seq order.
    changes: Vec<ArchivedChange>,
    /// The last seq the archive holds (at most `upto`).
    archived_to: u64,
    /// The gap records the reader gave, `(from, to)`.
    gaps: Vec<(u64, u64)>,
}

/// One read of [`read_window`]; an archive error comes with whether it is
/// in the epoch's last segment.
fn read_window_once(
    root: &Path,
    epoch: u64,
    since_ms: u64,
    upto: u64,
) -> Result<Window, (ArchiveError, bool)> {
    let reader = Reader::open(root).map_err(|e| (e, false))?;
    let segments = reader.segments_of(epoch).map_err(|e| (e, false))?;
    let last_path = segments.last().map(|s| s.path.clone());
    let in_last = |e: ArchiveError| {
        let last = e.file().is_some() && e.file() == last_path.as_deref();
        (e, last)
    };
    let filter = Filter { epoch: Some(epoch), since_ms: Some(since_ms), until_ms: None };
    let mut window = Window { changes: Vec::new(), archived_to: 0, gaps: Vec::new() };
    for entry in reader.entries(filter) {
        match entry.map_err(in_last)? {
            Entry::Change(c) if c.seq <= upto => window.changes.push(c),
            Entry::Change(_) => {}
            Entry::Gap { from_seq, to_seq, .. } => window.gaps.push((from_seq, to_seq)),
        }
    }
    // The last seq archived: the last block of the last segment that has one.
    for seg in segments.iter().rev() {
        let mut last = None;
        for block in omcb_archive::read_blocks(&seg.path) {
            last = Some(block.map_err(in_last)?.header.last_seq);
        }
        if let Some(l) = last {
            window.archived_to = l.min(upto);
            break;
        }
    }
    Ok(window)
}

fn gap_in_window(epoch: u64, (from, to): (u64, u64)) -> String {
    format!(
        "the archive has a gap in the window: seqs {from}..={to} of epoch {epoch:016x} were \
         trimmed from the stream before the archiver read them; revert cannot tell who changed \
         what there (choose a later --since, or revert by hand from `omcb admin audit`)"
    )
}

/// Refuses a gap that may hold changes of the window. A gap has no time;
/// its seqs were committed before the change after it (the store's seqs
/// follow its clock). So with `first` the window's first seq (its first
/// change, or the one after the board's seq when it has none), a gap that
/// ends before `first - 1` is followed by a change before the window and is
/// before it too; a gap up to `first - 1` or later may be in it. The
/// reader gives every such gap ([`Reader::entries`] keeps a gap whose next
/// change is in the window, wherever its block is), and this check sees
/// the changes from the store's log too.
fn check_gaps(epoch: u64, window: &Window, first: u64, upto: u64) -> Result<(), String> {
    let boundary = first.saturating_sub(1);
    match window.gaps.iter().find(|g| g.1 >= boundary && g.0 <= upto) {
        Some(&g) => Err(gap_in_window(epoch, g)),
        None => Ok(()),
    }
}

/// The changes after `after` up to `upto` of `epoch`, from the store's log
/// ([`Store::log_after`], what the archiver reads).
async fn read_log(
    store: &Store,
    epoch: u64,
    after: u64,
    upto: u64,
) -> Result<Vec<ArchivedChange>, String> {
    const CHUNK: usize = 4096;
    let mut out = Vec::new();
    let mut at = after;
    while at < upto {
        let read = store
            .log_after(at, CHUNK)
            .await
            .map_err(|e| format!("reading the store's log: {e}"))?;
        if read.epoch != epoch {
            return Err(format!(
                "the board has a new epoch ({:016x}, was {epoch:016x}) since the revert began: \
                 run it again",
                read.epoch
            ));
        }
        let first = read.changes.first().map_or(read.seq + 1, |c| c.seq);
        if first > at + 1 {
            return Err(format!(
                "the archive of epoch {epoch:016x} ends at seq {after} and the store's log no \
                 longer holds seqs {}..={}: the archiver is behind the log's trim (see \
                 omcb_archive_lag_changes); revert cannot see every change",
                at + 1,
                first - 1
            ));
        }
        for c in read.changes {
            if c.seq > upto {
                break;
            }
            at = c.seq;
            out.push(ArchivedChange {
                epoch,
                seq: c.seq,
                ms: c.committed_ms,
                index: c.index,
                op: c.op,
                origin: c.origin,
            });
        }
    }
    Ok(out)
}

fn make_plan(
    who: Who,
    origin: u64,
    since_ms: u64,
    board: &Board,
    changes: &[ArchivedChange],
    archived_to: u64,
    from_log: usize,
) -> Plan {
    let mut touched: BTreeMap<u32, Touched> = BTreeMap::new();
    for c in changes {
        if c.origin == origin {
            let t = touched.entry(c.index).or_insert(Touched {
                // A change always changes the box: a check was of an
                // unchecked box, an uncheck or a freeze of a checked one.
                before: !matches!(c.op, Op::Set(true)),
                first_seq: c.seq,
                last_seq: c.seq,
                since: None,
            });
            t.last_seq = c.seq;
            t.since = None;
        } else if let Some(t) = touched.get_mut(&c.index) {
            t.since = Some(*c);
        }
    }
    let boxes = touched
        .into_iter()
        .map(|(index, t)| {
            let now = board.is_checked(index);
            let fate = if now != t.before && board.is_frozen(index) {
                Fate::Frozen
            } else if let Some(c) = t.since {
                Fate::Kept { by: c.origin, seq: c.seq, ms: c.ms }
            } else if now == t.before {
                Fate::Unchanged
            } else {
                Fate::Restore
            };
            (index, (t, fate))
        })
        .collect();
    Plan {
        who,
        origin,
        since_ms,
        epoch: board.epoch,
        seq: board.seq,
        archived_to,
        from_log,
        boxes,
        applied: Vec::new(),
        refused: Vec::new(),
    }
}

/// Sets every box the plan restores back to its value before, as the
/// operator ([`OPERATOR`]); records what the store answered.
pub async fn apply(store: &Store, plan: &mut Plan) -> Result<(), String> {
    use futures_util::StreamExt as _;
    let work: Vec<(u32, bool)> = plan
        .boxes
        .iter()
        .filter(|(_, (_, fate))| *fate == Fate::Restore)
        .map(|(&i, (t, _))| (i, t.before))
        .collect();
    let mut answers = futures_util::stream::iter(work)
        .map(|(i, v)| async move { (i, v, store.set(i, v, OPERATOR).await) })
        .buffer_unordered(SETS_IN_FLIGHT);
    let mut failed = None;
    while let Some((i, v, answer)) = answers.next().await {
        match answer {
            Ok(SetOutcome::Changed { seq, .. }) => plan.applied.push((i, v, seq)),
            Ok(SetOutcome::Unchanged { .. }) => plan.applied.push((i, v, 0)),
            Ok(SetOutcome::Refused { reason, .. }) => plan.refused.push((
                i,
                match reason {
                    Refusal::Frozen => "frozen".into(),
                    Refusal::BoardFull => "the board is full (max_checked)".into(),
                    Refusal::OutOfRange => "out of range".into(),
                },
            )),
            Err(e) => failed = Some(format!("box {i}: {e}")),
        }
    }
    plan.applied.sort_unstable();
    plan.refused.sort_unstable();
    match failed {
        Some(e) => Err(format!(
            "the store refused a change ({e}); {} boxes were restored, run revert again \
             to finish (it skips what is done)",
            plan.applied.len()
        )),
        None => Ok(()),
    }
}

impl Plan {
    /// The plan (and what was applied) as the JSON `omcb admin revert
    /// --json` prints and `POST /admin/revert` answers.
    pub fn to_json(&self, dry_run: bool) -> serde_json::Value {
        use serde_json::json;
        let mut restore = Vec::new();
        let mut kept = Vec::new();
        let mut frozen = Vec::new();
        let mut unchanged = Vec::new();
        for (&index, (t, fate)) in &self.boxes {
            match *fate {
                Fate::Restore => restore.push(json!({
                    "index": index, "to": t.before, "first_seq": t.first_seq, "last_seq": t.last_seq,
                })),
                Fate::Kept { by, seq, ms } => kept.push(json!({
                    "index": index, "by": origin_hex(by), "seq": seq, "ms": ms,
                    "last_seq": t.last_seq,
                })),
                Fate::Frozen => frozen.push(json!({ "index": index, "before": t.before })),
                Fate::Unchanged => unchanged.push(json!(index)),
            }
        }
        json!({
            "address": self.who.address(),
            "origin": origin_hex(self.origin),
            "operator_origin": origin_hex(OPERATOR),
            "since_ms": self.since_ms,
            "epoch": origin_hex(self.epoch),
            "seq": self.seq,
            "archived_to_seq": self.archived_to,
            "from_log": self.from_log,
            "dry_run": dry_run,
            "restore": restore,
            "kept": kept,
            "frozen": frozen,
            "unchanged": unchanged,
            "applied": self.applied.iter()
                .map(|&(i, v, seq)| json!({ "index": i, "to": v, "seq": seq }))
                .collect::<Vec<_>>(),
            "refused": self.refused.iter()
                .map(|(i, why)| json!({ "index": i, "reason": why }))
                .collect::<Vec<_>>(),
        })
    }
}

/// The revert JSON for people.
pub fn render_revert(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let len = |k: &str| v[k].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        out,
        "revert of {} (origin {}) since {}: board epoch {} at seq {} (archive to seq {}, \
         {} changes from the store's log)",
        v["address"].as_str().unwrap_or("an origin"),
        v["origin"].as_str().unwrap_or("?"),
        format_ms(v["since_ms"].as_u64().unwrap_or(0)),
        v["epoch"].as_str().unwrap_or("?"),
        v["seq"],
        v["archived_to_seq"],
        v["from_log"],
    );
    let value =
        |b: &serde_json::Value| if b.as_bool() == Some(true) { "checked" } else { "unchecked" };
    for r in v["restore"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  restore  box {:>8} to {} (its changes: seqs {}..={})",
            r["index"].as_u64().unwrap_or(0),
            value(&r["to"]),
            r["first_seq"],
            r["last_seq"]
        );
    }
    for k in v["kept"].as_array().into_iter().flatten() {
        let by = u64::from_str_radix(k["by"].as_str().unwrap_or("0"), 16).unwrap_or(0);
        let _ = writeln!(
            out,
            "  kept     box {:>8}: changed since by {} at seq {} ({})",
            k["index"].as_u64().unwrap_or(0),
            who(by),
            k["seq"],
            format_ms(k["ms"].as_u64().unwrap_or(0)),
        );
    }
    for f in v["frozen"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  frozen   box {:>8}: frozen, cannot go back to {}",
            f["index"].as_u64().unwrap_or(0),
            value(&f["before"])
        );
    }
    for r in v["refused"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  refused  box {:>8}: {}",
            r["index"].as_u64().unwrap_or(0),
            r["reason"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        out,
        "summary: {} boxes to restore, {} kept (changed by someone else since), {} frozen, \
         {} already as before",
        len("restore"),
        len("kept"),
        len("frozen"),
        len("unchanged"),
    );
    if v["dry_run"].as_bool() == Some(true) {
        let _ = writeln!(out, "dry run: nothing was changed");
    } else {
        let _ = writeln!(
            out,
            "restored {} boxes as the operator (origin {}), {} refused",
            len("applied"),
            v["operator_origin"].as_str().unwrap_or("?"),
            len("refused"),
        );
    }
    out
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_is_an_address_or_an_origin() {
        assert_eq!("127.0.0.2".parse(), Ok(Who::Address("127.0.0.2".parse().unwrap())));
        assert_eq!("::1".parse(), Ok(Who::Address("::1".parse().unwrap())));
        assert_eq!("8d28c2ff91b23dd5".parse(), Ok(Who::Origin(0x8d28_c2ff_91b2_3dd5)));
        assert!("8d28c2ff".parse::<Who>().unwrap_err().contains("16 hex digits"));
        let e = Who::Address("127.0.0.2".parse().unwrap()).origin(None).unwrap_err();
        assert!(e.contains("--origin-key-file"), "{e}");
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(parse_time("0s", now).unwrap(), now);
        assert_eq!(parse_time("2026-11-26T05:00:00Z", now).unwrap(), 1_795_669_200_000);
        assert_eq!(parse_time("2026-11-26T05:00:00", now).unwrap(), 1_795_669_200_000);
        assert_eq!(parse_time("2026-11-26T07:00:00+02:00", now).unwrap(), 1_795_669_200_000);
        assert_eq!(parse_time("2026-11-26T04:30:00.5-00:30", now).unwrap(), 1_795_669_200_500);
        assert!(parse_time("yesterday", now).unwrap_err().contains("2026-11-26T05:00:00Z"));
        assert!(parse_time("2026-13-26T05:00:00Z", now).is_err());
    }

    /// An archive of epoch 1 with `records`: `(seq, ms)` changes (ms 0 =
    /// a gap record ending at that seq, from the seq after the previous;
    /// seq 0 = end the block here).
    fn archive(records: &[(u64, u64)]) -> tempfile::TempDir {
        use omcb_archive::{Record, Writer};
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path(), 1).unwrap();
        let mut last = 0;
        for &(seq, ms) in records {
            if seq == 0 {
                w.flush(10_000).unwrap();
                continue;
            }
            w.push(match ms {
                0 => Record::Gap { from: last + 1, to: seq },
                ms => Record::Change { seq, ms, index: 0, op: Op::Set(seq % 2 == 1), origin: 7 },
            })
            .unwrap();
            last = seq;
        }
        w.flush(10_000).unwrap();
        dir
    }

    fn scope(since_ms: u64) -> Scope {
        Scope { since_ms, until_ms: None, index: None, range: None }
    }

    /// The window's changes from 3000 ms up to seq `upto`, with
    /// [`check_gaps`]' verdict.
    fn window(records: &[(u64, u64)], upto: u64) -> Result<Vec<u64>, String> {
        let dir = archive(records);
        let w = read_window(dir.path(), 1, 3000, upto)?;
        let first = w.changes.first().map_or(upto + 1, |c| c.seq);
        check_gaps(1, &w, first, upto)?;
        Ok(w.changes.iter().map(|c| c.seq).collect())
    }

    /// A gap in the window stops revert; one before it does not (the change
    /// after it is before the window), also in a block of its own; one
    /// just before the window's first change may hold changes of the
    /// window and stops it too.
    #[test]
    fn only_a_gap_that_may_be_in_the_window_stops_revert() {
        let seqs = |from: u64, to: u64, ms: u64| (from..=to).map(move |s| (s, ms));
        let before: Vec<_> =
            [(10, 0)].into_iter().chain(seqs(11, 20, 1000)).chain(seqs(21, 30, 5000)).collect();
        assert_eq!(window(&before, 30).unwrap(), (21..=30).collect::<Vec<u64>>());

        let between: Vec<_> = seqs(1, 5, 1000)
            .chain([(8, 0)])
            .chain(seqs(9, 10, 1000))
            .chain(seqs(11, 12, 5000))
            .collect();
        assert_eq!(window(&between, 12).unwrap(), [11, 12]);

        // The same with the gap in a block of its own; audit does not list
        // it either.
        let skipped: Vec<_> = seqs(1, 5, 1000)
            .chain([(8, 0)])
            .chain(seqs(9, 10, 1000))
            .chain([(0, 0)])
            .chain(seqs(11, 12, 5000))
            .collect();
        assert_eq!(window(&skipped, 12).unwrap(), [11, 12]);
        let dir = archive(&skipped);
        let report = audit(dir.path(), None, Some(7), &scope(3000)).unwrap();
        assert_eq!(report["gaps"], serde_json::json!([]));

        let inside: Vec<_> = seqs(1, 10, 5000).chain([(15, 0)]).chain(seqs(16, 20, 6000)).collect();
        let e = window(&inside, 20).unwrap_err();
        assert!(e.contains("gap in the window: seqs 11..=15"), "{e}");

        // At the end of a block whose changes are all before the window,
        // right before the window's first change.
        let boundary: Vec<_> =
            seqs(1, 10, 1000).chain([(15, 0), (0, 0)]).chain(seqs(16, 20, 5000)).collect();
        let e = window(&boundary, 20).unwrap_err();
        assert!(e.contains("gap in the window: seqs 11..=15"), "{e}");
        // Audit lists it.
        let dir = archive(&boundary);
        let report = audit(dir.path(), None, Some(7), &scope(3000)).unwrap();
        assert_eq!(report["summary"]["changes"], 5);
        assert_eq!(
            report["gaps"],
            serde_json::json!([{ "epoch": "0000000000000001", "from_seq": 11, "to_seq": 15 }])
        );

        // The archive's end, with nothing after it.
        let end: Vec<_> = seqs(1, 10, 1000).chain([(15, 0)]).collect();
        let e = window(&end, 15).unwrap_err();
        assert!(e.contains("gap in the window: seqs 11..=15"), "{e}");
    }

    #[test]
    fn a_box_set_counts_distinct_boxes_as_a_set_and_as_a_bitmap() {
        let mut set = BoxSet::default();
        let mut want = std::collections::HashSet::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in 0..20_000 {
            // Few boxes first (the set), then many of a small board (the
            // bitmap), with repeats throughout.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = if n < 1_000 { (x % 50) as u32 } else { (x % 4_000) as u32 };
            set.insert(i);
            want.insert(i);
            assert_eq!(set.len, want.len(), "after {n} inserts");
        }
        assert!(!set.bits.is_empty() && set.small.is_empty(), "it became a bitmap");
    }

    #[test]
    fn a_box_range_is_a_to_b_both_included() {
        assert_eq!("400..499".parse(), Ok(BoxRange { first: 400, last: 499 }));
        assert_eq!(" 7 ".parse(), Ok(BoxRange { first: 7, last: 7 }));
        assert_eq!(BoxRange { first: 1, last: 2 }.to_string(), "1..2");
        assert!("499..400".parse::<BoxRange>().unwrap_err().contains("after the last"));
        for bad in ["", "a..b", "1..", "..2", "1...2", "-1..3"] {
            assert!(bad.parse::<BoxRange>().unwrap_err().contains("range of boxes"), "{bad}");
        }
    }

    fn change(seq: u64, index: u32, op: Op, origin: u64) -> ArchivedChange {
        ArchivedChange { epoch: 1, seq, ms: seq, index, op, origin }
    }

    /// Each fate: restored, kept (someone changed it after the address's
    /// last change, but not a box the address changed again after that),
    /// frozen, unchanged; the value before is the one before the first.
    #[test]
    fn the_plan_restores_only_what_nobody_changed_since() {
        let (a, b) = (11, 22);
        let mut board = Board::new(10, 1, 0);
        let changes = [
            change(1, 1, Op::Set(true), a), // 1: a checks, nobody after: restore to false
            change(2, 2, Op::Set(true), a), // 2: a checks, b unchecks, a checks: restore
            change(3, 2, Op::Set(false), b),
            change(4, 2, Op::Set(true), a),
            change(5, 3, Op::Set(true), a), // 3: a checks, b unchecks after: kept
            change(6, 3, Op::Set(false), b),
            change(7, 4, Op::Set(true), a), // 4: a checks, the sweep freezes: frozen
            change(8, 4, Op::Freeze, 0),
            change(9, 5, Op::Set(false), a), // 5: a unchecks, then checks: unchanged
            change(10, 5, Op::Set(true), a),
            change(11, 6, Op::Set(true), b), // 6: only b: not in the plan
        ];
        for c in &changes {
            board
                .apply_change(&omcb_store::Change {
                    seq: c.seq,
                    index: c.index,
                    op: c.op,
                    checked_count: 0,
                    frozen_count: 0,
                    committed_ms: c.ms,
                    origin: c.origin,
                })
                .unwrap();
        }
        let plan = make_plan(Who::Origin(a), a, 0, &board, &changes, 11, 0);
        let fates: Vec<(u32, Fate)> = plan.boxes.iter().map(|(&i, (_, f))| (i, *f)).collect();
        assert_eq!(
            fates,
            [
                (1, Fate::Restore),
                (2, Fate::Restore),
                (3, Fate::Kept { by: b, seq: 6, ms: 6 }),
                (4, Fate::Frozen),
                (5, Fate::Unchanged),
            ]
        );
        assert!(!plan.boxes[&2].0.before, "the value before a's first change");
    }
}
