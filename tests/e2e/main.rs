//! End-to-end tests: the four service binaries as separate processes, real SQLite files,
//! real gRPC on loopback, agents as real child processes.

mod agent_lifecycle;
mod bad_input;
mod chaos_scaled;
mod cli_up;
mod compose;
mod console;
mod delivery_lanes;
mod delivery_retry;
mod delivery_shared;
mod discord;
mod discord_catch_up;
mod docker;
mod docker_remote;
mod grpc_ingress;
mod grpc_reflection;
mod idle_sessions;
mod live_streams;
mod metrics;
mod models;
mod openapi;
mod outbound_policy;
mod pipeline;
mod postgres;
mod questions;
mod runner_restart;
mod runner_standby;
mod scheduler;
mod scheduler_clock;
mod scheduler_standby;
mod service_instances;
mod several_runners;
mod slots;
mod stuck_agent_file;
mod traces;
mod webhooks;
