//! Graceful shutdown helpers shared by the front-ends' listeners.

use std::time::Duration;

use tokio::task::JoinSet;

/// Waits for a listener's connection tasks (they saw the shutdown signal and are sending
/// their protocol's close); whatever is still running after `grace` is aborted.
pub async fn drain_connections(tasks: &mut JoinSet<()>, grace: Duration) {
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return },
            _ = &mut deadline => {
                tasks.abort_all();
                return;
            }
        }
    }
}
