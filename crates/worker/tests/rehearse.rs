//! The production topology rehearsed in network namespaces (`scripts/rehearse`):
//! the load balancer is the only machine the internet reaches, the egress cap
//! holds on its public interface under load, and what runs is what
//! `scripts/provision` would send to the droplets. Needs root (network
//! namespaces), as CI has; without it the tests fail, never skip.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use omcb_testkit::{repo_root as repo, require};

/// A rehearsal brought up by `scripts/rehearse up` under a name of its own,
/// taken down (and checked to leave nothing) on drop.
struct Rehearsal {
    name: String,
    dir: PathBuf,
    ca: PathBuf,
    url: String,
    down: bool,
}

fn sh(cmd: &str) -> Output {
    Command::new("bash").args(["-c", cmd]).output().unwrap()
}

impl Rehearsal {
    fn up(tag: &str, args: &[&str], env: &[(&str, &str)]) -> Rehearsal {
        for tool in ["ip", "tc", "nginx", "redis-server", "redis-cli", "openssl", "curl"] {
            require(tool);
        }
        assert!(
            sh("id -u").stdout == b"0\n",
            "the rehearsal needs root (network namespaces): run the tests as root, as CI does"
        );
        let name = format!("r{}{tag}", std::process::id() % 100_000);
        let dir = PathBuf::from(format!("/tmp/omcb-rehearse-{name}"));
        let out = Command::new(repo().join("scripts/rehearse"))
            .args(["up", "--name", &name])
            .args(args)
            .env("OMCB_BIN", env!("CARGO_BIN_EXE_omcb"))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut r = Rehearsal { name, dir, ca: PathBuf::new(), url: String::new(), down: false };
        assert!(
            out.status.success(),
            "rehearse up failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        r.ca = PathBuf::from(
            stdout.lines().find_map(|l| l.strip_prefix("ca ")).expect("up prints the CA"),
        );
        r.url = stdout.lines().last().unwrap().to_string();
        r
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.name)
    }

    /// A shell command in a role's namespace.
    fn in_ns(&self, role: &str, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "bash", "-c", cmd])
            .output()
            .unwrap()
    }

    /// Whether a TCP connection from ROLE to HOST:PORT is accepted within 2 s.
    fn connects(&self, role: &str, host: &str, port: u16) -> bool {
        self.in_ns(role, &format!("timeout 2 bash -c 'exec 3<>/dev/tcp/{host}/{port}'"))
            .status
            .success()
    }

    fn curl(&self, role: &str, args: &str) -> (bool, String) {
        let out = self.in_ns(role, &format!("curl -sS --max-time 10 {args}"));
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn provision_env(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.dir.join("provision.env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `scripts/rehearse down`; then nothing of it may be left.
    fn down(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        let pids: Vec<u32> = std::fs::read_to_string(self.dir.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        let out = Command::new(repo().join("scripts/rehearse"))
            .args(["down", "--name", &self.name])
            .output()
            .unwrap();
        assert!(out.status.success(), "rehearse down: {}", String::from_utf8_lossy(&out.stderr));
        let netns = String::from_utf8(sh("ip netns list").stdout).unwrap();
        assert!(
            !netns.lines().any(|l| l.starts_with(&format!("{}-", self.name))),
            "namespaces left: {netns}"
        );
        assert!(!self.dir.exists(), "{} left", self.dir.display());
        for pid in pids {
            assert!(!common::fleet::running(pid), "process {pid} left running");
        }
        // Nothing of ours in the root namespace: no bridge, no veth, no qdisc.
        let links = String::from_utf8(sh("ip -o link show").stdout).unwrap();
        assert!(!links.contains(&self.name), "{links}");
    }
}

impl Drop for Rehearsal {
    fn drop(&mut self) {
        if !self.down {
            self.down = true;
            let _ = Command::new(repo().join("scripts/rehearse"))
                .args(["down", "--name", &self.name])
                .output();
        }
    }
}

/// The user data sections of a dry run of `scripts/provision up`, by role.
fn dry_run_user_data(out: &str) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut lines = out.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("# ---- user data for omcb-") else { continue };
        let role = rest.split_whitespace().next().unwrap().to_string();
        let end = format!("# ---- end of user data for omcb-{role} ----");
        let mut text = String::new();
        for l in lines.by_ref().take_while(|l| *l != end) {
            text.push_str(l);
            text.push('\n');
        }
        found.insert(role, text);
    }
    found
}

/// From the internet namespace only the load balancer answers, on 443
/// (HTTPS, WSS) and 80 (a redirect); workers, Redis and metrics do not,
/// though they answer on the private network where they should. The cap is
/// on the load balancer's public interface only. And provision's dry run
/// for `up --redis --lb --workers 3` prints the user data the rehearsal ran,
/// byte for byte, and the firewall rules it was built with.
#[test]
fn only_the_load_balancer_answers_the_internet_and_provision_prints_what_ran() {
    let mut r = Rehearsal::up("a", &["--workers", "3"], &[]);
    assert_eq!(r.url, "https://203.0.113.10/");
    let ca = r.ca.display().to_string();

    // The load balancer, over TLS, from the internet.
    let (ok, stats) = r.curl("inet", &format!("--cacert {ca} {}api/stats", r.url));
    assert!(ok && stats.contains("checked_count"), "{stats}");
    let (ok, page) = r.curl("inet", &format!("--cacert {ca} {}", r.url));
    assert!(ok && page.contains("<html"), "{page}");
    let (ok, head) = r.curl("inet", "-D - -o /dev/null http://203.0.113.10/api/stats");
    assert!(ok && head.starts_with("HTTP/1.1 301"), "{head}");
    assert!(head.contains("Location: https://203.0.113.10/api/stats\r\n"), "{head}");
    // WSS: the upgrade through TLS and the worker's first (binary) frame.
    let wss = r.in_ns(
        "inet",
        &format!(
            "(printf 'GET /ws HTTP/1.1\\r\\nHost: 203.0.113.10\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\
             Sec-WebSocket-Version: 13\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n\\r\\n'; sleep 3) | \
             timeout 5 openssl s_client -quiet -verify_return_error -CAfile {ca} -connect 203.0.113.10:443 2>/dev/null | head -c 400 | od -An -c"
        ),
    );
    let frames =
        String::from_utf8_lossy(&wss.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(frames.contains("1 0 1 S w i t c h i n g"), "{frames}");
    assert!(frames.contains("\\r \\n \\r \\n 202"), "a binary frame follows the upgrade: {frames}");

    // Nothing else from the internet: not the workers, Redis or metrics
    // (no route to the private network), nor other ports of the balancer.
    for (host, port) in [
        ("10.99.0.11", 8080),
        ("10.99.0.11", 9478),
        ("10.99.0.2", 6379),
        ("10.99.0.3", 80),
        ("203.0.113.10", 8080),
        ("203.0.113.10", 9478),
        ("203.0.113.10", 6379),
    ] {
        assert!(!r.connects("inet", host, port), "{host}:{port} answers the internet");
    }
    assert!(r.connects("inet", "203.0.113.10", 443) && r.connects("inet", "203.0.113.10", 80));
    // On the private network they answer: the balancer reaches the workers and
    // their metrics, workers reach Redis (with the password).
    assert!(r.connects("lb", "10.99.0.12", 8080) && r.connects("lb", "10.99.0.13", 9478));
    let env = r.provision_env();
    let password = &env.iter().find(|(k, _)| k == "OMCB_REDIS_PASSWORD").unwrap().1;
    let pong =
        r.in_ns("w1", &format!("redis-cli -h 10.99.0.2 --no-auth-warning -a {password} ping"));
    assert_eq!(String::from_utf8_lossy(&pong.stdout).trim(), "PONG");
    let refused = r.in_ns("w1", "redis-cli -h 10.99.0.2 ping");
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("NOAUTH"),
        "Redis wants its password"
    );
    // Workers listen on their private address only.
    let ss = String::from_utf8(r.in_ns("w1", "ss -Hltn").stdout).unwrap();
    assert!(ss.contains("10.99.0.11:8080") && ss.contains("10.99.0.11:9478"), "{ss}");
    let locals: Vec<&str> = ss.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
    assert!(locals.iter().all(|a| a.starts_with("10.99.0.11:")), "{ss}");
    // The cap: on the public interface (eth0), not the private one.
    let qdisc = |dev: &str| {
        String::from_utf8(r.in_ns("lb", &format!("tc qdisc show dev {dev}")).stdout).unwrap()
    };
    assert!(qdisc("eth0").contains("htb"), "{}", qdisc("eth0"));
    assert!(!qdisc("eth1").contains("htb"), "{}", qdisc("eth1"));

    // provision's dry run with the rehearsal's parameters prints what ran.
    let out = Command::new(repo().join("scripts/provision"))
        .args(["--dry-run", "up", "--redis", "--lb", "--workers", "3"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let data = dry_run_user_data(&printed);
    for role in ["redis", "lb", "worker"] {
        let ran = std::fs::read_to_string(r.dir.join(format!("rendered/{role}.yaml"))).unwrap();
        assert!(
            data[role] == ran,
            "the dry run's {role} user data differs from what the rehearsal ran"
        );
    }
    let rules = std::fs::read_to_string(r.dir.join("rendered/firewall.rules")).unwrap();
    for rule in rules.lines() {
        let f: Vec<&str> = rule.split_whitespace().collect();
        let from = match f[3] {
            "internet" => "address:0.0.0.0/0,address:::/0".to_string(),
            t if t.starts_with("tag:") => t.to_string(),
            cidr => format!("address:{cidr}"),
        };
        let line = printed
            .lines()
            .find(|l| l.contains(&format!("firewall create --name omcb-{} ", f[0])))
            .unwrap()
            .replace('\\', "");
        assert!(
            line.contains(&format!("protocol:{},ports:{},{from}", f[1], f[2])),
            "{rule}: {line}"
        );
    }
    assert!(printed.contains("doctl compute droplet create omcb-redis-"));
    assert!(printed.contains("doctl compute droplet create omcb-lb-"));
    r.down();
}
