//! The bodies of omcb's fuzz targets, on stable Rust.
//!
//! Each target takes any bytes and panics only when one of omcb's promises
//! breaks, so every panic is a bug. `fuzz/` (cargo-fuzz, nightly; run with
//! `scripts/fuzz`) calls them under libFuzzer; `tests/corpus.rs` runs them on
//! stable over the committed corpus (`fuzz/corpus/<target>/`) plus a few
//! thousand deterministic mutations, as part of the workspace's tests.
//!
//! # Layout
//! - [`client_message`]: what a client sends, through
//!   [`omcb_proto::decode_client`] into an embedded `MemoryStore` of a small
//!   board, whose feed is coalesced into batches that a client's board follows.
//! - [`board_file`]: the embedded store's board file decoder.
//! - [`batch`]: `ServerMessage`s (Snapshots and delta-coded Batches) applied to
//!   a client's board by the convergence rule.
//! - [`seeds`]: the meaningful inputs each target's corpus starts from.
#![forbid(unsafe_code)]

pub mod seeds;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use omcb_proto::v1::{Batch, ClientMessage, ServerMessage, Toggle, client_message, server_message};
use omcb_proto::{Applied, BatchBuilder, Board, bits, decode_client, delta, encode_server};
use omcb_store::memory::{MemoryStore, decode_board_file, encode_board_file};
use omcb_store::{BoardConfig, FeedEvent, Refusal, SetOutcome};
use prost::Message as _;

/// A target: any bytes in, a panic when a promise breaks.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` and the corpus
/// directories name them.
pub const TARGETS: &[(&str, Target)] =
    &[("client_message", client_message), ("board_file", board_file), ("batch", batch)];

/// Board sizes a target's first byte picks from: tiny boards, and sizes that
/// are not a multiple of 8 so the padding bits of the last byte are in play.
pub const SIZES: [u32; 8] = [0, 1, 7, 8, 13, 64, 100, 1000];

/// `freeze_after_ms` when an input turns freezing on.
pub const FREEZE_AFTER_MS: u64 = 1_000;

/// How far one clock step of [`client_message`] moves the store's clock: two
/// steps pass [`FREEZE_AFTER_MS`].
pub const CLOCK_STEP_MS: u64 = 600;

/// A client's frames, applied to an embedded store of a small board.
///
/// Input: a head byte, then records. Head: bits 0-2 pick the size from
/// [`SIZES`]; bit 3 sets `max_checked` to bits 4-5; bit 6 turns freezing on
/// ([`FREEZE_AFTER_MS`]). A record is a control byte and a frame of
/// `control & 0x3f` bytes; bit 6 of the control byte first moves the clock by
/// [`CLOCK_STEP_MS`] and runs the freeze sweep; bit 7 ends a batch after the
/// frame (a hub tick).
///
/// Checks: `decode_client` accepts exactly what prost accepts and differs
/// only where it saturates a wide varint; a toggle changes at most its own box,
/// as PROTOCOL.md's table says, and nothing outside the board; the board never
/// grows and its counts are its popcounts; a Resync's Snapshot round-trips;
/// and a client that applies the coalesced batches of the store's feed ends
/// with exactly the store's board.
pub fn client_message(data: &[u8]) {
    let Some((&head, mut rest)) = data.split_first() else { return };
    let config = BoardConfig {
        size: SIZES[usize::from(head & 7)],
        max_checked: (head & 0x08 != 0).then_some(u32::from((head >> 4) & 3)),
        freeze_after_ms: if head & 0x40 != 0 { FREEZE_AFTER_MS } else { 0 },
    };
    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock = {
        let now = now.clone();
        Arc::new(move || now.load(Relaxed))
    };
    let store = block_on(MemoryStore::open_with_clock(config, None, clock))
        .expect("a store without a data dir opens");
    let start = store.snapshot();
    let mut feed = Feed { feed: store.feed(start.epoch, start.seq), seq: start.seq };
    let mut client = start;
    let mut batch = BatchBuilder::new();
    while let Some((&control, tail)) = rest.split_first() {
        let (frame, tail) = tail.split_at(usize::from(control & 0x3f).min(tail.len()));
        rest = tail;
        if control & 0x40 != 0 {
            now.fetch_add(CLOCK_STEP_MS, Relaxed);
            sweep(&store);
        }
        client_frame(&store, &config, frame);
        feed.drain_into(&store, &mut batch);
        if control & 0x80 != 0 {
            send_batch(&mut batch, &mut client);
        }
    }
    feed.drain_into(&store, &mut batch);
    send_batch(&mut batch, &mut client);
    assert_eq!(client, store.snapshot(), "a client following the batches holds the store's board");
}

/// The store's feed and the last seq taken from it.
struct Feed {
    feed: omcb_store::memory::MemoryFeed,
    seq: u64,
}

impl Feed {
    /// Moves every change the store has made since the last drain into `batch`.
    fn drain_into(&mut self, store: &MemoryStore, batch: &mut BatchBuilder) {
        // `next` waits for a change, so ask only when there is one.
        while self.seq < store.snapshot().seq {
            match block_on(self.feed.next()) {
                FeedEvent::Changes(changes) => {
                    for c in &changes {
                        batch.push(c).expect("the feed yields changes in seq order");
                        self.seq = c.seq;
                    }
                }
                FeedEvent::Reset(board) => panic!("the feed reset within one epoch: {board:?}"),
            }
        }
    }
}

/// Sends the coalesced batch through the wire encoding to the client's board.
fn send_batch(batch: &mut BatchBuilder, client: &mut Board) {
    let Some(b) = batch.finish() else { return };
    let bytes = encode_server(server_message::Msg::Batch(b));
    let Some(server_message::Msg::Batch(b)) =
        ServerMessage::decode(bytes.as_slice()).expect("our own batch decodes").msg
    else {
        panic!("our own batch decodes as a Batch")
    };
    assert_eq!(client.apply_batch(&b), Ok(Applied::Applied), "the next batch follows on");
}

fn sweep(store: &MemoryStore) {
    let before = store.snapshot();
    let frozen = store.sweep(usize::MAX);
    let after = store.snapshot();
    check_board(&after, before.size);
    assert_eq!(after.seq, before.seq + frozen as u64, "one seq per box the sweep froze");
    assert_eq!(after.frozen_count, before.frozen_count + frozen as u32);
    assert_eq!((after.checked, after.checked_count), (before.checked, before.checked_count));
}

/// One frame, as the worker's reader handles it.
fn client_frame(store: &MemoryStore, config: &BoardConfig, frame: &[u8]) {
    let ours = decode_client(frame);
    let prosts = ClientMessage::decode(frame);
    assert_eq!(ours.is_ok(), prosts.is_ok(), "decode_client accepts what prost accepts");
    let (Ok(ours), Ok(prosts)) = (ours, prosts) else { return };
    match (ours.msg, prosts.msg) {
        // The worker answers CODE_BAD_MESSAGE.
        (None, None) => {}
        (Some(client_message::Msg::Resync(_)), Some(client_message::Msg::Resync(_))) => {
            resync(store);
        }
        (Some(client_message::Msg::Toggle(t)), Some(client_message::Msg::Toggle(p))) => {
            assert_eq!(t.checked, p.checked);
            assert!(t.index == p.index || t.index == u32::MAX, "index {} vs {}", t.index, p.index);
            assert!(t.request_id == p.request_id || t.request_id == u32::MAX);
            toggle(store, config, &t);
        }
        (Some(client_message::Msg::Subscribe(s)), Some(client_message::Msg::Subscribe(p))) => {
            assert!(s.first == p.first || s.first == u32::MAX, "first {} vs {}", s.first, p.first);
            assert!(s.count == p.count || s.count == u32::MAX, "count {} vs {}", s.count, p.count);
            // What the worker does with it: a range inside the board, or a refusal.
            if let Ok(Some(r)) = omcb_proto::view::subscription(s.first, s.count, 1_000_000) {
                assert!(r.start < r.end && r.end <= omcb_proto::view::region_count(1_000_000));
            }
        }
        (ours, prosts) => panic!("decode_client read {ours:?} where prost read {prosts:?}"),
    }
}

/// A Resync: the Snapshot the worker would send, through the wire and back.
fn resync(store: &MemoryStore) {
    let board = store.snapshot();
    let bytes = encode_server(server_message::Msg::Snapshot(board.to_snapshot(7)));
    let Some(server_message::Msg::Snapshot(s)) =
        ServerMessage::decode(bytes.as_slice()).expect("our own snapshot decodes").msg
    else {
        panic!("our own snapshot decodes as a Snapshot")
    };
    assert_eq!(Board::from_snapshot(&s), Ok(board));
}

/// A Toggle: the outcome must be PROTOCOL.md's answer, and only box `index` may change.
fn toggle(store: &MemoryStore, config: &BoardConfig, t: &Toggle) {
    let before = store.snapshot();
    let outcome =
        store.set(t.index, t.checked, 0).expect("a store with no data dir has nothing to fail at");
    let after = store.snapshot();
    check_board(&after, config.size);
    let i = t.index;
    let mut want = before.clone();
    if i >= before.size {
        assert_eq!(outcome, SetOutcome::Refused { reason: Refusal::OutOfRange, checked: false });
        assert_eq!(after, before, "an index outside the board changes nothing");
        return;
    }
    let (was_checked, was_frozen) = (before.is_checked(i), before.is_frozen(i));
    match outcome {
        SetOutcome::Changed { seq, checked } => {
            assert!(checked == t.checked && checked != was_checked && !was_frozen);
            assert_eq!(seq, before.seq + 1);
            want.checked.set(i as usize, checked);
            want.seq = seq;
            want.checked_count =
                if checked { want.checked_count + 1 } else { want.checked_count - 1 };
        }
        SetOutcome::Unchanged { checked } => {
            assert!(checked == t.checked && checked == was_checked && !was_frozen);
        }
        SetOutcome::Refused { reason: Refusal::Frozen, checked } => {
            assert!(checked && was_checked, "only a checked box is frozen");
            if !was_frozen {
                // Unchecking a box checked for freeze_after_ms or longer freezes it now.
                assert!(!t.checked && config.freeze_after_ms > 0);
                want.frozen.set(i as usize, true);
                want.seq += 1;
                want.frozen_count += 1;
            }
        }
        SetOutcome::Refused { reason: Refusal::BoardFull, checked } => {
            assert!(t.checked && !was_checked && !checked);
            assert!(config.max_checked.is_some_and(|max| before.checked_count >= max));
        }
        other => panic!("box {i} of {} got {other:?}", before.size),
    }
    assert_eq!(after, want, "a toggle of box {i} changes that box alone, as its outcome says");
}

/// What holds for every board: its size, the bitsets' lengths and zero padding,
/// counts that are popcounts, and frozen boxes that are checked.
fn check_board(b: &Board, size: u32) {
    assert_eq!(b.size, size, "the board never changes size");
    for set in [&b.checked, &b.frozen] {
        assert_eq!(set.len(), size as usize);
        assert_eq!(bits::as_bytes(set).len(), bits::byte_len(size));
        assert_eq!(bits::from_exact_bytes(bits::as_bytes(set), size).as_ref(), Ok(set));
    }
    assert_eq!(b.checked_count as usize, b.checked.count_ones(), "checked_count is the popcount");
    assert_eq!(b.frozen_count as usize, b.frozen.count_ones(), "frozen_count is the popcount");
    assert!(b.frozen.iter_ones().all(|i| b.checked[i]), "a frozen box is checked");
}

/// A board file, as given and sealed with a valid checksum.
///
/// The decoder checks the checksum first, so almost no mutation of a valid
/// file gets past it: the input is also read as a file body and sealed
/// ([`seal`]) to reach the parser behind the checksum. Checks: what decodes
/// is a board [`check_board`] accepts, with a check time for exactly its
/// checked boxes (the freeze sweep trusts them), and encodes to a file that
/// decodes to the same.
pub fn board_file(data: &[u8]) {
    board_file_bytes(data);
    board_file_bytes(&seal(data));
}

fn board_file_bytes(bytes: &[u8]) {
    let Ok((board, checked_at, clean)) = decode_board_file(bytes) else { return };
    check_board(&board, board.size);
    assert_eq!(checked_at.len(), board.size as usize);
    for (i, &at) in checked_at.iter().enumerate() {
        assert_eq!(at > 0, board.checked[i], "box {i} has a check time exactly when checked");
    }
    let again = encode_board_file(&board, &checked_at, clean);
    assert_eq!(decode_board_file(&again), Ok((board, checked_at, clean)));
}

/// `body` followed by its FNV-1a-64 checksum, which is how a board file ends
/// (`memory/file.rs`, `encode`; a test checks the two agree).
pub fn seal(body: &[u8]) -> Vec<u8> {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, body);
    let h = std::hash::Hasher::finish(&h);
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(body);
    out.extend_from_slice(&h.to_le_bytes());
    out
}

/// Server messages applied to a client's board.
///
/// Input: a head byte, then records. Head: bits 0-2 pick the size from
/// [`SIZES`]; bits 3-7 are the board's starting seq. A record is a length
/// byte and that many bytes of `ServerMessage`; a valid Snapshot replaces the
/// board, a Batch is applied by the convergence rule.
///
/// Checks: the delta codec round-trips whatever it accepts; `apply_batch`
/// answers what the rule says (worked out here independently); a batch that
/// is refused, stale or a gap changes nothing; an applied one sets exactly its
/// boxes; a valid Snapshot round-trips; the board never changes size except
/// by a Snapshot.
pub fn batch(data: &[u8]) {
    let Some((&head, mut rest)) = data.split_first() else { return };
    let mut board = Board::new(SIZES[usize::from(head & 7)], 1, 0);
    board.seq = u64::from(head >> 3);
    while let Some((&len, tail)) = rest.split_first() {
        let (frame, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        let Ok(msg) = ServerMessage::decode(frame) else { continue };
        match msg.msg {
            Some(server_message::Msg::Batch(b)) => apply_batch(&mut board, &b),
            Some(server_message::Msg::Snapshot(s)) => {
                if let Ok(new) = Board::from_snapshot(&s) {
                    assert_eq!(new.to_snapshot(s.server_time_ms), s, "a snapshot round-trips");
                    board = new;
                }
            }
            _ => {}
        }
    }
}

fn apply_batch(board: &mut Board, b: &Batch) {
    let lists = [&b.checked, &b.unchecked, &b.frozen].map(|list| {
        let decoded = delta::decode(list);
        if let Ok(indices) = &decoded {
            assert!(indices.windows(2).all(|w| w[0] < w[1]), "decoded indices ascend strictly");
            assert_eq!(&delta::encode(indices), list, "the delta codec round-trips");
        }
        decoded
    });
    let before = board.clone();
    let in_range = lists
        .iter()
        .all(|l| l.as_ref().is_ok_and(|indices| indices.iter().all(|&i| i < before.size)));
    // PROTOCOL.md's convergence rule, in the order apply_batch documents; None = refused.
    let rule = if b.from_seq > b.to_seq {
        None
    } else if b.to_seq <= before.seq {
        Some(Applied::Stale)
    } else if b.from_seq > before.seq + 1 {
        Some(Applied::Gap)
    } else if in_range {
        Some(Applied::Applied)
    } else {
        None
    };
    let outcome = board.apply_batch(b);
    assert_eq!(outcome.as_ref().ok().copied(), rule, "batch {b:?} on a board at {}", before.seq);
    if rule != Some(Applied::Applied) {
        assert_eq!(*board, before, "a batch that is not applied changes nothing");
        return;
    }
    let mut want = before;
    let [checked, unchecked, frozen] = lists.map(|l| l.expect("in range, so decoded"));
    for i in checked {
        want.checked.set(i as usize, true);
    }
    for i in unchecked {
        want.checked.set(i as usize, false);
    }
    for i in frozen {
        want.frozen.set(i as usize, true);
    }
    (want.seq, want.checked_count, want.frozen_count) = (b.to_seq, b.checked_count, b.frozen_count);
    assert_eq!(*board, want, "an applied batch sets exactly its boxes");
}

/// Runs a future that completes without waiting for I/O (a store without a
/// data dir, a feed that has a change) on this thread's runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(f))
}
