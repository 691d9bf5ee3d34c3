//! The kit's real redis-server: starts, answers, restarts with and without
//! its data, and leaves no process behind.

use omcb_testkit::{RedisOptions, RedisServer, Resp};

fn get(r: &RedisServer, key: &str) -> Resp {
    r.command(&["GET", key]).unwrap()
}

#[test]
fn start_command_restart_and_cleanup() {
    let mut r = RedisServer::start_with(RedisOptions { aof: true, ..Default::default() }).unwrap();
    assert_eq!(r.command(&["PING"]).unwrap(), Resp::Simple("PONG".into()));
    assert_eq!(r.command(&["SET", "k", "v"]).unwrap(), Resp::Simple("OK".into()));
    assert!(matches!(r.command(&["NOSUCHCOMMAND"]).unwrap(), Resp::Error(_)));
    let port = r.port();
    r.restart().unwrap();
    assert_eq!(r.port(), port, "same port after a restart");
    assert_eq!(get(&r, "k").as_str(), Some("v"), "AOF keeps data across a restart");
    r.restart_empty().unwrap();
    assert_eq!(get(&r, "k"), Resp::Bulk(None), "an empty restart loses it");
    r.kill().unwrap();
    assert!(r.command(&["PING"]).is_err(), "down after kill");
    r.start_again().unwrap();
    assert_eq!(r.command(&["PING"]).unwrap(), Resp::Simple("PONG".into()));
    let log = r.log();
    assert!(log.contains("Ready to accept connections"), "log kept: {log}");
    drop(r);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens after drop"
    );
}

#[test]
fn servers_run_side_by_side() {
    let a = RedisServer::start().unwrap();
    let b = RedisServer::start().unwrap();
    assert_ne!(a.port(), b.port());
    a.command(&["SET", "x", "1"]).unwrap();
    assert_eq!(get(&b, "x"), Resp::Bulk(None));
}

/// The TLS variant speaks TLS only, with its own CA, and lets in only its ACL
/// user: what `rediss://user:pass@` tests run against.
#[test]
fn tls_with_an_acl_user_answers_over_tls_only_and_after_auth_only() {
    let user = Some(("omcb".to_string(), "s3cret".to_string()));
    let r =
        RedisServer::start_with(RedisOptions { tls: true, user, ..Default::default() }).unwrap();
    assert_eq!(r.url(), format!("rediss://omcb:s3cret@127.0.0.1:{}", r.port()));
    let ca = r.ca_file().expect("a TLS server has a CA");
    assert!(std::fs::read_to_string(ca).unwrap().contains("BEGIN CERTIFICATE"));
    assert_eq!(r.command(&["PING"]).unwrap(), Resp::Simple("PONG".into()));
    assert_eq!(r.command(&["ACL", "WHOAMI"]).unwrap().as_str(), Some("omcb"));
    // Plain RESP on the TLS port gets no answer (the server waits for a TLS
    // hello, then drops the connection).
    use std::io::{Read, Write};
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", r.port())).unwrap();
    plain.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    plain.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut buf = [0; 64];
    let n = plain.read(&mut buf).unwrap_or(0);
    assert!(!buf[..n].starts_with(b"+PONG"), "a TLS-only server answered plain RESP");
}
