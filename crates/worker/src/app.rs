//! What every connection shares: [`App`], made once by `Server::bind` and
//! handed to every HTTP connection and socket task.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use omcb_store::Store;
use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::hub::Hub;
use crate::origin::OriginKey;
use crate::{assets, counts, limits, metrics};

/// What every connection shares.
#[derive(Debug)]
pub struct App {
    /// The configuration the worker was started with.
    pub config: Config,
    /// Where toggles go.
    pub store: Store,
    /// The replica and fan-out.
    pub hub: Arc<Hub>,
    /// The counts the widget's live stream sends, published once a second.
    pub counts: counts::CountsFeed,
    /// Metric handles.
    pub metrics: metrics::Metrics,
    /// The web client's files.
    pub assets: assets::Assets,
    /// Turns true when the worker shuts down: sockets close with 1012.
    pub shutdown: watch::Receiver<bool>,
    /// WebSocket connections admitted now (what `--max-connections` counts).
    pub sockets: AtomicUsize,
    /// WebSocket connections over a cap, waiting to close with 1013: they take
    /// no slot, so that one address hammering its cap locks nobody else out.
    pub refusing: AtomicUsize,
    /// Notified when `sockets` or `refusing` drops to zero (shutdown waits on them).
    pub sockets_gone: Notify,
    /// Per client address: connection counts and shared budgets.
    pub addresses: limits::Addresses,
    /// The key that hashes a client's address into its changes' origin.
    pub origin_key: OriginKey,
}
