//! Real servers for tests: nothing here is a mock.
//!
//! # Layout
//! - [`RedisServer`]: a real `redis-server` (from `PATH`, or `OMCB_REDIS_BIN`)
//!   on a free port in its own temp dir, polled until it answers `PING`,
//!   restartable on the same port (with or without its AOF), killed and waited
//!   for on drop, its log printed when a test panics. With
//!   [`RedisOptions::tls`] it listens for TLS only, with a certificate from
//!   its own [`tls::TestCa`]; with [`RedisOptions::user`] it wants that ACL
//!   user and password (the default user is off).
//! - [`WorkerProcess`]: the built `omcb` binary as a child process on free
//!   ports, its addresses read from its stdout, killed on drop.
//! - [`Resp`]: a tiny RESP client for the few commands tests send, so the kit
//!   needs no Redis client crate and depends on nothing of ours.
//! - [`http`]: a minimal HTTP/1.1 `GET` client (the workers' HTTP API).
//! - [`poll`]: waits for a condition with a deadline ([`WAIT`]), never a
//!   fixed sleep.
//! - [`rng`]: a tiny deterministic generator for tests, benches, examples and
//!   the load generator (reproducible runs from a seed).
#![forbid(unsafe_code)]

pub mod http;
pub mod rng;
pub mod tls;
mod worker;
pub use worker::WorkerProcess;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to run a [`RedisServer`].
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file with `appendfsync everysec` (what production runs), so
    /// a restart keeps the data.
    pub aof: bool,
    /// TLS only (`--port 0 --tls-port P`), with a CA of its own
    /// ([`RedisServer::ca_file`]); [`RedisServer::url`] is `rediss://`.
    pub tls: bool,
    /// An ACL user and its password, the only user allowed in (the default
    /// user is off); [`RedisServer::url`] carries them.
    pub user: Option<(String, String)>,
}

/// A real redis-server process; see the crate docs.
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1, kept across restarts.
    port: u16,
    /// Its `--dir`: AOF, RDB and `redis.log`.
    dir: tempfile::TempDir,
    opts: RedisOptions,
    /// With [`RedisOptions::tls`]: its CA and the certificate it serves.
    tls: Option<(tls::TestCa, tls::ServerCert)>,
    /// The process while it runs.
    child: Option<Child>,
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Int(i64),
    /// `$3 foo`, or nil.
    Bulk(Option<Vec<u8>>),
    /// `*2 ...`, or nil.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Resp::Bulk(Some(b)) => Some(b),
            Resp::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
    /// The text of a bulk or simple string.
    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// How long [`poll`] waits for a condition before it fails the test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `f` (every 20 ms) until it returns `Some`, failing after [`WAIT`]:
/// for states a test waits for, instead of a sleep.
pub async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The repository's root (tests read its deploy/ and scripts/).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Fails the test when `tool` is not on the PATH: scripts/test installs every
/// tool the tests use, so a missing one is a broken setup, never a reason to
/// pass (or to print SKIPPED).
pub fn require(tool: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is not installed: run scripts/test, which installs it");
}

/// A port that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts a server without persistence.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server; retries another port if the chosen one was taken meanwhile.
    pub fn start_with(opts: RedisOptions) -> anyhow::Result<Self> {
        let tls = match opts.tls {
            true => {
                let ca = tls::TestCa::new()?;
                let cert = ca.issue("redis")?;
                Some((ca, cert))
            }
            false => None,
        };
        let mut s = RedisServer { port: 0, dir: tempfile::tempdir()?, opts, tls, child: None };
        for _ in 0..5 {
            s.port = free_port();
            if s.spawn().is_ok() {
                return Ok(s);
            }
        }
        anyhow::bail!(
            "redis-server did not start (is it installed? scripts/test installs it); log:\n{}",
            s.log()
        )
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = std::env::var("OMCB_REDIS_BIN").unwrap_or_else(|_| "redis-server".into());
        let mut cmd = Command::new(bin);
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((ca, cert)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-cert-file"])
                .arg(&cert.cert)
                .arg("--tls-key-file")
                .arg(&cert.key)
                .arg("--tls-ca-cert-file")
                .arg(ca.cert())
                .args(["--tls-auth-clients", "no"]),
        };
        if let Some((user, pass)) = &self.opts.user {
            // Each word its own argument: redis-server joins them into the
            // config line `user NAME on >PASS ...`.
            let rule = format!(">{pass}");
            cmd.args([
                "--user", "default", "off", "--user", user, "on", &rule, "~*", "&*", "+@all",
            ]);
        }
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args([
                "--protected-mode",
                "no",
                "--appendonly",
                if self.opts.aof { "yes" } else { "no" },
            ])
            .args(["--appendfsync", "everysec", "--logfile", "redis.log", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Resp::Simple(p)) = self.command(&["PING"])
                && p == "PONG"
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && c.try_wait()?.is_some()
            {
                anyhow::bail!("redis-server exited");
            }
            if Instant::now() > deadline {
                anyhow::bail!("redis-server did not answer PING");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` with [`RedisOptions::tls`],
    /// with `USER:PASSWORD@` when it has a [`RedisOptions::user`].
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        let auth = match &self.opts.user {
            Some((user, pass)) => format!("{user}:{pass}@"),
            None => String::new(),
        };
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// The certificate of the CA that signed its TLS certificate (PEM); a
    /// server without [`RedisOptions::tls`] has none.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|(ca, _)| ca.cert())
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its `--dir` (RDB, AOF, log): a test copies it to play a backup restore.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn stop(&mut self, signal: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args([signal, &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }

    /// SIGTERM (Redis flushes its AOF), then start on the same port and dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop("-TERM");
        self.spawn()
    }

    /// Stop, delete the data, start on the same port: an empty Redis.
    pub fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.stop("-TERM");
        for entry in std::fs::read_dir(self.dir.path())? {
            let path: PathBuf = entry?.path();
            if path.file_name().is_some_and(|n| n != "redis.log") {
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?
                } else {
                    std::fs::remove_file(&path)?
                }
            }
        }
        self.spawn()
    }

    /// SIGKILL: down until `start_again`.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.stop("-KILL");
        Ok(())
    }

    /// Starts it again after [`kill`](Self::kill), same port and dir.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn()
    }

    /// One command over a fresh connection (over TLS and after `AUTH` when
    /// the server wants them).
    pub fn command(&self, args: &[&str]) -> anyhow::Result<Resp> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        match &self.tls {
            None => self.authenticated(tcp, args),
            Some((ca, _)) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
                let conn = rustls::ClientConnection::new(ca.client_config()?, name)?;
                self.authenticated(rustls::StreamOwned::new(conn, tcp), args)
            }
        }
    }

    fn authenticated(&self, mut s: impl Read + Write, args: &[&str]) -> anyhow::Result<Resp> {
        if let Some((user, pass)) = &self.opts.user {
            s.write_all(&request(&["AUTH", user, pass]))?;
        }
        s.write_all(&request(args))?;
        let mut r = BufReader::new(s);
        if self.opts.user.is_some() {
            let auth = read_resp(&mut r)?;
            anyhow::ensure!(auth == Resp::Simple("OK".into()), "AUTH failed: {auth:?}");
        }
        read_resp(&mut r)
    }
}

fn request(args: &[&str]) -> Vec<u8> {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req
}

fn read_resp(r: &mut impl BufRead) -> anyhow::Result<Resp> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    anyhow::ensure!(!line.is_empty(), "connection closed");
    let (kind, rest) = line.split_at(1);
    Ok(match kind {
        "+" => Resp::Simple(rest.into()),
        "-" => Resp::Error(rest.into()),
        ":" => Resp::Int(rest.parse()?),
        "$" => {
            let n: i64 = rest.parse()?;
            if n < 0 {
                Resp::Bulk(None)
            } else {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Resp::Bulk(Some(buf))
            }
        }
        "*" => {
            let n: i64 = rest.parse()?;
            if n < 0 {
                Resp::Array(None)
            } else {
                Resp::Array(Some((0..n).map(|_| read_resp(r)).collect::<Result<_, _>>()?))
            }
        }
        _ => anyhow::bail!("bad RESP line {line:?}"),
    })
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- redis log ---\n{}", self.log());
        }
        self.stop("-KILL");
    }
}
