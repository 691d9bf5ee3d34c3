//! A small real run: the built worker, a few hundred clients, a few hundred
//! toggles a second for a few seconds. Every figure must be produced and
//! plausible, and the clients must converge.

use std::path::PathBuf;
use std::process::Command;

use omcb_testkit::WorkerProcess;

/// The `omcb` binary cargo built beside this test (`target/<profile>/omcb`).
fn omcb_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("omcb");
    assert!(bin.exists(), "{} is missing: build the workspace (cargo build) first", bin.display());
    bin
}

fn run(worker: &WorkerProcess, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_omcb-loadgen"))
        .args(["--url", &format!("ws://{}/ws", worker.addr)])
        .args(extra)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadgen failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("converged               yes"),
        "the human table is printed:\n{stdout}"
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn plausible(r: &serde_json::Value, clients: u64, rate: f64, secs: f64) {
    assert_eq!(r["clients_connected"], clients);
    let sent = r["toggles_sent"].as_f64().unwrap();
    assert!(
        (sent - rate * secs).abs() <= rate * secs * 0.15,
        "sent {sent}, expected about {}",
        rate * secs
    );
    assert_eq!(r["toggles_accepted"], r["toggles_sent"], "nothing refused with open limits");
    let lat = &r["latency_ms"];
    let (p50, p99, max) =
        (lat["p50"].as_f64().unwrap(), lat["p99"].as_f64().unwrap(), lat["max"].as_f64().unwrap());
    assert!(lat["samples"].as_u64().unwrap() > 10, "latency was sampled");
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max && max < 2_000.0, "latency {lat}");
    // A 20 ms tick: a toggle waits at most one tick plus delivery.
    assert!(p50 < 200.0, "p50 {p50} ms");
    let bytes = r["bytes_per_client_per_s"].as_f64().unwrap();
    assert!(bytes > 50.0 && bytes < 100_000.0, "bytes per client per second {bytes}");
    let frames = r["frames_per_client_per_s"].as_f64().unwrap();
    assert!(
        frames > 5.0 && frames < 100.0,
        "frames per client per second {frames} (ticks of 20 ms)"
    );
    assert_eq!(r["converged"], true);
    assert_eq!(r["errors"], 0);
}

#[test]
fn smoke_run_produces_every_figure_and_converges() {
    let args = [
        "--toggle-rate",
        "100000",
        "--toggle-burst",
        "100000",
        "--max-connections-per-ip",
        "0",
        // 300 clients from one address: no per-address connect, snapshot or
        // HTTP connection budget (every socket starts as an HTTP connection).
        "--ip-connect-rate",
        "0",
        "--ip-snapshot-rate",
        "0",
        "--max-http-connections-per-ip",
        "0",
        "--batch-ms",
        "20",
    ];
    let worker = WorkerProcess::start(omcb_bin(), None, &args).unwrap();
    let r = run(
        &worker,
        &[
            "--clients",
            "300",
            "--rate",
            "300",
            "--duration",
            "3",
            "--pattern",
            "hot",
            "--region",
            "200",
        ],
    );
    plausible(&r, 300, 300.0, 3.0);
    // Several processes, several source addresses: merged into one report.
    let r = run(
        &worker,
        &[
            "--clients",
            "200",
            "--rate",
            "200",
            "--duration",
            "2",
            "--procs",
            "2",
            "--source-ips",
            "3",
        ],
    );
    plausible(&r, 200, 200.0, 2.0);
}
