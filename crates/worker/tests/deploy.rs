//! The deploy/ files and scripts/provision: checked with the real tools where
//! the machine has them (systemd-analyze, tc in network namespaces, iperf3),
//! and against a fake `doctl` for the cloud API (outside this machine).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::dry_run_user_data;

use omcb_testkit::{repo_root as repo, require};

/// The checksum the tests give `provision up` for the workers' binary.
const BINARY_SHA256: &str = "5f0c6a1f0e0d4c3b2a19181716151413121110090807060504030201000f0e0d";

#[test]
fn systemd_unit_verifies_clean() {
    require("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/omcb-worker.service")).unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = unit.replace("/usr/local/bin/omcb", env!("CARGO_BIN_EXE_omcb"));
    let path = dir.path().join("omcb-worker.service");
    std::fs::write(&path, &unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    for must in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=",
        "LimitNOFILE=",
        "Restart=always",
        "RestartSec=",
        "StartLimitIntervalSec=0",
        "EnvironmentFile=",
    ] {
        assert!(unit.contains(must), "the unit lacks {must}");
    }
}

/// Renders the cloud-init user data the way scripts/provision does.
fn rendered_user_data() -> String {
    let dir = tempfile::tempdir().unwrap();
    let (bin, log) = fake_doctl(dir.path());
    let out = Command::new(repo().join("scripts/provision"))
        .args(["up", "1"])
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
        .env("FAKE_DOCTL_LOG", &log)
        .env("FAKE_DOCTL_STATE", dir.path().join("state"))
        .env("OMCB_REDIS_URL", "redis://10.0.0.5:6379")
        .env("OMCB_BINARY_URL", "https://example.invalid/omcb")
        .env("OMCB_BINARY_SHA256", BINARY_SHA256)
        .env("OMCB_UPSTREAM_FILE", dir.path().join("upstream.conf"))
        .env("OMCB_PROMETHEUS_TARGETS", dir.path().join("workers.json"))
        .env("OMCB_STATE_FILE", dir.path().join("provision.env"))
        .env("OMCB_NGINX_RELOAD", "true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(log.with_extension("userdata")).unwrap()
}

/// The worker's user data installs the binary only if its sha256 is the one
/// provision was given: its install line, run with its paths moved into a
/// temporary directory, links nothing for a file with another checksum and
/// links the verified file for the right one.
fn installs_only_a_binary_with_its_checksum(doc: &yaml_rust2::Yaml) {
    let install = doc["runcmd"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_vec())
        .find(|c| c[0].as_str() == Some("sh") && format!("{c:?}").contains("sha256sum -c"))
        .expect("runcmd checks the binary's sha256")[2]
        .as_str()
        .unwrap()
        .to_string();
    assert!(install.contains(BINARY_SHA256), "{install}");
    let dir = tempfile::tempdir().unwrap();
    let (lib, link) = (dir.path().join("lib"), dir.path().join("omcb"));
    std::fs::create_dir_all(&lib).unwrap();
    let run = |sum: &str, content: &str| {
        std::fs::write(lib.join(format!("omcb-{sum}.part")), content).unwrap();
        let line = install
            .replace(BINARY_SHA256, sum)
            .replace("/usr/local/lib/omcb", lib.to_str().unwrap())
            .replace("/usr/local/bin/omcb", link.to_str().unwrap());
        Command::new("sh").args(["-c", &line]).output().unwrap().status.success()
    };
    assert!(!run(BINARY_SHA256, "not the binary"), "a checksum mismatch must fail");
    assert!(!link.exists(), "nothing is linked after a mismatch");
    let content = "the binary";
    let out = Command::new("sh")
        .args(["-c", &format!("printf %s '{content}' | sha256sum")])
        .output()
        .unwrap();
    let sum = String::from_utf8_lossy(&out.stdout)[..64].to_string();
    assert!(run(&sum, content), "the right checksum installs");
    assert_eq!(std::fs::read_to_string(&link).unwrap(), content);
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        lib.join(format!("omcb-{sum}")),
        "/usr/local/bin/omcb links the verified, versioned file"
    );
}

#[test]
fn cloud_init_user_data_has_the_shape_of_a_worker() {
    let text = rendered_user_data();
    assert!(text.starts_with("#cloud-config\n"));
    require("cloud-init");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("user-data.yaml");
    std::fs::write(&f, &text).unwrap();
    let out =
        Command::new("cloud-init").args(["schema", "--config-file"]).arg(&f).output().unwrap();
    assert!(out.status.success(), "cloud-init schema: {}", String::from_utf8_lossy(&out.stderr));
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let doc = &docs[0];
    let files: Vec<&str> =
        doc["write_files"].as_vec().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    for path in [
        "/etc/systemd/system/omcb-worker.service",
        "/etc/omcb/worker.env",
        "/etc/sysctl.d/60-omcb.conf",
        "/usr/local/sbin/cap-egress",
    ] {
        assert!(files.contains(&path), "user data writes {path}");
    }
    let runcmd = format!("{:?}", doc["runcmd"]);
    assert!(
        runcmd.contains("omcb-worker.service") && runcmd.contains("enable"),
        "it enables the worker"
    );
    installs_only_a_binary_with_its_checksum(doc);
    let written = |path: &str| {
        doc["write_files"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|f| f["path"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("user data writes {path}"))
            .clone()
    };
    let env = written("/etc/omcb/worker.env");
    let env = env["content"].as_str().unwrap();
    assert!(env.contains("OMCB_REDIS=redis://10.0.0.5:6379"));
    metrics_listen_is_filled_from_the_private_address(doc, env);
    // The unit travels base64-encoded and decodes to the repo's unit.
    let unit = written("/etc/systemd/system/omcb-worker.service");
    assert_eq!(
        decode_b64(unit["content"].as_str().unwrap()),
        std::fs::read_to_string(repo().join("deploy/systemd/omcb-worker.service")).unwrap()
    );
    // The egress cap is installed but not started: a worker's bytes to its
    // clients leave through the load balancer, which is capped.
    assert!(
        runcmd.contains(r#"String("disable"), String("--now"), String("omcb-egress-cap.service")"#),
        "{runcmd}"
    );
}

/// The listener (8080, for the load balancer) and metrics (9478, for
/// Prometheus) are on the droplet's private address only (never the public
/// interface): the user data carries a placeholder that omcb-private-address
/// replaces at boot, before the worker starts, from the metadata service.
/// Runs that script against a fake `curl`.
fn metrics_listen_is_filled_from_the_private_address(doc: &yaml_rust2::Yaml, env: &str) {
    let line = env.lines().find(|l| l.starts_with("OMCB_METRICS_LISTEN=")).expect("metrics listen");
    assert_eq!(line, "OMCB_METRICS_LISTEN=private-address-unknown:9478");
    let line = env.lines().find(|l| l.starts_with("OMCB_LISTEN=")).expect("listen");
    assert_eq!(line, "OMCB_LISTEN=private-address-unknown:8080", "workers listen privately");
    let runcmd: Vec<String> =
        doc["runcmd"].as_vec().unwrap().iter().map(|c| format!("{c:?}")).collect();
    let fill =
        runcmd.iter().position(|c| c.contains("omcb-private-address")).expect("runcmd fills it");
    assert!(runcmd[fill].contains("/etc/omcb/worker.env"));
    let start = runcmd.iter().position(|c| c.contains("omcb-worker.service")).unwrap();
    assert!(fill < start, "the address is filled in before the worker starts");

    let script = decode_b64(
        doc["write_files"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|f| f["path"].as_str() == Some("/usr/local/sbin/omcb-private-address"))
            .expect("user data writes omcb-private-address")["content"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(
        script,
        std::fs::read_to_string(repo().join("deploy/cloud-init/omcb-private-address")).unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fill_with = |answer: &str| {
        std::fs::write(
            bin.join("curl"),
            format!(
                "#!/bin/sh\necho \"$*\" >>{0}/curl.log\nprintf '%s' '{answer}'\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("omcb-private-address"), &script).unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(bin.join("curl"))
            .arg(dir.path().join("omcb-private-address"))
            .status()
            .unwrap();
        let env_file = dir.path().join("worker.env");
        std::fs::write(&env_file, env).unwrap();
        let out = Command::new(dir.path().join("omcb-private-address"))
            .arg(&env_file)
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
            .output()
            .unwrap();
        (out.status.success(), std::fs::read_to_string(&env_file).unwrap())
    };
    let (ok, filled) = fill_with("10.10.0.7");
    assert!(ok);
    assert!(filled.contains("\nOMCB_METRICS_LISTEN=10.10.0.7:9478\n"), "{filled}");
    assert!(filled.contains("\nOMCB_LISTEN=10.10.0.7:8080\n"), "{filled}");
    assert_eq!(filled.matches("OMCB_METRICS_LISTEN=").count(), 1);
    let asked = std::fs::read_to_string(dir.path().join("curl.log")).unwrap();
    assert!(asked.contains("http://169.254.169.254/metadata/v1/interfaces/private/0/ipv4/address"));
    // A metadata answer that is no address changes nothing and fails the step;
    // the worker then refuses the placeholder at start.
    let (ok, unchanged) = fill_with("<html>503</html>");
    assert!(!ok);
    assert_eq!(unchanged, env);
    let out = Command::new(env!("CARGO_BIN_EXE_omcb"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "private-address-unknown:9478",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("invalid value 'private-address-unknown:9478'")
    );

    let example =
        std::fs::read_to_string(repo().join("deploy/systemd/worker.env.example")).unwrap();
    let line = example.lines().find(|l| l.starts_with("OMCB_METRICS_LISTEN=")).unwrap();
    assert!(line.ends_with(":9478") && !line.contains("127.0.0.1"), "{line}");
}

/// base64 -d, with the system's tool (what cloud-init's `encoding: b64` does).
fn decode_b64(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// A fake `doctl` that records its calls and keeps droplets in a state file,
/// answering `list` like the real one (`--format` columns, `--no-header`).
fn fake_doctl(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = r#"#!/usr/bin/env bash
set -euo pipefail
echo "$*" >>"$FAKE_DOCTL_LOG"
state=$FAKE_DOCTL_STATE
touch "$state"
case "$1 $2 $3" in
  "compute droplet create")
    shift 3
    names=()
    while (($#)) && [[ $1 != --* ]]; do names+=("$1"); shift; done
    ud="" tag=""
    while (($#)); do
      case $1 in
        --user-data-file) ud=$2; shift 2 ;;
        --tag-name) tag=$2; shift 2 ;;
        --wait|--enable-private-networking) shift ;;
        *) shift 2 ;;
      esac
    done
    [[ -f "$ud" ]] || { echo "Error: open $ud: no such file" >&2; exit 1; }
    cp "$ud" "${FAKE_DOCTL_LOG%.*}.userdata"
    cp "$ud" "${FAKE_DOCTL_LOG%.*}.$tag.userdata"
    echo "ID        Name    Public IPv4    Private IPv4    Status"
    for n in "${names[@]}"; do
      i=$(( $(wc -l <"$state") + 10 ))
      echo "$n 10.10.0.$i active $tag" >>"$state"
      echo "3$i    $n    203.0.113.$i    10.10.0.$i    active"
    done ;;
  "compute droplet list")
    shift 3
    tag="" format="ID,Name"
    while (($#)); do
      case $1 in
        --tag-name) tag=$2; shift 2 ;;
        --format) format=$2; shift 2 ;;
        *) shift ;;
      esac
    done
    while read -r name ip status t; do
      [[ -z "$tag" || "$t" == "$tag" ]] || continue
      row=()
      IFS=, read -ra cols <<<"$format"
      for c in "${cols[@]}"; do
        case $c in Name) row+=("$name") ;; PrivateIPv4) row+=("$ip") ;; Status) row+=("$status") ;; *) row+=("?") ;; esac
      done
      echo "${row[*]}"
    done <"$state" ;;
  "compute droplet get")
    line=$(grep "^$4 " "$state") || { echo "Error: droplet $4 not found" >&2; exit 1; }
    ip=$(echo "$line" | cut -d' ' -f2)
    case $6 in
      PrivateIPv4) echo "$ip" ;;
      PublicIPv4) echo "203.0.113.${ip##*.}" ;;
      *) echo "fake doctl: unsupported format $6" >&2; exit 1 ;;
    esac ;;
  "compute firewall list")
    cat "$state.firewalls" 2>/dev/null || true ;;
  "compute firewall create")
    echo "$5" >>"$state.firewalls" ;;
  "compute droplet untag")
    sed -i "s/^$4 \(.*\) $6\$/$4 \1 -/" "$state" ;;
  "compute droplet delete")
    grep -q "^$4 " "$state" || { echo "Error: droplet $4 not found" >&2; exit 1; }
    sed -i "/^$4 /d" "$state" ;;
  *) echo "fake doctl: unsupported: $*" >&2; exit 1 ;;
esac
"#;
    let path = bin.join("doctl");
    std::fs::write(&path, script).unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    // A fake `ssh` that records its destination and runs the remote command
    // here, as if this machine were the load balancer.
    let ssh = r#"#!/usr/bin/env bash
set -euo pipefail
while [[ $1 == -o ]]; do shift 2; done
echo "ssh $1 $2" >>"$FAKE_DOCTL_LOG"
shift
# The load balancer's cloud-init is done at once.
[[ "$*" == "cloud-init status --wait"* ]] && exit 0
exec bash -c "$*"
"#;
    std::fs::write(bin.join("ssh"), ssh).unwrap();
    Command::new("chmod").arg("+x").arg(bin.join("ssh")).status().unwrap();
    (bin, dir.join("doctl.log"))
}

#[test]
fn provision_adds_and_removes_tagged_droplets_and_keeps_the_upstream_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, log) = fake_doctl(dir.path());
    let upstream = dir.path().join("upstream.conf");
    let targets = dir.path().join("prometheus/targets/workers.json");
    let reloads = dir.path().join("reloads");
    let provision = |args: &[&str]| {
        let out = Command::new(repo().join("scripts/provision"))
            .args(args)
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
            .env("FAKE_DOCTL_LOG", &log)
            .env("FAKE_DOCTL_STATE", dir.path().join("state"))
            .env("OMCB_REDIS_URL", "redis://10.0.0.5:6379")
            .env("OMCB_BINARY_URL", "https://example.invalid/omcb")
            .env("OMCB_BINARY_SHA256", BINARY_SHA256)
            .env("OMCB_UPSTREAM_FILE", &upstream)
            .env("OMCB_PROMETHEUS_TARGETS", &targets)
            .env("OMCB_NGINX_RELOAD", format!("echo reload >>{}", reloads.display()))
            .env("OMCB_STATE_FILE", dir.path().join("provision.env"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success(), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let calls = || std::fs::read_to_string(&log).unwrap_or_default();
    let servers = || {
        std::fs::read_to_string(&upstream)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("server "))
            .map(String::from)
            .collect::<Vec<_>>()
    };

    // --dry-run prints the commands and runs none.
    let (ok, out, _) = provision(&["--dry-run", "up", "2"]);
    assert!(ok);
    assert!(
        out.contains("doctl compute droplet create omcb-worker-")
            && out.contains("--tag-name omcb-worker"),
        "{out}"
    );
    assert!(calls().is_empty(), "dry run called doctl: {}", calls());
    assert!(!upstream.exists());
    assert!(!targets.exists());

    // Workers install only a binary with the checksum provision was given: a
    // real `up` without one is refused before anything is created.
    let refused = Command::new(repo().join("scripts/provision"))
        .args(["up", "2"])
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
        .env("FAKE_DOCTL_LOG", &log)
        .env("FAKE_DOCTL_STATE", dir.path().join("state"))
        .env("OMCB_REDIS_URL", "redis://10.0.0.5:6379")
        .env("OMCB_BINARY_URL", "https://example.invalid/omcb")
        .env_remove("OMCB_BINARY_SHA256")
        .env("OMCB_STATE_FILE", dir.path().join("provision.env"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("OMCB_BINARY_SHA256"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(calls().is_empty(), "a refused up called doctl: {}", calls());

    let (ok, _, err) = provision(&["up", "2"]);
    assert!(ok, "{err}");
    assert!(calls().contains("compute droplet create"), "{}", calls());
    assert_eq!(
        servers(),
        ["server 10.10.0.10:8080 max_fails=0;", "server 10.10.0.11:8080 max_fails=0;"]
    );
    assert_eq!(
        std::fs::read_to_string(&reloads).unwrap().lines().count(),
        1,
        "nginx reloaded once"
    );
    // Prometheus's file_sd targets: the same droplets, metrics port 9478.
    let scraped = || -> Vec<(String, String)> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&targets).unwrap()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| {
                assert_eq!(t["targets"].as_array().unwrap().len(), 1);
                (
                    t["targets"][0].as_str().unwrap().into(),
                    t["labels"]["worker"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let two = scraped();
    assert_eq!(
        two.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["10.10.0.10:9478", "10.10.0.11:9478"]
    );
    assert!(two.iter().all(|(_, w)| w.starts_with("omcb-worker-")), "{two:?}");

    let (ok, list, _) = provision(&["list"]);
    assert!(ok);
    assert_eq!(list.lines().count(), 2);
    let victim = list.lines().next().unwrap().split_whitespace().next().unwrap().to_string();

    let (ok, _, err) = provision(&["down", &victim]);
    assert!(ok, "{err}");
    assert_eq!(servers(), ["server 10.10.0.11:8080 max_fails=0;"], "it left the upstream");
    assert_eq!(scraped(), [two[1].clone()], "and the Prometheus targets");
    assert_eq!(two[0].1, victim, "the removed target was the deleted droplet");
    let log_text = calls();
    let untag = log_text.find(&format!("untag {victim}")).expect("untagged first");
    let delete = log_text.find(&format!("delete {victim}")).expect("then deleted");
    assert!(untag < delete, "out of the upstream before it is deleted");
    assert_eq!(std::fs::read_to_string(&reloads).unwrap().lines().count(), 2);

    // Guard rails: not ours, or the last one.
    let (ok, _, err) = provision(&["down", "some-database"]);
    assert!(!ok && err.contains("not an omcb-worker droplet"), "{err}");
    let last = provision(&["list"]).1.split_whitespace().next().unwrap().to_string();
    let (ok, _, err) = provision(&["down", &last]);
    assert!(!ok && err.contains("last worker"), "{err}");
}

/// `write_files` content of PATH in a cloud-config document, decoded.
fn written_file(doc: &yaml_rust2::Yaml, path: &str) -> String {
    let f = doc["write_files"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("user data writes {path}"));
    let content = f["content"].as_str().unwrap();
    if f["encoding"].as_str() == Some("b64") { decode_b64(content) } else { content.to_string() }
}

/// `up --redis --lb --workers 3` from zero: the dry run prints the firewalls,
/// each role's droplet and user data (valid cloud-config, under
/// DigitalOcean's 64 KiB) and calls nothing; the real run (against the fake
/// doctl) creates them in order (Redis and the load balancer before the
/// workers, which need their private addresses), the firewalls once, and
/// remembers the Redis URL for the next `up --workers`.
#[test]
fn provision_up_from_zero_creates_every_role_behind_its_firewall() {
    require("cloud-init");
    let dir = tempfile::tempdir().unwrap();
    let (bin, log) = fake_doctl(dir.path());
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(
        certs.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(
        certs.join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let provision = |args: &[&str], extra: &[(&str, &str)]| {
        let out = Command::new(repo().join("scripts/provision"))
            .args(args)
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
            .env("FAKE_DOCTL_LOG", &log)
            .env("FAKE_DOCTL_STATE", dir.path().join("state"))
            .env("OMCB_STATE_FILE", dir.path().join("provision.env"))
            .env("OMCB_UPSTREAM_FILE", dir.path().join("upstream.conf"))
            .env("OMCB_PROMETHEUS_TARGETS", dir.path().join("workers.json"))
            .env("OMCB_TLS_CERT_FILE", certs.join("cert.pem"))
            .env("OMCB_TLS_KEY_FILE", certs.join("key.pem"))
            .env("OMCB_REDIS_PASSWORD", "0123456789abcdef0123")
            .env("OMCB_BINARY_URL", "https://example.invalid/omcb")
            .env("OMCB_BINARY_SHA256", BINARY_SHA256)
            .env("OMCB_VPC_CIDR", "10.10.0.0/16")
            .env("OMCB_SSH_FROM", "198.51.100.7/32")
            .env("OMCB_NGINX_RELOAD", "echo reload >>\"$FAKE_DOCTL_LOG\"")
            .env_remove("OMCB_REDIS_URL")
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "provision {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let calls = || std::fs::read_to_string(&log).unwrap_or_default();

    let out = provision(
        &["--dry-run", "up", "--redis", "--lb", "--workers", "3"],
        &[("OMCB_REDIS_ADDR", "10.10.0.5"), ("OMCB_PROXY_ADDR", "10.10.0.2")],
    );
    assert!(calls().is_empty(), "a dry run calls nothing: {}", calls());
    // Firewalls: only the load balancer answers the internet.
    let fw = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("doctl compute firewall create --name {name} ")))
            .unwrap_or_else(|| panic!("no firewall {name}:\n{out}"))
            .replace('\\', "")
    };
    let (lb, worker, redis) = (fw("omcb-lb"), fw("omcb-worker"), fw("omcb-redis"));
    let inbound = |cmd: &str| {
        cmd.split("--inbound-rules ").nth(1).unwrap().split(" --").next().unwrap().to_string()
    };
    assert_eq!(
        inbound(&lb),
        "protocol:tcp,ports:80,address:0.0.0.0/0,address:::/0 protocol:tcp,ports:443,address:0.0.0.0/0,address:::/0 \
         protocol:tcp,ports:22,address:198.51.100.7/32"
    );
    assert_eq!(
        inbound(&worker),
        "protocol:tcp,ports:8080,tag:omcb-lb protocol:tcp,ports:9478,address:10.10.0.0/16 \
         protocol:tcp,ports:22,address:198.51.100.7/32"
    );
    assert_eq!(
        inbound(&redis),
        "protocol:tcp,ports:6379,tag:omcb-worker protocol:tcp,ports:22,address:198.51.100.7/32"
    );
    for cmd in [&lb, &worker, &redis] {
        assert!(cmd.contains("--tag-names omcb-"), "{cmd}");
    }
    // Droplets, in order, each role with its tag.
    let create = |tag: &str| {
        out.find(&format!("--tag-name omcb-{tag} ")).unwrap_or_else(|| panic!("no {tag} droplet"))
    };
    assert!(create("redis") < create("worker") && create("lb") < create("worker"));
    assert_eq!(out.matches("doctl compute droplet create omcb-worker-").count(), 1);
    assert_eq!(out.matches(" omcb-worker-").count(), 3, "three workers in one create");

    let data = dry_run_user_data(&out);
    assert_eq!(data.keys().collect::<Vec<_>>(), ["lb", "redis", "worker"]);
    for (role, text) in &data {
        assert!(text.starts_with("#cloud-config\n"), "{role}");
        assert!(
            text.len() < 64 * 1024,
            "{role}'s user data is {} bytes: over DigitalOcean's 64 KiB",
            text.len()
        );
        let f = dir.path().join(format!("{role}.yaml"));
        std::fs::write(&f, text).unwrap();
        let schema =
            Command::new("cloud-init").args(["schema", "--config-file"]).arg(&f).output().unwrap();
        assert!(schema.status.success(), "{role}: {}", String::from_utf8_lossy(&schema.stderr));
    }
    let doc = |role: &str| yaml_rust2::YamlLoader::load_from_str(&data[role]).unwrap().remove(0);
    let redis_conf = written_file(&doc("redis"), "/etc/redis/omcb.conf");
    for line in [
        "bind private-address-unknown",
        "requirepass 0123456789abcdef0123",
        "appendonly yes",
        "appendfsync everysec",
        "maxmemory-policy noeviction",
    ] {
        assert!(redis_conf.lines().any(|l| l.trim() == line), "redis: {line}\n{redis_conf}");
    }
    let env = written_file(&doc("worker"), "/etc/omcb/worker.env");
    assert!(env.contains("\nOMCB_REDIS=redis://:0123456789abcdef0123@10.10.0.5:6379\n"), "{env}");
    assert!(env.contains("\nOMCB_TRUSTED_PROXY=10.10.0.2\n"), "{env}");
    assert!(env.contains("\nOMCB_LISTEN=private-address-unknown:8080\n"), "{env}");
    let lb_doc = doc("lb");
    let nginx = written_file(&lb_doc, "/etc/omcb/nginx.conf");
    assert!(nginx.contains("listen 0.0.0.0:443 ssl reuseport;"), "{nginx}");
    assert!(nginx.contains("ssl_certificate /etc/omcb/tls/fullchain.pem;"));
    assert!(nginx.contains("listen 0.0.0.0:80 reuseport;"));
    assert!(nginx.contains("return 301 https://$host$request_uri;"));
    let directives: String =
        nginx.lines().filter(|l| !l.trim_start().starts_with("# ")).collect::<Vec<_>>().join("\n");
    assert!(
        !directives.contains("#tls:")
            && !directives.contains("#plain:")
            && !directives.contains('@'),
        "every marker decided, every placeholder filled"
    );
    assert_eq!(
        written_file(&lb_doc, "/etc/omcb/tls/fullchain.pem"),
        std::fs::read_to_string(certs.join("cert.pem")).unwrap()
    );
    assert_eq!(written_file(&lb_doc, "/etc/omcb/egress.env"), "OMCB_EGRESS_RATE=250mbit\n");
    assert_eq!(
        written_file(&lb_doc, "/usr/local/sbin/cap-egress"),
        std::fs::read_to_string(repo().join("deploy/tc/cap-egress")).unwrap()
    );
    let runcmd = format!("{:?}", lb_doc["runcmd"]);
    assert!(
        runcmd.contains(r#"String("enable"), String("--now"), String("omcb-egress-cap.service")"#),
        "the load balancer starts its cap: {runcmd}"
    );
    let unit = written_file(&lb_doc, "/etc/systemd/system/omcb-egress-cap.service");
    assert!(unit.contains("ExecStart=/usr/local/sbin/cap-egress set auto ${OMCB_EGRESS_RATE}"));

    // Certbot instead of the operator's files.
    let certbot = provision(
        &["--dry-run", "up", "--lb"],
        &[
            ("OMCB_TLS_CERT_FILE", ""),
            ("OMCB_TLS_KEY_FILE", ""),
            ("OMCB_DOMAIN", "board.example.org"),
            ("OMCB_ACME_EMAIL", "ops@example.org"),
        ],
    );
    let lb_text = &dry_run_user_data(&certbot)["lb"];
    assert!(
        lb_text.contains("certbot certonly --webroot -w /var/www/acme -d board.example.org"),
        "{lb_text}"
    );
    assert!(!lb_text.contains("/etc/omcb/tls/privkey.pem\n    permissions"), "no key files travel");

    // The real run against the fake doctl.
    provision(&["up", "--redis", "--lb", "--workers", "2"], &[]);
    let log_text = calls();
    assert_eq!(log_text.matches("compute firewall create").count(), 3, "{log_text}");
    let redis_at = log_text.find("--tag-name omcb-redis").unwrap();
    let lb_at = log_text.find("--tag-name omcb-lb").unwrap();
    let workers_at = log_text.find("--tag-name omcb-worker").unwrap();
    assert!(redis_at < workers_at && lb_at < workers_at, "{log_text}");
    let worker_data = std::fs::read_to_string(log.with_extension("omcb-worker.userdata")).unwrap();
    // The fake gives the first droplet (Redis) 10.10.0.10, the second (the LB) .11.
    assert!(
        worker_data.contains("OMCB_REDIS=redis://:0123456789abcdef0123@10.10.0.10:6379"),
        "{worker_data}"
    );
    assert!(worker_data.contains("OMCB_TRUSTED_PROXY=10.10.0.11"), "{worker_data}");
    let upstream = std::fs::read_to_string(dir.path().join("upstream.conf")).unwrap();
    assert_eq!(upstream.lines().filter(|l| l.starts_with("server ")).count(), 2, "{upstream}");
    // Written on the load balancer (its public address, over SSH), then nginx
    // reloaded there.
    let log_text = calls();
    let ssh = log_text.find("ssh root@203.0.113.11").expect("the upstream went over SSH");
    assert!(log_text[ssh..].contains("reload"), "{log_text}");
    // Without OMCB_SSH_FROM the load balancer could not be reached: refused.
    let out = Command::new(repo().join("scripts/provision"))
        .args(["--dry-run", "up", "--lb"])
        .env("OMCB_STATE_FILE", dir.path().join("none.env"))
        .env_remove("OMCB_SSH_FROM")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set OMCB_SSH_FROM"));
    // A later `up --workers 1` needs no Redis URL: the state file has it;
    // the firewalls exist and are not created again.
    provision(&["up", "--workers", "1"], &[]);
    assert_eq!(calls().matches("compute firewall create").count(), 3);
    let upstream = std::fs::read_to_string(dir.path().join("upstream.conf")).unwrap();
    assert_eq!(upstream.lines().filter(|l| l.starts_with("server ")).count(), 3, "{upstream}");
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct NetPair {
    a: String,
    b: String,
}

impl NetPair {
    fn new() -> Option<NetPair> {
        let id = std::process::id() % 100_000;
        let pair = NetPair { a: format!("omcb-a{id}"), b: format!("omcb-b{id}") };
        let sh = |c: &str| Command::new("sh").args(["-c", c]).status().is_ok_and(|s| s.success());
        let ok = sh(&format!("ip netns add {}", pair.a))
            && sh(&format!("ip netns add {}", pair.b))
            && sh(&format!(
                "ip link add va{id} netns {} type veth peer name vb{id} netns {}",
                pair.a, pair.b
            ))
            && sh(&format!(
                "ip -n {} addr add 10.77.0.1/24 dev va{id} && ip -n {} link set va{id} up && ip -n {} link set lo up",
                pair.a, pair.a, pair.a
            ))
            && sh(&format!(
                "ip -n {} addr add 10.77.0.2/24 dev vb{id} && ip -n {} link set vb{id} up && ip -n {} link set lo up",
                pair.b, pair.b, pair.b
            ));
        ok.then_some(pair)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

#[test]
fn egress_cap_holds_throughput_within_ten_percent() {
    require("iperf3");
    require("tc");
    let net = NetPair::new()
        .expect("cannot create network namespaces (the test needs root and CAP_NET_ADMIN)");
    let id = std::process::id() % 100_000;
    let cap = repo().join("deploy/tc/cap-egress");
    let in_a = |args: &[&str]| {
        Command::new("ip").args(["netns", "exec", &net.a]).args(args).output().unwrap()
    };
    let out = in_a(&[cap.to_str().unwrap(), "set", &format!("va{id}"), "20mbit"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let show = in_a(&[cap.to_str().unwrap(), "show", &format!("va{id}")]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("htb"));

    let mut server = Command::new("ip")
        .args(["netns", "exec", &net.b, "iperf3", "-s", "-1", "-B", "10.77.0.2"])
        .spawn()
        .unwrap();
    // Poll until the server listens, then connect with a short timeout (a SYN
    // sent before the veth carrier is up would otherwise wait minutes).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ss = Command::new("ip")
            .args(["netns", "exec", &net.b, "ss", "-Hltn", "sport = :5201"])
            .output()
            .unwrap();
        if !ss.stdout.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "iperf3 server never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let report = loop {
        let out = in_a(&[
            "iperf3",
            "-c",
            "10.77.0.2",
            "--connect-timeout",
            "1000",
            "-t",
            "4",
            "-O",
            "1",
            "-J",
        ]);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "iperf3 never connected");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&report).unwrap();
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().unwrap();
    eprintln!("measured {:.2} Mbit/s through a 20 Mbit/s cap", bps / 1e6);
    assert!(
        (bps - 20e6).abs() <= 2e6,
        "throughput {:.2} Mbit/s is not within 10% of 20 Mbit/s",
        bps / 1e6
    );

    let out = in_a(&[cap.to_str().unwrap(), "clear", &format!("va{id}")]);
    assert!(out.status.success());
    let show = in_a(&["tc", "qdisc", "show", "dev", &format!("va{id}")]);
    assert!(!String::from_utf8_lossy(&show.stdout).contains("htb"), "cleared");
}

/// The cap goes where billed bytes leave: `cap-egress set auto RATE` picks the
/// interface of the route to the internet, whatever the interfaces are called.
/// A namespace like a droplet with the names the wrong way round: `eth0` is
/// the private (VPC) side, `eth1` carries the default route; only `eth1` gets
/// the HTB root. `OMCB_EGRESS_PROBE` moves the probe onto the private network
/// and the pick follows; an explicit name still wins.
#[test]
fn egress_cap_goes_on_the_interface_that_faces_the_internet() {
    require("tc");
    let id = std::process::id() % 100_000;
    let ns = format!("omcb-cap{id}");
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let sh = |c: &str| {
        let out = Command::new("sh").args(["-c", c]).output().unwrap();
        assert!(out.status.success(), "{c}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    sh(&format!("ip netns add {ns}"));
    let _gone = Gone(ns.clone());
    // Two veth pairs inside the namespace: names and routes are all the pick looks at.
    sh(&format!(
        "ip -n {ns} link add eth0 type veth peer name peer0 && ip -n {ns} link add eth1 type veth peer name peer1 && \
         ip -n {ns} link set peer0 up && ip -n {ns} link set peer1 up && \
         ip -n {ns} addr add 10.10.0.7/16 dev eth0 && ip -n {ns} addr add 203.0.113.7/24 dev eth1 && \
         ip -n {ns} link set eth0 up && ip -n {ns} link set eth1 up && \
         ip -n {ns} route add default via 203.0.113.1 dev eth1"
    ));
    let cap = repo().join("deploy/tc/cap-egress");
    let cap = cap.to_str().unwrap();
    let htb_on =
        |dev: &str| sh(&format!("ip netns exec {ns} tc qdisc show dev {dev}")).contains("htb");

    assert_eq!(sh(&format!("ip netns exec {ns} {cap} iface")).trim(), "eth1");
    let out = sh(&format!("ip netns exec {ns} {cap} set auto 20mbit"));
    assert!(out.contains("eth1 egress capped at 20mbit"), "{out}");
    assert!(htb_on("eth1") && !htb_on("eth0"), "the cap is on the public interface only");
    sh(&format!("ip netns exec {ns} {cap} clear"));
    assert!(!htb_on("eth1"), "cleared");

    // The probe address is overridable (here: one on the private side).
    let picked = sh(&format!("ip netns exec {ns} env OMCB_EGRESS_PROBE=10.10.0.9 {cap} iface"));
    assert_eq!(picked.trim(), "eth0");
    // An explicit interface overrides the pick.
    sh(&format!("ip netns exec {ns} {cap} set eth0 20mbit"));
    assert!(htb_on("eth0") && !htb_on("eth1"));

    // No route to the internet: a clear refusal, nothing capped.
    sh(&format!("ip -n {ns} route del default && ip netns exec {ns} {cap} clear eth0"));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, cap, "set", "auto", "20mbit"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no interface faces the internet"));
    assert!(!htb_on("eth0") && !htb_on("eth1"));
}

fn yaml_file(path: &str) -> yaml_rust2::Yaml {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    yaml_rust2::YamlLoader::load_from_str(&text).unwrap().remove(0)
}

/// `(row, panel title, expr)` of every query of the Grafana dashboard.
fn dashboard_queries() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/omcb.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut row = String::new();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_string();
        if panel["type"] == "row" {
            row = title;
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title} uses the variable");
        for target in panel["targets"].as_array().unwrap() {
            out.push((row.clone(), title.clone(), target["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// The issue's nine alerts and the change archive's three, each with a `for`, a severity, a runbook section
/// in docs/OPERATIONS.md (its anchor is the heading's), and promtool unit
/// tests in which it fires and in which it stays silent. Every recording rule
/// is read by an alert, a dashboard panel or another rule.
#[test]
fn alerts_have_a_for_a_severity_a_runbook_and_a_promtool_test() {
    let rules = yaml_file("deploy/prometheus/rules/omcb.rules.yml");
    let ops = std::fs::read_to_string(repo().join("docs/OPERATIONS.md")).unwrap();
    let mut alerts = Vec::new();
    let mut records = Vec::new();
    let mut exprs = String::new();
    for group in rules["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            exprs.push_str(rule["expr"].as_str().unwrap());
            exprs.push('\n');
            if let Some(name) = rule["record"].as_str() {
                assert!(name.starts_with("omcb:"), "{name}");
                records.push(name.to_string());
                continue;
            }
            let name = rule["alert"].as_str().unwrap().to_string();
            assert!(rule["for"].as_str().is_some(), "{name} has a for");
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(["page", "warning"].contains(&severity), "{name}: severity {severity:?}");
            let runbook = rule["annotations"]["runbook_url"].as_str().unwrap();
            assert_eq!(runbook, format!("docs/OPERATIONS.md#{}", name.to_lowercase()));
            assert!(
                ops.contains(&format!("\n#### {name}\n")),
                "OPERATIONS.md has a section {name}"
            );
            assert!(rule["annotations"]["summary"].as_str().is_some(), "{name} has a summary");
            alerts.push(name);
        }
    }
    let mut sorted = alerts.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "OmcbArchiveGap",
            "OmcbArchiveLagging",
            "OmcbArchiveStopped",
            "OmcbEgressNearCap",
            "OmcbFeedLagging",
            "OmcbFileDescriptorsNearLimit",
            "OmcbFreezingWithoutSweep",
            "OmcbReconnectStorm",
            "OmcbRedisUnavailable",
            "OmcbSlowConsumerStorm",
            "OmcbStoreLatencyHigh",
            "OmcbWorkerDown",
        ]
    );

    let (mut fires, mut silent) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(repo().join("deploy/prometheus/tests")).unwrap() {
        let tests =
            yaml_file(entry.unwrap().path().strip_prefix(repo()).unwrap().to_str().unwrap());
        for test in tests["tests"].as_vec().unwrap() {
            for case in test["alert_rule_test"].as_vec().into_iter().flatten() {
                let name = case["alertname"].as_str().unwrap().to_string();
                if case["exp_alerts"].as_vec().is_some_and(|a| !a.is_empty()) {
                    fires.push(name);
                } else {
                    silent.push(name);
                }
            }
        }
    }
    for name in &alerts {
        assert!(fires.contains(name), "no promtool test where {name} fires");
        assert!(silent.contains(name), "no promtool test where {name} stays silent");
    }

    let panels: String = dashboard_queries().into_iter().map(|(_, _, e)| e + "\n").collect();
    for record in &records {
        let read_by_rule = exprs.matches(record.as_str()).count() > 0;
        assert!(
            read_by_rule || panels.contains(record.as_str()),
            "recording rule {record} is read by no alert, panel or rule"
        );
    }
}

/// docs/OPERATIONS.md lists every dashboard query, in the dashboard's order,
/// and nothing else: the two cannot drift (the live test evaluates the same
/// queries). On a mismatch the message holds the table to paste.
#[test]
fn the_operations_panel_table_is_the_dashboard_s_queries() {
    let ops = std::fs::read_to_string(repo().join("docs/OPERATIONS.md")).unwrap();
    let start = ops.find("### Dashboard panels\n").expect("OPERATIONS.md has the panel table");
    let table: Vec<&str> = ops[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    let mut expected =
        vec!["| row | panel | query |".to_string(), "| --- | --- | --- |".to_string()];
    for (row, panel, expr) in dashboard_queries() {
        assert!(!expr.contains('|') && !expr.contains('`'), "{expr} fits a table cell");
        expected.push(format!("| {row} | {panel} | `{expr}` |"));
    }
    let differs = table.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(
        table == expected,
        "OPERATIONS.md's panel table differs from deploy/grafana/omcb.json (first at line {:?} of {} vs {}); it should be:\n{}\n",
        differs,
        table.len(),
        expected.len(),
        expected.join("\n")
    );
}
