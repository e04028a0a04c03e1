/// Everything the scheduler can fail at, mapped once to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("task store: {0}")]
    Store(#[from] sqlx::Error),
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
        tracing::error!(error = %e, "internal error");
        tonic::Status::internal(e.to_string())
    }
}
