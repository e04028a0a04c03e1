//! A stand-in for a remote Docker engine: TLS on loopback that requires a client certificate
//! signed by one CA (as `dockerd --tlsverify` does), each accepted connection piped to the
//! local engine's Unix socket. It counts the handshakes it accepted and refused, so a test
//! can tell that a client really spoke mutual TLS to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// The local engine's socket.
pub const LOCAL_ENGINE: &str = "/var/run/docker.sock";

/// The server side's PEM files, as `dockerd --tlscacert/--tlscert/--tlskey` takes them.
pub struct ServerTls<'a> {
    /// The CA whose client certificates are accepted.
    pub client_ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// The forwarder, running until dropped.
pub struct DockerTlsProxy {
    /// Where clients connect: `tcp://{addr}` is their `DOCKER_HOST`.
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    /// The accept loop; aborting it drops the connections it spawned too.
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("certificates in {}", path.display()))
}

fn acceptor(tls: &ServerTls<'_>) -> anyhow::Result<TlsAcceptor> {
    // Explicit provider: the process-wide default depends on which features the tree enables.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs(tls.client_ca)? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("client certificate verifier")?;
    let key = PrivateKeyDer::from_pem_file(tls.key)
        .with_context(|| format!("private key in {}", tls.key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(tls.cert)?, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl DockerTlsProxy {
    /// Listens on `127.0.0.1:0` and forwards to the engine at `engine` (a Unix socket).
    pub async fn start(tls: &ServerTls<'_>, engine: &Path) -> anyhow::Result<Self> {
        let acceptor = acceptor(tls)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn(serve(
            listener,
            acceptor,
            engine.to_path_buf(),
            counts.clone(),
        ));
        Ok(Self { addr, counts, task })
    }

    /// TLS handshakes that completed: the client's certificate was signed by the CA.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed: no certificate, one from another CA, or no TLS at all.
    pub fn refused(&self) -> usize {
        self.counts.refused.load(Ordering::SeqCst)
    }
}

impl Drop for DockerTlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, engine: PathBuf, counts: Arc<Counts>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, say: wait instead of spinning.
                eprintln!("docker TLS proxy: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, engine, counts) = (acceptor.clone(), engine.clone(), counts.clone());
        connections.spawn(async move {
            let mut tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    counts.refused.fetch_add(1, Ordering::SeqCst);
                    eprintln!("docker TLS proxy: handshake refused: {e}");
                    return;
                }
            };
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            match UnixStream::connect(&engine).await {
                Ok(mut unix) => {
                    // Either side closing ends the exchange; errors are the client's business.
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut unix).await;
                }
                Err(e) => eprintln!("docker TLS proxy: {}: {e}", engine.display()),
            }
        });
    }
}
