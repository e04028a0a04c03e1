//! End-to-end tests: the four service binaries as separate processes, real SQLite files,
//! real gRPC on loopback, agents as real child processes.

mod bad_input;
mod pipeline;
mod runner_restart;
