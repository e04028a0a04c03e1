//! Messages for sessions whose runner is missing (several runners, no shared storage):
//! any live runner takes the enqueue, checked as it would be, and keeps it in the
//! `handoff` table, in order; the session's runner, back, moves them into the session's
//! mailbox and deletes them. A message is kept under its idempotency key (the message id),
//! so a repeat is a duplicate here and in the mailbox, and a runner that dies between the
//! mailbox write and the delete only makes the next move a duplicate.

use prost::Message;
use sqlx::AnyPool;

use crate::error::{Result, RunnerError};
use ferroclaw_proto::v1::EnqueueRequest;

/// Messages moved in one round.
pub const MOVE_AT_ONCE: i64 = 256;

/// One waiting message.
pub struct Waiting {
    pub n: i64,
    pub session_id: String,
    pub request: EnqueueRequest,
}

/// Keeps `request` (its idempotency key set to the message id) for `session_id`; `false`
/// when a message with that id waits already.
pub async fn keep(pool: &AnyPool, session_id: &str, request: &EnqueueRequest) -> Result<bool> {
    let kept = sqlx::query(
        "INSERT INTO handoff (session_id, message_id, request, created_at)
         VALUES ($1, $2, $3, $4) ON CONFLICT (session_id, message_id) DO NOTHING",
    )
    .bind(session_id)
    .bind(&request.idempotency_key)
    .bind(request.encode_to_vec())
    .bind(ferroclaw_mailbox::now_ms())
    .execute(pool)
    .await?;
    Ok(kept.rows_affected() == 1)
}

/// The oldest waiting messages after `after` (a message's `n`) of the sessions placed on
/// `runner`, in the order they came.
pub async fn waiting_for(pool: &AnyPool, runner: &str, after: i64) -> Result<Vec<Waiting>> {
    let rows: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
        "SELECT h.n, h.session_id, h.request FROM handoff h
         JOIN sessions s ON s.id = h.session_id
         WHERE s.runner = $1 AND h.n > $3 ORDER BY h.n LIMIT $2",
    )
    .bind(runner)
    .bind(MOVE_AT_ONCE)
    .bind(after)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(n, session_id, bytes)| {
            let request = EnqueueRequest::decode(bytes.as_slice()).map_err(|e| {
                RunnerError::Config(format!(
                    "handoff row {n} of {session_id} is unreadable: {e}"
                ))
            })?;
            Ok(Waiting {
                n,
                session_id,
                request,
            })
        })
        .collect()
}

/// Whether messages of `session_id` wait (a direct enqueue must not pass them).
pub async fn any_for(pool: &AnyPool, session_id: &str) -> Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM handoff WHERE session_id = $1")
        .bind(session_id)
        .fetch_one(pool)
        .await?;
    Ok(n > 0)
}

/// Forgets a message once it is in its mailbox.
pub async fn moved(pool: &AnyPool, n: i64) -> Result<()> {
    sqlx::query("DELETE FROM handoff WHERE n = $1")
        .bind(n)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use ferroclaw_common::service_db::Location;

    #[tokio::test]
    async fn kept_messages_come_back_in_order_once_each_for_their_runner() {
        let Some(cluster) = ferroclaw_common::test_postgres::cluster() else {
            return;
        };
        let url = cluster.create_database("handoff").await.unwrap();
        let reg = Registry::open(Location::Postgres(url)).await.unwrap();
        let on_b = reg.get_or_create("main", "k", Some("b")).await.unwrap();
        let on_a = reg.get_or_create("main", "other", Some("a")).await.unwrap();
        let message = |session: &str, key: &str| EnqueueRequest {
            session_id: session.into(),
            idempotency_key: key.into(),
            kind: "chat".into(),
            content_json: format!("{{\"text\":\"{key}\"}}"),
            ..Default::default()
        };
        let pool = reg.pool();
        assert!(
            keep(pool, &on_b.id, &message(&on_b.id, "m1"))
                .await
                .unwrap()
        );
        assert!(keep(pool, &on_a.id, &message(&on_a.id, "x")).await.unwrap());
        assert!(
            keep(pool, &on_b.id, &message(&on_b.id, "m2"))
                .await
                .unwrap()
        );
        assert!(
            !keep(pool, &on_b.id, &message(&on_b.id, "m1"))
                .await
                .unwrap(),
            "a repeat"
        );
        assert!(any_for(pool, &on_b.id).await.unwrap());

        let for_b = waiting_for(pool, "b", 0).await.unwrap();
        let keys: Vec<&str> = for_b
            .iter()
            .map(|w| w.request.idempotency_key.as_str())
            .collect();
        assert_eq!(keys, ["m1", "m2"], "only b's, in the order they came");
        let after_first = waiting_for(pool, "b", for_b[0].n).await.unwrap();
        assert_eq!(after_first.len(), 1);
        for w in &for_b {
            moved(pool, w.n).await.unwrap();
        }
        assert!(waiting_for(pool, "b", 0).await.unwrap().is_empty());
        assert!(!any_for(pool, &on_b.id).await.unwrap());
        assert_eq!(waiting_for(pool, "a", 0).await.unwrap().len(), 1);
    }
}
