//! Slot scheduling under load: many more busy sessions than agent slots. Every message is
//! answered exactly once, and agents stay warm: the runner starts about one agent per
//! session, not one per message (counted in the session listing's `agent_starts`).

use std::sync::Arc;
use std::time::Duration;

use ferroclaw_e2e::Cluster;

const SESSIONS: usize = 30;
const SLOTS: usize = 4;
/// Each session sends this many bursts, one after another: the next once the replies to
/// the previous are all visible.
const ROUNDS: usize = 4;
/// Messages per burst, posted back to back.
const BURST: usize = 2;

fn line(session: usize, round: usize, message: usize) -> String {
    format!("echo: s{session} r{round} m{message}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_sessions_on_four_slots_answered_once_with_few_agent_starts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Arc::new(
        Cluster::start(
            dir.path(),
            &[("FERROCLAW_MAX_RUNNING_AGENTS", SLOTS.to_string())],
        )
        .await?,
    );
    let mut clients = Vec::new();
    for s in 0..SESSIONS {
        let cluster = cluster.clone();
        clients.push(tokio::spawn(async move {
            let conversation = format!("slots-{s}");
            for r in 0..ROUNDS {
                for m in 0..BURST {
                    let (status, body) = cluster
                        .post_message(&conversation, &format!("s{s} r{r} m{m}"), None)
                        .await?;
                    anyhow::ensure!(status == 202, "{conversation}: POST got {status}: {body}");
                }
                let want: Vec<String> = (0..BURST).map(|m| line(s, r, m)).collect();
                cluster
                    .wait_for_lines(&conversation, &want, Duration::from_secs(120))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for client in clients {
        client.await??;
    }

    // Exactly once: every message's echo line appears once, and nothing else.
    for s in 0..SESSIONS {
        let conversation = format!("slots-{s}");
        let mut lines: Vec<String> = cluster
            .texts(&conversation)
            .await?
            .iter()
            .flat_map(|t| t.lines().map(String::from).collect::<Vec<_>>())
            .collect();
        lines.sort();
        let mut want: Vec<String> = (0..ROUNDS)
            .flat_map(|r| (0..BURST).map(move |m| line(s, r, m)))
            .collect();
        want.sort();
        assert_eq!(lines, want, "{conversation}: replies not exactly once");
    }

    let (status, listing) = cluster.get("/v1/sessions").await?;
    assert_eq!(status, 200, "{listing}");
    let sessions = listing["sessions"].as_array().cloned().unwrap_or_default();
    assert_eq!(sessions.len(), SESSIONS, "{listing}");
    let per_session: Vec<u64> = sessions
        .iter()
        .map(|s| s["agent_starts"].as_u64().unwrap_or(0))
        .collect();
    let total = listing["agent_starts_total"]
        .as_u64()
        .expect("the listing reports agent_starts_total");
    assert_eq!(per_session.iter().sum::<u64>(), total, "{listing}");
    assert!(
        per_session.iter().all(|n| *n >= 1),
        "every session's agent started at least once: {per_session:?}"
    );
    // The bound: 2 × SESSIONS = 60 starts for 240 messages. Every session needs one start
    // (30). After that, a session's agent is only taken from it once it has had nothing
    // due for slot_policy::MIN_IDLE (100 ms, stretched to twice the session's own recent
    // gap between a reply and its next message, at most 1 s) while someone waits, or after
    // a turn of MAX_TURN (5 s). A session's bursts follow each other as fast as a reply travels to
    // the client and its next burst back (milliseconds; tens under load), and its whole
    // exchange takes well under MAX_TURN, so it keeps its agent from its first burst to
    // its last: about one start per session. The margin of one more start per session
    // covers gaps stretched past MIN_IDLE on a loaded machine. The old policy stopped
    // every idle agent whenever anyone waited, i.e. between any two bursts: about one
    // start per burst (120 here).
    let bound = 2 * SESSIONS as u64;
    eprintln!(
        "agent starts: {total} for {} messages over {SESSIONS} sessions on {SLOTS} slots (bound {bound})",
        SESSIONS * ROUNDS * BURST
    );
    assert!(
        total <= bound,
        "{total} agent starts for {SESSIONS} sessions × {ROUNDS} bursts: agents were not kept warm ({per_session:?})"
    );

    match Arc::try_unwrap(cluster) {
        Ok(cluster) => cluster.stop().await,
        Err(_) => anyhow::bail!("cluster still shared"),
    }
}
