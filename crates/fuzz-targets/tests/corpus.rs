//! The fuzz targets on stable, in every test run: each target over its
//! committed corpus (`fuzz/corpus/<target>/`), then over deterministic
//! mutations of it, the kinds libFuzzer makes (bit flips, interesting bytes
//! and varints, inserted, dropped and repeated bytes, splices of two inputs).
//! A long run is `scripts/fuzz` (cargo-fuzz, nightly); this is the short one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use omcb_fuzz_targets::{TARGETS, seeds};
use omcb_testkit::rng::XorShift64;

/// Mutated inputs per target: about 3 s for all three in a debug build on an
/// idle core (client_message is the slow one: it runs a store per input).
const MUTATIONS: usize = 20_000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

/// Every file of the target's committed corpus, sorted by name for a fixed order.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    files
}

#[test]
fn committed_corpus_holds_every_seed() {
    for (target, _) in TARGETS {
        let dir = corpus_dir(target);
        for (name, bytes) in seeds::seeds(target) {
            let committed = std::fs::read(dir.join(name)).ok();
            assert!(
                committed.as_deref() == Some(bytes.as_slice()),
                "fuzz/corpus/{target}/{name} is missing or stale: \
                 run `cargo run -p omcb-fuzz-targets --example write-seeds` and commit it"
            );
        }
    }
}

#[test]
fn seal_is_the_board_files_checksum() {
    let board = omcb_proto::Board::new(13, 5, 0);
    let file = omcb_store::memory::encode_board_file(&board, &[0; 13], true);
    assert_eq!(omcb_fuzz_targets::seal(&file[..file.len() - 8]), file);
}

/// Values that sit on a boundary somewhere in the decoders.
const BYTES: [u8; 8] = [0x00, 0x01, 0x02, 0x07, 0x08, 0x7f, 0x80, 0xff];
const VARINTS: [u64; 6] = [0, 127, 128, u32::MAX as u64, (1 << 32) + 5, u64::MAX];

fn mutate(rng: &mut XorShift64, input: &mut Vec<u8>, other: &[u8]) {
    let mut pick = |n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    let at = pick(input.len() + 1);
    match pick(7) {
        0 if !input.is_empty() => {
            let i = at.min(input.len() - 1);
            input[i] ^= 1 << pick(8);
        }
        1 if !input.is_empty() => {
            let i = at.min(input.len() - 1);
            input[i] = BYTES[pick(BYTES.len())];
        }
        2 => input.insert(at, BYTES[pick(BYTES.len())]),
        3 if !input.is_empty() => {
            let end = (at + 1 + pick(8)).min(input.len());
            input.drain(at.min(input.len() - 1)..end);
        }
        4 => {
            let v = seeds::varint(VARINTS[pick(VARINTS.len())]);
            input.splice(at..at, v);
        }
        5 if !input.is_empty() => {
            // Repeat a piece of the input elsewhere in it.
            let start = pick(input.len());
            let piece: Vec<u8> = input[start..(start + 1 + pick(16)).min(input.len())].to_vec();
            let to = pick(input.len() + 1);
            input.splice(to..to, piece);
        }
        _ => {
            // Splice: this input's head, another's tail.
            let cut = pick(other.len() + 1);
            input.truncate(at);
            input.extend_from_slice(&other[cut..]);
        }
    }
}

#[test]
fn every_target_survives_its_corpus_and_mutations() {
    for (target, run) in TARGETS {
        let started = Instant::now();
        let corpus = corpus(target);
        for (name, bytes) in &corpus {
            eprintln!("{target}: corpus {name}");
            run(bytes);
        }
        let mut rng = XorShift64::new(0x0f0c_b5ee_d000 + target.len() as u64);
        for n in 0..MUTATIONS {
            let (_, base) = &corpus[n % corpus.len()];
            let (_, other) = &corpus[(rng.next_u64() % corpus.len() as u64) as usize];
            let mut input = base.clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                mutate(&mut rng, &mut input, other);
            }
            input.truncate(4096);
            let outcome = std::panic::catch_unwind(|| run(&input));
            assert!(outcome.is_ok(), "{target}: mutation {n} panicked on input {input:02x?}");
        }
        eprintln!(
            "{target}: {} corpus inputs and {MUTATIONS} mutations in {:.1?}",
            corpus.len(),
            started.elapsed()
        );
    }
}
