//! `ferroclaw-agent`: runs inside a session's container (or as a local process), reads the
//! session's inbound mailbox, asks a model provider for replies and writes them out.

pub mod agent_loop;
pub mod claude_code;
pub mod commands;
pub mod conversation;
pub mod formatter;
pub mod lock;
pub mod mcp_server;
pub mod memory;
pub mod model;
pub mod provider;
pub mod tools;
pub mod transcript;

pub use agent_loop::{AgentOptions, run};
