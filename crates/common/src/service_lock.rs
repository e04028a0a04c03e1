//! One active instance among several of a service sharing one store: whoever holds the
//! service's lock is active, the others stand by and try again. On PostgreSQL the lock is a
//! session-level advisory lock held on a connection of its own, which the server frees when
//! that connection ends (a killed process's socket closes at once); it needs a direct
//! connection, not one through a transaction-pooling proxy. On SQLite it is an exclusive
//! `flock` on a file beside the database, which the kernel frees when the process ends.

use std::fs::{File, OpenOptions, TryLockError};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::{AnyConnection, AnyPool, Connection};

use crate::service_db::Location;

/// Longest wait for the database in one try or check. A lock connection that does not
/// answer is given up: closing it frees the lock on the server's side too.
pub const DB_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServiceLockError {
    #[error("lock file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lock connection: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the {name} lock's database did not answer within {after:?}")]
    Timeout { name: String, after: Duration },
}

/// A service's lock, held or not.
pub struct ServiceLock {
    name: String,
    kind: Kind,
}

enum Kind {
    Postgres {
        pool: AnyPool,
        key: i64,
        /// The connection that tries for the lock, and holds it once `held`.
        conn: Option<AnyConnection>,
        held: bool,
    },
    File {
        path: PathBuf,
        /// Open while the lock is held: closing the file unlocks it.
        file: Option<File>,
    },
}

impl ServiceLock {
    /// The lock named `name` among the instances using the store at `at` (opened as `pool`).
    pub fn new(name: &str, at: &Location, pool: &AnyPool) -> Self {
        let kind = match at {
            Location::Postgres(_) => Kind::Postgres {
                pool: pool.clone(),
                key: key_of(name),
                conn: None,
                held: false,
            },
            // Beside the database, so instances on one file contend for one lock.
            Location::Sqlite(path) => Kind::File {
                path: path.with_extension("lock"),
                file: None,
            },
        };
        Self {
            name: name.to_string(),
            kind,
        }
    }

    /// Takes the lock when it is free, or checks that it is still held; whether it is held.
    pub async fn hold(&mut self) -> Result<bool, ServiceLockError> {
        let name = &self.name;
        match &mut self.kind {
            Kind::File { path, file } => {
                if file.is_none() {
                    *file = try_lock_file(path)?;
                }
                Ok(file.is_some())
            }
            Kind::Postgres {
                pool,
                key,
                conn,
                held,
            } => {
                // Out of its slot while in use: one whose query was cut short is dropped.
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => {
                        *held = false;
                        timed(name, async {
                            Ok::<_, sqlx::Error>(pool.acquire().await?.detach())
                        })
                        .await?
                    }
                };
                let answer = if *held {
                    // A session lock lives as long as its session: a live connection holds it.
                    timed(
                        name,
                        sqlx::query_scalar::<_, bool>("SELECT true").fetch_one(&mut c),
                    )
                    .await
                } else {
                    timed(
                        name,
                        sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                            .bind(*key)
                            .fetch_one(&mut c),
                    )
                    .await
                };
                *held = answer.as_ref().is_ok_and(|h| *h);
                if answer.is_ok() {
                    *conn = Some(c);
                }
                answer
            }
        }
    }

    /// Gives the lock up, so a standby takes it at its next try.
    pub async fn release(&mut self) {
        match &mut self.kind {
            Kind::File { file, .. } => *file = None,
            Kind::Postgres { conn, held, .. } => {
                *held = false;
                if let Some(c) = conn.take() {
                    // Ending the session frees the lock at once.
                    let _ = tokio::time::timeout(DB_TIMEOUT, c.close()).await;
                }
            }
        }
    }
}

/// The advisory lock's key: 64-bit FNV-1a of `name`, the same in every instance.
pub const fn key_of(name: &str) -> i64 {
    let bytes = name.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash as i64
}

/// The open lock file when this process got its exclusive lock, `None` when another holds it
/// (the lock lasts while the file is open, and the kernel frees it when the process ends).
pub fn try_lock_file(path: &Path) -> Result<Option<File>, ServiceLockError> {
    let io = |source| ServiceLockError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(source)) => Err(io(source)),
    }
}

/// `work` on the lock's database, given up after [`DB_TIMEOUT`].
async fn timed<T>(
    name: &str,
    work: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, ServiceLockError> {
    match tokio::time::timeout(DB_TIMEOUT, work).await {
        Ok(done) => done.map_err(Into::into),
        Err(_) => Err(ServiceLockError::Timeout {
            name: name.to_string(),
            after: DB_TIMEOUT,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_name_and_are_stable() {
        assert_eq!(key_of("ferroclaw-runner"), key_of("ferroclaw-runner"));
        assert_ne!(key_of("ferroclaw-runner"), key_of("ferroclaw-scheduler"));
    }

    #[tokio::test]
    async fn one_process_holds_a_file_lock_until_it_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let at = Location::Sqlite(dir.path().join("svc.db"));
        sqlx::any::install_default_drivers();
        let pool = AnyPool::connect_lazy("sqlite::memory:").unwrap();
        let mut one = ServiceLock::new("svc", &at, &pool);
        let mut two = ServiceLock::new("svc", &at, &pool);
        assert!(one.hold().await.unwrap());
        assert!(
            !two.hold().await.unwrap(),
            "flock is per open file, even in one process"
        );
        assert!(one.hold().await.unwrap(), "still held");
        one.release().await;
        assert!(two.hold().await.unwrap());
    }
}
