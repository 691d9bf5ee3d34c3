//! The board's counts for the widget's live stream (`/api/counts`, see
//! `http::embed`), published at most once a second: one read of the replica
//! per second per worker, however many widgets watch.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::hub::Hub;

/// How often the counts are read and, when they moved, published. A widget
/// shows a change within this (plus one hub tick), and receives at most one
/// event per period however fast the board changes.
pub const PERIOD: Duration = Duration::from_secs(1);

/// What a widget shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Board incarnation (a new epoch resets the counts).
    pub epoch: u64,
    /// Number of boxes.
    pub size: u32,
    /// Checked boxes.
    pub checked: u32,
    /// Frozen boxes.
    pub frozen: u32,
}

impl Counts {
    /// The replica's counts now.
    pub fn of(hub: &Hub) -> Self {
        hub.with_board(|b| Counts {
            epoch: b.epoch,
            size: b.size,
            checked: b.checked_count,
            frozen: b.frozen_count,
        })
    }
}

/// The latest published counts; streams subscribe to it.
#[derive(Debug)]
pub struct CountsFeed {
    tx: watch::Sender<Counts>,
}

impl CountsFeed {
    /// A feed starting at the replica's counts.
    pub fn new(hub: &Hub) -> Self {
        Self { tx: watch::Sender::new(Counts::of(hub)) }
    }

    /// A receiver that sees each published change (only the latest, if it
    /// falls behind: a slow stream skips counts, it never queues them).
    pub fn subscribe(&self) -> watch::Receiver<Counts> {
        self.tx.subscribe()
    }

    /// Publishes the replica's counts every [`PERIOD`] when they moved. Runs
    /// until the task is aborted (`Server::run` does at shutdown).
    pub async fn run(&self, hub: &Hub) {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Counts::of(hub);
            self.tx.send_if_modified(|old| {
                let moved = *old != now;
                *old = now;
                moved
            });
        }
    }
}
