//! Golden vectors for the browser's protobuf codec: messages encoded by prost,
//! with what they must decode to, written to `web/test/golden/vectors.json`.
//! `web/test/proto.test.mjs` decodes (and for client messages, encodes) every
//! vector with `web/proto.js`, so the two sides cannot drift apart silently.
//!
//! This test fails when the committed file differs from what the Rust side
//! produces now; run with `OMCB_UPDATE_GOLDEN=1` to rewrite it after a
//! deliberate change.

use omcb_proto::v1::{self, ClientMessage, ServerMessage, client_message, server_message::Msg};
use omcb_proto::{BatchBuilder, Board, Change, Op};
use prost::Message;
use serde_json::{Value, json};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn snapshot_json(s: &v1::Snapshot) -> Value {
    let mut v = json!({
        "seq": s.seq.to_string(), "size": s.size, "checked": hex(&s.checked), "frozen": hex(&s.frozen),
        "checkedCount": s.checked_count, "frozenCount": s.frozen_count,
        "freezeAfterMs": s.freeze_after_ms.to_string(), "serverTimeMs": s.server_time_ms.to_string(),
        "epoch": s.epoch.to_string(),
    });
    // The viewport fields: web/proto.js sets them only when they are on the
    // wire, and prost leaves out a range_first of 0.
    if s.range_first > 0 {
        v["rangeFirst"] = json!(s.range_first);
    }
    if s.range_count > 0 {
        v["rangeCount"] = json!(s.range_count);
        v["regionSize"] = json!(s.region_size);
    }
    v
}

fn expected(msg: &Msg) -> Value {
    match msg {
        Msg::Snapshot(s) => {
            let mut v = snapshot_json(s);
            v["kind"] = json!("snapshot");
            v
        }
        Msg::Batch(b) => {
            let mut v = json!({
                "kind": "batch", "fromSeq": b.from_seq.to_string(), "toSeq": b.to_seq.to_string(),
                "checked": b.checked, "unchecked": b.unchecked, "frozen": b.frozen,
                "checkedCount": b.checked_count, "frozenCount": b.frozen_count,
            });
            if let Some(r) = b.region {
                v["region"] = json!(r);
            }
            if b.counts_only {
                v["countsOnly"] = json!(true);
            }
            v
        }
        Msg::ToggleResult(t) => json!({
            "kind": "toggleResult", "requestId": t.request_id, "accepted": t.accepted,
            "checked": t.checked, "reason": t.reason, "seq": t.seq.to_string(),
        }),
        Msg::Error(e) => json!({"kind": "error", "code": e.code, "message": e.message}),
        Msg::Settings(s) => json!({
            "kind": "settings", "freezeAfterMs": s.freeze_after_ms.to_string(),
            "serverTimeMs": s.server_time_ms.to_string(), "maxChecked": s.max_checked,
        }),
    }
}

fn board(size: u32, epoch: u64, boxes: &[u32], frozen: &[u32]) -> Board {
    let mut b = Board::new(size, epoch, 90_000);
    let mut seq = 0;
    for &i in boxes {
        seq += 1;
        let c = Change {
            seq,
            index: i,
            op: Op::Set(true),
            checked_count: b.checked_count + 1,
            frozen_count: b.frozen_count,
            committed_ms: 0,
            origin: 0,
        };
        b.apply_change(&c).unwrap();
    }
    for &i in frozen {
        seq += 1;
        let c = Change {
            seq,
            index: i,
            op: Op::Freeze,
            checked_count: b.checked_count,
            frozen_count: b.frozen_count + 1,
            committed_ms: 0,
            origin: 0,
        };
        b.apply_change(&c).unwrap();
    }
    b
}

fn vectors() -> Value {
    let mut out = Vec::new();
    let mut server = |name: &str, msg: Msg| {
        let bytes = ServerMessage { msg: Some(msg.clone()) }.encode_to_vec();
        out.push(
            json!({"name": name, "kind": "server", "hex": hex(&bytes), "expected": expected(&msg)}),
        );
    };
    server("snapshot, empty 20-box board", Msg::Snapshot(Board::new(20, 1, 0).to_snapshot(0)));
    server(
        "snapshot, 1003 boxes, first/last/frozen, u64 epoch above 2^63",
        Msg::Snapshot(
            board(1003, u64::MAX - 12_345, &[0, 7, 8, 1002], &[7]).to_snapshot(1_780_000_000_123),
        ),
    );
    server(
        "snapshot, 100000 boxes",
        Msg::Snapshot(
            board(100_000, 0x0123_4567_89ab_cdef, &[1, 99_999, 65_536], &[]).to_snapshot(42),
        ),
    );
    let mut builder = BatchBuilder::new();
    let changes =
        [(5, 999_999, true), (6, 3, true), (7, 3, false), (8, 500_000, true), (9, 0, true)];
    for (i, &(seq, index, v)) in changes.iter().enumerate() {
        builder
            .push(&Change {
                seq,
                index,
                op: Op::Set(v),
                checked_count: i as u32 + 1,
                frozen_count: 0,
                committed_ms: 0,
                origin: 0,
            })
            .unwrap();
    }
    builder
        .push(&Change {
            seq: 10,
            index: 500_000,
            op: Op::Freeze,
            checked_count: 5,
            frozen_count: 1,
            committed_ms: 0,
            origin: 0,
        })
        .unwrap();
    server("batch, coalesced, large deltas, a freeze", Msg::Batch(builder.finish().unwrap()));
    server(
        "batch, empty lists, seqs above 2^53",
        Msg::Batch(v1::Batch {
            from_seq: (1 << 53) + 1,
            to_seq: (1 << 53) + 9,
            checked_count: 7,
            ..Default::default()
        }),
    );
    for reason in 0..=5 {
        server(
            &format!("toggle result, reason {reason}"),
            Msg::ToggleResult(v1::ToggleResult {
                request_id: 4_000_000_000 + reason as u32,
                accepted: reason == 0,
                checked: reason % 2 == 0,
                reason,
                seq: if reason == 0 { 123_456_789_012 } else { 0 },
            }),
        );
    }
    for code in 0..=5 {
        server(
            &format!("error, code {code}"),
            Msg::Error(v1::Error { code, message: format!("bad thing ü {code}") }),
        );
    }
    server(
        "settings, a ten-minute sunset",
        Msg::Settings(v1::Settings {
            freeze_after_ms: 600_000,
            server_time_ms: 1_780_000_000_123,
            max_checked: 250_000,
        }),
    );
    server("settings, sunset stopped", Msg::Settings(v1::Settings::default()));
    // Viewport subscriptions: a range Snapshot of the board's last two
    // regions (the last one short), region frames (region 0 present though
    // 0) and a counts frame.
    let mut range = board(1_000_000, 9, &[997_376, 999_999], &[999_999]).to_snapshot(11);
    let (first, count) = (995_328, 1_000_000 - 995_328);
    range.checked = range.checked[first / 8..].to_vec();
    range.frozen = range.frozen[first / 8..].to_vec();
    range.range_first = first as u32;
    range.range_count = count as u32;
    range.region_size = 2048;
    server("range snapshot, the last two regions", Msg::Snapshot(range));
    let mut top = board(1_000_000, 9, &[0, 2047], &[]).to_snapshot(11);
    top.checked.truncate(256);
    top.frozen.truncate(256);
    top.range_count = 2048;
    top.region_size = 2048;
    server(
        "range snapshot, the first region (range_first 0 is not on the wire)",
        Msg::Snapshot(top),
    );
    for (region, checked) in [(0, vec![0, 2047]), (488, vec![999_424])] {
        server(
            &format!("region frame, region {region}"),
            Msg::Batch(v1::Batch {
                from_seq: 3,
                to_seq: 40,
                checked,
                unchecked: vec![],
                region: Some(region),
                ..Default::default()
            }),
        );
    }
    server(
        "counts frame",
        Msg::Batch(v1::Batch {
            to_seq: 41,
            checked_count: 12,
            frozen_count: 3,
            counts_only: true,
            ..Default::default()
        }),
    );
    // Bare snapshot, as GET /api/state serves it.
    let bare = board(64, 77, &[63], &[]).to_snapshot(5);
    out.push(json!({"name": "bare snapshot (/api/state)", "kind": "snapshot", "hex": hex(&bare.encode_to_vec()), "expected": snapshot_json(&bare)}));
    // Client messages: the browser must produce exactly these bytes.
    let toggles = [(0, false, 0), (0, true, 1), (999_999, true, 7), (u32::MAX, false, u32::MAX)];
    for (index, checked, request_id) in toggles {
        let msg = ClientMessage {
            msg: Some(client_message::Msg::Toggle(v1::Toggle { index, checked, request_id })),
        };
        out.push(json!({
            "name": format!("toggle {index} {checked} {request_id}"), "kind": "client", "hex": hex(&msg.encode_to_vec()),
            "expected": {"toggle": {"index": index, "checked": checked, "requestId": request_id}},
        }));
    }
    for (first, count) in [(0, 0), (0, 6144), (995_328, 65_536), (u32::MAX, 1)] {
        let msg = ClientMessage {
            msg: Some(client_message::Msg::Subscribe(v1::Subscribe { first, count })),
        };
        out.push(json!({
            "name": format!("subscribe {first} {count}"), "kind": "client", "hex": hex(&msg.encode_to_vec()),
            "expected": {"subscribe": {"first": first, "count": count}},
        }));
    }
    let resync = ClientMessage { msg: Some(client_message::Msg::Resync(v1::Resync {})) };
    out.push(json!({"name": "resync", "kind": "client", "hex": hex(&resync.encode_to_vec()), "expected": {"resync": {}}}));
    Value::Array(out)
}

#[test]
fn golden_vectors_match_the_committed_file() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/test/golden/vectors.json");
    let now = serde_json::to_string_pretty(&vectors()).unwrap() + "\n";
    if std::env::var_os("OMCB_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &now).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == now,
        "{} differs from what omcb-proto encodes now; if the change is deliberate, rerun with OMCB_UPDATE_GOLDEN=1 and check web/proto.js",
        path.display()
    );
}
