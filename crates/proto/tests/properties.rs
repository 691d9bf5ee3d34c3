//! Property tests of the protocol's semantics: codec round trips, coalescing,
//! and the convergence rule over arbitrary delivery orders.

use omcb_proto::v1::{self, ClientMessage, ServerMessage, client_message, server_message::Msg};
use omcb_proto::view::{self, Chains, REGION_SIZE, Subscriber, View, subscription};
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
                ..Default::default()
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

/// What the worker has published and not yet offered to the socket: a
/// tick's region frames, or a counts frame.
enum Published {
    Tick(Vec<(u32, v1::Batch)>),
    Counts(v1::Batch),
}

/// One step of the viewport model (see `view_follows_the_board_in_its_range`).
#[derive(Debug, Clone)]
enum Step {
    /// The next `n` changes become one tick's Batch and its region frames.
    Tick(usize),
    /// The socket's shard offers it the oldest published tick.
    Offer,
    /// The client reads up to `n` frames.
    Receive(usize),
    /// The client scrolls by `delta` boxes (and re-subscribes).
    Scroll(i32),
    /// The client jumps to `first`.
    Jump(u32),
    /// The client sends `Resync`.
    Resync,
    /// The worker publishes a counts frame.
    Counts,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1usize..20).prop_map(Step::Tick),
        4 => Just(Step::Offer),
        4 => (1usize..6).prop_map(Step::Receive),
        3 => (-3000i32..3000).prop_map(Step::Scroll),
        1 => any::<u32>().prop_map(Step::Jump),
        1 => Just(Step::Resync),
        1 => Just(Step::Counts),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// PROTOCOL.md, "Viewport subscriptions": any interleaving of changes,
    /// subscriptions, scrolls, resyncs and late fan-out (a tick published
    /// before a Subscribe but offered after it) leaves the reference client
    /// (`View`) equal to the board inside its range, given the worker's
    /// region encoding (`Chains`) and per-socket delivery (`Subscriber`).
    /// The client never sees a gap.
    #[test]
    fn view_follows_the_board_in_its_range(
        (size, changes) in (1u32..6 * REGION_SIZE)
            .prop_flat_map(|size| (Just(size), arb_changes(size, 300))),
        steps in proptest::collection::vec(arb_step(), 0..120),
        (first, count) in (any::<u32>(), 1u32..3 * REGION_SIZE),
    ) {
        let mut replica = Board::new(size, 1, 0);
        let mut chains = Chains::new(size, 0);
        let mut next = 0; // changes[next..] are not yet in a tick
        let mut unoffered: std::collections::VecDeque<Published> = Default::default();
        let mut to_client: std::collections::VecDeque<Msg> = Default::default();
        let mut first = first % size;
        let regions = |first: u32| subscription(first, count, size).unwrap().unwrap();
        // The first Subscribe: a range Snapshot of the whole range.
        let mut sub = Subscriber::new(regions(first), replica.seq);
        to_client.push_back(Msg::Snapshot(replica.range_snapshot(&sub.regions(), 0)));
        let mut view = View::new();
        view.subscribe(Some(&sub.regions()));

        let tick = |n: usize, next: &mut usize, replica: &mut Board, chains: &mut Chains,
                    unoffered: &mut std::collections::VecDeque<Published>| {
            let mut b = BatchBuilder::new();
            for c in &changes[*next..(*next + n).min(changes.len())] {
                b.push(c).unwrap();
                replica.apply_change(c).unwrap();
            }
            *next = (*next + n).min(changes.len());
            if let Some(batch) = b.finish() {
                unoffered.push_back(Published::Tick(chains.frames(&batch).unwrap()));
            }
        };
        let offer = |p: Published, sub: &mut Subscriber, replica: &Board,
                     to_client: &mut std::collections::VecDeque<Msg>| {
            match p {
                Published::Tick(frames) => {
                    for (region, frame) in frames {
                        match sub.offer(region, frame.from_seq, frame.to_seq) {
                            Applied::Applied => to_client.push_back(Msg::Batch(frame)),
                            Applied::Stale => {}
                            Applied::Gap => panic!("the worker's chains left socket a gap: {frame:?} {sub:?} at {}", replica.seq),
                        }
                    }
                }
                Published::Counts(c) => to_client.push_back(Msg::Batch(c)),
            }
        };
        let receive = |msg: Msg, view: &mut View| -> Result<(), TestCaseError> {
            match msg {
                Msg::Snapshot(s) => view.apply_snapshot(&s).unwrap(),
                Msg::Batch(b) => {
                    let applied = view.apply_batch(&b).unwrap();
                    prop_assert_ne!(applied, Applied::Gap, "the client saw a gap: {:?}", b);
                }
                _ => unreachable!(),
            }
            Ok(())
        };
        let counts = |replica: &Board| v1::Batch {
            to_seq: replica.seq,
            checked_count: replica.checked_count,
            frozen_count: replica.frozen_count,
            counts_only: true,
            ..Default::default()
        };
        let resubscribe = |to: u32, sub: &mut Subscriber, view: &mut View, replica: &Board,
                               to_client: &mut std::collections::VecDeque<Msg>| {
            let new = regions(to);
            view.subscribe(Some(&new));
            for run in sub.resubscribe(new, replica.seq) {
                to_client.push_back(Msg::Snapshot(replica.range_snapshot(&run, 0)));
            }
        };

        for step in steps {
            match step {
                Step::Tick(n) => tick(n, &mut next, &mut replica, &mut chains, &mut unoffered),
                Step::Offer => {
                    if let Some(p) = unoffered.pop_front() {
                        offer(p, &mut sub, &replica, &mut to_client);
                    }
                }
                Step::Receive(n) => {
                    for _ in 0..n {
                        if let Some(m) = to_client.pop_front() {
                            receive(m, &mut view)?;
                        }
                    }
                }
                Step::Scroll(d) => {
                    first = (i64::from(first) + i64::from(d)).clamp(0, i64::from(size) - 1) as u32;
                    resubscribe(first, &mut sub, &mut view, &replica, &mut to_client);
                }
                Step::Jump(to) => {
                    first = to % size;
                    resubscribe(first, &mut sub, &mut view, &replica, &mut to_client);
                }
                Step::Resync => {
                    // The writer sends a Snapshot of the whole range, which
                    // replaces what is queued and not yet sent (sink.rs).
                    sub.snapshot(replica.seq);
                    to_client.retain(|m| !matches!(m, Msg::Snapshot(_)) && !matches!(m, Msg::Batch(b) if b.region.is_some()));
                    to_client.push_back(Msg::Snapshot(replica.range_snapshot(&sub.regions(), 0)));
                }
                Step::Counts => unoffered.push_back(Published::Counts(counts(&replica))),
            }
        }
        // Quiet: the rest of the changes, the fan-out and the reads catch up.
        tick(changes.len(), &mut next, &mut replica, &mut chains, &mut unoffered);
        unoffered.push_back(Published::Counts(counts(&replica)));
        while let Some(p) = unoffered.pop_front() {
            offer(p, &mut sub, &replica, &mut to_client);
        }
        while let Some(m) = to_client.pop_front() {
            receive(m, &mut view)?;
        }
        let (lo, n) = view::boxes(&sub.regions(), size);
        prop_assert_eq!(view.regions().collect::<Vec<_>>(), sub.regions().collect::<Vec<_>>());
        for i in lo..lo + n {
            prop_assert_eq!(view.is_checked(i), Some(replica.is_checked(i)), "box {}", i);
            prop_assert_eq!(view.is_frozen(i), Some(replica.is_frozen(i)), "box {}", i);
        }
        prop_assert_eq!((view.checked_count, view.frozen_count), (replica.checked_count, replica.frozen_count));
    }
}
