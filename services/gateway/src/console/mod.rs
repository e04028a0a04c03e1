//! The operator console at `/ui`: server-rendered HTML (maud escapes every interpolation)
//! plus one small script and stylesheet embedded in the binary. No build chain, no CDN.
//!
//! Sign-in trades the API token for a session cookie ([`auth`]); every state-changing form
//! carries a CSRF token derived from the session. Without an API token the gateway listens
//! on loopback only, and the console needs no sign-in (forms still carry the CSRF token).
//! Every response carries a strict CSP (no inline script or style), `X-Frame-Options: DENY`
//! and `Referrer-Policy: no-referrer`.

mod agents;
mod assets;
pub mod auth;
mod conversation;
mod deliveries;
mod health;
mod layout;
mod paging;
mod reply;
mod schedule_words;
mod session_view;
pub mod sessions;
mod sign_in;
mod tasks;
mod time;
mod urls;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::http::AppState;
use auth::{Keys, Signed};
pub use reply::ConsoleError;

/// What the console's handlers share: the API's state and the sign-in keys.
#[derive(Clone)]
pub struct ConsoleState {
    pub app: AppState,
    pub keys: Arc<Keys>,
}

impl ConsoleState {
    /// Whether the console asks for the API token (it does when the API does).
    fn needs_sign_in(&self) -> bool {
        self.app.config.gateway.api_token.is_some()
    }
}

/// The console's routes, with their own state (mergeable into the API's router).
pub fn router<S: Clone + Send + Sync + 'static>(app: AppState) -> Router<S> {
    let limit = app.config.gateway.max_body_bytes;
    let state = ConsoleState {
        app,
        keys: Arc::new(Keys::new()),
    };
    Router::new()
        .route("/ui", get(sign_in::index))
        .route("/ui/sign-in", post(sign_in::sign_in))
        .route("/ui/sign-out", post(sign_in::sign_out))
        .route("/ui/assets/{name}", get(assets::serve))
        .route("/ui/sessions", get(sessions::page))
        .route("/ui/sessions/rows", get(sessions::rows))
        .route("/ui/sessions/{id}", get(session_view::page))
        .route("/ui/sessions/{id}/messages", get(session_view::messages))
        .route("/ui/sessions/{id}/files/{*path}", get(conversation::file))
        .route("/ui/conversations/{id}", get(conversation::page))
        .route("/ui/conversations/{id}/events", get(conversation::events))
        .route("/ui/conversations/{id}/messages", post(conversation::send))
        .route(
            "/ui/conversations/{id}/files",
            // A file may be bigger than the other forms' limit.
            post(conversation::send_file).layer(DefaultBodyLimit::max(
                conversation::MAX_FILE_BYTES + 64 * 1024,
            )),
        )
        .route("/ui/questions/{id}/answer", post(conversation::answer))
        .route("/ui/tasks", get(tasks::page))
        .route("/ui/tasks/{id}/runs", get(tasks::runs))
        .route("/ui/tasks/{id}/{action}", post(tasks::action))
        .route("/ui/deliveries", get(deliveries::page))
        .route(
            "/ui/deliveries/{session}/{seq}/retry",
            post(deliveries::retry),
        )
        .route("/ui/agents", get(agents::page))
        .route("/ui/health", get(health::page))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Headers every console response carries, errors and redirects included.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    // `default-src 'self'` forbids inline script and style; the rest closes what
    // `default-src` does not cover (framing, form targets, `<base>`).
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A signed-in operator (or anyone, on a gateway without an API token), with the CSRF
/// token their forms carry.
pub struct Operator {
    pub signed: Signed,
    pub csrf: String,
    /// Whether there is a sign-in to sign out of.
    pub can_sign_out: bool,
}

impl Operator {
    /// Refuses a form whose CSRF token is missing or not this session's.
    pub fn check_csrf(&self, keys: &Keys, given: &str) -> Result<(), ConsoleError> {
        if keys.csrf_ok(&self.signed, given) {
            Ok(())
        } else {
            Err(ConsoleError::Csrf)
        }
    }
}

/// Not signed in: a page goes to the sign-in form, anything else is refused.
pub struct NotSignedIn(Method);

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        if self.0 == Method::GET {
            Redirect::to("/ui").into_response()
        } else {
            ConsoleError::NotSignedIn.into_response()
        }
    }
}

impl FromRequestParts<ConsoleState> for Operator {
    type Rejection = NotSignedIn;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Self, Self::Rejection> {
        let signed = if state.needs_sign_in() {
            auth::cookie_value(&parts.headers)
                .and_then(|c| state.keys.check(c, ferroclaw_content::now_ms()))
                .ok_or_else(|| NotSignedIn(parts.method.clone()))?
        } else {
            Keys::open_session()
        };
        Ok(Self {
            csrf: state.keys.csrf(&signed),
            signed,
            can_sign_out: state.needs_sign_in(),
        })
    }
}

/// Whether the console's script sent this request (it wants a plain-text answer to show
/// in place, not a redirect).
fn from_script(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key("x-console-fetch")
}

/// The console's state, for handlers.
type Console = State<ConsoleState>;

#[cfg(test)]
mod tests;
