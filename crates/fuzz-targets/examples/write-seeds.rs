//! Writes every target's seeds to `fuzz/corpus/<target>/<name>` (see `seeds`).
//! Usage: `cargo run -p omcb-fuzz-targets --example write-seeds`

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (target, _) in omcb_fuzz_targets::TARGETS {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in omcb_fuzz_targets::seeds::seeds(target) {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{}", dir.display());
    }
    Ok(())
}
