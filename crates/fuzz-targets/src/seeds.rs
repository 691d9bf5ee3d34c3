//! The seed corpus: small, meaningful inputs for each target (valid messages
//! and files, and the edge cases each decoder must refuse or bound), built
//! from the real encoders so they stay valid as the code moves.
//!
//! `cargo run -p omcb-fuzz-targets --example write-seeds` writes them to
//! `fuzz/corpus/<target>/<name>`; a test fails when the committed corpus
//! lacks one. Regression inputs (from crashes) are committed there by hand,
//! named `regression-*`.

use omcb_proto::v1::{
    Batch, ClientMessage, Resync, Toggle, ToggleResult, client_message, server_message,
};
use omcb_proto::{Board, delta, encode_server};
use omcb_store::memory::encode_board_file;
use prost::Message as _;

/// The seeds of target `target` (a name in [`crate::TARGETS`]), by file name.
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "client_message" => client_message(),
        "board_file" => board_file(),
        "batch" => batch(),
        _ => panic!("no target {target}"),
    }
}

/// The varint encoding of `v` (LEB128).
pub fn varint(v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(v, &mut out);
    out
}

fn toggle(index: u32, checked: bool, request_id: u32) -> Vec<u8> {
    let t = Toggle { index, checked, request_id };
    ClientMessage { msg: Some(client_message::Msg::Toggle(t)) }.encode_to_vec()
}

/// A Toggle whose index is the raw varint `index` (the generated types cannot write one wider than 32 bits).
fn raw_toggle(index: &[u8], request_id: u32) -> Vec<u8> {
    let mut t = vec![0x08];
    t.extend_from_slice(index);
    t.extend([0x10, 0x01, 0x18]);
    t.extend(varint(request_id.into()));
    let mut out = vec![0x0a, t.len() as u8];
    out.extend(t);
    out
}

fn resync() -> Vec<u8> {
    ClientMessage { msg: Some(client_message::Msg::Resync(Resync {})) }.encode_to_vec()
}

/// Head bits of [`crate::client_message`]'s input.
const SIZE_7: u8 = 2;
const SIZE_64: u8 = 5;
const SIZE_1000: u8 = 7;
const MAX_CHECKED_2: u8 = 0x08 | (2 << 4);
const FREEZING: u8 = 0x40;
/// Control bits of a record.
const CLOCK_STEP: u8 = 0x40;
const TICK: u8 = 0x80;

/// A [`crate::client_message`] input: a head byte and `(control bits, frame)` records.
fn client_input(head: u8, records: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![head];
    for (control, frame) in records {
        assert!(frame.len() < 0x40, "a record holds at most 63 bytes");
        out.push(control | frame.len() as u8);
        out.extend_from_slice(frame);
    }
    out
}

fn client_message() -> Vec<(&'static str, Vec<u8>)> {
    let wide = |v: u64| (0, raw_toggle(&varint(v), 9));
    vec![
        (
            "toggles-and-resync",
            client_input(
                SIZE_64,
                &[
                    (0, toggle(5, true, 1)),
                    (TICK, toggle(5, true, 2)),
                    (0, toggle(63, true, 3)),
                    (0, toggle(5, false, 4)),
                    (TICK, resync()),
                    (0, toggle(0, true, 5)),
                ],
            ),
        ),
        (
            "out-of-range",
            client_input(
                SIZE_7,
                &[
                    (0, toggle(6, true, 1)),
                    (0, toggle(7, true, 2)),
                    (0, toggle(8, true, 3)),
                    (0, toggle(u32::MAX, true, 4)),
                ],
            ),
        ),
        (
            "index-2pow32-plus-5",
            client_input(SIZE_64, &[(0, toggle(5, false, 1)), wide((1 << 32) + 5)]),
        ),
        ("index-2pow32", client_input(SIZE_64, &[wide(1 << 32)])),
        ("index-2pow64-minus-1", client_input(SIZE_1000, &[wide(u64::MAX)])),
        (
            "index-10-byte-padded",
            client_input(
                SIZE_64,
                &[(
                    0,
                    raw_toggle(&[0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00], 1),
                )],
            ),
        ),
        (
            "index-varint-overflow",
            client_input(
                SIZE_64,
                &[(
                    0,
                    raw_toggle(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], 1),
                )],
            ),
        ),
        (
            "request-id-wide",
            client_input(
                SIZE_64,
                &[(0, {
                    let mut t = vec![0x08, 0x03, 0x18];
                    t.extend(varint((1 << 32) + 7));
                    let mut m = vec![0x0a, t.len() as u8];
                    m.extend(t);
                    m
                })],
            ),
        ),
        (
            "board-full",
            client_input(
                SIZE_64 | MAX_CHECKED_2,
                &[
                    (0, toggle(1, true, 1)),
                    (0, toggle(2, true, 2)),
                    (0, toggle(3, true, 3)),
                    (0, toggle(1, false, 4)),
                    (0, toggle(3, true, 5)),
                ],
            ),
        ),
        (
            "freeze",
            client_input(
                SIZE_64 | FREEZING,
                &[
                    (0, toggle(4, true, 1)),
                    (0, toggle(9, true, 2)),
                    (CLOCK_STEP, toggle(9, false, 3)),
                    (CLOCK_STEP | TICK, toggle(4, false, 4)),
                    (CLOCK_STEP, toggle(4, true, 5)),
                    (TICK, resync()),
                ],
            ),
        ),
        (
            "unknown-fields",
            client_input(
                SIZE_64,
                &[(
                    0,
                    vec![
                        0x28, 0x2a, 0x0a, 0x0a, 0x08, 0x07, 0x78, 0x01, 0x82, 0x01, 0x01, 0xaa,
                        0x10, 0x01,
                    ],
                )],
            ),
        ),
        (
            "empty-frames",
            client_input(SIZE_64, &[(0, vec![]), (0, vec![0x0a, 0x00]), (0, vec![0x12, 0x00])]),
        ),
        (
            "merged-toggles",
            client_input(SIZE_64, &[(0, [toggle(3, true, 1), toggle(4, false, 2)].concat())]),
        ),
        ("checked-as-2", client_input(SIZE_7, &[(0, vec![0x0a, 0x04, 0x08, 0x02, 0x10, 0x02])])),
        ("size-0", client_input(0, &[(0, toggle(0, true, 1)), (0, resync())])),
    ]
}

/// A board of `size` with `checked` boxes (checked at time 1000 + index) and `frozen` ones among them.
fn saved(size: u32, seq: u64, checked: &[u32], frozen: &[u32], clean: bool) -> Vec<u8> {
    let mut board = Board::new(size, 0x5eed, 0);
    board.seq = seq;
    let mut at = vec![0u64; size as usize];
    for &i in checked {
        board.checked.set(i as usize, true);
        at[i as usize] = 1_000 + u64::from(i);
    }
    for &i in frozen {
        board.frozen.set(i as usize, true);
    }
    board.checked_count = checked.len() as u32;
    board.frozen_count = frozen.len() as u32;
    encode_board_file(&board, &at, clean)
}

/// `file`, a board of 13 boxes, with one more check time, for box `index`
/// (its checksum goes stale: [`body`] drops it).
fn with_time(file: Vec<u8>, index: u32) -> Vec<u8> {
    // The count of check times follows the 37-byte header and both bitsets.
    let at = 37 + 2 * omcb_proto::bits::byte_len(13);
    let mut out = file;
    let count = u32::from_le_bytes(out[at..at + 4].try_into().expect("4 bytes"));
    out[at..at + 4].copy_from_slice(&(count + 1).to_le_bytes());
    let end = out.len() - 8;
    out.splice(end..end, index.to_le_bytes().into_iter().chain(5_000u64.to_le_bytes()));
    out
}

/// The file without its checksum: [`crate::board_file`] seals what it gets.
fn body(mut file: Vec<u8>) -> Vec<u8> {
    file.truncate(file.len() - 8);
    file
}

fn board_file() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty-clean", body(saved(64, 0, &[], &[], true))),
        ("checked-unclean", body(saved(13, 5, &[0, 3, 12], &[], false))),
        ("frozen", body(saved(100, 40, &[1, 2, 50, 99], &[2, 99], true))),
        ("size-0", body(saved(0, 0, &[], &[], true))),
        ("size-1000", body(saved(1000, 7, &[0, 7, 8, 500, 999], &[500], false))),
        // A whole file with its checksum: the as-given path accepts it.
        ("whole-file", saved(8, 3, &[1, 2, 3], &[3], true)),
        // Found by this target: files the store never writes, which loaded and
        // then broke the freeze sweep (crates/store/tests/board_file.rs).
        (
            "regression-check-time-on-unchecked-box",
            body(with_time(saved(13, 5, &[0, 12], &[], true), 3)),
        ),
        ("regression-frozen-box-not-checked", body(saved(64, 1, &[], &[9], true))),
    ]
}

/// A [`crate::batch`] input: a head byte and length-prefixed ServerMessages.
fn batch_input(head: u8, messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![head];
    for m in messages {
        out.push(u8::try_from(m.len()).expect("a record holds at most 255 bytes"));
        out.extend_from_slice(m);
    }
    out
}

fn batch_msg(
    from_seq: u64,
    to_seq: u64,
    checked: &[u32],
    unchecked: &[u32],
    frozen: &[u32],
) -> Vec<u8> {
    encode_server(server_message::Msg::Batch(Batch {
        from_seq,
        to_seq,
        checked: delta::encode(checked),
        unchecked: delta::encode(unchecked),
        frozen: delta::encode(frozen),
        checked_count: checked.len() as u32,
        frozen_count: frozen.len() as u32,
        ..Batch::default()
    }))
}

/// A Batch with raw (not delta-coded) lists.
fn raw_batch(from_seq: u64, to_seq: u64, checked: Vec<u32>) -> Vec<u8> {
    encode_server(server_message::Msg::Batch(Batch {
        from_seq,
        to_seq,
        checked,
        ..Batch::default()
    }))
}

fn batch() -> Vec<(&'static str, Vec<u8>)> {
    let mut snapshot_board = Board::new(13, 9, 0);
    snapshot_board.seq = 4;
    snapshot_board.checked.set(12, true);
    snapshot_board.checked_count = 1;
    let snapshot = encode_server(server_message::Msg::Snapshot(snapshot_board.to_snapshot(1)));
    vec![
        (
            "applied-in-order",
            batch_input(
                5,
                &[batch_msg(1, 3, &[0, 5, 63], &[], &[]), batch_msg(4, 4, &[1], &[5], &[0])],
            ),
        ),
        (
            "stale-and-gap",
            batch_input(
                5 | (3 << 3),
                &[batch_msg(1, 3, &[1], &[], &[]), batch_msg(6, 7, &[2], &[], &[])],
            ),
        ),
        ("overlapping", batch_input(5 | (3 << 3), &[batch_msg(2, 5, &[7, 8], &[], &[])])),
        ("out-of-range", batch_input(2, &[batch_msg(1, 1, &[6, 7], &[], &[])])),
        ("delta-zero", batch_input(5, &[raw_batch(1, 1, vec![3, 0])])),
        ("delta-overflow", batch_input(7, &[raw_batch(1, 1, vec![u32::MAX, 1])])),
        ("bad-range", batch_input(5, &[batch_msg(3, 2, &[1], &[], &[])])),
        ("checked-and-unchecked", batch_input(5, &[batch_msg(1, 2, &[4], &[4], &[])])),
        ("snapshot-then-batch", batch_input(0, &[snapshot, batch_msg(5, 5, &[0], &[12], &[])])),
        (
            "other-messages",
            batch_input(
                5,
                &[encode_server(server_message::Msg::ToggleResult(ToggleResult {
                    request_id: 1,
                    accepted: true,
                    checked: true,
                    reason: 0,
                    seq: 1,
                }))],
            ),
        ),
    ]
}
