//! The Memory store's board file: what a reopen finds after a clean close,
//! after a crash, and what the store refuses once it is closing. (Full and
//! read-only disks are tested through the worker, in
//! `crates/worker/tests/embedded.rs`.)

use omcb_store::memory::{FILE_NAME, LOG_CAPACITY, MemoryStore, RESERVE_NAME, reserve_len};
use omcb_store::{BoardConfig, SetOutcome, StoreError};

const CONFIG: BoardConfig = BoardConfig { size: 200_000, max_checked: None, freeze_after_ms: 0 };

#[tokio::test]
async fn a_clean_close_keeps_every_change_and_the_epoch_even_past_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(CONFIG, Some(dir.path().into())).await.unwrap();
    // More changes than the log holds since the last write (the one at open):
    // the persister's copy cannot catch up from the log and takes the whole
    // board. (The other tests here catch up from the log.)
    let mut index = 0u32;
    for n in 0..LOG_CAPACITY as u32 + 1000 {
        index = (index + 7919) % CONFIG.size;
        store.set(index, n % 3 != 0, 0).unwrap();
    }
    let before = store.snapshot();
    store.close().await.unwrap();
    let again = MemoryStore::open(CONFIG, Some(dir.path().into())).await.unwrap();
    assert_eq!(again.snapshot(), before, "same board, same epoch and seq after a clean close");
    again.close().await.unwrap();
}

#[tokio::test]
async fn a_closing_store_acknowledges_nothing_its_last_write_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(CONFIG, Some(dir.path().into())).await.unwrap();
    assert!(matches!(store.set(1, true, 0), Ok(SetOutcome::Changed { .. })));
    store.close().await.unwrap();
    assert!(matches!(store.set(2, true, 0), Err(StoreError::Unavailable(_))));
    assert!(!store.is_writable());
    let again = MemoryStore::open(CONFIG, Some(dir.path().into())).await.unwrap();
    let board = again.snapshot();
    assert!(board.is_checked(1) && !board.is_checked(2));
}

#[tokio::test]
async fn opening_marks_the_file_unclean_before_the_first_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(CONFIG, Some(dir.path().into())).await.unwrap();
    store.set(1, true, 0).unwrap();
    store.close().await.unwrap();
    let epoch = store.snapshot().epoch;
    // A clean restart, one change, and a crash before any persist: the
    // process is gone without close (the persister waits a second first).
    let crashed = MemoryStore::open(CONFIG, Some(dir.path().into())).await.unwrap();
    assert_eq!(crashed.snapshot().epoch, epoch, "a clean file keeps its epoch");
    crashed.set(2, true, 0).unwrap();
    drop(crashed);
    let again = MemoryStore::open(CONFIG, Some(dir.path().into())).await.unwrap();
    assert_ne!(again.snapshot().epoch, epoch, "the change at seq 2 may be lost: a new epoch");
}

#[tokio::test]
async fn the_space_reserve_is_allocated_and_as_large_as_the_largest_board_file() {
    use std::os::unix::fs::MetadataExt;
    let config = BoardConfig { size: 3000, max_checked: None, freeze_after_ms: 0 };
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(config, Some(dir.path().into())).await.unwrap();
    let reserve = std::fs::metadata(dir.path().join(RESERVE_NAME)).unwrap();
    assert_eq!(reserve.len(), reserve_len(config));
    assert!(reserve.blocks() * 512 >= reserve.len(), "written, not sparse");
    // The largest file: every box checked, each with a check time.
    for i in 0..config.size {
        store.set(i, true, 0).unwrap();
    }
    store.close().await.unwrap();
    let board = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap();
    assert_eq!(board.len(), reserve_len(config));
    let capped = BoardConfig { max_checked: Some(100), ..config };
    assert_eq!(reserve_len(capped), reserve_len(config) - 12 * 2900, "a cap bounds the file");
}
