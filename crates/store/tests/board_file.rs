//! Board files the embedded store never writes, which its decoder must refuse
//! rather than load: found by the `board_file` fuzz target
//! (crates/fuzz-targets; regression seeds in fuzz/corpus/board_file/).

use omcb_proto::Board;
use omcb_store::memory::{FILE_NAME, MemoryStore, encode_board_file};
use omcb_store::{BoardConfig, StoreError};

const CONFIG: BoardConfig = BoardConfig { size: 8, max_checked: None, freeze_after_ms: 1_000 };

/// Opens a store on a data dir holding `file`; the error message when refused.
async fn open_on(dir: &tempfile::TempDir, file: Vec<u8>) -> Result<MemoryStore, String> {
    std::fs::write(dir.path().join(FILE_NAME), file).unwrap();
    match MemoryStore::open(CONFIG, Some(dir.path().into())).await {
        Ok(store) => Ok(store),
        Err(StoreError::Data(why)) => Err(why),
        Err(e) => panic!("not a data error: {e}"),
    }
}

/// Asserts that the file of `board` and `checked_at` is refused, saying `why`.
async fn assert_refused(board: &Board, checked_at: &[u64], why: &str) {
    let dir = tempfile::tempdir().unwrap();
    match open_on(&dir, encode_board_file(board, checked_at, true)).await {
        Ok(_) => panic!("loaded; expected a refusal: {why}"),
        Err(e) => assert!(e.contains(why), "refused, but not with {why:?}: {e}"),
    }
}

/// Loading such a file used to put the unchecked box in the freeze sweep's
/// queue for good: every sweep froze it again (a new change and one more
/// `frozen_count` each time, the box frozen yet unchecked), and the file then
/// written failed to load ("counts do not match").
#[tokio::test]
async fn a_check_time_on_an_unchecked_box_is_refused() {
    let board = Board::new(8, 77, 0);
    let mut checked_at = vec![0u64; 8];
    checked_at[1] = 1_000;
    assert_refused(&board, &checked_at, "check time for an unchecked box").await;
}

/// Only a checked box freezes; a frozen unchecked box would be refused as
/// frozen while reading as unchecked, and never change again.
#[tokio::test]
async fn a_frozen_box_that_is_not_checked_is_refused() {
    let mut board = Board::new(8, 77, 0);
    board.frozen.set(2, true);
    board.frozen_count = 1;
    assert_refused(&board, &[0; 8], "frozen box that is not checked").await;
}

#[tokio::test]
async fn a_file_the_store_writes_loads() {
    let mut board = Board::new(8, 77, 0);
    let mut checked_at = vec![0u64; 8];
    for i in [2, 5] {
        board.checked.set(i, true);
        checked_at[i] = 1_000 + i as u64;
    }
    board.frozen.set(5, true);
    (board.checked_count, board.frozen_count, board.seq) = (2, 1, 3);
    let dir = tempfile::tempdir().unwrap();
    let store = open_on(&dir, encode_board_file(&board, &checked_at, true)).await.unwrap();
    let loaded = store.snapshot();
    assert_eq!(
        (loaded.epoch, loaded.seq, loaded.checked, loaded.frozen),
        (77, 3, board.checked, board.frozen)
    );
    store.close().await.unwrap();
}
