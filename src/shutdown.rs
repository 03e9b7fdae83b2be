//! The router's stop flag, as the tasks that watch it see it: a
//! `watch::Receiver<bool>` that turns true when sessions and background
//! tasks must stop. A leaf: anything may wait on it.

use tokio::sync::watch;

/// Resolves once the router's stop flag is set (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
