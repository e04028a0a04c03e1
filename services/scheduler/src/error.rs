/// Everything the scheduler can fail at, mapped once to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
    #[error("task store: {0}")]
    Store(#[from] sqlx::Error),
    #[error(transparent)]
    Database(#[from] ferroclaw_common::service_db::DbError),
    #[error("runner: {0}")]
    Runner(#[from] tonic::Status),
    #[error(transparent)]
    Grpc(#[from] ferroclaw_common::grpc::GrpcError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;

impl From<SchedulerError> for tonic::Status {
    fn from(e: SchedulerError) -> Self {
        let message = e.to_string();
        match e {
            SchedulerError::InvalidArgument(_) | SchedulerError::Schedule(_) => {
                tonic::Status::invalid_argument(message)
            }
            SchedulerError::NotFound(_) => tonic::Status::not_found(message),
            SchedulerError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            SchedulerError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            SchedulerError::AlreadyExists(_) => tonic::Status::already_exists(message),
            SchedulerError::Runner(status) => status,
            _ => {
                tracing::error!(error = %message, "internal error");
                tonic::Status::internal(message)
            }
        }
    }
}
