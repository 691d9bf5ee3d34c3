//! The kit's real redis-server: starts, answers, restarts with and without
//! its data, and leaves no process behind.

use omcb_testkit::{RedisOptions, RedisServer, Resp};

fn get(r: &RedisServer, key: &str) -> Resp {
    r.command(&["GET", key]).unwrap()
}

#[test]
fn start_command_restart_and_cleanup() {
    let mut r = RedisServer::start_with(RedisOptions { aof: true }).unwrap();
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
