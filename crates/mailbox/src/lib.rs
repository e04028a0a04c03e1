//! The session-directory contract (ARCHITECTURE.md §4), both sides of the mount.
//!
//! A session directory holds two SQLite files with one writer each: `in/inbound.db`, written
//! by the runner ([`HostMailbox`]), and `out/outbound.db`, written by the agent
//! ([`AgentMailbox`]). Rows of both share one seq order: the host takes even numbers, the agent
//! odd ones, each the smallest above the largest seq in either file, so they never collide.

pub mod agent;
mod agent_file;
/// The message schema, re-exported for the mailbox's two sides.
pub use ferroclaw_content as content;
mod db;
pub mod error;
pub mod host;
pub mod paths;
pub mod rows;
mod schema;
pub mod seq;
pub mod session_fs;
pub mod wake;

pub use agent::AgentMailbox;
pub use content::{Destination, InboundContent, Origin, OutboundContent};
pub use db::JournalMode;
pub use error::{Error, Result};
pub use host::{HostMailbox, Reopen, Settlement};
pub use paths::SessionPaths;
pub use rows::{InboundRow, NewInbound, NewOutbound, OutboundRow, Outcome};

pub use ferroclaw_content::now_ms;

/// Every mailbox future must be `Send` so services can run it on a multi-threaded runtime.
#[cfg(test)]
#[allow(dead_code, clippy::all)]
fn futures_are_send(host: &HostMailbox, msg: &NewInbound) {
    fn send<T: Send>(_: T) {}
    send(host.enqueue(msg));
    send(host.unsettled_after(0, usize::MAX));
    send(host.settle(1, Outcome::Delivered, None, None));
    send(host.pending());
    send(host.set_meta("a", "b"));
    send(host.outcome(1));
    send(host.replace_tasks(&[]));
    send(HostMailbox::open(
        SessionPaths::new("/x"),
        JournalMode::Delete,
    ));
    send(AgentMailbox::open(
        SessionPaths::new("/x"),
        JournalMode::Delete,
    ));
}
