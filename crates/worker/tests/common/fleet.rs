//! A fleet started by `scripts/fleet` (real redis-server, workers, nginx and,
//! with `--prometheus`, prometheus) in a temp run dir, stopped on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const WORKER_ARGS: &str =
    "--board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms 20";

/// A fleet started by `scripts/fleet up`, stopped by `scripts/fleet down` on drop.
pub struct Fleet {
    pub run_dir: tempfile::TempDir,
    pub port: u16,
    pub env: Vec<(&'static str, String)>,
    /// What `scripts/fleet up` printed on stdout.
    pub up_output: String,
}

impl Fleet {
    pub fn up(workers: usize, env: &[(&'static str, &str)]) -> Fleet {
        Fleet::up_with(workers, env, &[])
    }

    /// `scripts/fleet up` with more arguments (`--prometheus`).
    pub fn up_with(workers: usize, env: &[(&'static str, &str)], args: &[&str]) -> Fleet {
        let run_dir = tempfile::tempdir().unwrap();
        let port = omcb_testkit::free_port();
        let mut all = vec![
            ("OMCB_BIN", env!("CARGO_BIN_EXE_omcb").to_string()),
            ("OMCB_WORKER_ARGS", WORKER_ARGS.to_string()),
            ("OMCB_NGINX_WS_RATE", "1000".to_string()),
            ("OMCB_NGINX_WS_BURST", "1000".to_string()),
            ("OMCB_NGINX_API_RATE", "1000".to_string()),
            ("OMCB_NGINX_API_BURST", "1000".to_string()),
        ];
        for (k, v) in env {
            all.retain(|(key, _)| key != k);
            all.push((k, v.to_string()));
        }
        let mut fleet = Fleet { run_dir, port, env: all, up_output: String::new() };
        let workers = workers.to_string();
        let port = port.to_string();
        let mut up = vec!["up", "--workers", &workers, "--port", &port];
        up.extend_from_slice(args);
        let out = fleet.script(&up);
        // https when the fleet's nginx has a certificate (OMCB_NGINX_TLS_*).
        let scheme =
            if env.iter().any(|(k, _)| *k == "OMCB_NGINX_TLS_CERT") { "https" } else { "http" };
        assert_eq!(
            out.lines().last(),
            Some(format!("{scheme}://127.0.0.1:{port}").as_str()),
            "up prints the URL last"
        );
        fleet.up_output = out;
        fleet
    }

    pub fn script(&self, args: &[&str]) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new(root.join("scripts/fleet"))
            .args(args)
            .arg("--run-dir")
            .arg(self.run_dir.path())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "fleet {args:?} failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn ws(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws{query}", self.port)
    }

    pub fn workers_dir(&self) -> PathBuf {
        self.run_dir.path().join("workers")
    }

    /// `(port, pid, metrics port)` of each worker.
    pub fn workers(&self) -> Vec<(u16, u32, u16)> {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap().trim().parse::<u64>().unwrap();
        let mut out: Vec<_> = std::fs::read_dir(self.workers_dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".pid")?.parse::<u16>().ok())
            .map(|port| {
                let d = self.workers_dir();
                (
                    port,
                    read(d.join(format!("{port}.pid"))) as u32,
                    read(d.join(format!("{port}.metrics"))) as u16,
                )
            })
            .collect();
        out.sort();
        out
    }
}

impl Fleet {
    /// The metrics addresses Prometheus is told to scrape (the file_sd file
    /// `scripts/fleet` keeps), sorted; each target must carry its worker label.
    pub fn scrape_targets(&self) -> Vec<String> {
        let path = self.run_dir.path().join("prometheus/targets/workers.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}):\n{text}", path.display()));
        let mut out: Vec<String> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                assert!(t["labels"]["worker"].is_string(), "a target without its worker: {t}");
                t["targets"][0].as_str().unwrap().to_string()
            })
            .collect();
        out.sort();
        out
    }

    /// What [`Fleet::scrape_targets`] should be: every worker's metrics address.
    pub fn metrics_addresses(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.workers().iter().map(|(_, _, m)| format!("127.0.0.1:{m}")).collect();
        out.sort();
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::process::Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fleet"),
        )
        .args(["down", "--run-dir"])
        .arg(self.run_dir.path())
        .output();
    }
}

/// Whether a process runs (a zombie waiting to be reaped by init does not).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}
