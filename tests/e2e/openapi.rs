//! `GET /openapi.json` on a live gateway: valid OpenAPI 3.1 (checked against the official
//! OAS 3.1 schema that Schemathesis bundles), then Schemathesis (PyPI) fuzzes every
//! operation and finds no 5xx and no response the document does not describe.
//!
//! Schemathesis is looked for in `target/schemathesis-venv` (what `.ci/run` makes), then on
//! PATH. Without it the test says so and passes, unless `FERROCLAW_REQUIRE_SCHEMATHESIS=1`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use ferroclaw_e2e::Cluster;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const REQUIRE_ENV: &str = "FERROCLAW_REQUIRE_SCHEMATHESIS";

/// The Schemathesis executable, if installed.
fn schemathesis() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let venv = workspace.join("target/schemathesis-venv/bin/schemathesis");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("schemathesis"))
            .find(|candidate| candidate.is_file())
    })
}

/// The Python that runs `schemathesis` (its script's `#!` line), to reach the OAS 3.1
/// schema it bundles.
fn python_of(script: &Path) -> anyhow::Result<PathBuf> {
    let text =
        std::fs::read_to_string(script).with_context(|| format!("reading {}", script.display()))?;
    let line = text.lines().next().unwrap_or_default();
    let interpreter = line
        .strip_prefix("#!")
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("{} has no #! line", script.display()))?;
    Ok(PathBuf::from(interpreter))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_valid_and_schemathesis_finds_no_5xx_or_undocumented_answer()
-> anyhow::Result<()> {
    let Some(schemathesis) = schemathesis() else {
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            bail!("schemathesis is not installed and {REQUIRE_ENV}=1 (see .ci/run)");
        }
        eprintln!(
            "skipped: schemathesis not found in target/schemathesis-venv or on PATH \
             (python3 -m venv target/schemathesis-venv && \
             target/schemathesis-venv/bin/pip install schemathesis)"
        );
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ferroclaw.toml");
    // Short long-polls: Schemathesis asks for `wait` values up to the maximum.
    std::fs::write(&config, "[gateway]\nmax_wait_secs = 1\n")?;
    let cluster = Cluster::start(
        &dir.path().join("data"),
        &[
            ("FERROCLAW_API_TOKEN", "s3cret".into()),
            ("FERROCLAW_CONFIG", config.display().to_string()),
        ],
    )
    .await?;
    let api = cluster.api();

    // Served without a token, as JSON, and it is OpenAPI 3.1.
    let response = reqwest::get(format!("{api}/openapi.json")).await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let document = response.bytes().await?;
    let parsed: Value = serde_json::from_slice(&document)?;
    assert_eq!(parsed["openapi"], "3.1.0");

    // The official OAS 3.1 schema (as Schemathesis ships it) accepts the document.
    let python = python_of(&schemathesis)?;
    let mut validate = tokio::process::Command::new(&python)
        .args([
            "-c",
            "import json, sys\n\
             from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR\n\
             OPENAPI_31_VALIDATOR.validate(json.load(sys.stdin))\n\
             print('valid OpenAPI 3.1')",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", python.display()))?;
    let mut stdin = validate.stdin.take().context("validator stdin")?;
    stdin.write_all(&document).await?;
    drop(stdin);
    let validated = validate.wait_with_output().await?;
    assert!(
        validated.status.success(),
        "the document is not valid OpenAPI 3.1:\n{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    // Schemathesis: every operation, positive and negative inputs, with the token.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        % 1_000_000;
    let args: Vec<String> = [
        "run",
        &format!("{api}/openapi.json"),
        "--header",
        "Authorization: Bearer s3cret",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples",
        "15",
        "--seed",
        &seed.to_string(),
        // The event stream never ends by design; its handler shares the conversation
        // checks of `/messages`, which is tested here.
        "--exclude-path-regex",
        "/events$",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--no-color",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = tokio::process::Command::new(&schemathesis)
        .args(&args)
        // Hypothesis keeps its files in the working directory.
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .context("schemathesis ran longer than 150 s")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis {} failed ({}):\n{stdout}\n{stderr}",
        args.join(" "),
        output.status
    );
    // Its summary, for the test log (`cargo test -- --nocapture`).
    let summary = stdout
        .find("SUMMARY")
        .map_or(&stdout[..], |at| &stdout[at..]);
    eprintln!("schemathesis {}\n{summary}", args.join(" "));
    cluster.stop().await
}
