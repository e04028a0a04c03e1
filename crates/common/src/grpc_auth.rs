//! Who may call a gRPC server. The internal services (runner, delivery, scheduler) take a
//! secret shared by ferroclaw's own processes; the public `Gateway` takes the API token.
//! Both travel as `authorization: Bearer <secret>` metadata, checked by a `tower` layer in
//! constant time. Health checks stay open, so probes and orchestrators need no secret.
//!
//! The internal secret is `FERROCLAW_INTERNAL_TOKEN`, or else `<data>/internal.token`
//! (made on first start, 0600): agents get neither, since their mounts hold only their own
//! session and agent folders. Across hosts, mTLS (tonic with rustls) is the stronger option.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

/// The environment variable that gives every service the internal secret.
pub const INTERNAL_TOKEN_ENV: &str = "FERROCLAW_INTERNAL_TOKEN";
/// The file in the data directory that holds it when the variable is unset.
pub const INTERNAL_TOKEN_FILE: &str = "internal.token";

/// A channel whose every call carries the caller's credential, within the client limits
/// of [`crate::grpc::LimitedChannel`].
pub type GrpcChannel = InterceptedService<crate::grpc::LimitedChannel, AttachToken>;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("internal token file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the internal token is not usable as a header value (use printable ASCII)")]
    NotAscii,
}

/// The internal secret: the variable when set, else the data dir's file, made on first use.
/// Several services may start at once; the first to create the file wins and the others
/// read what it wrote.
pub fn internal_token(data_dir: &Path) -> Result<String, AuthError> {
    if let Ok(token) = std::env::var(INTERNAL_TOKEN_ENV)
        && !token.trim().is_empty()
    {
        return Ok(token.trim().to_string());
    }
    let path = data_dir.join(INTERNAL_TOKEN_FILE);
    let file_error = |source| AuthError::File {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(file_error)?;
    for _ in 0..50 {
        match std::fs::read_to_string(&path) {
            Ok(token) if token.trim().len() >= 32 => return Ok(token.trim().to_string()),
            // Another service is writing it right now.
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = format!(
                    "{}{}",
                    uuid::Uuid::new_v4().simple(),
                    uuid::Uuid::new_v4().simple()
                );
                write_new(&path, &token).map_err(file_error)?;
            }
            Err(e) => return Err(file_error(e)),
        }
    }
    Err(file_error(std::io::Error::other(
        "it stays shorter than 32 characters; delete it to have a new one made",
    )))
}

/// The internal secret as a client presents it and as a server requires it.
pub fn internal_auth(data_dir: &Path) -> Result<(AttachToken, RequireToken), AuthError> {
    let token = internal_token(data_dir)?;
    Ok((
        AttachToken::new(Some(&token))?,
        RequireToken::new(Some(&token), "internal token"),
    ))
}

/// Creates `path` with `token` unless it exists already (then the other writer wins).
fn write_new(path: &Path, token: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    // link() fails when the name exists: exactly one token is ever published.
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Adds `authorization: Bearer <secret>` to every call of a client.
#[derive(Clone)]
pub struct AttachToken {
    value: Option<AsciiMetadataValue>,
}

impl AttachToken {
    /// `None` sends no credential (a server without one, such as an open gateway).
    pub fn new(secret: Option<&str>) -> Result<Self, AuthError> {
        let value = secret
            .map(|s| {
                MetadataValue::try_from(format!("Bearer {s}")).map_err(|_| AuthError::NotAscii)
            })
            .transpose()?;
        Ok(Self { value })
    }
}

impl Interceptor for AttachToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The token a request presents: `Authorization: Bearer <token>`, the scheme matched
/// case-insensitively (RFC 9110 §11.1).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares two secrets in time independent of where they differ.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// The server side: a layer that refuses calls without the expected bearer secret.
#[derive(Clone)]
pub struct RequireToken {
    expected: Option<Arc<str>>,
    what: &'static str,
}

impl RequireToken {
    /// `expected: None` lets every call through (a gateway with no API token, on loopback).
    /// `what` names the credential in the refusal ("internal token", "API token").
    pub fn new(expected: Option<&str>, what: &'static str) -> Self {
        Self {
            expected: expected.map(Arc::from),
            what,
        }
    }
}

impl<S> tower::Layer<S> for RequireToken {
    type Service = RequireTokenService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequireTokenService {
            inner,
            policy: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequireTokenService<S> {
    inner: S,
    policy: RequireToken,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for RequireTokenService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(refusal) = self.policy.refusal(&request) {
            return Box::pin(async move { Ok(refusal.into_http()) });
        }
        // The clone is the one polled ready; keep it for this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(request))
    }
}

impl RequireToken {
    fn refusal<B>(&self, request: &http::Request<B>) -> Option<tonic::Status> {
        let expected = self.expected.as_deref()?;
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return None;
        }
        let presented = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        match presented {
            Some(token) if same_secret(token, expected) => None,
            Some(_) => Some(tonic::Status::unauthenticated(format!(
                "wrong {} in authorization metadata",
                self.what
            ))),
            None => Some(tonic::Status::unauthenticated(format!(
                "missing {}: send authorization: Bearer <token> metadata",
                self.what
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }

    #[test]
    fn the_policy_refuses_missing_and_wrong_tokens_but_not_health() {
        let policy = RequireToken::new(Some("s3cret"), "internal token");
        let call = |path: &str, auth: Option<&str>| {
            let mut request = http::Request::builder().uri(path);
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            policy.refusal(&request.body(()).unwrap())
        };
        let rpc = "/ferroclaw.v1.Runner/ListSessions";
        assert_eq!(
            call(rpc, None).map(|s| s.code()),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(rpc, Some("Bearer wrong")).map(|s| s.code()),
            Some(tonic::Code::Unauthenticated)
        );
        assert!(call(rpc, Some("bearer s3cret")).is_none());
        assert!(call("/grpc.health.v1.Health/Check", None).is_none());
        let open = RequireToken::new(None, "API token");
        assert!(open.refusal(&http::Request::new(())).is_none());
    }

    #[test]
    fn the_token_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY-free: the variable is only read; make sure a stray one does not decide.
        if std::env::var(INTERNAL_TOKEN_ENV).is_ok() {
            return;
        }
        let a = internal_token(dir.path()).unwrap();
        let b = internal_token(dir.path()).unwrap();
        assert_eq!(a, b);
        assert!(a.len() >= 32);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(INTERNAL_TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
