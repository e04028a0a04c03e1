//! Questions in an API conversation: the echo agent's `!card` row stands in for
//! `ask_user_question`; the answer comes back to the agent as a system message.

use std::time::Duration;

use ferroclaw_e2e::Cluster;
use serde_json::{Value, json};

fn card(id: &str, expires_in_secs: u64) -> String {
    let card = json!({
        "question_id": id,
        "text": "Deploy now?",
        "options": [{"id": "yes", "label": "Yes"}, {"id": "no", "label": "Not yet"}],
        "expires_in_secs": expires_in_secs,
    });
    format!("!card {card}")
}

async fn card_message(cluster: &Cluster, conversation: &str) -> anyhow::Result<Value> {
    for _ in 0..150 {
        let (messages, _) = cluster.messages(conversation, 0, 0.0).await?;
        if let Some(m) = messages.iter().find(|m| m["kind"] == json!("card")) {
            return Ok(m.clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no card in {conversation}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_answered_once_and_the_agent_gets_the_answer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), &[]).await?;
    cluster
        .post_message("ask", &card("q-deploy", 0), None)
        .await?;
    let shown = card_message(&cluster, "ask").await?;
    assert_eq!(shown["text"], json!("Deploy now?"));
    assert_eq!(shown["content"]["options"][1]["label"], json!("Not yet"));

    let (status, body) = cluster
        .post(
            "/v1/questions/q-deploy/answer",
            &json!({"option": "maybe", "user": "ann"}),
        )
        .await?;
    assert_eq!(status, 400, "not an option: {body}");
    let (status, body) = cluster
        .post(
            "/v1/questions/q-deploy/answer",
            &json!({"option": "yes", "user": "ann"}),
        )
        .await?;
    assert_eq!(
        (status, body["label"].clone()),
        (200, json!("Yes")),
        "{body}"
    );
    let (status, body) = cluster
        .post(
            "/v1/questions/q-deploy/answer",
            &json!({"option": "no", "user": "bob"}),
        )
        .await?;
    assert_eq!(status, 409, "a second answer changes nothing: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("already answered")
    );
    let (status, _) = cluster
        .post("/v1/questions/q-none/answer", &json!({"option": "yes"}))
        .await?;
    assert_eq!(status, 404);

    // The agent received exactly the first answer.
    let lines = cluster
        .wait_for_lines(
            "ask",
            &["echo: system question_response: ann answered \"Yes\"".into()],
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("question_response"))
            .count(),
        1,
        "{lines:?}"
    );

    // A late answer is refused as expired.
    cluster
        .post_message("ask", &card("q-late", 1), None)
        .await?;
    for _ in 0..100 {
        let (messages, _) = cluster.messages("ask", 0, 0.0).await?;
        if messages
            .iter()
            .any(|m| m["content"]["question_id"] == json!("q-late"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = cluster
        .post(
            "/v1/questions/q-late/answer",
            &json!({"option": "yes", "user": "ann"}),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("expired"),
        "{body}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_only_question_refuses_other_answerers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ferroclaw.toml");
    std::fs::write(
        &config,
        "[roles]\nadmins = [\"ann\"]\n[[agents]]\nname = \"main\"\nanswerers = \"admins\"\n",
    )?;
    let cluster = Cluster::start(
        &dir.path().join("data"),
        &[("FERROCLAW_CONFIG", config.display().to_string())],
    )
    .await?;
    cluster
        .post_message("ops", &card("q-admin", 0), None)
        .await?;
    card_message(&cluster, "ops").await?;
    let (status, body) = cluster
        .post(
            "/v1/questions/q-admin/answer",
            &json!({"option": "yes", "user": "bob"}),
        )
        .await?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["error"]["message"],
        json!("only admins may answer this question, and \"bob\" is not one")
    );
    let (status, body) = cluster
        .post(
            "/v1/questions/q-admin/answer",
            &json!({"option": "yes", "user": "ann"}),
        )
        .await?;
    assert_eq!(status, 200, "bob's refusal changed nothing: {body}");
    cluster
        .wait_for_lines(
            "ops",
            &["echo: system question_response: ann answered \"Yes\"".into()],
            Duration::from_secs(30),
        )
        .await?;
    cluster.stop().await
}
