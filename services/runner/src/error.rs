/// Everything the runner can fail at, mapped once to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Mailbox(#[from] ferroclaw_mailbox::Error),
    /// A read-only look into a session's files for the operator's lists failed.
    #[error("sqlite error on {path}: {source}")]
    MailboxView {
        path: std::path::PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("session registry: {0}")]
    Registry(#[from] sqlx::Error),
    #[error(transparent)]
    Database(#[from] ferroclaw_common::service_db::DbError),
    #[error("{0}")]
    Config(String),
    #[error("docker: {0}")]
    Docker(String),
    #[error(transparent)]
    Grpc(#[from] ferroclaw_common::grpc::GrpcError),
    #[error(transparent)]
    Lock(#[from] ferroclaw_common::service_lock::ServiceLockError),
    #[error(
        "the runner lost its lock on the session store, so it stopped; restarted, it stands by"
    )]
    LostLock,
    #[error(
        "the runner could not renew its lease in time, so it stopped: its sessions may be \
         another runner's now"
    )]
    LostLease,
    /// Another runner serves the session (or will): the caller tries again.
    #[error("{0}")]
    Unavailable(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = RunnerError> = std::result::Result<T, E>;

impl From<RunnerError> for tonic::Status {
    fn from(e: RunnerError) -> Self {
        match &e {
            RunnerError::InvalidArgument(m) => tonic::Status::invalid_argument(m.clone()),
            RunnerError::NotFound(m) => tonic::Status::not_found(m.clone()),
            RunnerError::Unavailable(m) => tonic::Status::unavailable(m.clone()),
            RunnerError::Mailbox(ferroclaw_mailbox::Error::Fenced { .. }) => {
                tonic::Status::unavailable(e.to_string())
            }
            // The session's agent holds its own file: the session waits, nothing else does.
            RunnerError::Mailbox(ferroclaw_mailbox::Error::Stuck { .. }) => {
                tracing::warn!(error = %e, "session mailbox stuck");
                tonic::Status::unavailable(e.to_string())
            }
            RunnerError::Mailbox(ferroclaw_mailbox::Error::File(f)) if f.is_tampering() => {
                tonic::Status::failed_precondition(format!(
                    "the session is stopped: its files were tampered with ({f})"
                ))
            }
            _ => {
                tracing::error!(error = %e, "internal error");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
