//! A runner on a remote Docker engine: `DOCKER_HOST=tcp://…` with mutual TLS
//! (`DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`), as the docker CLI reads them. The "remote"
//! engine is the local one behind a TLS forwarder that requires a client certificate from
//! its CA, so the runner reaches it only by speaking mutual TLS.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ferroclaw_e2e::docker_tls_proxy::{DockerTlsProxy, LOCAL_ENGINE, ServerTls};
use ferroclaw_e2e::{Cluster, docker, docker_available, docker_inspect, offline_agent_image};
use serde_json::{Value, json};

/// Whether the openssl CLI is here to make certificates. With `FERROCLAW_REQUIRE_DOCKER=1`
/// (CI) its absence is a failure, not a skip, as a missing engine is.
fn openssl_available() -> bool {
    let ok = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("FERROCLAW_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("FERROCLAW_REQUIRE_DOCKER=1 but there is no openssl CLI to make certificates");
    }
    ok
}

fn prerequisites() -> bool {
    if !docker_available() {
        eprintln!("skipped: no Docker engine");
        return false;
    }
    if !openssl_available() {
        eprintln!("skipped: no openssl CLI to make certificates");
        return false;
    }
    true
}

/// Runs `openssl` in `dir` with the words of `command` (fixed flags), then `args` (values,
/// such as paths, that may hold spaces).
fn openssl(dir: &Path, command: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(command.split_whitespace())
        .args(args)
        .output()
        .context("running openssl")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {command} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A self-signed CA in `dir`: `ca.pem` and `ca-key.pem`.
fn make_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    openssl(
        dir,
        "req -x509 -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
            -keyout ca-key.pem -out ca.pem -days 2 -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign,cRLSign",
        &["-subj", &format!("/CN={name}")],
    )
}

const SERVER_EXTENSIONS: &str = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
    basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n";
const CLIENT_EXTENSIONS: &str = "extendedKeyUsage=clientAuth\n\
    basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n";

/// `cert.pem` and `key.pem` in `dir`, signed by the CA in `ca`, with `extensions`.
fn issue(ca: &Path, dir: &Path, subject: &str, extensions: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("extensions.cnf"), extensions)?;
    openssl(
        dir,
        "req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
            -keyout key.pem -out request.csr",
        &["-subj", &format!("/CN={subject}")],
    )?;
    openssl(
        dir,
        "x509 -req -in request.csr -CAcreateserial -out cert.pem -days 2 -extfile extensions.cnf",
        &[
            "-CA",
            &ca.join("ca.pem").display().to_string(),
            "-CAkey",
            &ca.join("ca-key.pem").display().to_string(),
        ],
    )
}

/// Certificates under `root`: `ca/` (the engine's CA), `server/` (the engine's, for
/// 127.0.0.1), and two directories laid out as `DOCKER_CERT_PATH` wants them (`ca.pem`,
/// `cert.pem`, `key.pem`), both trusting the engine's CA: `client/` with a client certificate
/// from that CA, `stranger/` with one from another CA.
fn make_certificates(root: &Path) -> anyhow::Result<()> {
    let (ca, other_ca) = (root.join("ca"), root.join("other-ca"));
    make_ca(&ca, "engine CA")?;
    make_ca(&other_ca, "another CA")?;
    issue(&ca, &root.join("server"), "engine", SERVER_EXTENSIONS)?;
    for (dir, issuer) in [("client", &ca), ("stranger", &other_ca)] {
        let dir = root.join(dir);
        issue(issuer, &dir, "runner", CLIENT_EXTENSIONS)?;
        std::fs::copy(ca.join("ca.pem"), dir.join("ca.pem"))?;
    }
    Ok(())
}

/// The local engine behind mutual TLS, accepting client certificates of `root/ca`.
async fn remote_engine(root: &Path) -> anyhow::Result<DockerTlsProxy> {
    let tls = ServerTls {
        client_ca: &root.join("ca/ca.pem"),
        cert: &root.join("server/cert.pem"),
        key: &root.join("server/key.pem"),
    };
    DockerTlsProxy::start(&tls, Path::new(LOCAL_ENGINE)).await
}

/// A docker-backed cluster whose runner uses the engine at `engine` with the client
/// certificates in `cert_path`.
async fn remote_cluster(
    dir: &Path,
    engine: &DockerTlsProxy,
    cert_path: &Path,
) -> anyhow::Result<Cluster> {
    let env = [
        ("FERROCLAW_RUNNER_BACKEND", "docker".to_string()),
        ("FERROCLAW_AGENT_IMAGE", offline_agent_image()?),
        ("DOCKER_HOST", format!("tcp://{}", engine.addr)),
        ("DOCKER_TLS_VERIFY", "1".to_string()),
        ("DOCKER_CERT_PATH", cert_path.display().to_string()),
    ];
    Cluster::start(dir, &env).await
}

fn session_id(body: &Value) -> anyhow::Result<String> {
    Ok(body["session_id"]
        .as_str()
        .with_context(|| format!("no session id in {body}"))?
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_drives_a_remote_engine_over_mutual_tls() -> anyhow::Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    make_certificates(&pki)?;
    let engine = remote_engine(&pki).await?;
    let cluster = remote_cluster(&dir.path().join("data"), &engine, &pki.join("client")).await?;

    let (status, body) = cluster
        .post_message("remote", "hello over TLS", None)
        .await?;
    assert_eq!(status, 202, "{body}");
    cluster
        .wait_for_lines(
            "remote",
            &["echo: hello over TLS".into()],
            Duration::from_secs(60),
        )
        .await?;
    eprintln!(
        "TLS handshakes: {} accepted, {} refused",
        engine.accepted(),
        engine.refused()
    );
    assert!(
        engine.accepted() > 0,
        "the runner never completed a mutual-TLS handshake with the engine"
    );
    let session = session_id(&body)?;
    let name = format!("ferroclaw-agent-{session}");
    let container = docker_inspect(&name).context("the agent's container is not on the engine")?;
    assert_eq!(
        container["Config"]["Labels"]["ferroclaw.session"],
        json!(session)
    );

    let (_, status) = cluster.get("/v1/status").await?;
    let agents = &status["agents"];
    assert_eq!(agents["backend"], json!("docker"), "{status}");
    assert_eq!(agents["engine_ok"], json!(true), "{status}");
    let described = agents["engine"].as_str().unwrap_or_default();
    assert!(
        described.starts_with("Docker ")
            && described.ends_with(&format!(" at tcp://{} (TLS)", engine.addr)),
        "{described}"
    );

    // The runner removes its containers on the way out, through the same TLS connection.
    cluster.stop().await?;
    assert!(
        docker_inspect(&name).is_none(),
        "the container was left behind"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused_and_readyz_says_so() -> anyhow::Result<()>
{
    if !prerequisites() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    make_certificates(&pki)?;
    let engine = remote_engine(&pki).await?;
    let cluster = remote_cluster(&dir.path().join("data"), &engine, &pki.join("stranger")).await?;

    let (status, body) = cluster
        .post_message("refused", "anyone there?", None)
        .await?;
    assert_eq!(
        status, 202,
        "accepted while the engine refuses the runner: {body}"
    );
    let mut not_ready = Value::Null;
    for _ in 0..50 {
        let (status, ready) = cluster.get("/readyz").await?;
        if status == 503 {
            not_ready = ready;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(not_ready["runner"], json!("unreachable"), "{not_ready}");
    // Time in which an agent on a reachable engine would have answered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(cluster.texts("refused").await?.is_empty(), "no answer");
    eprintln!(
        "TLS handshakes: {} accepted, {} refused",
        engine.accepted(),
        engine.refused()
    );
    assert!(engine.refused() > 0, "the engine refused no handshake");
    assert_eq!(
        engine.accepted(),
        0,
        "a stranger's certificate was accepted"
    );

    let session = session_id(&body)?;
    cluster.stop().await?;
    let label = format!("label=ferroclaw.session={session}");
    let containers = docker(&["ps", "--all", "--quiet", "--filter", &label])?;
    assert!(
        containers.trim().is_empty(),
        "a container was made: {containers}"
    );
    Ok(())
}
