//! Disk quotas: what a session's `out/` (its workspace, outbox and state) and an agent's
//! shared memory may take on the disk that also holds every service's database.
//!
//! Usage is measured by a walk of that tree through descriptors (no link followed, at most
//! [`MAX_ENTRIES`] entries), off the async workers: before an agent starts, every
//! [`CHECK_EVERY`] while it runs, and when new work arrives for a session that was over.
//! Never per message. For hard limits enforced by the kernel, give each session directory
//! its own file system image or an XFS project quota (see the README).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferroclaw_common::config::AgentConfig;
use ferroclaw_mailbox::SessionPaths;
use ferroclaw_mailbox::session_fs::{Dir, FsError};

/// Entries walked at most; a tree with more is over quota whatever its size.
pub const MAX_ENTRIES: usize = 200_000;
/// How often a running agent's usage is measured.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct DiskQuota {
    pub session_bytes: u64,
    pub agent_bytes: u64,
    pub data_dir: PathBuf,
}

impl DiskQuota {
    /// Why the session (or its agent's shared memory) is over its quota, if it is.
    pub async fn exceeded(&self, paths: &SessionPaths, agent: &AgentConfig) -> Option<String> {
        let quota = self.clone();
        let out = paths.out_dir();
        let memory = agent.shared_memory_dir(&self.data_dir);
        tokio::task::spawn_blocking(move || {
            over(
                &out,
                quota.session_bytes,
                "this conversation's files",
                "runner.session_disk_mb",
            )
            .or_else(|| {
                memory.and_then(|m| {
                    over(
                        &m,
                        quota.agent_bytes,
                        "the agent's shared memory",
                        "runner.agent_disk_mb",
                    )
                })
            })
        })
        .await
        .ok()
        .flatten()
    }
}

fn over(dir: &Path, limit: u64, what: &str, key: &str) -> Option<String> {
    let used = match Dir::open(dir).and_then(|d| d.disk_usage(MAX_ENTRIES)) {
        Ok(used) => used,
        // Not made yet: nothing used.
        Err(FsError::NotFound { .. }) => return None,
        // What cannot be measured is not taken as under the quota.
        Err(e) => {
            return Some(format!(
                "{what} cannot be measured ({e}); an operator must look at them before this \
                 conversation takes new messages"
            ));
        }
    };
    let mb = |bytes: u64| bytes.div_ceil(1024 * 1024);
    match used {
        Some(bytes) if bytes <= limit => None,
        Some(bytes) => Some(format!(
            "{what} take {} MB, over the quota of {} MB ({key}); an operator can raise it, \
             or remove files, before this conversation takes new messages",
            mb(bytes),
            mb(limit)
        )),
        None => Some(format!(
            "{what} hold more than {MAX_ENTRIES} files or nest deeper than {} directories; an \
             operator must remove some before this conversation takes new messages",
            ferroclaw_mailbox::session_fs::MAX_WALK_DEPTH
        )),
    }
}
