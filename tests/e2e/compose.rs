//! `docker compose up` from the offline images → a webhook → its reply, through an agent
//! container the runner creates on the host's engine.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferroclaw_e2e::{compose_command, docker_available, offline_agent_image};
use serde_json::{Value, json};

struct Compose {
    command: Vec<String>,
    project: String,
    /// Where compose runs: the data directory is `ferroclaw-data` in it.
    dir: std::path::PathBuf,
    envs: Vec<(&'static str, String)>,
}

impl Compose {
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(&self.command[0])
            .args(&self.command[1..])
            .args(["-p", &self.project, "-f"])
            .arg(root.join("docker-compose.yml"))
            .args(args)
            .current_dir(&self.dir)
            // The compose file names the data directory `${PWD}/ferroclaw-data`.
            .env("PWD", &self.dir)
            .envs(self.envs.iter().map(|(k, v)| (*k, v.as_str())))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(&["down", "--remove-orphans", "--timeout", "15"]);
    }
}

/// The host port the engine chose for the gateway: the test publishes port 0, because a
/// port picked by the test could be taken by a parallel test before compose binds it.
fn published_port(compose: &Compose) -> anyhow::Result<u16> {
    let out = compose.run(&["port", "gateway", "8080"])?;
    let port = out
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .filter(|p: &u16| *p != 0);
    port.ok_or_else(|| anyhow::anyhow!("compose port gave no host port: {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_up_then_a_webhook_gets_its_reply() -> anyhow::Result<()> {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return Ok(());
    }
    let Some(command) = compose_command() else {
        anyhow::ensure!(
            std::env::var("FERROCLAW_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "FERROCLAW_REQUIRE_DOCKER=1 but neither `docker compose` nor `docker-compose` is here"
        );
        eprintln!("skipped: no compose");
        return Ok(());
    };
    offline_agent_image()?;
    let dir = tempfile::tempdir()?;
    let compose = Compose {
        command,
        project: format!("fce2e{}", std::process::id()),
        dir: dir.path().to_path_buf(),
        envs: vec![
            ("FERROCLAW_API_TOKEN", "compose-token".into()),
            ("FERROCLAW_TAG", "e2e".into()),
            ("FERROCLAW_HTTP_PORT", "0".into()),
            (
                "FERROCLAW_AGENT_NETWORK",
                format!("fce2e{}-agents", std::process::id()),
            ),
        ],
    };
    compose.run(&["up", "-d"])?;
    let port = published_port(&compose)?;

    let api = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = http.get(format!("{api}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the compose stack never became ready"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        dir.path().join("ferroclaw-data/runner.db").is_file(),
        "the data directory defaults to ./ferroclaw-data where compose runs"
    );
    let unauthorized = http
        .post(format!("{api}/v1/hooks/default"))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(
        unauthorized.status().as_u16(),
        401,
        "compose requires the API token"
    );
    let accepted: Value = http
        .post(format!("{api}/v1/hooks/default"))
        .bearer_auth("compose-token")
        .json(&json!({"from": "compose"}))
        .send()
        .await?
        .json()
        .await?;
    assert!(accepted["session_id"].is_string(), "{accepted}");
    let replies: Value = http
        .get(format!(
            "{api}/v1/conversations/webhook-default/messages?wait=60"
        ))
        .bearer_auth("compose-token")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        replies["messages"][0]["text"],
        json!(r#"echo: webhook default: {"from":"compose"}"#),
        "{replies}"
    );
    let agent = format!(
        "ferroclaw-agent-{}",
        accepted["session_id"].as_str().unwrap_or_default()
    );
    assert!(
        ferroclaw_e2e::docker_inspect(&agent).is_some(),
        "the agent ran in its own container"
    );
    let network = format!("fce2e{}-agents", std::process::id());
    let agents_net: Value =
        serde_json::from_str(&ferroclaw_e2e::docker(&["network", "inspect", &network])?)?;
    assert_eq!(
        agents_net[0]["Internal"],
        json!(true),
        "the agents' network has no route out"
    );
    // From a container on the agents' network: the proxy opens, the runner's gRPC does not.
    let from_agents_network = |target: &str| {
        Command::new("docker")
            .args(["run", "--rm", "--network", &network, "ferroclaw:e2e"])
            .args(["/ferroclaw", "probe", target])
            .output()
    };
    let proxy = from_agents_network("tcp://runner:50055")?;
    assert!(
        proxy.status.success(),
        "the proxy is reachable from the agents' network: {}",
        String::from_utf8_lossy(&proxy.stderr)
    );
    for target in ["tcp://runner:50051", "grpc://runner:50051"] {
        let grpc = from_agents_network(target)?;
        assert!(
            !grpc.status.success(),
            "{target} must not be reachable from the agents' network"
        );
    }
    compose.run(&["down", "--remove-orphans", "--timeout", "15"])?;
    assert!(
        ferroclaw_e2e::docker_inspect(&agent).is_none(),
        "compose down stopped the agent container"
    );
    Ok(())
}

/// `--profile scale` adds PostgreSQL and a second runner, delivery and scheduler, and every
/// service lists every instance of its peers (without the profile, the second names never
/// serve and are never called: `compose_up_then_a_webhook_gets_its_reply` runs that way).
#[test]
fn the_scale_profile_adds_a_second_instance_of_each_service() -> anyhow::Result<()> {
    let Some(command) = compose_command() else {
        anyhow::ensure!(
            std::env::var("FERROCLAW_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "FERROCLAW_REQUIRE_DOCKER=1 but neither `docker compose` nor `docker-compose` is here"
        );
        eprintln!("skipped: no compose");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let compose = Compose {
        command,
        project: format!("fcscale{}", std::process::id()),
        dir: dir.path().to_path_buf(),
        envs: vec![
            ("FERROCLAW_API_TOKEN", "t".into()),
            // Two runners serving different sessions, as the README has it.
            ("FERROCLAW_RUNNER_ID", "runner-1".into()),
            ("FERROCLAW_RUNNER_2_ID", "runner-2".into()),
        ],
    };
    let services = |profile: &[&str]| -> anyhow::Result<Vec<String>> {
        let mut args = profile.to_vec();
        args.extend(["config", "--services"]);
        let mut names: Vec<String> = compose
            .run(&args)?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        names.sort();
        Ok(names)
    };
    // (docker-compose 1.x lists every service whatever the profile: only the profile's
    // own listing is checked, and that the second ones belong to the profile.)
    let scaled = services(&["--profile", "scale"])?;
    for second in ["delivery-2", "postgres", "runner-2", "scheduler-2"] {
        assert!(scaled.contains(&second.to_string()), "{scaled:?}");
    }
    let config = compose.run(&["--profile", "scale", "config"])?;
    // The lines after `profiles:` name them ("- scale" in either compose's layout).
    let lines: Vec<&str> = config.lines().map(str::trim).collect();
    let in_profile = lines
        .windows(2)
        .filter(|w| w[0] == "profiles:" && w[1] == "- scale")
        .count();
    assert_eq!(
        in_profile, 4,
        "four services in the scale profile:\n{config}"
    );
    for list in [
        "http://runner:50051,http://runner-2:50051",
        "http://delivery:50052,http://delivery-2:50052",
        "http://scheduler:50053,http://scheduler-2:50053",
    ] {
        assert!(config.contains(list), "{list} missing from:\n{config}");
    }
    for setting in [
        "FERROCLAW_RUNNER_ID: runner-1",
        "FERROCLAW_RUNNER_ID: runner-2",
        "FERROCLAW_RUNNER_ADVERTISE_URL: http://runner:50051",
        "FERROCLAW_RUNNER_ADVERTISE_URL: http://runner-2:50051",
    ] {
        assert!(
            config.contains(setting),
            "{setting} missing from:\n{config}"
        );
    }
    Ok(())
}
