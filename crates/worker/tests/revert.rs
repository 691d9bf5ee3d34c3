//! Audit and revert (issue 14 part 2): `omcb admin audit` lists what one
//! client address did, from the change archive; `omcb admin revert` undoes
//! it except where someone else changed a box since, through the store, so
//! that every connected client converges to the reverted board. The real
//! binary, real clients from their own loopback addresses (127.0.0.2 and
//! 127.0.0.3 as the sockets' source addresses, which the worker takes as the
//! clients' addresses), a real redis-server for the fleet.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use omcb_archive::{Op, Record, Writer};
use omcb_testkit::RedisServer;
use omcb_worker::origin::OriginKey;

const OPEN: &str = "--board-size 1000 --toggle-rate 1000000 --toggle-burst 1000000 --batch-ms 20";
const KEY: &str = "00112233445566778899aabbccddeeff";

type Tcp = tokio::net::TcpStream;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("origin.key");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    path
}

fn origin_of(address: &str) -> u64 {
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16).unwrap();
    }
    OriginKey::from_bytes(key).origin(ip(address))
}

/// Runs `omcb admin ARGS`: its stdout when it succeeds, its stderr as the
/// error when it fails.
fn admin(args: &[String]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_omcb")).arg("admin").args(args).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// [`admin`] with `--json`, parsed.
fn admin_json(args: &[String]) -> Result<serde_json::Value, String> {
    let mut args = args.to_vec();
    args.push("--json".into());
    admin(&args).map(|out| serde_json::from_str(&out).expect("--json prints JSON"))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// Sets a box and checks that it changed; the change's seq.
async fn change(c: &mut Client<Tcp>, index: u32, checked: bool) -> u64 {
    let r = c.set(index, checked).await;
    assert!(r.accepted && r.seq > 0, "box {index} to {checked}: {r:?}");
    r.seq
}

/// What the drawing did.
struct Drawn {
    /// `--since` for the revert: after the board's prior state, before A.
    since: String,
    /// A's (127.0.0.2) changes in order: (seq, box, op).
    a_changes: Vec<(u64, u32, &'static str)>,
    /// The last seq of the drawing.
    last: u64,
    clients: Vec<Client<Tcp>>,
}

/// The board before: 0..50 checked by 127.0.0.4. Then 127.0.0.2 (A)
/// unchecks 20..50 and checks 50..120, checks and unchecks 500; then
/// 127.0.0.3 (B) unchecks 100..120 and checks 120..140; then A unchecks 135.
/// Clients A and B on the first worker and the last, observers on each.
async fn draw(addrs: &[SocketAddr]) -> Drawn {
    let (first, last) = (addrs[0], addrs[addrs.len() - 1]);
    let mut c = connect_from(ip("127.0.0.4"), first, "/ws").await;
    let mut a = connect_from(ip("127.0.0.2"), first, "/ws").await;
    let mut b = connect_from(ip("127.0.0.3"), last, "/ws").await;
    let mut clients = Vec::new();
    for &addr in addrs {
        clients.push(connect_from(ip("127.0.0.1"), addr, "/ws").await);
    }
    let mut seq = 0;
    for i in 0..50 {
        seq = change(&mut c, i, true).await;
    }
    // The store's commit times and this clock are the same machine's: C's
    // last change is at or before now, A's first after.
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    a.until_seq(seq).await;
    let mut a_changes = Vec::new();
    for i in 20..120 {
        let v = i >= 50;
        a_changes.push((change(&mut a, i, v).await, i, if v { "check" } else { "uncheck" }));
    }
    a_changes.push((change(&mut a, 500, true).await, 500, "check"));
    seq = change(&mut a, 500, false).await;
    a_changes.push((seq, 500, "uncheck"));
    b.until_seq(seq).await;
    for i in 100..140 {
        seq = change(&mut b, i, i >= 120).await;
    }
    a.until_seq(seq).await;
    seq = change(&mut a, 135, false).await;
    a_changes.push((seq, 135, "uncheck"));
    clients.extend([a, b, c]);
    Drawn { since, a_changes, last: seq, clients }
}

/// The board the revert of A must leave: 0..50 and 120..140 checked (A's
/// 20..100 restored, B's 100..120 kept, 135 back to B's check).
fn reverted() -> Vec<u32> {
    (0..50).chain(120..140).collect()
}

fn checked_of(board: &omcb_proto::Board) -> Vec<u32> {
    (0..board.size).filter(|&i| board.is_checked(i)).collect()
}

/// Dry run (nothing changes), revert, then every client and every worker's
/// `/api/state` shows the reverted board.
/// `target` goes before `revert`, `extra` after it; `who` names A (its
/// address or its origin); `archived` is how many of the board's changes
/// the plan must find in the archive (the rest come from the store's log).
async fn dry_run_then_revert(
    addrs: &[SocketAddr],
    drawn: &mut Drawn,
    target: &[String],
    extra: &[String],
    who: &str,
    archived: u64,
) {
    let mut args = target.to_vec();
    args.extend(strings(&["revert", "--origin", who, "--since", &drawn.since]));
    args.extend(extra.iter().cloned());
    let mut dry = args.clone();
    dry.push("--dry-run".into());
    let plan = admin_json(&dry).unwrap();
    let indexes = |k: &str| -> Vec<u64> {
        plan[k].as_array().unwrap().iter().map(|r| r["index"].as_u64().unwrap()).collect()
    };
    let want: Vec<u64> = (20..100).chain([135]).collect();
    assert_eq!(indexes("restore"), want, "{plan}");
    assert_eq!(indexes("kept"), (100..120).collect::<Vec<u64>>(), "{plan}");
    assert!(
        plan["kept"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["by"] == format!("{:016x}", origin_of("127.0.0.3")))
    );
    assert_eq!(plan["unchanged"], serde_json::json!([500]), "{plan}");
    assert_eq!(plan["frozen"], serde_json::json!([]), "{plan}");
    assert_eq!(plan["applied"], serde_json::json!([]), "a dry run applies nothing");
    assert_eq!(plan["seq"].as_u64(), Some(drawn.last));
    assert_eq!(plan["archived_to_seq"].as_u64(), Some(archived), "{plan}");
    assert_eq!(plan["from_log"].as_u64(), Some(drawn.last - archived), "{plan}");
    // The text form says the same for people.
    let text = admin(&dry).unwrap();
    assert!(text.contains("summary: 81 boxes to restore, 20 kept"), "{text}");
    assert!(text.contains("dry run: nothing was changed"), "{text}");
    for &addr in addrs {
        let (state, _) = api_state(addr).await;
        assert_eq!(state.seq, drawn.last, "the dry run changed nothing");
    }

    let done = admin_json(&args).unwrap();
    let applied = done["applied"].as_array().unwrap();
    assert_eq!(applied.len(), 81, "{done}");
    assert_eq!(done["refused"], serde_json::json!([]));
    let top = applied.iter().map(|a| a["seq"].as_u64().unwrap()).max().unwrap();
    assert_eq!(top, drawn.last + 81, "81 ordinary changes, one seq each");
    for c in &mut drawn.clients {
        c.until_seq(top).await;
        assert_eq!(checked_of(c.board.as_ref().unwrap()), reverted());
    }
    for &addr in addrs {
        let (state, _) = poll("the worker's replica to take the revert", || async {
            let (s, r) = api_state(addr).await;
            (s.seq >= top).then_some((s, r))
        })
        .await;
        let board = omcb_proto::Board::from_snapshot(&inflate_snapshot(&state)).unwrap();
        assert_eq!(checked_of(&board), reverted());
    }

    // Again: everything A changed is now the operator's latest change, so
    // nothing is restored twice.
    let again = admin_json(&args).unwrap();
    assert_eq!(again["applied"], serde_json::json!([]), "{again}");
    assert!(
        again["kept"].as_array().unwrap().iter().any(|k| k["by"] == "ffffffffffffffff"),
        "the operator's own changes count as someone else's: {again}"
    );
}

/// The embedded board, through the worker's private listener
/// (`POST /admin/revert`): two addresses draw over the same region;
/// reverting 127.0.0.2 restores its boxes except those 127.0.0.3 touched
/// later; every client converges to the reverted board. The dry run
/// changes nothing; a second revert restores nothing. The plan reads the
/// window from the archive the worker wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_restores_one_address_boxes_on_the_embedded_board() {
    let dir = tempfile::tempdir().unwrap();
    let (w, key, archive) = archiving_worker(dir.path(), "");
    let mut drawn = draw(&[w.addr]).await;
    until_archived(&archive, &key, &drawn).await;
    let target = vec!["--worker".to_owned(), format!("http://{}", w.metrics)];
    let archived = drawn.last;
    dry_run_then_revert(&[w.addr], &mut drawn, &target, &[], "127.0.0.2", archived).await;
}

/// The same on a fleet of two workers, straight to Redis (`--redis`): A
/// draws on one worker, B on the other, and the clients of both converge.
/// No worker archives here: the plan reads every change of the window from
/// the store's log (as it does for an archive that lags). A is named by its
/// origin (as `audit --box` finds it), so no key is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_restores_one_address_boxes_on_a_fleet() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    let args = format!("--redis {} {OPEN} --origin-key-file {}", redis.url(), key.display());
    let workers = [Worker::start(&flags(&args)), Worker::start(&flags(&args))];
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
    let mut drawn = draw(&addrs).await;
    let target = strings(&["--redis", &redis.url()]);
    let extra = strings(&["--archive-dir", &archive.display().to_string()]);
    let who = format!("{:016x}", origin_of("127.0.0.2"));
    dry_run_then_revert(&addrs, &mut drawn, &target, &extra, &who, 0).await;
}

/// `omcb admin audit` of 127.0.0.2 (A) since the drawing began.
fn audit_of_a(archive: &Path, key: &Path, drawn: &Drawn) -> Vec<String> {
    strings(&[
        "audit",
        "--origin",
        "127.0.0.2",
        "--since",
        &drawn.since,
        "--archive-dir",
        &archive.display().to_string(),
        "--origin-key-file",
        &key.display().to_string(),
    ])
}

/// A worker (embedded, open to any origin) archiving to `DIR/archive` with
/// the key in `DIR`, and `extra` flags: the worker, the key file, the archive.
fn archiving_worker(dir: &Path, extra: &str) -> (Worker, PathBuf, PathBuf) {
    let key = key_file(dir);
    let archive = dir.join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    let args = format!(
        "{OPEN} {extra} --archive-dir {} --origin-key-file {}",
        archive.display(),
        key.display()
    );
    (Worker::start(&flags(&args)), key, archive)
}

/// Waits until the archive holds the drawing's last change.
async fn until_archived(archive: &Path, key: &Path, drawn: &Drawn) -> serde_json::Value {
    let audit = audit_of_a(archive, key, drawn);
    // The archive trails the store by up to its block interval.
    poll("the archive to hold A's last change", || async {
        let r = admin_json(&audit).ok()?;
        let last = r["changes"].as_array()?.last()?["seq"].as_u64()?;
        (last == drawn.last).then_some(r)
    })
    .await
}

/// `omcb admin audit` lists exactly the address's changes (time, seq, box,
/// op) from the archive the worker writes, and a summary; another address's
/// changes are not in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lists_exactly_what_an_address_did() {
    let dir = tempfile::tempdir().unwrap();
    let (w, key, archive) = archiving_worker(dir.path(), "");
    let drawn = draw(&[w.addr]).await;
    let audit = audit_of_a(&archive, &key, &drawn);
    let report = until_archived(&archive, &key, &drawn).await;
    let listed: Vec<(u64, u32, String)> = report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["seq"].as_u64().unwrap(),
                c["index"].as_u64().unwrap() as u32,
                c["op"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(u64, u32, String)> =
        drawn.a_changes.iter().map(|&(s, i, op)| (s, i, op.to_owned())).collect();
    assert_eq!(listed, want);
    assert_eq!(report["summary"]["changes"], 103);
    assert_eq!(report["summary"]["boxes"], 102);
    assert_eq!(report["origin"], format!("{:016x}", origin_of("127.0.0.2")));
    let text = admin(&audit).unwrap();
    assert!(text.contains("summary: 103 changes to 102 boxes, first "), "{text}");
    // Until before A's first change: nothing.
    let first_ms = report["changes"][0]["ms"].as_u64().unwrap();
    let mut before = audit.clone();
    before.extend(strings(&[
        "--until",
        &format!(
            "{}",
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(first_ms),
            )
        ),
    ]));
    assert_eq!(admin_json(&before).unwrap()["summary"]["changes"], 0);

    // Who changed box 110: A checked it, then B unchecked it.
    let by_box = strings(&[
        "audit",
        "--box",
        "110",
        "--since",
        &drawn.since,
        "--archive-dir",
        &archive.display().to_string(),
    ]);
    let report = admin_json(&by_box).unwrap();
    let who: Vec<(String, String)> = report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["op"].as_str().unwrap().to_owned(), c["origin"].as_str().unwrap().to_owned()))
        .collect();
    let hex = |a: &str| format!("{:016x}", origin_of(a));
    assert_eq!(
        who,
        [("check".to_owned(), hex("127.0.0.2")), ("uncheck".to_owned(), hex("127.0.0.3"))]
    );
    // ... and that origin audits as the address does, without the key.
    let mut by_origin = by_box.clone();
    by_origin.splice(1..3, strings(&["--origin", &hex("127.0.0.2")]));
    let report = admin_json(&by_origin).unwrap();
    assert_eq!(report["summary"]["changes"], 103, "{report}");
}

/// A corrupt block in the archive stops audit and revert with the file and
/// the block's offset; the revert changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_segment_stops_audit_and_revert_with_file_and_offset() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let args = format!("--redis {} {OPEN} --origin-key-file {}", redis.url(), key.display());
    let w = Worker::start(&flags(&args));
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let mut a = connect_from(ip("127.0.0.2"), w.addr, "/ws").await;
    let origin = origin_of("127.0.0.2");
    let mut records = Vec::new();
    let mut last = 0;
    for i in 0..20 {
        let seq = change(&mut a, i, true).await;
        last = seq;
        let ms = omcb_store::now_ms();
        records.push(Record::Change { seq, ms, index: i, op: Op::Set(true), origin });
    }
    let state = poll("the replica to take the changes", || async {
        let (s, _) = api_state(w.addr).await;
        (s.seq == last).then_some(s)
    })
    .await;
    // The archive of the board's epoch, written by the archive's own
    // writer, then one byte of its first block's payload flipped.
    let archive = dir.path().join("archive");
    let mut writer = Writer::open(&archive, state.epoch).unwrap();
    for r in records {
        writer.push(r).unwrap();
    }
    writer.flush(omcb_store::now_ms()).unwrap();
    drop(writer);
    let segment = std::fs::read_dir(omcb_archive::epoch_dir(&archive, state.epoch))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = omcb_archive::SEGMENT_HEADER_LEN as usize + omcb_archive::BLOCK_HEADER_LEN + 2;
    bytes[at] ^= 0x55;
    std::fs::write(&segment, bytes).unwrap();
    let common = strings(&[
        "--origin",
        "127.0.0.2",
        "--since",
        &since,
        "--archive-dir",
        &archive.display().to_string(),
        "--origin-key-file",
        &key.display().to_string(),
    ]);
    let where_ = format!("{} at byte 16: corrupt", segment.display());

    let mut audit = vec!["audit".to_owned()];
    audit.extend(common.clone());
    let e = admin(&audit).unwrap_err();
    assert!(e.contains(&where_), "{e}");

    let mut revert = strings(&["--redis", &redis.url(), "revert"]);
    revert.extend(common);
    let e = admin(&revert).unwrap_err();
    assert!(e.contains(&where_), "{e}");
    let (after, _) = api_state(w.addr).await;
    assert_eq!(after.seq, state.seq, "a failed revert changes nothing");
}

/// A box the address checked and the sunset froze since cannot be
/// unchecked: revert lists it as frozen and leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_lists_frozen_boxes_and_leaves_them() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _, _) = archiving_worker(dir.path(), "--freeze-after 1s");
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let mut a = connect_from(ip("127.0.0.2"), w.addr, "/ws").await;
    for i in 0..3 {
        change(&mut a, i, true).await;
    }
    poll("the sweep to freeze A's boxes", || async {
        (w.stats().await["frozen_count"] == 3).then_some(())
    })
    .await;
    let seq = w.stats().await["seq"].as_u64().unwrap();
    let target = strings(&["--worker", &format!("http://{}", w.metrics)]);
    let mut args = target.clone();
    args.extend(strings(&["revert", "--origin", "127.0.0.2", "--since", &since]));
    let done = admin_json(&args).unwrap();
    let frozen: Vec<u64> =
        done["frozen"].as_array().unwrap().iter().map(|f| f["index"].as_u64().unwrap()).collect();
    assert_eq!(frozen, [0, 1, 2], "{done}");
    assert_eq!(done["applied"], serde_json::json!([]), "{done}");
    assert_eq!(done["restore"], serde_json::json!([]), "{done}");
    let (state, _) = api_state(w.addr).await;
    assert_eq!(state.seq, seq, "nothing changed");
    let board = omcb_proto::Board::from_snapshot(&inflate_snapshot(&state)).unwrap();
    assert_eq!(checked_of(&board), [0, 1, 2]);
    assert!((0..3).all(|i| board.is_frozen(i)));
}

/// `POST /admin/revert` is on the private listener only; a bad body is 400
/// with the reason, a worker without an archive 409, and neither changes
/// anything.
#[tokio::test]
async fn the_revert_route_is_private_and_checks_its_body() {
    let w = Worker::start(&flags(OPEN));
    let body = r#"{"origin": "127.0.0.2", "since_ms": 0}"#;
    // The public listener has no admin route: it takes no POST at all.
    assert_eq!(post(w.addr, "/admin/revert", body).await.0, 405);
    assert_eq!(http_get(w.addr, "/admin/revert", &[]).await.status, 404);
    for bad in ["", "{}", r#"{"origin": "nobody", "since_ms": 0}"#, r#"{"origin": "127.0.0.2"}"#] {
        let (status, answer) = post(w.metrics, "/admin/revert", bad).await;
        assert_eq!(status, 400, "{bad:?}: {answer}");
        assert!(answer.contains("origin"), "{bad:?}: {answer}");
    }
    let (status, answer) = post(w.metrics, "/admin/revert", body).await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("--archive-dir"), "{answer}");
    assert_eq!(w.stats().await["seq"], 0);
}

/// `omcb admin audit --top N` finds who drew when only the damage is known:
/// three addresses draw different amounts; the top list orders their
/// origins by changes, with distinct boxes, first and last time and the
/// range of boxes each touched; `--box-range` keeps only the changes to a
/// region (the top list then names who drew there), and restricts an
/// audit of one origin the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_top_names_the_origins_that_drew_most_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _, archive) = archiving_worker(dir.path(), "");
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let mut a = connect_from(ip("127.0.0.2"), w.addr, "/ws").await;
    let mut b = connect_from(ip("127.0.0.3"), w.addr, "/ws").await;
    let mut c = connect_from(ip("127.0.0.4"), w.addr, "/ws").await;
    // A: 70 changes to 60 boxes, 100..159. B: 30 to 30, 400..429. C: 6 to
    // 6, five in B's region (430..434) and 999.
    for i in 100..160 {
        change(&mut a, i, true).await;
    }
    for i in 100..110 {
        change(&mut a, i, false).await;
    }
    for i in 400..430 {
        change(&mut b, i, true).await;
    }
    for i in (430..435).chain([999]) {
        change(&mut c, i, true).await;
    }
    let hex = |a: &str| format!("{:016x}", origin_of(a));
    let archive_dir = archive.display().to_string();
    let top = |extra: &[&str]| {
        let mut args = strings(&["audit", "--since", &since, "--archive-dir", &archive_dir]);
        args.extend(strings(extra));
        args
    };
    // The archive trails the store by up to its block interval.
    let all = poll("the archive to hold every change", || async {
        let r = admin_json(&top(&["--top", "10"])).ok()?;
        (r["summary"]["changes"] == 106).then_some(r)
    })
    .await;
    let row = |o: &serde_json::Value| {
        (
            o["origin"].as_str().unwrap().to_owned(),
            o["changes"].as_u64().unwrap(),
            o["boxes"].as_u64().unwrap(),
            (o["box_range"]["first"].as_u64().unwrap(), o["box_range"]["last"].as_u64().unwrap()),
        )
    };
    let rows: Vec<_> = all["origins"].as_array().unwrap().iter().map(row).collect();
    assert_eq!(
        rows,
        [
            (hex("127.0.0.2"), 70, 60, (100, 159)),
            (hex("127.0.0.3"), 30, 30, (400, 429)),
            (hex("127.0.0.4"), 6, 6, (430, 999)),
        ],
        "{all}"
    );
    assert_eq!(all["summary"]["origins"], 3);
    for o in all["origins"].as_array().unwrap() {
        assert!(o["first_ms"].as_u64() <= o["last_ms"].as_u64(), "{o}");
    }
    // A drew before B, B before C.
    let origins = all["origins"].as_array().unwrap();
    assert!(origins[0]["last_ms"].as_u64() <= origins[1]["first_ms"].as_u64(), "{all}");
    assert!(origins[1]["last_ms"].as_u64() <= origins[2]["first_ms"].as_u64(), "{all}");

    // The first N only.
    let two = admin_json(&top(&["--top", "2"])).unwrap();
    let rows: Vec<_> = two["origins"].as_array().unwrap().iter().map(row).collect();
    assert_eq!(rows, all["origins"].as_array().unwrap()[..2].iter().map(row).collect::<Vec<_>>());
    assert_eq!(two["summary"]["origins"], 3, "the summary counts every origin");

    // Who drew over 400..499: B, then C's five; A not at all.
    let region = admin_json(&top(&["--top", "5", "--box-range", "400..499"])).unwrap();
    let rows: Vec<_> = region["origins"].as_array().unwrap().iter().map(row).collect();
    assert_eq!(
        rows,
        [(hex("127.0.0.3"), 30, 30, (400, 429)), (hex("127.0.0.4"), 5, 5, (430, 434))],
        "{region}"
    );
    assert_eq!(region["box_range"], serde_json::json!({ "first": 400, "last": 499 }));
    let text = admin(&top(&["--top", "5", "--box-range", "400..499"])).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("top 5 origins by changes to boxes 400..499 from "), "{text}");
    assert!(lines[2].starts_with(&hex("127.0.0.3")) && lines[2].ends_with("400..429"), "{text}");
    assert!(lines[3].starts_with(&hex("127.0.0.4")) && lines[3].ends_with("430..434"), "{text}");
    assert!(text.contains("summary: 35 changes by 2 origins"), "{text}");

    // One origin's audit, limited to the region: C's five, not 999.
    let of_c =
        admin_json(&top(&["--origin", &hex("127.0.0.4"), "--box-range", "400..499"])).unwrap();
    let boxes: Vec<u64> =
        of_c["changes"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(boxes, [430, 431, 432, 433, 434], "{of_c}");
    // A region's changes, everyone's.
    let everyone = admin_json(&top(&["--box-range", "425..430"])).unwrap();
    assert_eq!(everyone["summary"]["changes"], 6, "{everyone}");

    // Bad input is refused with the reason.
    let e = admin(&top(&["--top", "5", "--box-range", "499..400"])).unwrap_err();
    assert!(e.contains("the first box is after the last"), "{e}");
    let e = admin(&top(&["--top", "0"])).unwrap_err();
    assert!(e.contains("--top"), "{e}");
    let e = admin(&top(&["--top", "5", "--origin", &hex("127.0.0.2")])).unwrap_err();
    assert!(e.contains("cannot be used with"), "{e}");
}
