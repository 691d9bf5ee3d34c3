//! The change archive's inputs and the archiver (issue 14): every change's
//! origin (a keyed hash of the client's address), the origin key's checks
//! at start, and the archiver in an embedded worker and a fleet.

mod common;

use common::*;
use omcb_testkit::{RedisServer, Resp};
use omcb_worker::origin::OriginKey;

const OPEN: &str = "--board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms 20";
const KEY: &str = "00112233445566778899aabbccddeeff";

fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("origin.key");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    path
}

/// A fleet worker writes each change's origin into the change stream as the
/// `a` field: the keyed hash of the client's address, never the address.
#[tokio::test]
async fn a_fleet_worker_writes_the_keyed_origin_of_each_change() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let args = format!("--redis {} {OPEN} --origin-key-file {}", redis.url(), key.display());
    let w = Worker::start(&flags(&args));
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    assert!(c.set(7, true).await.accepted);
    let entry = redis.command(&["XRANGE", "{main}:log", "-", "+"]).unwrap();
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16).unwrap();
    }
    let want = OriginKey::from_bytes(bytes).origin("127.0.0.1".parse().unwrap());
    let Resp::Array(Some(entries)) = &entry else { panic!("{entry:?}") };
    let Resp::Array(Some(entry)) = &entries[0] else { panic!("{entry:?}") };
    let Resp::Array(Some(fields)) = &entry[1] else { panic!("{entry:?}") };
    let fields: Vec<&str> = fields.iter().map(|f| f.as_str().unwrap()).collect();
    let a = fields.chunks(2).find(|kv| kv[0] == "a").map(|kv| kv[1]);
    assert_eq!(a, Some(format!("{want:016x}").as_str()), "{fields:?}");
    assert!(!fields.iter().any(|f| f.contains("127.0.0.1")), "no address: {fields:?}");
}

/// A key file the worker cannot use is refused at start, with the reason;
/// so is an archiving fleet worker without a key (its origins would not
/// match its peers').
#[test]
fn an_unusable_origin_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, "0011").unwrap();
    let missing = dir.path().join("missing.key");
    let cases: [(Vec<String>, &str); 3] = [
        (vec!["--origin-key-file".into(), short.display().to_string()], "32 hex digits"),
        (vec!["--origin-key-file".into(), missing.display().to_string()], "cannot read"),
        (
            vec![
                "--redis".into(),
                "redis://127.0.0.1:1".into(),
                "--archive-dir".into(),
                dir.path().join("archive").display().to_string(),
            ],
            "--origin-key-file",
        ),
    ];
    for (args, why) in cases {
        let data = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_omcb"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(data.path()).args(&args);
        let out = refuses_to_start(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}
