//! Fleet mode over `rediss://` with an ACL user and password, against a real
//! redis-server that listens for TLS only (its certificate from a CA made for
//! the test), and the configuration errors a worker refuses at start: a wrong
//! password, a CA that did not sign the server's certificate, a bad URL. No
//! message or log line shows the password.

mod common;

use std::process::Command;

use common::*;
use omcb_testkit::tls::TestCa;
use omcb_testkit::{RedisOptions, RedisServer};

const OPEN: &str = "--board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms 20";
const PASSWORD: &str = "tls-s3cret-pw";

fn tls_redis() -> RedisServer {
    let user = Some(("omcb".to_string(), PASSWORD.to_string()));
    RedisServer::start_with(RedisOptions { tls: true, user, ..Default::default() }).unwrap()
}

fn ca_flag(redis: &RedisServer) -> String {
    redis.ca_file().unwrap().display().to_string()
}

/// `omcb serve` with `args` must exit (within [`WAIT`]) without listening,
/// with a failure status; its stderr.
fn refused(args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omcb"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--board-size", "1000"]).args(args);
    let out = refuses_to_start(cmd);
    let status = out.status;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!status.success(), "omcb serve {args:?} exited with success:\n{stderr}");
    assert!(!stdout.contains("listening on"), "it listened before refusing:\n{stdout}");
    assert!(!stderr.contains(PASSWORD), "the password is in the output:\n{stderr}");
    stderr
}

/// Two workers on one TLS Redis with a password: a toggle on one reaches a
/// client of the other, both `/api/state`s agree with each other and with
/// Redis, and the password shows nowhere (logs, `/api/stats`, `/metrics`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_board_over_rediss_with_a_password() {
    let redis = tls_redis();
    let url = redis.url();
    assert!(url.starts_with("rediss://omcb:") && url.contains(PASSWORD));
    let ca = ca_flag(&redis);
    let args = format!("--redis {url} --redis-ca-file {ca} {OPEN}");
    let a = Worker::start(&flags(&args));
    let b = Worker::start(&flags(&args));
    let mut on_a = connect(&a.ws_url("")).await;
    let mut on_b = connect(&b.ws_url("")).await;
    on_a.until_seq(0).await;
    on_b.until_seq(0).await;

    let r = on_a.set(7, true).await;
    assert!(r.accepted && r.seq > 0, "{r:?}");
    on_b.until_seq(r.seq).await;
    assert!(on_b.board.as_ref().unwrap().is_checked(7), "the other worker's client sees it");
    let r2 = on_b.set(8, true).await;
    assert!(r2.accepted && r2.seq > r.seq, "{r2:?}");
    on_a.until_seq(r2.seq).await;
    assert!(on_a.board.as_ref().unwrap().is_checked(8));

    a.stats_at(r2.seq).await;
    b.stats_at(r2.seq).await;
    let (sa, _) = api_state(a.addr).await;
    let (sb, _) = api_state(b.addr).await;
    assert_eq!((sa.epoch, sa.seq), (sb.epoch, sb.seq));
    assert_eq!(sa.checked, sb.checked, "both workers serve the same board");
    let stored = redis.command(&["GET", "{main}:bits"]).unwrap();
    let bits = omcb_proto::bits::from_bytes(stored.as_bytes().unwrap(), 1000).unwrap();
    assert!(bits[7] && bits[8], "the board is in the TLS Redis");

    for w in [&a, &b] {
        let stats = String::from_utf8(http_get(w.addr, "/api/stats", &[]).await.body).unwrap();
        assert!(!stats.contains(PASSWORD), "/api/stats shows the password: {stats}");
        assert!(!w.metrics_text().await.contains(PASSWORD), "/metrics shows the password");
        let log = w.log();
        assert!(log.contains("rediss://omcb:***@127.0.0.1"), "the log names the Redis:\n{log}");
        assert!(!log.contains(PASSWORD), "the log shows the password:\n{log}");
    }
}

/// `omcb admin --redis rediss://...` reads the board a worker made over TLS;
/// with a wrong password it fails with the reason, the password hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reads_the_board_over_rediss() {
    let redis = tls_redis();
    let ca = ca_flag(&redis);
    let _w = Worker::start(&flags(&format!("--redis {} --redis-ca-file {ca} {OPEN}", redis.url())));
    let admin = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_omcb"))
            .args(["admin", "--redis", url, "--redis-ca-file", &ca, "settings"])
            .output()
            .unwrap()
    };
    let out = admin(&redis.url());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"size\":1000"), "{stdout}");
    let out = admin(&redis.url().replace(PASSWORD, "not-the-pw"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refused the login") && !stderr.contains("not-the-pw"), "{stderr}");
}

/// A wrong password is refused at start, naming the cause and not the password.
#[test]
fn a_wrong_password_is_refused_at_start() {
    let redis = tls_redis();
    let wrong = redis.url().replace(PASSWORD, "not-the-pw");
    let err = refused(&["--redis", &wrong, "--redis-ca-file", &ca_flag(&redis)]);
    assert!(err.contains("refused the login"), "{err}");
    assert!(err.contains("rediss://omcb:***@127.0.0.1"), "it names the Redis: {err}");
    assert!(!err.contains("not-the-pw"), "{err}");
}

/// A server certificate that does not chain to the CA the worker trusts (the
/// CA file, or the system's store without one) is refused at start as a TLS
/// failure, not retried in silence.
#[test]
fn a_certificate_from_another_ca_is_refused_at_start_as_tls() {
    let redis = tls_redis();
    let other = TestCa::new().unwrap();
    let other = other.cert().display().to_string();
    let err = refused(&["--redis", &redis.url(), "--redis-ca-file", &other]);
    assert!(err.contains("TLS handshake with Redis at rediss://omcb:***@127.0.0.1"), "{err}");
    assert!(err.contains("UnknownIssuer"), "it says why: {err}");
    assert!(err.contains(&other), "it names the CA file: {err}");
    // Without a CA file the system's store does not know the test CA either.
    let err = refused(&["--redis", &redis.url()]);
    assert!(err.contains("TLS handshake") && err.contains("--redis-ca-file"), "{err}");
    // `rediss://` to a plain port: the server never answers the TLS hello.
    let plain = RedisServer::start().unwrap();
    let url = plain.url().replace("redis://", &format!("rediss://omcb:{PASSWORD}@"));
    let err = refused(&["--redis", &url, "--redis-ca-file", &ca_flag(&redis)]);
    assert!(err.contains("over TLS timed out"), "{err}");
}

/// A bad URL, an unreadable CA file, and a CA file for a plain URL are
/// refused before any connection, the password hidden.
#[test]
fn bad_urls_and_ca_files_are_refused_at_start() {
    let err = refused(&["--redis", &format!("rediss://omcb:{PASSWORD}@127.0.0.1:notaport")]);
    assert!(err.contains("bad Redis URL rediss://omcb:***@127.0.0.1:notaport"), "{err}");
    let err = refused(&[
        "--redis",
        &format!("rediss://omcb:{PASSWORD}@127.0.0.1:1"),
        "--redis-ca-file",
        "/nonexistent/ca.crt",
    ]);
    assert!(err.contains("cannot read the Redis CA file /nonexistent/ca.crt"), "{err}");
    let ca = TestCa::new().unwrap();
    let err = refused(&[
        "--redis",
        &format!("redis://omcb:{PASSWORD}@127.0.0.1:1"),
        "--redis-ca-file",
        &ca.cert().display().to_string(),
    ]);
    assert!(err.contains("is not TLS: use rediss://"), "{err}");
}

/// `redis://USER:PASSWORD@` (an ACL user, no TLS) works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_over_plain_redis() {
    let user = Some(("omcb".to_string(), PASSWORD.to_string()));
    let redis = RedisServer::start_with(RedisOptions { user, ..Default::default() }).unwrap();
    assert!(redis.url().starts_with("redis://omcb:"));
    let w = Worker::start(&flags(&format!("--redis {} {OPEN}", redis.url())));
    let mut c = connect(&w.ws_url("")).await;
    let r = c.set(3, true).await;
    assert!(r.accepted && r.seq > 0, "{r:?}");
    assert_eq!(redis.command(&["GET", "{main}:seq"]).unwrap().as_str(), Some("1"));
    assert!(w.log().contains("redis://omcb:***@127.0.0.1"));
    assert!(!w.log().contains(PASSWORD));
}
