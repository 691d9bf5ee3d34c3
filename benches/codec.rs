//! Micro-benchmarks of the hot pure code: building and encoding a batch (once
//! per tick), applying one (every client, every tick), and the snapshot (once
//! per seq). Results and the machine: docs/BENCHMARKS.md.
//!
//! `cargo bench -p omcb-benches --bench codec`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use omcb_proto::v1::server_message::Msg;
use omcb_proto::{BatchBuilder, Board, Change, Op, delta, encode_server};
use omcb_testkit::rng::XorShift64 as Rng;
use std::hint::black_box;

const SIZE: u32 = 1_000_000;

/// `n` changes on random boxes of a million-box board, three checks to one uncheck.
fn changes(n: usize) -> Vec<Change> {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|i| Change {
            seq: i as u64 + 1,
            index: (rng.next_u64() % u64::from(SIZE)) as u32,
            op: Op::Set(!rng.next_u64().is_multiple_of(4)),
            checked_count: i as u32,
            frozen_count: 0,
            committed_ms: 0,
            origin: 0,
        })
        .collect()
}

fn build(changes: &[Change]) -> omcb_proto::v1::Batch {
    let mut b = BatchBuilder::new();
    for c in changes {
        b.push(c).unwrap();
    }
    b.finish().unwrap()
}

fn batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_build_encode");
    for n in [10, 100, 1_000, 10_000] {
        let cs = changes(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &cs, |b, cs| {
            b.iter(|| encode_server(Msg::Batch(build(black_box(cs)))))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("batch_apply");
    for n in [10, 100, 1_000, 10_000] {
        let batch = build(&changes(n));
        let board = Board::new(SIZE, 1, 0);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &batch, |b, batch| {
            b.iter_batched_ref(
                || board.clone(),
                |board| board.apply_batch(black_box(batch)).unwrap(),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn snapshot(c: &mut Criterion) {
    let mut board = Board::new(SIZE, 1, 0);
    let mut rng = Rng::new(7);
    for i in 0..SIZE as usize {
        board.checked.set(i, rng.next_u64() & 1 == 1);
    }
    board.checked_count = board.checked.count_ones() as u32;
    let mut g = c.benchmark_group("snapshot");
    g.throughput(Throughput::Bytes(250_000));
    g.bench_function("encode_1m", |b| {
        b.iter(|| encode_server(Msg::Snapshot(black_box(&board).to_snapshot(0))))
    });
    let bytes = prost::Message::encode_to_vec(&board.to_snapshot(0));
    g.bench_function("decode_1m", |b| {
        b.iter(|| {
            let s: omcb_proto::v1::Snapshot =
                prost::Message::decode(black_box(bytes.as_slice())).unwrap();
            Board::from_snapshot(&s).unwrap()
        })
    });
    g.finish();
}

fn deltas(c: &mut Criterion) {
    let mut sorted: Vec<u32> = changes(10_000).iter().map(|c| c.index).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let coded = delta::encode(&sorted);
    let mut g = c.benchmark_group("delta");
    g.throughput(Throughput::Elements(sorted.len() as u64));
    g.bench_function("encode_10k", |b| b.iter(|| delta::encode(black_box(&sorted))));
    g.bench_function("decode_10k", |b| b.iter(|| delta::decode(black_box(&coded)).unwrap()));
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(500))
}

criterion_group! { name = benches; config = config(); targets = batch, snapshot, deltas }
criterion_main!(benches);
