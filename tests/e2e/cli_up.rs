use std::process::Stdio;
use std::time::Duration;

use ferroclaw_e2e::{agent_processes, binary};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferroclaw_up_serves_send_and_hook_then_stops_on_ctrl_c() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut up = Command::new(binary("ferroclaw")?)
        .args(["up", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(up.stdout.take().expect("stdout")).lines();
    let api = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.trim().strip_prefix("REST API") {
                return anyhow::Ok(url.trim().to_string());
            }
        }
        anyhow::bail!("ferroclaw up exited before printing the API address")
    })
    .await??;

    let send = Command::new(binary("ferroclaw")?)
        .args([
            "send",
            "--api",
            &api,
            "-c",
            "cli",
            "--wait",
            "30",
            "hello from the cli",
        ])
        .output()
        .await?;
    assert!(
        send.status.success(),
        "{}",
        String::from_utf8_lossy(&send.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&send.stdout).trim(),
        "echo: hello from the cli"
    );

    let hook = Command::new(binary("ferroclaw")?)
        .args(["hook", "--api", &api, "default", r#"{"from": "cli"}"#])
        .output()
        .await?;
    assert!(
        hook.status.success(),
        "{}",
        String::from_utf8_lossy(&hook.stderr)
    );
    assert!(String::from_utf8_lossy(&hook.stdout).contains("\"session_id\""));

    let bad = Command::new(binary("ferroclaw")?)
        .args(["hook", "--api", &api, "default", "{not json"])
        .output()
        .await?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not valid JSON"));

    // Ctrl-C stops every service and agent, and `up` exits cleanly.
    let pid = up.id().expect("pid") as libc::pid_t;
    // SAFETY: kill(2) on our own child; no memory effects.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait()).await??;
    assert!(status.success(), "ferroclaw up exited with {status}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        agent_processes(dir.path()).is_empty(),
        "agents left running"
    );
    Ok(())
}
