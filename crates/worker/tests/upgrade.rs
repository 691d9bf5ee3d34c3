//! Rolling upgrades as operators run them: `scripts/fleet upgrade BINARY
//! --sha256 SUM` on a fleet started by `scripts/fleet up` (real redis-server,
//! workers and nginx rendered from deploy/nginx), under `omcb-loadgen`
//! traffic through nginx; and `scripts/provision --dry-run upgrade`, the same
//! steps over SSH on droplets.
//!
//! Needs redis-server, nginx, curl and sha256sum (scripts/test installs them)
//! and the `omcb-loadgen` binary beside `omcb` (`cargo build`); a missing one
//! fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fleet::{Fleet, WORKER_ARGS, running};
use omcb_testkit::{repo_root, require};

/// `scripts/fleet ARGS --run-dir <the fleet's>`, whatever its exit status.
fn fleet_script(fleet: &Fleet, args: &[&str]) -> Output {
    Command::new(repo_root().join("scripts/fleet"))
        .args(args)
        .arg("--run-dir")
        .arg(fleet.run_dir.path())
        .envs(fleet.env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// The file a process runs.
fn exe(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

fn ready(port: u16) -> bool {
    Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/readyz"))
        .output()
        .is_ok_and(|o| o.stdout == b"200")
}

fn loadgen() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_omcb")).with_file_name("omcb-loadgen");
    assert!(path.exists(), "{} is missing: build it (cargo build -p omcb-loadgen)", path.display());
    path
}

/// Kills the load generator if the test fails before it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The promise: a rolling upgrade of every worker under 1,000 clients
/// x 200 toggles/s loses no acknowledged toggle, every client converges, and
/// each client reconnects at most once per worker it was on.
///
/// The load generator's clients each own two boxes (`--own-boxes`): the last
/// acknowledged value of each must be on the board at the end (read from
/// Redis). "Once per worker": every attempt to resume got a working socket at
/// once (`failed_reconnects` 0), no client reconnected more often than there
/// are workers, and the clients reconnected no more often in total than the
/// drained workers held sockets when they went (the script reports each).
#[test]
fn rolling_upgrade_of_every_worker_under_1000_clients_loses_no_ack_and_moves_each_client_once_per_worker()
 {
    let started = Instant::now();
    require("curl");
    require("sha256sum");
    let loadgen = loadgen();
    const WORKERS: u64 = 3;
    const CLIENTS: u64 = 1000;
    // The load comes from 20 loopback addresses (nginx hashes addresses to
    // workers), 50 clients each: the per-address budgets, made for one
    // browser per address, are off.
    let args = WORKER_ARGS.replace("--board-size 1000", "--board-size 10000")
        + " --ip-toggle-rate 0 --ip-connect-rate 0 --ip-snapshot-rate 0 --max-connections-per-ip 0";
    let fleet = Fleet::up(
        WORKERS as usize,
        &[("OMCB_WORKER_ARGS", &args), ("OMCB_NGINX_CONN_PER_IP", "1000")],
    );
    let before = fleet.workers();
    // The new binary: the same build, installed by the script under its checksum.
    let binary = Path::new(env!("CARGO_BIN_EXE_omcb"));
    let sum = sha256(binary);
    let redis_port = std::fs::read_to_string(fleet.run_dir.path().join("redis.port")).unwrap();
    let ready_file = fleet.run_dir.path().join("loadgen.ready");
    let out_file = fleet.run_dir.path().join("loadgen.out");
    let err_file = fleet.run_dir.path().join("loadgen.err");
    // Traffic long enough for the upgrade (checked below), short enough for CI.
    let mut load = Child(
        Command::new(&loadgen)
            .args(["--url", &fleet.ws(""), "--clients", &CLIENTS.to_string(), "--ramp", "1000"])
            .args(["--source-ips", "20", "--rate", "200", "--duration", "40", "--own-boxes", "2"])
            .args(["--truth-redis", &format!("redis://127.0.0.1:{}", redis_port.trim())])
            .args(["--converge-timeout", "20", "--json", "--ready-file"])
            .arg(&ready_file)
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready_file.exists() {
        assert!(
            load.0.try_wait().unwrap().is_none(),
            "loadgen ended before traffic: {}",
            std::fs::read_to_string(&err_file).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "1,000 clients did not connect through nginx in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("fleet up and 1,000 clients connected after {:?}", started.elapsed());

    let upgrade_start = Instant::now();
    let run = fleet_script(&fleet, &["upgrade", binary.to_str().unwrap(), "--sha256", &sum]);
    let upgrade_s = upgrade_start.elapsed().as_secs_f64();
    let out = String::from_utf8_lossy(&run.stdout);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the upgrade failed:\n{out}\n{log}");
    let upgrade_end_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64;
    eprintln!("upgrade of {WORKERS} workers took {upgrade_s:.1} s:\n{log}");
    // "upgraded worker PORT sockets N", one line per worker, in order.
    let moved: Vec<(u16, u64)> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w[..] {
                ["upgraded", "worker", p, "sockets", n] => Some((p.parse().ok()?, n.parse().ok()?)),
                _ => None,
            }
        })
        .collect();
    let ports: Vec<u16> = before.iter().map(|w| w.0).collect();
    assert_eq!(moved.iter().map(|m| m.0).collect::<Vec<_>>(), ports, "every worker, in turn");
    let held: u64 = moved.iter().map(|m| m.1).sum();

    // Every worker is a new process on its old address, running the
    // installed copy, ready; the old processes are gone.
    let installed = fleet.run_dir.path().join(format!("bin/omcb-{sum}")).canonicalize().unwrap();
    let after = fleet.workers();
    assert_eq!(after.len(), before.len());
    for ((port, old_pid, metrics), (port2, pid, metrics2)) in before.iter().zip(&after) {
        assert_eq!((port, metrics), (port2, metrics2), "the same addresses");
        assert!(!running(*old_pid), "the old worker {port} is gone");
        assert_eq!(exe(*pid), installed, "worker {port} runs the verified copy");
        assert!(ready(*port), "worker {port} is ready");
    }

    let status = load.0.wait().unwrap();
    let stdout = std::fs::read_to_string(&out_file).unwrap();
    let stderr = std::fs::read_to_string(&err_file).unwrap();
    let tail: String = stderr.lines().rev().take(10).collect::<Vec<_>>().join("\n");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| {
            panic!("no JSON report from loadgen ({e}):\n{stdout}\n{tail}");
        });
    eprintln!("{stdout}");
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("no {k} in {report}"));
    let audit = &report["audit"];
    let a = |k: &str| audit[k].as_u64().unwrap_or_else(|| panic!("no audit.{k} in {audit}"));
    assert!(
        upgrade_end_ms + 2000 < n("traffic_end_ms"),
        "the upgrade ({upgrade_s:.1} s) must end while the traffic still runs"
    );

    // 0 acknowledged toggles lost.
    assert!(n("toggles_accepted") > 1000, "traffic ran: {report}");
    assert!(a("acked_boxes") > 1000, "most own boxes got an acknowledged toggle: {audit}");
    assert_eq!(a("acks_lost_silent"), 0, "acknowledged toggles lost: {audit}");
    assert_eq!(a("acks_lost_new_epoch"), 0, "acknowledged toggles lost: {audit}");
    assert_eq!(a("refused_applied"), 0, "{audit}");
    assert_eq!(a("phantom_changes"), 0, "{audit}");
    // Every client converges.
    assert!(status.success(), "loadgen failed:\n{stdout}\n{tail}");
    assert_eq!(report["converged"], true, "{report}");
    assert_eq!(a("clients_at_truth"), CLIENTS, "{audit}");
    assert_eq!(n("errors"), 0, "{report}");
    // Each client reconnects at most once per worker it was on.
    assert_eq!(n("failed_reconnects"), 0, "a resume that did not get a socket at once: {report}");
    let by_count = report["reconnects_by_count"].as_object().unwrap();
    assert!(!by_count.contains_key("0"), "every client was moved by the upgrade: {by_count:?}");
    assert!(n("max_reconnects_per_client") <= WORKERS, "{by_count:?}");
    assert!(
        n("reconnects") <= held,
        "{} reconnects, but the drained workers held {held} sockets",
        n("reconnects")
    );
    eprintln!("passed after {:?}", started.elapsed());
}

/// Fail safe: a checksum mismatch is refused before any worker is touched,
/// and a new binary that exits at start is replaced by the old one on its
/// address; the upgrade stops there, with an error that says so.
#[test]
fn upgrade_refuses_a_checksum_mismatch_and_puts_the_old_binary_back_when_the_new_one_fails() {
    require("sha256sum");
    let fleet = Fleet::up(2, &[]);
    let before = fleet.workers();
    let dir = tempfile::tempdir().unwrap();

    // A mismatch: refused, nothing touched.
    let binary = env!("CARGO_BIN_EXE_omcb");
    let wrong = "0".repeat(64);
    let out = fleet_script(&fleet, &["upgrade", binary, "--sha256", &wrong]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing to upgrade") && err.contains("no worker was touched"),
        "a clear message: {err}"
    );
    assert_eq!(fleet.workers(), before, "no worker was touched");
    assert!(!fleet.run_dir.path().join(format!("bin/omcb-{wrong}")).exists(), "nothing installed");

    // A build that exits at start.
    let broken = dir.path().join("omcb");
    std::fs::write(&broken, "#!/bin/sh\necho 'Error: this build is broken' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sum = sha256(&broken);
    let out = fleet_script(&fleet, &["upgrade", broken.to_str().unwrap(), "--sha256", &sum]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the upgrade reports the failure");
    let first = before[0].0;
    assert!(
        err.contains(&format!("upgrade stopped: worker {first}"))
            && err.contains("exited at start")
            && err.contains("this build is broken")
            && err.contains(&format!(
                "worker {first} runs {} again",
                Path::new(binary).canonicalize().unwrap().display()
            )),
        "it says what failed and what runs: {err}"
    );
    let after = fleet.workers();
    assert_eq!(after.len(), 2);
    // The first worker runs the old binary again, ready, on its address; the
    // second was never touched.
    assert_eq!(after[0].0, first);
    assert_ne!(after[0].1, before[0].1, "the first worker was drained and restarted");
    assert_eq!(exe(after[0].1), Path::new(binary).canonicalize().unwrap());
    assert!(ready(first));
    assert_eq!(after[1], before[1], "the second worker was not touched");
    let status = fleet.script(&["status"]);
    assert!(
        status.lines().filter(|l| l.starts_with("worker ")).all(|l| l.ends_with(" ready")),
        "both workers ready, none left draining: {status}"
    );
}

/// `scripts/provision --dry-run upgrade` prints every command, and for each
/// worker, in turn, the steps in order: verify (fetch and check the sha256
/// on the droplet), out of the upstream and drain, replace, start, ready,
/// back in; the binary is verified here before any worker is touched.
#[test]
fn provision_upgrade_dry_run_prints_each_workers_steps_in_order() {
    let sum = "ab".repeat(32);
    let url = "https://example.invalid/omcb-1.2.3";
    let out = Command::new(repo_root().join("scripts/provision"))
        .args(["--dry-run", "upgrade", "--binary-url", url, "--sha256", &sum])
        .args(["--workers", "omcb-worker-a=10.0.0.5,omcb-worker-b=10.0.0.6,omcb-worker-c=10.0.0.7"])
        .env("OMCB_LB_HOST", "203.0.113.10")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    // Commands are printed shell-quoted (`printf %q`): compare them unquoted.
    let lines: Vec<String> = text.lines().map(|l| l.replace('\\', "")).collect();
    // (worker, step, the command that follows its "# worker: step" line)
    let mut steps = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some((who, what)) = l.strip_prefix("# ").and_then(|l| l.split_once(": ")) {
            let command = lines.get(i + 1).cloned().unwrap_or_default();
            steps.push((who.to_string(), what.split(" (").next().unwrap().to_string(), command));
        }
    }
    assert_eq!(steps[0].0, "local", "the binary is verified here first: {text}");
    assert!(steps[0].2.starts_with("curl ") && steps[0].2.contains(url));
    let mut expected = Vec::new();
    for (name, addr) in [
        ("omcb-worker-a", "10.0.0.5"),
        ("omcb-worker-b", "10.0.0.6"),
        ("omcb-worker-c", "10.0.0.7"),
    ] {
        for step in
            ["verify", "out of the upstream and drain", "replace", "start", "ready", "back in"]
        {
            expected.push((name.to_string(), step.to_string(), addr));
        }
    }
    let got: Vec<(String, String)> =
        steps[1..].iter().map(|s| (s.0.clone(), s.1.clone())).collect();
    assert_eq!(
        got,
        expected.iter().map(|e| (e.0.clone(), e.1.clone())).collect::<Vec<_>>(),
        "per worker, in order:\n{text}"
    );
    for ((name, step, command), (_, _, addr)) in steps[1..].iter().zip(&expected) {
        let on_worker = format!("-J root@203.0.113.10 root@{addr} ");
        let want: &[&str] = match step.as_str() {
            "verify" => &[url, "sha256sum -c", &sum],
            "out of the upstream and drain" => &["systemctl stop omcb-worker"],
            "replace" => &[
                &format!("/usr/local/lib/omcb/omcb-{sum}"),
                "mv -T /usr/local/bin/omcb.next /usr/local/bin/omcb",
            ],
            "start" => &["systemctl start omcb-worker"],
            "ready" => &["http://127.0.0.1:8080/readyz"],
            "back in" => &["root@203.0.113.10 ", &format!("http://{addr}:8080/readyz")],
            _ => unreachable!(),
        };
        assert!(command.starts_with("ssh "), "{name} {step}: {command}");
        if step != "back in" {
            assert!(
                command.contains(&on_worker),
                "{name} {step} runs on {addr} through the LB: {command}"
            );
        }
        for w in want {
            assert!(command.contains(w), "{name} {step}: {command} lacks {w}");
        }
    }
}

/// `scripts/provision upgrade` refuses a binary whose checksum is not the one
/// given, before it asks DigitalOcean or SSH anything.
#[test]
fn provision_upgrade_refuses_a_checksum_mismatch_before_touching_any_worker() {
    require("sha256sum");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("omcb");
    std::fs::write(&file, "not the binary you expect").unwrap();
    let wrong = "0".repeat(64);
    let out = Command::new(repo_root().join("scripts/provision"))
        .args([
            "upgrade",
            "--binary-url",
            &format!("file://{}", file.display()),
            "--sha256",
            &wrong,
        ])
        // No doctl or ssh is reached: an empty PATH beyond what curl needs would
        // hide that, so name workers that do not exist instead.
        .args(["--workers", "omcb-worker-x=192.0.2.1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing to upgrade")
            && err.contains(&wrong)
            && err.contains("no worker was touched"),
        "a clear message: {err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("omcb-worker-x:"), "no worker step ran");
    // Malformed sums are refused with the format they need.
    let out = Command::new(repo_root().join("scripts/provision"))
        .args([
            "--dry-run",
            "upgrade",
            "--binary-url",
            "https://example.invalid/omcb",
            "--sha256",
            "abc",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 lowercase hex digits"));
}
