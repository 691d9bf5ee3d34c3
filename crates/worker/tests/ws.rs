//! The WebSocket contract against the real binary: snapshot first, fan-out,
//! idempotent repeats, every row of PROTOCOL.md's bad-input table, resume,
//! slow clients.

mod common;

use common::*;
use futures_util::SinkExt;
use omcb_proto::delta;
use omcb_proto::v1::{Code, Reason, client_message, server_message::Msg};
use tokio_tungstenite::tungstenite::Message;

const SMALL: &[&str] = &["--board-size", "1000"];

#[tokio::test]
async fn snapshot_comes_first() {
    let w = Worker::start(&[]);
    let mut c = connect(&w.ws_url("")).await;
    let Msg::Snapshot(s) = c.recv().await else { panic!("first message must be a Snapshot") };
    assert_eq!(s.size, 1_000_000);
    assert_eq!(s.checked.len(), 125_000);
    assert_eq!(s.frozen.len(), 125_000);
    assert_ne!(s.epoch, 0);
    assert_eq!(s.seq, 0);
}

#[tokio::test]
async fn toggle_reaches_another_client_as_a_batch() {
    let w = Worker::start(SMALL);
    let mut a = connect(&w.ws_url("")).await;
    let mut b = connect(&w.ws_url("")).await;
    a.recv().await;
    b.recv().await;
    let r = a.set(7, true).await;
    assert!(r.accepted && r.checked);
    assert_eq!(r.seq, 1);
    let Msg::Batch(batch) = b.recv().await else { panic!("expected a Batch") };
    assert!(batch.from_seq <= 1 && batch.to_seq >= 1);
    assert_eq!(delta::decode(&batch.checked).unwrap(), vec![7]);
    assert_eq!(batch.checked_count, 1);
    assert!(b.board.as_ref().unwrap().is_checked(7));
}

#[tokio::test]
async fn repeat_is_accepted_without_a_seq() {
    let w = Worker::start(SMALL);
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    let first = a.set(3, true).await;
    let again = a.set(3, true).await;
    assert!(first.accepted && first.seq == 1);
    assert!(again.accepted && again.checked);
    assert_eq!(again.seq, 0, "a repeat changes nothing and gets no seq");
    let off = a.set(3, false).await;
    assert!(off.accepted && !off.checked && off.seq == 2);
    assert_eq!(w.stats_at(2).await["checked_count"], 0);
}

#[tokio::test]
async fn out_of_range_is_refused_and_the_board_does_not_grow() {
    let w = Worker::start(SMALL);
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    for index in [1000, 1001, 99_999_999, u32::MAX] {
        let r = a.set(index, true).await;
        assert!(!r.accepted);
        assert_eq!(r.reason, Reason::OutOfRange as i32);
        assert_eq!(r.seq, 0);
    }
    // The connection stays and works.
    assert!(a.set(999, true).await.accepted);
    w.stats_at(1).await;
    let (s, _) = api_state(w.addr).await;
    assert_eq!((s.size, s.checked.len(), s.checked_count), (1000, 125, 1));
}

#[tokio::test]
async fn frozen_box_is_refused() {
    let w = Worker::start(&flags("--board-size 1000 --freeze-after 150ms"));
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    assert!(a.set(5, true).await.accepted);
    // The sweep freezes it once it has been checked for 150 ms.
    poll("box 5 to freeze", || async { (w.stats().await["frozen_count"] == 1).then_some(()) })
        .await;
    let r = a.set(5, false).await;
    assert!(!r.accepted);
    assert_eq!(r.reason, Reason::Frozen as i32);
    assert!(r.checked, "a refused toggle reports the box's current value");
    assert!(a.set(6, true).await.accepted, "the connection stays");
}

#[tokio::test]
async fn full_board_is_refused() {
    let w = Worker::start(&flags("--board-size 1000 --max-checked 2"));
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    assert!(a.set(1, true).await.accepted);
    assert!(a.set(2, true).await.accepted);
    let r = a.set(3, true).await;
    assert!(!r.accepted);
    assert_eq!(r.reason, Reason::BoardFull as i32);
    assert!(!r.checked);
    assert!(a.set(1, false).await.accepted, "unchecking still works");
    assert!(a.set(3, true).await.accepted);
}

#[tokio::test]
async fn over_the_rate_is_refused_then_abuse_is_closed() {
    let w = Worker::start(&flags(
        "--board-size 1000 --toggle-rate 0.001 --toggle-burst 3 --abuse-burst 5",
    ));
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    for i in 0..3 {
        assert!(a.set(i, true).await.accepted);
    }
    // Over the rate: refused, connection stays.
    for i in 3..8 {
        let r = a.set(i, true).await;
        assert!(!r.accepted);
        assert_eq!(r.reason, Reason::RateLimited as i32);
    }
    // Persistent abuse: Error{CODE_RATE_LIMITED} then close 1008.
    a.toggle(9, true).await;
    let Msg::Error(e) = a.recv().await else { panic!("expected an Error") };
    assert_eq!(e.code, Code::RateLimited as i32);
    assert_eq!(a.until_closed().await, Ended::Closed(Some(1008)));
    let stats = w.stats_at(3).await;
    assert_eq!(stats["checked_count"], 3, "no refused toggle changed the board");
    assert_eq!(stats["seq"], 3);
}

async fn expect_bad_message(w: &Worker, msg: Message, close_code: u16) {
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    a.ws.send(msg).await.unwrap();
    let Msg::Error(e) = a.recv().await else { panic!("expected an Error before the close") };
    assert_eq!(e.code, Code::BadMessage as i32);
    assert!(!e.message.is_empty());
    assert_eq!(a.until_closed().await, Ended::Closed(Some(close_code)));
}

#[tokio::test]
async fn text_frame_is_closed_with_1003() {
    let w = Worker::start(SMALL);
    expect_bad_message(&w, Message::Text("{\"toggle\":1}".into()), 1003).await;
}

#[tokio::test]
async fn garbage_is_closed_with_1007() {
    let w = Worker::start(SMALL);
    // A truncated varint.
    expect_bad_message(&w, Message::Binary(vec![0x0a, 0xff].into()), 1007).await;
    // Valid protobuf, but no known `msg` (field 15) / nothing at all.
    expect_bad_message(&w, Message::Binary(vec![0x78, 0x01].into()), 1007).await;
    expect_bad_message(&w, Message::Binary(Vec::new().into()), 1007).await;
    // The worker is still fine.
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    assert!(a.set(1, true).await.accepted);
}

#[tokio::test]
async fn oversized_frame_is_closed_with_1009() {
    let w = Worker::start(SMALL);
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    a.ws.send(Message::Binary(vec![0u8; 1025].into())).await.unwrap();
    assert_eq!(a.until_closed().await, Ended::Closed(Some(1009)));
    // Exactly at the limit is a normal (here undecodable) message, not a 1009.
    let mut b = connect(&w.ws_url("")).await;
    b.recv().await;
    let mut ok = omcb_proto::v1::ClientMessage {
        msg: Some(client_message::Msg::Resync(omcb_proto::v1::Resync {})),
    };
    let _ = &mut ok;
    b.ws.send(Message::Binary(vec![0u8; 1024].into())).await.unwrap();
    let Msg::Error(_) = b.recv().await else { panic!("expected an Error") };
    assert_eq!(b.until_closed().await, Ended::Closed(Some(1007)));
}

#[tokio::test]
async fn over_the_connection_limit_is_closed_with_1013() {
    let w = Worker::start(&flags("--board-size 1000 --max-connections 2"));
    let mut a = connect(&w.ws_url("")).await;
    let mut b = connect(&w.ws_url("")).await;
    a.recv().await;
    b.recv().await;
    let mut c = connect(&w.ws_url("")).await;
    assert_eq!(c.until_closed().await, Ended::Closed(Some(1013)));
    // A slot frees when a client leaves.
    drop(a);
    poll("a slot to free", || async {
        let mut d = connect(&w.ws_url("")).await;
        matches!(d.next().await, Ok(Msg::Snapshot(_))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn resync_sends_a_snapshot() {
    let w = Worker::start(SMALL);
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    a.send_msg(client_message::Msg::Resync(omcb_proto::v1::Resync {})).await;
    let Msg::Snapshot(_) = a.recv().await else { panic!("expected a Snapshot") };
}

#[tokio::test]
async fn resume_with_since_sends_batches_not_a_snapshot() {
    let w = Worker::start(SMALL);
    let mut a = connect(&w.ws_url("")).await;
    let Msg::Snapshot(first) = a.recv().await else { panic!() };
    assert!(a.set(1, true).await.accepted);
    a.until_seq(1).await;
    let (epoch, since) = (first.epoch, a.seq());
    let mut board = a.board.clone().unwrap();
    drop(a);
    // Changes while the client is away.
    let mut b = connect(&w.ws_url("")).await;
    b.recv().await;
    for i in 10..20 {
        assert!(b.set(i, true).await.accepted);
    }
    let mut back = connect(&w.ws_url(&format!("?since={since}&epoch={epoch}"))).await;
    let Msg::Batch(batch) = back.recv().await else { panic!("a resume starts with batches") };
    assert!(batch.from_seq <= since + 1, "no gap: from {} after {since}", batch.from_seq);
    // It converges to the board without a snapshot.
    assert_eq!(board.apply_batch(&batch).unwrap(), omcb_proto::Applied::Applied);
    let mut seen = batch.to_seq;
    while seen < 11 {
        let Msg::Batch(b) = back.recv().await else { panic!("expected batches") };
        assert_eq!(board.apply_batch(&b).unwrap(), omcb_proto::Applied::Applied);
        seen = b.to_seq;
    }
    w.stats_at(11).await;
    let (s, _) = api_state(w.addr).await;
    let truth = omcb_proto::Board::from_snapshot(&s).unwrap();
    assert_eq!((board.seq, board.checked_count), (truth.seq, truth.checked_count));
    assert!(board == truth, "resumed client converged");
    assert_eq!(w.metric("omcb_resumes_total").await, 1.0);

    // A wrong epoch, or a seq from the future, gets a snapshot.
    let mut other = connect(&w.ws_url(&format!("?since={since}&epoch={}", epoch ^ 1))).await;
    assert!(matches!(other.recv().await, Msg::Snapshot(_)));
    let mut future = connect(&w.ws_url(&format!("?since=999&epoch={epoch}"))).await;
    assert!(matches!(future.recv().await, Msg::Snapshot(_)));
}

#[tokio::test]
async fn a_client_that_stops_reading_gets_a_snapshot_later_and_others_are_unaffected() {
    let w = Worker::start(&flags(
        "--batch-ms 2 --send-queue 4 --socket-send-buffer 16384 --toggle-rate 1000000 --toggle-burst 1000000 --send-timeout 60s",
    ));
    // `slow` reads nothing, not even its first snapshot.
    let mut slow = connect_small_buffer(w.addr, "/ws").await;
    let mut fast = connect(&w.ws_url("")).await;
    fast.recv().await;
    let rss_before = w.rss_kib();
    // Thousands of toggles while `slow` reads nothing: its socket buffers fill,
    // it falls behind the 4-batch queue, and the worker must not buffer for it.
    let mut last = 0;
    for round in 0..40u32 {
        let mut ids = Vec::new();
        for i in 0..200u32 {
            ids.push(fast.toggle((round * 200 + i) * 61 % 1_000_000, true).await);
        }
        for id in ids {
            let r = fast.result_for(id).await;
            assert!(r.accepted);
            last = last.max(r.seq);
        }
    }
    fast.until_seq(last).await;
    assert_eq!(fast.gaps, 0, "a reading client never sees a gap");
    assert_eq!(fast.snapshots, 1, "a reading client never needs a second snapshot");
    let rss_after = w.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "worker memory grew from {rss_before} KiB to {rss_after} KiB while a client stalled"
    );
    // Now it reads again: it gets a snapshot (not the backlog) and converges.
    slow.until_seq(last).await;
    assert!(slow.snapshots >= 2, "the lagging client got a fresh Snapshot");
    assert_eq!(slow.board, fast.board);
}

#[tokio::test]
async fn a_client_that_cannot_keep_up_is_closed() {
    let w = Worker::start(&flags(
        "--batch-ms 2 --send-queue 2 --socket-send-buffer 16384 --toggle-rate 1000000 --toggle-burst 1000000 --send-timeout 300ms",
    ));
    let _stuck = connect_small_buffer(w.addr, "/ws").await;
    let mut fast = connect(&w.ws_url("")).await;
    fast.recv().await;
    // Toggle until the worker gives up on the stuck client (polling, bounded).
    let deadline = std::time::Instant::now() + WAIT;
    for round in 0u32.. {
        let mut ids = Vec::new();
        for i in 0..100u32 {
            ids.push(fast.toggle((round * 100 + i) % 100_000, round % 2 == 0).await);
        }
        for id in ids {
            fast.result_for(id).await;
        }
        if w.metric("omcb_slow_clients_closed_total").await >= 1.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the stuck client was never closed");
    }
    assert_eq!(fast.gaps, 0);
}

async fn connect_as(w: &Worker, forwarded_for: &str) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = w.ws_url("").into_client_request().unwrap();
    req.headers_mut().insert("X-Forwarded-For", forwarded_for.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    Client::new(ws)
}

#[tokio::test]
async fn per_address_cap_counts_forwarded_clients_only_from_trusted_proxies() {
    // Trusted proxy: each forwarded client has its own allowance.
    let w = Worker::start(&flags(
        "--board-size 1000 --max-connections-per-ip 1 --trusted-proxy 127.0.0.1",
    ));
    let mut a = connect_as(&w, "198.51.100.1").await;
    let mut b = connect_as(&w, "198.51.100.2").await;
    assert!(matches!(a.recv().await, Msg::Snapshot(_)));
    assert!(matches!(b.recv().await, Msg::Snapshot(_)));
    let mut again = connect_as(&w, "203.0.113.9, 198.51.100.1").await;
    assert_eq!(again.until_closed().await, Ended::Closed(Some(1013)), "same client, second socket");

    // Untrusted peer: the header is ignored, the peer address counts.
    let w = Worker::start(&flags("--board-size 1000 --max-connections-per-ip 1"));
    let mut a = connect_as(&w, "198.51.100.1").await;
    assert!(matches!(a.recv().await, Msg::Snapshot(_)));
    let mut b = connect_as(&w, "198.51.100.2").await;
    assert_eq!(b.until_closed().await, Ended::Closed(Some(1013)), "a forged header buys nothing");
}

#[tokio::test]
async fn snapshots_are_deflated_only_for_a_socket_that_asks() {
    let w = Worker::start(&[]);
    let mut a = connect(&w.ws_url("")).await;
    a.recv().await;
    for i in [0, 4_242, 999_999] {
        assert!(a.set(i, true).await.accepted);
    }
    a.until_seq(3).await;
    let (state, _) = api_state(w.addr).await;
    // Asked: the bitsets come deflated (a near-empty million-box board is a
    // few hundred bytes instead of 125 KB each), on connect and on Resync.
    let mut d = connect(&w.ws_url("?snapshot=deflate")).await;
    for round in 0..2 {
        let Msg::Snapshot(s) = d.recv().await else { panic!("a Snapshot first") };
        assert!(s.checked.is_empty() && s.frozen.is_empty(), "round {round}: plain fields empty");
        assert!(
            s.checked_deflate.len() < 2_000,
            "round {round}: {} bytes",
            s.checked_deflate.len()
        );
        assert!(!s.frozen_deflate.is_empty());
        let s = inflate_snapshot(&s);
        assert_eq!((s.seq, &s.checked, &s.frozen), (state.seq, &state.checked, &state.frozen));
        d.send_msg(client_message::Msg::Resync(omcb_proto::v1::Resync {})).await;
    }
    // Not asked (today's clients): plain bitsets, as before.
    let mut p = connect(&w.ws_url("")).await;
    let Msg::Snapshot(s) = p.recv().await else { panic!("a Snapshot first") };
    assert_eq!((s.checked.len(), s.frozen.len()), (125_000, 125_000));
    assert!(s.checked_deflate.is_empty() && s.frozen_deflate.is_empty());
}

#[tokio::test]
async fn a_bitset_that_does_not_compress_stays_plain() {
    // A 64-box board: 8 bytes of bits, which deflate only makes longer (as it
    // does a random half-checked board's), so they stay plain.
    let w =
        Worker::start(&["--board-size", "64", "--toggle-rate", "1000", "--toggle-burst", "1000"]);
    let mut a = connect(&w.ws_url("?snapshot=deflate")).await;
    a.recv().await;
    // Bits with no pattern to find: 1101 0010 0111 1001 ...
    let bits = 0xd279_a4e1_3b86_5f0cu64;
    let boxes: Vec<u32> = (0..64).filter(|i| bits & (1 << (63 - i)) != 0).collect();
    for &i in &boxes {
        assert!(a.set(i, true).await.accepted);
    }
    a.until_seq(boxes.len() as u64).await;
    a.send_msg(client_message::Msg::Resync(omcb_proto::v1::Resync {})).await;
    let s = loop {
        if let Msg::Snapshot(s) = a.recv().await {
            break s;
        }
    };
    // 8 bytes of bits: deflate adds more than it saves.
    assert_eq!((s.checked.len(), s.checked_deflate.len()), (8, 0));
    assert_eq!(inflate_snapshot(&s).checked, api_state(w.addr).await.0.checked);
}
