//! What every ferroclaw process shares: configuration, telemetry, gRPC serving and client
//! helpers, shutdown signals, ids.

pub mod atomic_file;
pub mod config;
pub mod error_text;
pub mod grpc;
pub mod grpc_auth;
pub mod grpc_instances;
pub mod ids;
pub mod launch;
pub mod metrics;
pub mod ready;
pub mod service_db;
pub mod service_lock;
pub mod shutdown;
pub mod signing;
pub mod spend;
pub mod startup;
pub mod telemetry;
#[cfg(any(test, feature = "test-postgres"))]
pub mod test_postgres;

pub use config::{Config, ConfigError};
