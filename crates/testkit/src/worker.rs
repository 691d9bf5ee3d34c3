//! A worker binary (`omcb serve`) as a child process on free ports.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `omcb serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 ...`,
/// killed and waited for on drop (its log printed if the test is panicking).
#[derive(Debug)]
pub struct WorkerProcess {
    /// The process.
    pub child: Child,
    /// Where it serves HTTP and WebSockets (read from its stdout).
    pub addr: SocketAddr,
    /// Its metrics listener.
    pub metrics: SocketAddr,
    /// Its `--data-dir` (a temp dir unless the caller gave one).
    pub data_dir: PathBuf,
    /// Its stderr, for failure messages.
    pub stderr_path: PathBuf,
    /// Removes the temp data dir on drop.
    _tmp: Option<tempfile::TempDir>,
}

impl WorkerProcess {
    /// Starts `bin serve` with `args` (e.g. `--redis URL`). With `data_dir`
    /// `None` a temp dir is used. Returns once the worker printed both addresses.
    pub fn start(
        bin: impl AsRef<Path>,
        data_dir: Option<&Path>,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let tmp = match data_dir {
            Some(_) => None,
            None => Some(tempfile::tempdir()?),
        };
        let dir = data_dir.map_or_else(
            || tmp.as_ref().expect("made above").path().to_path_buf(),
            Path::to_path_buf,
        );
        let stderr_path = dir.join(format!("worker-{}.log", std::process::id()));
        Self::spawn(bin.as_ref(), dir, stderr_path, tmp, args)
    }

    /// [`start`](Self::start) on `data_dir` with its log at `log` instead of
    /// inside the data dir: for a data dir on a disk the test fills or makes
    /// read-only (the log must still be written, and an open log file would
    /// keep a remount read-only from succeeding).
    pub fn start_logging_to(
        bin: impl AsRef<Path>,
        data_dir: &Path,
        log: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn(bin.as_ref(), data_dir.to_path_buf(), log.to_path_buf(), None, args)
    }

    fn spawn(
        bin: &Path,
        dir: PathBuf,
        stderr_path: PathBuf,
        tmp: Option<tempfile::TempDir>,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&stderr_path)?;
        let mut child = Command::new(bin)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .args(args)
            .env(
                "OMCB_LOG",
                std::env::var("OMCB_LOG").unwrap_or_else(|_| "info,omcb_worker=debug".into()),
            )
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || metrics.is_none() {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                anyhow::bail!("omcb exited before listening; its log:\n{log}");
            };
            if let Some(a) = line.strip_prefix("listening on http://") {
                addr = Some(a.parse()?);
            } else if let Some(a) = line.strip_prefix("metrics on http://") {
                metrics = Some(a.trim_end_matches("/metrics").parse()?);
            }
        }
        // Keep draining stdout so the worker never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self {
            child,
            addr: addr.expect("loop"),
            metrics: metrics.expect("loop"),
            data_dir: dir,
            stderr_path,
            _tmp: tmp,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM, then wait (at most 10 s) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        self.wait_exit()
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "worker did not exit; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- worker log ---\n{}", self.log());
        }
    }
}
