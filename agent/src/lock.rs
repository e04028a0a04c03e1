//! One agent per session: the agent holds an exclusive lock on `out/agent.lock` for as long
//! as it runs. A second agent (say, started by a restarted runner while the old one is still
//! finishing) waits for the lock instead of writing beside it.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Held while the agent runs; the lock is released when the file is closed.
pub struct SessionLock {
    _file: File,
}

/// Waits until the lock is ours; `None` when shutdown came first.
pub async fn acquire(
    path: &Path,
    shutdown: &CancellationToken,
) -> std::io::Result<Option<SessionLock>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let mut warned = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(SessionLock { _file: file })),
            Err(TryLockError::WouldBlock) => {
                if !warned {
                    tracing::info!("another agent holds this session; waiting for it to exit");
                    warned = true;
                }
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}
