//! A hostile stand-in for `ferroclaw-agent`, run in an agent container by the isolation test.
//! It tries what a compromised agent would, then answers each message with a JSON report of
//! what it managed: the test asserts that every attempt failed.

use std::path::Path;

use ferroclaw_mailbox::agent::BatchStatus;
use ferroclaw_mailbox::content::ChatOut;
use ferroclaw_mailbox::{AgentMailbox, JournalMode, NewOutbound, OutboundContent, SessionPaths};
use serde_json::json;

fn attempts() -> serde_json::Value {
    // Another session's inbound mailbox, by its host path (passed in by the test).
    let other = std::env::var("FERROCLAW_ECHO_OTHER_SESSION_DB").unwrap_or_default();
    let read_other = !other.is_empty() && std::fs::read(&other).is_ok();
    let write_own_inbound = std::fs::OpenOptions::new()
        .append(true)
        .open("/session/in/inbound.db")
        .is_ok();
    let write_root = std::fs::write("/evil", b"x").is_ok();
    // Network: any interface but loopback, or the host's loopback listener the test opened.
    let interfaces: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let host_port = std::env::var("FERROCLAW_ECHO_HOST_PORT").unwrap_or_default();
    let reach_host = !host_port.is_empty()
        && std::net::TcpStream::connect_timeout(
            &format!("127.0.0.1:{host_port}").parse().expect("address"),
            std::time::Duration::from_secs(1),
        )
        .is_ok();
    let docker_socket = Path::new("/var/run/docker.sock").exists();
    json!({
        "uid": unsafe { libc::getuid() },
        "read_other_session": read_other,
        "write_own_inbound": write_own_inbound,
        "write_root_fs": write_root,
        "interfaces": interfaces,
        "reach_host_loopback": reach_host,
        "docker_socket": docker_socket,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let paths = SessionPaths::new("/session");
    let mut mailbox = AgentMailbox::open(paths, JournalMode::Delete).await?;
    let report = attempts().to_string();
    for _ in 0..100 {
        let batch = mailbox.due(ferroclaw_mailbox::now_ms()).await?;
        if let Some(last) = batch.rows.last() {
            let seqs: Vec<i64> = batch.rows.iter().map(|r| r.seq).collect();
            mailbox.claim(&seqs).await?;
            let reply = NewOutbound {
                in_reply_to: Some(last.seq),
                destination: last.origin.reply_to.clone(),
                content: OutboundContent::Chat(ChatOut {
                    text: report.clone(),
                }),
                trace: None,
            };
            mailbox
                .finish(&seqs, &[reply], BatchStatus::Completed)
                .await?;
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}
