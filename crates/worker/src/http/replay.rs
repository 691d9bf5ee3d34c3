//! The time-lapse (issue 14, part 3): `/replay` plays the board's history
//! from the change archive (`--archive-dir`), in the browser.
//!
//! - `GET /replay`: the page (`web/replay.html` and its module
//!   `web/replay.js`, served like every static file).
//! - `GET /replay/index.json`: what the archive holds, per epoch: each
//!   segment's seqs, times, change count, recorded gaps, the seqs no block
//!   holds, and the problems found in it (with byte offsets).
//! - `GET /replay/<epoch>/<segment>`: a segment file's bytes as the archive
//!   keeps them (crates/archive's format: raw-DEFLATE blocks the browser
//!   inflates with `DecompressionStream('deflate-raw')`, checks by CRC-32
//!   and decodes itself). Nothing is re-encoded: the archive's blocks are
//!   already the compact form (about a byte per change).
//!
//! Everything comes from the archive's files; a replay never reads the
//! store. A worker without `--archive-dir` answers 404 on all of them.
//!
//! Caching: a segment is *sealed* once the writer can no longer append to
//! it: a later segment of its epoch exists (the writer never goes back to
//! an earlier file), or its epoch is not the archive's newest and its hour
//! is over. A sealed segment is immutable: `max-age` of a year, `immutable`,
//! and an ETag. The newest segment grows: it is served up to its last
//! complete block (a block being appended is not served half) with a few
//! seconds of `max-age`. The index changes with every block: a few seconds
//! too. Each answer carries a strong ETag (a 304 on a match).
//!
//! Building the index reads every segment once (the CRC of every block is
//! checked, blocks holding gap records are inflated to list them); a sealed
//! segment's summary is kept in memory by path and length, so later
//! indexes read only the growing segment, and an index is built at most
//! once a second.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use omcb_archive::{
    ArchiveError, BLOCK_HEADER_LEN, BlockHeader, Reader, Record, SEGMENT_HEADER_LEN, Segment,
    decode_block, hour::HOUR_MS, parse_segment_name, read_blocks,
};
use serde::Serialize;

use super::{Body, header_value, if_none_match, plain};
use crate::app::App;

/// A sealed segment never changes: a year, and `immutable` (browsers do not
/// revalidate it on reload).
const SEALED: &str = "public, max-age=31536000, immutable";
/// The growing segment and the index: a few seconds (a new block comes
/// every archiver flush).
const GROWING: &str = "public, max-age=5";

/// Answers a path under `/replay` (the page included).
pub async fn serve(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let Some(root) = app.config.archive_dir.clone() else {
        return plain(
            StatusCode::NOT_FOUND,
            "this server keeps no change archive (--archive-dir): no replay here\n",
        );
    };
    let path = req.uri().path();
    if path == "/replay" || path == "/replay/" {
        return super::static_file_at(app, req, "/replay.html").await;
    }
    let Some(rest) = path.strip_prefix("/replay/") else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if rest == "index.json" {
        let size = app.hub.size();
        let made = tokio::task::spawn_blocking(move || recent_index(&root, size)).await;
        return match made {
            Ok(Ok(body)) => cacheable(req, body, "application/json", GROWING),
            Ok(Err(e)) => archive_unreadable(&e),
            Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        };
    }
    let Some((epoch, name)) = rest.split_once('/').and_then(|(e, n)| Some((parse_epoch(e)?, n)))
    else {
        return plain(StatusCode::NOT_FOUND, "no such segment\n");
    };
    // Only names the archive itself makes: no other file, no traversal.
    if parse_segment_name(name).is_none() {
        return plain(StatusCode::NOT_FOUND, "no such segment\n");
    }
    let name = name.to_owned();
    let read = tokio::task::spawn_blocking(move || segment(&root, epoch, &name, now_ms())).await;
    match read {
        Ok(Ok(Some((body, sealed)))) => {
            cacheable(req, body, "application/octet-stream", if sealed { SEALED } else { GROWING })
        }
        Ok(Ok(None)) => plain(StatusCode::NOT_FOUND, "no such segment\n"),
        Ok(Err(e)) => archive_unreadable(&e),
        Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

fn archive_unreadable(e: &ArchiveError) -> Response<Body> {
    // The message names server paths: for the log, not for visitors.
    tracing::warn!(error = %e, "replay: cannot read the archive");
    plain(StatusCode::INTERNAL_SERVER_ERROR, "the archive cannot be read\n")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn parse_epoch(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| u64::from_str_radix(s, 16).ok())?
}

/// A whole answer with an ETag of its bytes, a 304 when the client has them.
fn cacheable(
    req: &Request<Incoming>,
    body: Bytes,
    content_type: &'static str,
    cache: &'static str,
) -> Response<Body> {
    let etag = crate::assets::etag(&body);
    let mut r = if if_none_match(req, &etag) {
        let mut r = Response::new(Full::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(body));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    };
    r.headers_mut().insert(header::ETAG, header_value(&etag));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

/// Whether the writer can no longer append to `segs[i]` (see the module
/// docs); `newest_epoch` is the archive's newest.
fn sealed(segs: &[Segment], i: usize, newest_epoch: Option<u64>, now_ms: u64) -> bool {
    let s = &segs[i];
    i + 1 < segs.len() || (Some(s.epoch) != newest_epoch && s.hour_ms + HOUR_MS <= now_ms)
}

/// The bytes of segment `name` of `epoch`, and whether it is sealed; `None`
/// when there is no such segment. The growing one is cut after its last
/// complete block.
fn segment(
    root: &Path,
    epoch: u64,
    name: &str,
    now_ms: u64,
) -> Result<Option<(Bytes, bool)>, ArchiveError> {
    let reader = Reader::open(root)?;
    let segs = reader.segments_of(epoch)?;
    let Some(i) =
        segs.iter().position(|s| s.path.file_name().and_then(|n| n.to_str()) == Some(name))
    else {
        return Ok(None);
    };
    let newest = reader.epochs()?.last().copied();
    let sealed = sealed(&segs, i, newest, now_ms);
    let path = &segs[i].path;
    let mut body = match std::fs::read(path) {
        Ok(b) => b,
        // Pruned between the listing and the read.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ArchiveError::Io { path: path.clone(), source }),
    };
    if !sealed {
        body.truncate(complete_len(&body));
    }
    Ok(Some((Bytes::from(body), sealed)))
}

/// Where the last block that is whole by its header's length ends (a block
/// still being appended is left out). Damage is not judged here: the page
/// checks every block and reports what it finds.
fn complete_len(b: &[u8]) -> usize {
    let mut at = SEGMENT_HEADER_LEN as usize;
    if b.len() < at {
        return b.len();
    }
    while let Some(head) = b.get(at..at + BLOCK_HEADER_LEN) {
        let h = BlockHeader::parse(head.try_into().expect("a block header's length"));
        let end = at + BLOCK_HEADER_LEN + h.payload_len as usize;
        if h.plausible().is_err() || end > b.len() {
            break;
        }
        at = end;
    }
    at
}

/// `/replay/index.json`.
#[derive(Debug, Serialize)]
struct Index {
    /// The board's size now (the archive does not hold sizes).
    size: u32,
    epochs: Vec<EpochIndex>,
}

#[derive(Debug, Serialize)]
struct EpochIndex {
    /// 16 lowercase hex digits (a u64 does not fit a JSON number).
    epoch: String,
    first_seq: u64,
    last_seq: u64,
    first_ms: u64,
    last_ms: u64,
    changes: u64,
    segments: Vec<SegmentIndex>,
    /// Seqs no block and no gap record holds, found where the next block
    /// starts.
    missing: Vec<Hole>,
}

#[derive(Debug, Serialize)]
struct Hole {
    from_seq: u64,
    to_seq: u64,
    /// The segment (file name) and offset of the block after the hole.
    segment: String,
    offset: u64,
}

#[derive(Debug, Clone, Serialize)]
struct SegmentIndex {
    name: String,
    /// `/replay/<epoch>/<name>`.
    url: String,
    hour_ms: u64,
    /// Bytes served (the growing one: up to its last complete block).
    bytes: u64,
    sealed: bool,
    /// 0 (and `last_seq` 0) when it holds no good block.
    first_seq: u64,
    last_seq: u64,
    /// Earliest and latest commit time of its changes, ms (0 without).
    first_ms: u64,
    last_ms: u64,
    changes: u64,
    /// Recorded gaps `[from_seq, to_seq]`: seqs the store's stream had
    /// trimmed before the archiver read them.
    gaps: Vec<[u64; 2]>,
    /// Damaged blocks: `{offset, error}`.
    errors: Vec<Problem>,
    /// `(offset, first_seq, last_seq)` of each good block, for the epoch's
    /// hole check.
    #[serde(skip)]
    blocks: Vec<(u64, u64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
struct Problem {
    offset: u64,
    error: String,
}

/// Summaries of sealed segments, by path and length (a sealed file does not
/// change; a pruned one drops out when the cache is next cleared).
type Summaries = HashMap<(PathBuf, u64), SegmentIndex>;
static SUMMARIES: LazyLock<Mutex<Summaries>> = LazyLock::new(Default::default);
/// 30 days of hourly segments of a few epochs.
const MAX_SUMMARIES: usize = 4096;

/// The index, built at most once a second (a burst of requests that nginx
/// does not absorb costs one build, not one per request).
fn recent_index(root: &Path, size: u32) -> Result<Bytes, ArchiveError> {
    type Built = Option<(std::time::Instant, PathBuf, u32, Bytes)>;
    static LAST: Mutex<Built> = Mutex::new(None);
    let mut last = LAST.lock().expect("replay index lock");
    if let Some((at, r, s, body)) = last.as_ref()
        && at.elapsed() < std::time::Duration::from_secs(1)
        && r == root
        && *s == size
    {
        return Ok(body.clone());
    }
    let body = Bytes::from(index(root, size, now_ms())?);
    *last = Some((std::time::Instant::now(), root.to_path_buf(), size, body.clone()));
    Ok(body)
}

fn index(root: &Path, size: u32, now_ms: u64) -> Result<Vec<u8>, ArchiveError> {
    let reader = Reader::open(root)?;
    let all = reader.segments()?;
    let newest = all.last().map(|s| s.epoch);
    let mut epochs = Vec::new();
    for segs in all.chunk_by(|a, b| a.epoch == b.epoch) {
        let epoch = segs[0].epoch;
        let mut e = EpochIndex {
            epoch: format!("{epoch:016x}"),
            first_seq: 0,
            last_seq: 0,
            first_ms: 0,
            last_ms: 0,
            changes: 0,
            segments: Vec::new(),
            missing: Vec::new(),
        };
        let mut next = 1;
        for i in 0..segs.len() {
            let sealed = sealed(segs, i, newest, now_ms);
            let s = summary(&segs[i], sealed)?;
            for &(offset, first, last) in &s.blocks {
                if first > next {
                    e.missing.push(Hole {
                        from_seq: next,
                        to_seq: first - 1,
                        segment: s.name.clone(),
                        offset,
                    });
                }
                next = next.max(last + 1);
            }
            if s.first_seq > 0 {
                e.first_seq = if e.first_seq == 0 { s.first_seq } else { e.first_seq };
                e.last_seq = e.last_seq.max(s.last_seq);
            }
            if s.changes > 0 {
                e.first_ms = if e.first_ms == 0 { s.first_ms } else { e.first_ms.min(s.first_ms) };
                e.last_ms = e.last_ms.max(s.last_ms);
            }
            e.changes += s.changes;
            e.segments.push(s);
        }
        epochs.push(e);
    }
    let index = Index { size, epochs };
    Ok(serde_json::to_vec(&index).expect("the index serializes"))
}

/// A segment's [`SegmentIndex`], from the cache when sealed and known.
fn summary(seg: &Segment, sealed: bool) -> Result<SegmentIndex, ArchiveError> {
    let key = (seg.path.clone(), seg.len);
    if sealed && let Some(s) = SUMMARIES.lock().expect("replay cache lock").get(&key) {
        return Ok(s.clone());
    }
    let name = seg.path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let mut s = SegmentIndex {
        url: format!("/replay/{:016x}/{name}", seg.epoch),
        name,
        hour_ms: seg.hour_ms,
        bytes: seg.len,
        sealed,
        first_seq: 0,
        last_seq: 0,
        first_ms: 0,
        last_ms: 0,
        changes: 0,
        gaps: Vec::new(),
        errors: Vec::new(),
        blocks: Vec::new(),
    };
    let mut end = SEGMENT_HEADER_LEN;
    for block in read_blocks(&seg.path) {
        let b = match block {
            Ok(b) => b,
            Err(e @ ArchiveError::Io { .. }) => return Err(e),
            // The growing segment's block being appended: not served, not
            // a problem.
            Err(ArchiveError::Truncated { .. }) if !sealed => break,
            Err(e) => {
                let why = match &e {
                    ArchiveError::Truncated { why, .. } => format!("truncated: {why}"),
                    ArchiveError::Corrupt { why, .. } => format!("corrupt: {why}"),
                    other => other.to_string(),
                };
                s.errors.push(Problem { offset: e.offset().unwrap_or(0), error: why });
                continue;
            }
        };
        let h = b.header;
        end = b.offset + (BLOCK_HEADER_LEN as u64) + u64::from(h.payload_len);
        if h.records > h.changes {
            match decode_block(&h, &b.payload) {
                Ok(records) => s.gaps.extend(records.iter().filter_map(|r| match *r {
                    Record::Gap { from, to } => Some([from, to]),
                    Record::Change { .. } => None,
                })),
                Err(why) => {
                    s.errors.push(Problem { offset: b.offset, error: format!("corrupt: {why}") });
                    continue;
                }
            }
        }
        s.blocks.push((b.offset, h.first_seq, h.last_seq));
        s.first_seq = if s.first_seq == 0 { h.first_seq } else { s.first_seq };
        s.last_seq = s.last_seq.max(h.last_seq);
        if h.changes > 0 {
            s.first_ms = if s.first_ms == 0 { h.min_ms } else { s.first_ms.min(h.min_ms) };
            s.last_ms = s.last_ms.max(h.max_ms);
        }
        s.changes += u64::from(h.changes);
    }
    if !sealed {
        s.bytes = end.min(seg.len);
    }
    if sealed {
        let mut cache = SUMMARIES.lock().expect("replay cache lock");
        if cache.len() >= MAX_SUMMARIES {
            cache.clear();
        }
        cache.insert(key, s.clone());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_16_lowercase_hex_digits() {
        assert_eq!(parse_epoch("00000000000000ff"), Some(255));
        for bad in ["ff", "00000000000000FF", "000000000000000g", "../../../etc/pa"] {
            assert_eq!(parse_epoch(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_block_being_appended_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = omcb_archive::Writer::open(dir.path(), 1).unwrap();
        for seq in 1..=3 {
            w.push(Record::Change {
                seq,
                ms: 1000,
                index: 0,
                op: omcb_archive::Op::Set(true),
                origin: 0,
            })
            .unwrap();
            w.flush(1000).unwrap();
        }
        let segs = Reader::open(dir.path()).unwrap().segments().unwrap();
        let whole = std::fs::read(&segs[0].path).unwrap();
        assert_eq!(complete_len(&whole), whole.len());
        let mut torn = whole.clone();
        torn.truncate(whole.len() - 3);
        let last_block = complete_len(&torn);
        assert!(last_block < torn.len() && last_block > SEGMENT_HEADER_LEN as usize);
        assert_eq!(complete_len(&whole[..5]), 5);
    }
}
