//! Embeds the web client (`web/*`, not its tests or npm files) into the binary,
//! so one file is a whole deployable worker; and names the git commit it is
//! built from (`git_commit`).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

fn main() {
    git_commit();
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

/// Passes the git commit to `omcb_build_info{git}` as `OMCB_GIT_COMMIT`:
/// `OMCB_GIT_COMMIT` from the build's environment if set (a build from a
/// tarball), else `git rev-parse --short HEAD`, else "unknown" (no git, or not
/// a checkout). Rerun when HEAD moves.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=OMCB_GIT_COMMIT");
    let commit = std::env::var("OMCB_GIT_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=OMCB_GIT_COMMIT={commit}");
    // HEAD names the branch; the branch's ref file (or packed-refs) moves on
    // each commit. Only files that exist are watched: a missing one would
    // rerun this script on every build.
    let mut watch = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name])
            && let Ok(path) = Path::new(&path).canonicalize()
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

/// The trimmed output of a successful, non-empty `git` command.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

include!("src/mime.rs");
