//! Property tests of the protocol's semantics: codec round trips, coalescing,
//! and the convergence rule over arbitrary delivery orders.

use omcb_proto::v1::{self, ClientMessage, ServerMessage, client_message, server_message::Msg};
use omcb_proto::{Applied, BatchBuilder, Board, Change, Op};
use proptest::prelude::*;
use prost::Message;

fn arb_server_message() -> impl Strategy<Value = ServerMessage> {
    let snapshot =
        (any::<u64>(), 1u32..200, any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>())
            .prop_flat_map(|(seq, size, epoch, time, cc, fc)| {
                let n = size.div_ceil(8) as usize;
                (
                    proptest::collection::vec(any::<u8>(), n),
                    proptest::collection::vec(any::<u8>(), n),
                )
                    .prop_map(move |(checked, frozen)| {
                        Msg::Snapshot(v1::Snapshot {
                            seq,
                            size,
                            checked,
                            frozen,
                            checked_count: cc,
                            frozen_count: fc,
                            freeze_after_ms: time / 7,
                            server_time_ms: time,
                            epoch,
                            ..Default::default()
                        })
                    })
            });
    let list = || proptest::collection::vec(any::<u32>(), 0..50);
    let batch = (any::<u64>(), any::<u64>(), list(), list(), list(), any::<u32>(), any::<u32>())
        .prop_map(|(from_seq, to_seq, checked, unchecked, frozen, checked_count, frozen_count)| {
            Msg::Batch(v1::Batch {
                from_seq,
                to_seq,
                checked,
                unchecked,
                frozen,
                checked_count,
                frozen_count,
            })
        });
    let result = (any::<u32>(), any::<bool>(), any::<bool>(), 0i32..=5, any::<u64>()).prop_map(
        |(request_id, accepted, checked, reason, seq)| {
            Msg::ToggleResult(v1::ToggleResult { request_id, accepted, checked, reason, seq })
        },
    );
    let error =
        (0i32..=5, ".{0,40}").prop_map(|(code, message)| Msg::Error(v1::Error { code, message }));
    prop_oneof![snapshot, batch, result, error].prop_map(|msg| ServerMessage { msg: Some(msg) })
}

/// A run of valid changes on a `size`-box board from its empty state: sets of
/// random values (repeats are not changes, so they get no seq) and freezes of
/// checked boxes.
fn arb_changes(size: u32, max: usize) -> impl Strategy<Value = Vec<Change>> {
    proptest::collection::vec((0..size, 0u8..10), 0..max).prop_map(move |ops| {
        let mut board = Board::new(size, 1, 0);
        let mut out = Vec::new();
        for (index, what) in ops {
            if board.is_frozen(index) {
                continue;
            }
            let op = match what {
                0 if board.is_checked(index) => Op::Freeze,
                0 => continue,
                w => Op::Set(w % 2 == 1),
            };
            if op == Op::Set(board.is_checked(index)) {
                continue;
            }
            let (cc, fc) = match op {
                Op::Set(true) => (board.checked_count + 1, board.frozen_count),
                Op::Set(false) => (board.checked_count - 1, board.frozen_count),
                Op::Freeze => (board.checked_count, board.frozen_count + 1),
            };
            let c = Change {
                seq: board.seq + 1,
                index,
                op,
                checked_count: cc,
                frozen_count: fc,
                committed_ms: 0,
                origin: 0,
            };
            board.apply_change(&c).unwrap();
            out.push(c);
        }
        out
    })
}

/// Cuts changes into contiguous batches at the given cut points.
fn batches(changes: &[Change], cuts: &[usize]) -> Vec<v1::Batch> {
    let mut out = Vec::new();
    let mut b = BatchBuilder::new();
    for (i, c) in changes.iter().enumerate() {
        b.push(c).unwrap();
        if cuts.contains(&i) {
            out.extend(b.finish());
        }
    }
    out.extend(b.finish());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn server_messages_round_trip(msg in arb_server_message()) {
        let bytes = msg.encode_to_vec();
        prop_assert_eq!(ServerMessage::decode(bytes.as_slice()).unwrap(), msg);
    }

    #[test]
    fn client_messages_round_trip(index: u32, checked: bool, request_id: u32, resync: bool) {
        let msg = ClientMessage {
            msg: Some(if resync {
                client_message::Msg::Resync(v1::Resync {})
            } else {
                client_message::Msg::Toggle(v1::Toggle { index, checked, request_id })
            }),
        };
        prop_assert_eq!(ClientMessage::decode(msg.encode_to_vec().as_slice()).unwrap(), msg);
    }

    /// Applying coalesced batches (cut anywhere) equals applying every change.
    #[test]
    fn coalescing_equals_applying_one_by_one(
        changes in arb_changes(64, 300),
        cuts in proptest::collection::vec(0usize..300, 0..20),
    ) {
        let mut one_by_one = Board::new(64, 1, 0);
        for c in &changes {
            one_by_one.apply_change(c).unwrap();
        }
        let mut batched = Board::new(64, 1, 0);
        for b in batches(&changes, &cuts) {
            prop_assert_eq!(batched.apply_batch(&b).unwrap(), Applied::Applied);
        }
        prop_assert_eq!(&batched, &one_by_one);
        prop_assert_eq!(one_by_one.checked_count as usize, one_by_one.checked.count_ones());
        prop_assert_eq!(one_by_one.frozen_count as usize, one_by_one.frozen.count_ones());
    }

    /// A client following the convergence rule over any interleaving of
    /// snapshots and stale, contiguous, overlapping and gapped batches is always
    /// at a true state of the board, and after the in-order tail a live socket
    /// gives, at the final one.
    #[test]
    fn convergence_over_any_interleaving(
        changes in arb_changes(48, 200),
        cuts in proptest::collection::vec(0usize..200, 0..30),
        deliveries in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 0..60),
        start in any::<prop::sample::Index>(),
    ) {
        // The true board at every seq, and snapshots at batch boundaries.
        let mut history = vec![Board::new(48, 1, 0)];
        for c in &changes {
            let mut next = history.last().unwrap().clone();
            next.apply_change(c).unwrap();
            history.push(next);
        }
        let batches = batches(&changes, &cuts);
        let boundaries: Vec<u64> = std::iter::once(0).chain(batches.iter().map(|b| b.to_seq)).collect();
        let snapshot_at = |seq: u64| history[seq as usize].to_snapshot(0);

        let mut client = Board::from_snapshot(&snapshot_at(*start.get(&boundaries))).unwrap();
        let mut awaiting_snapshot = false;
        let deliver = |client: &mut Board, awaiting: &mut bool, msg: &Msg| {
            match msg {
                Msg::Snapshot(s) => {
                    *client = Board::from_snapshot(s).unwrap();
                    *awaiting = false;
                }
                Msg::Batch(b) if !*awaiting => *awaiting = client.apply_batch(b).unwrap() == Applied::Gap,
                _ => {}
            }
        };
        for (snapshot, pick) in &deliveries {
            let msg = if *snapshot || batches.is_empty() {
                Msg::Snapshot(snapshot_at(*pick.get(&boundaries)))
            } else {
                Msg::Batch(pick.get(&batches).clone())
            };
            deliver(&mut client, &mut awaiting_snapshot, &msg);
            prop_assert_eq!(&client, &history[client.seq as usize], "not a true state after a delivery");
        }
        // The tail: a requested snapshot (of now), then every batch in order.
        if awaiting_snapshot {
            deliver(&mut client, &mut awaiting_snapshot, &Msg::Snapshot(snapshot_at(changes.len() as u64)));
        }
        for b in &batches {
            deliver(&mut client, &mut awaiting_snapshot, &Msg::Batch(b.clone()));
            prop_assert_eq!(&client, &history[client.seq as usize]);
        }
        prop_assert!(!awaiting_snapshot);
        prop_assert_eq!(&client, history.last().unwrap());
    }

    /// A batch with a bad index or a zero delta changes nothing.
    #[test]
    fn malformed_batches_change_nothing(changes in arb_changes(32, 50), bad in 32u32..1000) {
        let mut board = Board::new(32, 1, 0);
        for c in &changes {
            board.apply_change(c).unwrap();
        }
        let before = board.clone();
        let next = board.seq + 1;
        let out_of_range = v1::Batch { from_seq: next, to_seq: next, checked: vec![0, bad], ..Default::default() };
        prop_assert!(board.apply_batch(&out_of_range).is_err());
        let zero_delta = v1::Batch { from_seq: next, to_seq: next, unchecked: vec![3, 0], ..Default::default() };
        prop_assert!(board.apply_batch(&zero_delta).is_err());
        prop_assert_eq!(board, before);
    }
}
