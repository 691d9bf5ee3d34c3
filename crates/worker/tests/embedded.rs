//! The embedded store under a bad day: a full or read-only data disk (a real
//! tmpfs, mounted by the test: CI runs as root), a stop while the disk is
//! full (the space reserve keeps every acknowledged toggle), a data dir it
//! cannot write or fill with the reserve at start, a kill -9 right after a
//! clean restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use omcb_proto::v1::{Reason, Snapshot, server_message::Msg};

/// A board small enough for a 1 MB disk (its space reserve, the largest
/// board file, is 120 KB), and no rate limit in the way.
const BOARD: &[&str] =
    &["--board-size", "10000", "--toggle-rate", "10000", "--toggle-burst", "10000"];

/// A small tmpfs mounted in a temp dir (unmounted on drop), holding the
/// worker's data dir; the worker's log lives beside it, on the ordinary disk.
struct SmallDisk {
    mount: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`mount -o size=`), with extra `options`.
    /// Where that is impossible (not root), the test cannot run, and fails.
    fn mount(size: &str, options: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}{options}"), "tmpfs"])
            .arg(&mount)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let log = dir.path().join("worker.log");
                SmallDisk { mount, log, _dir: dir }
            }
            other => panic!("cannot mount a tmpfs (the test needs root): {other:?}"),
        }
    }

    fn start(&self, args: &[&str]) -> Worker {
        let bin = env!("CARGO_BIN_EXE_omcb");
        Worker(WorkerProcess::start_logging_to(bin, &self.mount, &self.log, args).unwrap())
    }

    /// Fills the disk to the last byte.
    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.filler()).unwrap();
        let chunk = vec![0xa5u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }

    fn filler(&self) -> PathBuf {
        self.mount.join("filler")
    }

    /// Remounts `ro` or `rw`; retried, since a remount read-only fails while
    /// a persist has a file open for writing.
    fn remount(&self, mode: &str) {
        let deadline = std::time::Instant::now() + WAIT;
        let remount = || {
            Command::new("mount")
                .args(["-o", &format!("remount,{mode}")])
                .arg(&self.mount)
                .output()
                .unwrap()
        };
        loop {
            let out = remount();
            if out.status.success() {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "remount {mode}: {out:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a worker still exiting may hold a file open.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// Toggles new boxes (from `*next`) until one is refused as unavailable
/// (`want_refused`) or accepted (`!want_refused`); returns the boxes
/// acknowledged on the way.
async fn toggle_until(c: &mut Client, next: &mut u32, want_refused: bool) -> Vec<u32> {
    let deadline = std::time::Instant::now() + WAIT;
    let mut acknowledged = Vec::new();
    loop {
        let r = c.set(*next, true).await;
        if r.accepted {
            acknowledged.push(*next);
        } else {
            assert_eq!(r.reason, Reason::Unavailable as i32, "only refused as unavailable");
        }
        *next += 1;
        if r.accepted != want_refused {
            return acknowledged;
        }
        assert!(std::time::Instant::now() < deadline, "toggles still accepted={}", r.accepted);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn readyz(w: &Worker) -> u16 {
    http_get(w.addr, "/readyz", &[]).await.status
}

/// Starts a worker on `disk`, takes its Snapshot and checks boxes 0..20:
/// the worker, its client, the first Snapshot, the next box to toggle and the
/// boxes acknowledged so far.
async fn start_and_check_20(disk: &SmallDisk) -> (Worker, Client, Snapshot, u32, Vec<u32>) {
    let w = disk.start(BOARD);
    let mut c = connect(&w.ws_url("")).await;
    let Msg::Snapshot(first) = c.recv().await else { panic!("snapshot first") };
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        assert!(c.set(i, true).await.accepted);
        acknowledged.push(i);
    }
    (w, c, first, 20, acknowledged)
}

/// Restarts a worker on `disk`: its board is `epoch` and holds exactly the
/// `acknowledged` boxes (nothing acknowledged lost, nothing refused applied).
async fn restart_has_exactly(disk: &SmallDisk, epoch: u64, acknowledged: &[u32]) {
    let w = disk.start(BOARD);
    let (s, _) = api_state(w.addr).await;
    let board = omcb_proto::Board::from_snapshot(&s).unwrap();
    let lost: Vec<u32> = acknowledged.iter().copied().filter(|&i| !board.is_checked(i)).collect();
    assert!(lost.is_empty(), "acknowledged toggles lost: {lost:?} of {}", acknowledged.len());
    assert_eq!(s.checked_count as usize, acknowledged.len(), "refused toggles are not there");
    assert_eq!(s.epoch, epoch, "nothing was lost: same epoch");
}

/// Breaks the disk under a running worker and mends it again: toggles are
/// refused and `/readyz` is 503 meanwhile, accepted after, and a restart
/// after SIGTERM has every acknowledged toggle.
async fn refuses_while_broken_and_loses_nothing(
    disk: &SmallDisk,
    break_disk: impl Fn(&SmallDisk),
    mend_disk: impl Fn(&SmallDisk),
) {
    let (mut w, mut c, first, mut next, mut acknowledged) = start_and_check_20(disk).await;

    break_disk(disk);
    // Toggles acknowledged until the persister notices (at most a second).
    acknowledged.extend(toggle_until(&mut c, &mut next, true).await);
    assert_eq!(readyz(&w).await, 503);
    assert!(w.metric("omcb_persist_failures_total").await >= 1.0);
    assert_eq!(w.metric("omcb_persist_ok").await, 0.0);
    for _ in 0..5 {
        let r = c.set(next, true).await;
        next += 1;
        assert!(!r.accepted && r.reason == Reason::Unavailable as i32, "{r:?}");
    }

    mend_disk(disk);
    acknowledged.extend(toggle_until(&mut c, &mut next, false).await);
    poll("/readyz 200", || async { (readyz(&w).await == 200).then_some(()) }).await;
    assert_eq!(w.metric("omcb_persist_ok").await, 1.0);
    let log = w.log();
    assert_eq!(
        log.matches("persisting the board failed").count(),
        1,
        "one line per failure:\n{log}"
    );
    assert_eq!(log.matches("the board is persisted again").count(), 1, "{log}");

    assert!(w.terminate().success(), "a clean stop once the disk is mended");
    restart_has_exactly(disk, first.epoch, &acknowledged).await;
    drop(w);
}

#[tokio::test]
async fn a_full_disk_refuses_toggles_until_space_is_freed_and_loses_nothing() {
    let disk = SmallDisk::mount("1m", "");
    refuses_while_broken_and_loses_nothing(&disk, SmallDisk::fill, SmallDisk::free).await;
}

#[tokio::test]
async fn a_read_only_disk_refuses_toggles_until_writable_and_loses_nothing() {
    let disk = SmallDisk::mount("1m", "");
    refuses_while_broken_and_loses_nothing(&disk, |d| d.remount("ro"), |d| d.remount("rw")).await;
}

/// Fills the disk under a worker that acknowledged toggles since its last
/// persist and keeps toggling until refused, then stops it with `stop`
/// while the disk is still full, frees the disk and restarts: every
/// acknowledged toggle is there, under the same epoch (the board was written
/// into the space reserve, marked clean, and nothing was acknowledged after).
/// Returns how the stopped worker exited.
async fn a_stop_on_a_full_disk_keeps_every_acknowledged_toggle(
    stop: impl FnOnce(&mut Worker) -> std::process::ExitStatus,
) -> (std::process::ExitStatus, String) {
    let disk = SmallDisk::mount("1m", "");
    // Acknowledged at once, long before the first persist (a second away).
    let (mut w, mut c, first, mut next, mut acknowledged) = start_and_check_20(&disk).await;
    disk.fill();
    acknowledged.extend(toggle_until(&mut c, &mut next, true).await);
    assert_eq!(readyz(&w).await, 503);
    let status = stop(&mut w);

    disk.free();
    restart_has_exactly(&disk, first.epoch, &acknowledged).await;
    let log = w.log();
    assert!(log.contains("written into the space reserve"), "it says so:\n{log}");
    (status, log)
}

#[tokio::test]
async fn sigterm_on_a_full_disk_keeps_every_acknowledged_toggle_and_the_epoch() {
    let (status, log) =
        a_stop_on_a_full_disk_keeps_every_acknowledged_toggle(|w| w.terminate()).await;
    assert!(status.success(), "a clean stop: everything is on disk\n{log}");
}

#[tokio::test]
async fn kill_9_on_a_full_disk_keeps_every_acknowledged_toggle_and_the_epoch() {
    a_stop_on_a_full_disk_keeps_every_acknowledged_toggle(|w| w.kill9()).await;
}

/// A read-only disk leaves no way to write anything: a SIGTERM meanwhile
/// fails loudly, and the restart takes a new epoch (what was acknowledged
/// since the last persist is gone, and the file says unclean).
#[tokio::test]
async fn sigterm_on_a_read_only_disk_fails_loudly_and_the_restart_takes_a_new_epoch() {
    let disk = SmallDisk::mount("1m", "");
    let mut w = disk.start(BOARD);
    let mut c = connect(&w.ws_url("")).await;
    let Msg::Snapshot(first) = c.recv().await else { panic!("snapshot first") };
    let mut next = 0;
    assert!(c.set(next, true).await.accepted);
    next += 1;
    disk.remount("ro");
    let unwritten = toggle_until(&mut c, &mut next, true).await;
    let status = w.terminate();
    let log = w.log();
    assert!(!status.success(), "the final write failed: the exit says so\n{log}");
    assert!(log.contains("the final write of"), "a clear message:\n{log}");
    if !unwritten.is_empty() {
        assert!(log.contains("are not on disk"), "it says what is missing:\n{log}");
    }

    disk.remount("rw");
    let w2 = disk.start(BOARD);
    let (s, _) = api_state(w2.addr).await;
    assert_ne!(s.epoch, first.epoch, "the file lacks acknowledged changes: a new epoch");
    drop(w);
}

/// The worker's start on `mount` fails: its stderr.
fn start_fails(mount: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_omcb"))
        .args(["serve", "--listen", "127.0.0.1:0", "--board-size", "1000", "--data-dir"])
        .arg(mount)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker started on a data dir it cannot write");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

#[tokio::test]
async fn refuses_to_start_on_a_data_dir_it_cannot_write() {
    let disk = SmallDisk::mount("1m", ",ro");
    let err = start_fails(&disk.mount);
    assert!(
        err.contains("cannot write the data dir") && err.contains(&*disk.mount.to_string_lossy()),
        "a clear error, got: {err}"
    );
}

#[tokio::test]
async fn refuses_to_start_without_room_for_the_space_reserve() {
    let disk = SmallDisk::mount("1m", "");
    disk.fill();
    let err = start_fails(&disk.mount);
    // 1,000 boxes: 45 + 2 x 125 + 12 + 12 x 1,000 bytes.
    assert!(
        err.contains("space reserve") && err.contains("12307 bytes"),
        "a clear error naming the space needed, got: {err}"
    );
}

/// Finding: a clean file stayed "clean" until the first persist, so a crash
/// in the first second after a clean restart kept the epoch while losing
/// acknowledged changes (and their seqs were reused for others).
#[tokio::test]
async fn kill_9_right_after_a_clean_restart_changes_the_epoch() {
    let mut w = Worker::start(&["--board-size", "2000"]);
    let dir: &Path = &w.data_dir.clone();
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    assert!(c.set(1, true).await.accepted);
    assert!(w.terminate().success());

    let mut w2 = Worker::start_in(dir, &["--board-size", "2000"]);
    let mut c = connect(&w2.ws_url("")).await;
    let Msg::Snapshot(clean) = c.recv().await else { panic!("snapshot first") };
    let r = c.set(2, true).await;
    assert!(r.accepted);
    // At once: no persist has happened since the start.
    w2.kill9();

    let w3 = Worker::start_in(dir, &["--board-size", "2000"]);
    let (s, _) = api_state(w3.addr).await;
    assert_ne!(s.epoch, clean.epoch, "an acknowledged change may be lost: a new epoch");
    // A client that saw seq r.seq of the old epoch starts over from a snapshot.
    let url = w3.ws_url(&format!("?since={}&epoch={}", r.seq, clean.epoch));
    let mut resumed = connect(&url).await;
    let Msg::Snapshot(snap) = resumed.recv().await else { panic!("a snapshot, not batches") };
    assert_eq!(snap.epoch, s.epoch);
    drop((w, w2));
}

/// Snapshots are encoded outside the hub's lock, so one can be a few batches
/// behind the replica when a socket starts from it; the ring's batches after
/// it must follow it. Clients joining and resyncing while a writer toggles
/// without pause (1 ms ticks, a million boxes) never see a gap and converge.
#[tokio::test]
async fn snapshots_taken_under_constant_toggling_are_followed_by_every_later_batch() {
    let w =
        Worker::start(&["--batch-ms", "1", "--toggle-rate", "100000", "--toggle-burst", "100000"]);
    let mut writer = connect(&w.ws_url("")).await;
    writer.recv().await;
    let url = w.ws_url("");
    let writing = tokio::spawn(async move {
        let mut last = 0;
        for i in 0..3000u32 {
            let id = writer.toggle(i * 331 % 1_000_000, i % 2 == 0).await;
            if i % 50 == 49 {
                last = writer.result_for(id).await.seq.max(last);
            }
        }
        last
    });
    let mut clients = Vec::new();
    // At most 24 (each pulls two snapshots): the per-address connect and
    // snapshot budgets (64 at once) must not refuse us on a slow machine.
    while !writing.is_finished() && clients.len() < 24 {
        let mut c = connect(&url).await;
        c.recv().await;
        c.send_msg(omcb_proto::v1::client_message::Msg::Resync(omcb_proto::v1::Resync {})).await;
        clients.push(c);
    }
    let last = writing.await.unwrap();
    let (s, _) = api_state(w.addr).await;
    let seq = s.seq.max(last);
    w.stats_at(seq).await;
    let (s, _) = api_state(w.addr).await;
    assert!(clients.len() >= 2, "clients joined while the writer toggled");
    for c in &mut clients {
        c.until_seq(s.seq).await;
        assert_eq!(c.gaps, 0, "batches {:?}", &c.batches);
        let b = c.board.as_ref().unwrap();
        if b.seq == s.seq {
            assert_eq!(b, &omcb_proto::Board::from_snapshot(&s).unwrap());
        }
    }
}
