//! Bytes on the wire per toggle in encoded batches, against the floors:
//! 20 bits (log2 of a million) for one change alone, and the entropy of
//! choosing k boxes of a million, log2(C(10^6, k)) / k bits per box, plus one
//! bit for its value, for a batch.
//!
//! The floor uses the range the toggles actually fall in (the whole board, the
//! hot region, or the span the scrolling window covered).
//!
//! `cargo run --release -p omcb-benches --example bytes_per_toggle`

use omcb_proto::v1::server_message::Msg;
use omcb_proto::{BatchBuilder, Change, Op, encode_server};
use omcb_testkit::rng::XorShift64 as Rng;

const SIZE: u64 = 1_000_000;

/// log2(C(n, k)) / k, by summing logs.
fn entropy_bits_per_box(n: u64, k: u64) -> f64 {
    let log2_choose: f64 = (0..k).map(|i| ((n - i) as f64).log2() - ((i + 1) as f64).log2()).sum();
    log2_choose / k as f64
}

fn main() {
    println!(
        "| pattern | toggles | distinct boxes | batch bytes | bytes/toggle | floor bytes/box |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    type Pick = Box<dyn Fn(&mut Rng, u64) -> u64>;
    /// (name, how a toggle picks its box, how many boxes k toggles range over)
    type Pattern = (&'static str, Pick, fn(u64) -> u64);
    let patterns: [Pattern; 3] = [
        ("uniform", Box::new(|r, _| r.next_u64() % SIZE), |_| SIZE),
        ("hot 1,000 boxes", Box::new(|r, _| r.next_u64() % 1_000), |_| 1_000),
        (
            "scrolling window of 2,000",
            Box::new(|r, i| (i * 40 + r.next_u64() % 2_000) % SIZE),
            |k| (k * 40 + 2_000).min(SIZE),
        ),
    ];
    for (name, pick, range) in patterns {
        for k in [10u64, 100, 1_000, 10_000] {
            let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
            let mut b = BatchBuilder::new();
            let mut distinct = std::collections::HashSet::new();
            for i in 0..k {
                let index = pick(&mut rng, i) as u32;
                distinct.insert(index);
                let c = Change {
                    seq: i + 1,
                    index,
                    op: Op::Set(true),
                    checked_count: 0,
                    frozen_count: 0,
                    committed_ms: 0,
                    origin: 0,
                };
                b.push(&c).unwrap();
            }
            let bytes = encode_server(Msg::Batch(b.finish().unwrap())).len();
            let d = distinct.len() as u64;
            let floor = (entropy_bits_per_box(range(k), d) + 1.0) / 8.0;
            println!(
                "| {name} | {k} | {d} | {bytes} | {:.2} | {floor:.2} |",
                bytes as f64 / k as f64
            );
        }
    }
    println!("\nA single change alone needs log2(10^6) = 20 bits = 2.5 bytes (plus its value).");
}
