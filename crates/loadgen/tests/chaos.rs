//! A smoke run of `scripts/chaos`: one short scenario (Redis `kill -9` and
//! an AOF restart under traffic) on a real fleet (redis-server, two workers,
//! nginx), with the binaries cargo built for this test. It checks the
//! harness end to end: the fleet comes up, the fault lands, the loadgen's
//! ack audit and convergence check report, and the results line and table
//! hold every figure. Needs redis-server, nginx and jq (scripts/test
//! installs them); without them the script fails, and so does this test.

use std::path::PathBuf;
use std::process::Command;

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let b = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(b.exists(), "{} is missing: build the workspace (cargo build) first", b.display());
    b
}

#[test]
fn chaos_smoke_redis_kill_holds_and_reports_every_figure() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(root.join("scripts/chaos"))
        .args(["--quick", "--scenarios", "redis-kill", "--duration", "6", "--clients", "100"])
        .arg("--out")
        .arg(out.path())
        .env("OMCB_BIN", bin("omcb"))
        .env("OMCB_LOADGEN", env!("CARGO_BIN_EXE_omcb-loadgen"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let results = std::fs::read_to_string(out.path().join("results.jsonl")).unwrap_or_default();
    assert!(run.status.success(), "chaos failed:\n{stdout}\n{stderr}\n{results}");
    let lines: Vec<serde_json::Value> =
        results.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{results}");
    let r = &lines[0];
    assert_eq!(r["scenario"], "redis-kill");
    assert_eq!(r["pass"], true, "{r}");
    assert_eq!(r["converged_pct"], 100, "{r}");
    assert_eq!(r["verified"], 100, "{r}");
    assert!(r["acked_boxes"].as_u64().unwrap() > 50, "toggles were acknowledged: {r}");
    assert_eq!(r["acks_lost_silent"], 0, "{r}");
    assert!(r["recovery_s"].as_f64().is_some(), "{r}");
    assert!(r["peak_rss_mib"].as_f64().unwrap() > 1.0, "RSS was sampled: {r}");
    assert!(r["fault_ms"].as_u64().unwrap() > 0, "{r}");
    assert!(stdout.contains("| redis-kill | 100% of 100 |"), "the markdown table:\n{stdout}");
    assert!(stderr.contains("redis-kill: fault"), "progress lines:\n{stderr}");
}
