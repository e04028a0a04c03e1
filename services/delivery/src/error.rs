/// Everything delivery can fail at, mapped once to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyRunning(String),
    #[error(transparent)]
    Lock(#[from] ferroclaw_common::service_lock::ServiceLockError),
    #[error("delivery ledger: {0}")]
    Ledger(#[from] sqlx::Error),
    #[error(transparent)]
    Database(#[from] ferroclaw_common::service_db::DbError),
    #[error(transparent)]
    Grpc(#[from] ferroclaw_common::grpc::GrpcError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = DeliveryError> = std::result::Result<T, E>;

impl From<DeliveryError> for tonic::Status {
    fn from(e: DeliveryError) -> Self {
        match &e {
            DeliveryError::InvalidArgument(m) => tonic::Status::invalid_argument(m.clone()),
            _ => {
                tracing::error!(error = %e, "internal error");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
