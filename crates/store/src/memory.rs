//! The Memory backend (placeholder: being written).
#![allow(clippy::todo, unused_variables, missing_docs)]
use crate::*;

#[derive(Debug, Clone)]
pub struct MemoryStore {}

#[derive(Debug)]
pub struct MemoryFeed {}

impl MemoryStore {
    pub async fn open(
        config: BoardConfig,
        data_dir: Option<std::path::PathBuf>,
    ) -> Result<Self, StoreError> {
        todo!()
    }
    pub fn config(&self) -> BoardConfig {
        todo!()
    }
    pub fn set(&self, index: u32, checked: bool) -> SetOutcome {
        todo!()
    }
    pub fn snapshot(&self) -> Board {
        todo!()
    }
    pub fn feed(&self, epoch: u64, seq: u64) -> MemoryFeed {
        todo!()
    }
    pub fn sweep(&self, limit: usize) -> usize {
        todo!()
    }
    pub async fn close(&self) -> Result<(), StoreError> {
        todo!()
    }
}

impl MemoryFeed {
    pub async fn next(&mut self) -> FeedEvent {
        todo!()
    }
}
