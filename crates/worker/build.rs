//! Embeds the web client (`web/*`, not its tests or npm files) into the binary,
//! so one file is a whole deployable worker.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    println!("cargo:rerun-if-changed={}", web.display());
    let mut table = String::from("&[\n");
    let mut entries: Vec<_> =
        std::fs::read_dir(&web).map(|d| d.filter_map(Result::ok).collect()).unwrap_or_default();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(content_type) = content_type(&name) else {
            continue;
        };
        if !path.is_file() || name.starts_with("package") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        let abs = path.canonicalize().expect("web file path");
        writeln!(table, "    (\"/{name}\", \"{content_type}\", include_bytes!({abs:?}) as &[u8]),")
            .expect("write to string");
    }
    table.push(']');
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("assets.rs");
    std::fs::write(out, table).expect("write assets.rs");
}

include!("src/mime.rs");
