//! The fleet observed the way operators observe it: `scripts/fleet up
//! --prometheus` starts redis-server, two workers, nginx and Debian's
//! prometheus with deploy/prometheus (file_sd targets written by the script);
//! `omcb-loadgen` drives traffic through nginx. Then every query of the
//! dashboard (deploy/grafana/omcb.json) and every recording rule must return
//! a series from the real Prometheus, every alert expression must parse, and
//! a worker killed with SIGKILL under that traffic must raise OmcbWorkerDown
//! (pending or firing) within its `for` plus one scrape interval.
//!
//! Needs prometheus, redis-server, nginx and curl (scripts/test installs
//! them) and the `omcb-loadgen` binary beside `omcb` (`cargo build`); a
//! missing one fails the test.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use omcb_testkit::{repo_root as repo, require};

use common::fleet::{Fleet, WORKER_ARGS, running};
use yaml_rust2::{Yaml, YamlLoader};

/// A Go-style duration from the configs ("5s", "30s", "1m", "2m").
fn duration(s: &str) -> Duration {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap());
    let n: u64 = n.parse().unwrap();
    match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(60 * n),
        _ => panic!("unexpected duration {s}"),
    }
}

fn yaml(path: &str) -> Yaml {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

/// A rule of deploy/prometheus/rules.
#[derive(Clone)]
struct Rule {
    /// The recorded series' or the alert's name.
    name: String,
    /// One line (the YAML keeps long ones on several).
    expr: String,
    r#for: Option<String>,
    alert: bool,
}

fn rules() -> Vec<Rule> {
    let doc = yaml("deploy/prometheus/rules/omcb.rules.yml");
    let mut out = Vec::new();
    for group in doc["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            let (name, alert) = match (rule["record"].as_str(), rule["alert"].as_str()) {
                (Some(name), None) => (name, false),
                (None, Some(name)) => (name, true),
                _ => panic!("a rule is neither a recording rule nor an alert: {rule:?}"),
            };
            out.push(Rule {
                name: name.to_string(),
                expr: one_line(rule["expr"].as_str().unwrap()),
                r#for: rule["for"].as_str().map(String::from),
                alert,
            });
        }
    }
    out
}

fn one_line(expr: &str) -> String {
    expr.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The exported metric names an expression reads (not the `omcb:` recorded ones).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let word: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        rest = &rest[i + word.len()..];
        let preceded_by_quote = expr[..expr.len() - rest.len() - word.len()].ends_with('"');
        if (word.starts_with("omcb_") || word.starts_with("process_")) && !preceded_by_quote {
            out.push(word);
        }
    }
    out
}

/// Every `targets[].expr` of the dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/omcb.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(out.len() > 20, "the dashboard has its queries");
    out
}

/// The Prometheus HTTP API, through curl (it encodes the query).
struct Prom {
    url: String,
}

impl Prom {
    fn get(&self, path: &str, query: Option<&str>) -> serde_json::Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-G", "--max-time", "10"]);
        if let Some(q) = query {
            cmd.arg("--data-urlencode").arg(format!("query={q}"));
        }
        let out = cmd.arg(format!("{}{path}", self.url)).output().unwrap();
        assert!(out.status.success(), "curl {path}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{path}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Evaluates an instant query: Ok(number of series) or Err(Prometheus's error).
    fn query(&self, q: &str) -> Result<usize, String> {
        let v = self.get("/api/v1/query", Some(q));
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(match v["data"]["resultType"].as_str() {
            Some("vector" | "matrix") => v["data"]["result"].as_array().unwrap().len(),
            _ => 1,
        })
    }

    fn alerts(&self, name: &str) -> Vec<serde_json::Value> {
        let v = self.get("/api/v1/alerts", None);
        v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .cloned()
            .collect()
    }
}

/// Polls `f` every 200 ms until it returns Some, failing after `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn http_status(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The load generator, killed (it is ours) on drop.
struct Loadgen(Child);

impl Drop for Loadgen {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn prometheus_scrapes_the_fleet_every_query_returns_data_and_a_killed_worker_alerts() {
    let started = Instant::now();
    require("prometheus");
    require("curl");
    let loadgen = Path::new(env!("CARGO_BIN_EXE_omcb")).with_file_name("omcb-loadgen");
    assert!(
        loadgen.exists(),
        "{} is missing: build it (cargo build -p omcb-loadgen)",
        loadgen.display()
    );

    // Worker flags that make every series exist: an egress budget, freezing
    // on (so the sweep lease is held), limits loose enough that the one
    // loopback address of the load generator is not throttled.
    let wanted = "--egress-budget 30MB --freeze-after 1h --board-size 100000 \
                  --ip-toggle-rate 1000000 --ip-toggle-burst 1000000 --max-connections-per-ip 1000";
    let help = Command::new(env!("CARGO_BIN_EXE_omcb")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let mut problems = Vec::new();
    let mut args = WORKER_ARGS.replace("--board-size 1000 ", "");
    let mut words = wanted.split_whitespace();
    while let (Some(flag), Some(value)) = (words.next(), words.next()) {
        if help.contains(&format!("{flag} ")) {
            args.push_str(&format!(" {flag} {value}"));
        } else {
            problems.push(format!("the worker has no flag {flag}"));
        }
    }

    let fleet = Fleet::up_with(
        2,
        &[("OMCB_WORKER_ARGS", &args), ("OMCB_NGINX_WS_BALANCE", "least_conn")],
        &["--prometheus"],
    );
    let prom_url = fleet
        .up_output
        .lines()
        .find_map(|l| l.strip_prefix("prometheus "))
        .unwrap_or_else(|| panic!("up --prometheus prints its URL: {}", fleet.up_output))
        .to_string();
    let prom = Prom { url: prom_url };
    eprintln!("fleet and prometheus up after {:?}", started.elapsed());

    // The targets file lists every worker's metrics address; status shows prometheus.
    let workers = fleet.workers();
    assert_eq!(fleet.scrape_targets(), fleet.metrics_addresses());
    let port = prom.url.rsplit(':').next().unwrap();
    assert!(
        fleet
            .script(&["status"])
            .lines()
            .any(|l| l.starts_with(&format!("prometheus {port} ")) && l.ends_with(" up")),
        "status shows prometheus up"
    );

    // /metrics answers on the metrics listener only: never on the public
    // listener, directly or through nginx.
    assert_eq!(http_status(&format!("http://127.0.0.1:{}/metrics", fleet.port)), "404");
    for (port, _, metrics) in &workers {
        assert_eq!(http_status(&format!("http://127.0.0.1:{port}/metrics")), "404");
        assert_eq!(http_status(&format!("http://127.0.0.1:{metrics}/metrics")), "200");
    }

    let config = yaml("deploy/prometheus/prometheus.yml");
    let scrape = duration(config["global"]["scrape_interval"].as_str().unwrap());

    // Sockets that came and went (disconnects by code), and a refusal (an
    // upgrade from a foreign page: 403, a limiter refusal of kind origin).
    let logs = fleet.run_dir.path();
    let short = Command::new(&loadgen)
        .args(["--url", &fleet.ws(""), "--clients", "4", "--rate", "40", "--duration", "1"])
        .args(["--converge-timeout", "10"])
        .output()
        .unwrap();
    assert!(short.status.success(), "loadgen: {}", String::from_utf8_lossy(&short.stderr));
    let foreign = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"])
        .args([
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ])
        .args(["-H", "Origin: http://elsewhere.example"])
        .arg(format!("http://127.0.0.1:{}/ws", fleet.port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&foreign.stdout), "403", "a foreign page's socket");

    // Traffic through nginx for the whole test, so rates are not zero when
    // the worker dies.
    let _load = Loadgen(
        Command::new(&loadgen)
            .args(["--url", &fleet.ws(""), "--clients", "40", "--ramp", "200", "--rate", "200"])
            .args(["--duration", "60", "--verify-clients", "2", "--converge-timeout", "5"])
            .stdout(std::fs::File::create(logs.join("loadgen.out")).unwrap())
            .stderr(std::fs::File::create(logs.join("loadgen.err")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Every target up, and scraped often enough for rate() and for the rules
    // evaluated after it: a 1 m rate needs two samples.
    wait_for("every target up", Duration::from_secs(30), || {
        let v = prom.get("/api/v1/targets", None);
        let active = v["data"]["activeTargets"].as_array()?.clone();
        (active.len() == 2 && active.iter().all(|t| t["health"] == "up")).then_some(())
    });
    wait_for("rates over scraped traffic", Duration::from_secs(30), || {
        (prom.query("omcb:frames_sent:rate1m > 0") == Ok(1)
            && prom.query("omcb:toggles:rate1m{outcome=\"changed\"} > 0") == Ok(1))
        .then_some(())
    });
    eprintln!("scraped and rules evaluated after {:?}", started.elapsed());

    // Every recording rule was loaded, evaluates without error and holds a
    // series; every dashboard query and alert expression parses, and the
    // dashboard's return data. Collected, so one run names every gap.
    let rules = rules();
    let mut empty_exprs = Vec::new();
    let loaded = prom.get("/api/v1/rules", None);
    for group in loaded["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            if rule["health"] != "ok" {
                problems.push(format!(
                    "rule {} is {}: {}",
                    rule["name"], rule["health"], rule["lastError"]
                ));
            }
        }
    }
    let loaded_rules: usize = loaded["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        loaded_rules,
        rules.len(),
        "Prometheus loaded every rule of deploy/prometheus/rules"
    );
    let mut checked = 0;
    for rule in &rules {
        let (name, expr) = (&rule.name, &rule.expr);
        match prom.query(expr) {
            Err(e) => problems.push(format!("rule {name}: `{expr}` does not evaluate: {e}")),
            Ok(0) if !rule.alert => {
                problems.push(format!("recording rule {name}: `{expr}` returned no series"));
                empty_exprs.push(expr.clone());
            }
            Ok(_) => {}
        }
        // The recorded series itself: Prometheus evaluated the loaded rule.
        if !rule.alert && prom.query(name) == Ok(0) && !empty_exprs.contains(expr) {
            problems.push(format!("recording rule {name} recorded no series"));
        }
        checked += 1;
    }
    for (panel, expr) in dashboard_queries() {
        match prom.query(&expr) {
            Err(e) => problems.push(format!("panel \"{panel}\": `{expr}` does not evaluate: {e}")),
            Ok(0) => {
                problems.push(format!("panel \"{panel}\": `{expr}` returned no series"));
                empty_exprs.push(expr.clone());
            }
            Ok(_) => {}
        }
        checked += 1;
    }
    // Which exported metrics the empty ones lack: the first thing to fix.
    let mut absent: Vec<String> = empty_exprs.iter().flat_map(|e| metric_names(e)).collect();
    absent.sort();
    absent.dedup();
    absent.retain(|m| {
        let base = m.strip_suffix("_bucket").unwrap_or(m);
        let q = format!("{{__name__=~\"{base}|{base}_bucket\",job=\"omcb-worker\"}}");
        prom.query(&q) == Ok(0)
    });
    if !absent.is_empty() {
        problems.insert(0, format!("no worker exports: {}", absent.join(", ")));
    }
    eprintln!("{checked} queries evaluated after {:?}", started.elapsed());

    // Kill one worker under traffic: OmcbWorkerDown is pending or firing for
    // it (and only it) within its `for` plus one scrape interval.
    // A healthy fleet under traffic raises nothing (no alert is pending).
    // Except the alerts on how fast this machine is: on 2 cores starved by a
    // parallel test run, a Redis round trip can take 100 ms, and then store
    // latency, feed lag and slow consumers rightly read high. Their thresholds
    // are checked by the promtool unit tests (deploy/prometheus/tests).
    const MACHINE_SPEED: [&str; 3] =
        ["OmcbStoreLatencyHigh", "OmcbFeedLagging", "OmcbSlowConsumerStorm"];
    // A rule reads what was scraped and recorded before it ran: in the fleet's
    // first seconds the lease holder's first scrape can land after a rule that
    // read only the other worker, so an alert can be pending for one or two
    // evaluations (each alert's `for` covers that in production). What must
    // hold: every such alert clears within two scrape-and-evaluate rounds and
    // stays clear; one that is still pending then is a real problem.
    let evaluation = duration(config["global"]["evaluation_interval"].as_str().unwrap());
    let settle = 2 * (scrape + evaluation);
    let settle_deadline = Instant::now() + settle;
    let pending = loop {
        let now = prom.get("/api/v1/alerts", None);
        let pending: Vec<serde_json::Value> = now["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|alert| {
                let name = alert["labels"]["alertname"].as_str().unwrap_or_default();
                !MACHINE_SPEED.contains(&name)
            })
            .cloned()
            .collect();
        if pending.is_empty() || Instant::now() >= settle_deadline {
            break pending;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for alert in pending {
        // What the sweep gauges said, to tell a lease blink from a real gap.
        let sweep = ["omcb_sweep_lease_held", "omcb_sweeps_total", "omcb_freeze_after_seconds"]
            .map(|m| {
                prom.get("/api/v1/query", Some(&format!("{m}[30s]")))["data"]["result"].clone()
            });
        problems.push(format!(
            "alert still active on the healthy fleet after {settle:?}: {alert}; sweep series: {sweep:?}"
        ));
    }
    assert!(prom.alerts("OmcbWorkerDown").is_empty(), "no worker is down yet");
    let worker_down = rules.iter().find(|r| r.name == "OmcbWorkerDown").unwrap();
    assert_eq!(worker_down.expr, "up{job=\"omcb-worker\"} == 0");
    let limit = duration(worker_down.r#for.as_deref().unwrap()) + scrape;
    let (victim, pid, _) = workers[0];
    let victim = victim.to_string();
    assert!(running(pid));
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let killed = Instant::now();
    let alert = wait_for("OmcbWorkerDown for the killed worker", limit, || {
        prom.alerts("OmcbWorkerDown").into_iter().find(|a| {
            a["labels"]["worker"] == victim.as_str()
                && (a["state"] == "pending" || a["state"] == "firing")
        })
    });
    eprintln!(
        "OmcbWorkerDown {} {:?} after the kill (limit {limit:?}); test at {:?}",
        alert["state"],
        killed.elapsed(),
        started.elapsed()
    );
    assert_eq!(alert["labels"]["severity"], "page");
    assert!(alert["annotations"]["runbook_url"].as_str().unwrap().contains("OPERATIONS.md#"));
    assert!(
        prom.alerts("OmcbWorkerDown").iter().all(|a| a["labels"]["worker"] == victim.as_str()),
        "only the killed worker is down"
    );

    assert!(
        problems.is_empty(),
        "{} of {checked} queries (or flags) failed on the live fleet:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}
