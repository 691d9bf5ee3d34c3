//! A Toggle whose index does not fit 32 bits, as raw protobuf bytes against
//! the real binary: it is out of range, never the box named by its low 32 bits
//! (PROTOCOL.md, "Limits and bad input"; `omcb_proto::decode_client`).

mod common;

use common::*;
use futures_util::SinkExt;
use omcb_proto::v1::Reason;
use tokio_tungstenite::tungstenite::Message;

/// The varint encoding of `v`, built by hand: the generated types cannot
/// encode an index wider than their `u32`.
fn varint(v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(v, &mut out);
    out
}

/// `ClientMessage{toggle: Toggle{index, checked: true, request_id}}` with a 64-bit index.
fn wide_toggle(index: u64, request_id: u32) -> Vec<u8> {
    let mut toggle = vec![0x08]; // Toggle.index, varint
    toggle.extend(varint(index));
    toggle.extend([0x10, 0x01]); // Toggle.checked = true
    toggle.push(0x18); // Toggle.request_id, varint
    toggle.extend(varint(request_id.into()));
    let mut msg = vec![0x0a, toggle.len() as u8]; // ClientMessage.toggle
    msg.extend(toggle);
    msg
}

#[tokio::test]
async fn index_past_32_bits_is_out_of_range_and_sets_nothing() {
    let w = Worker::start(&["--board-size", "1000"]);
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    for (index, id) in [((1u64 << 32) + 5, 1_001), (u64::MAX, 1_002), (1u64 << 32, 1_003)] {
        c.ws.send(Message::Binary(wide_toggle(index, id).into())).await.unwrap();
        let r = c.result_for(id).await;
        assert!(!r.accepted, "index {index} was accepted as box {}", index as u32);
        assert_eq!(r.reason, Reason::OutOfRange as i32, "index {index}");
        assert_eq!(r.seq, 0);
    }
    // One real change, so the replica's seq shows every change has landed.
    assert_eq!(c.set(6, true).await.seq, 1);
    w.stats_at(1).await;
    let (s, _) = api_state(w.addr).await;
    let board = omcb_proto::Board::from_snapshot(&s).unwrap();
    assert!(!board.is_checked(5), "box 5 (2^32 + 5 truncated) must be unchanged");
    assert!(!board.is_checked(0), "box 0 (2^32 truncated) must be unchanged");
    assert_eq!((s.seq, s.checked_count), (1, 1));
}
