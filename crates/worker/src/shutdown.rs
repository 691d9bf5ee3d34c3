//! Waiting for a stop flag: a `watch::Receiver<bool>` that turns true once
//! (the worker's shutdown, the hub's stop).

use tokio::sync::watch;

/// Resolves once `flag` is true (or its sender is gone). Unlike `wait_for`
/// itself, holds no borrow of the value, so it can sit in a `select!`.
pub async fn until_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}
