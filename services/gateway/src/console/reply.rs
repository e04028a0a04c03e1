//! How the console refuses: a status and one plain sentence (`text/plain`), which the
//! script shows in place and a browser without script shows as the page.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCause};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// What the API would answer (a gRPC peer's refusal, a bad id…), with its status.
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error(
        "refused: this form has no valid CSRF token for your session; reload the page and try again"
    )]
    Csrf,
    #[error("not signed in: open /ui and sign in with the API token")]
    NotSignedIn,
    #[error("{0}")]
    BadRequest(String),
}

impl From<tonic::Status> for ConsoleError {
    fn from(status: tonic::Status) -> Self {
        Self::Api(ApiError::from(status))
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let status = match self {
            // The API's own mapping, read off the response it would send.
            Self::Api(e) => e.into_response().status(),
            Self::Csrf => StatusCode::FORBIDDEN,
            Self::NotSignedIn => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
        };
        let mut response = (status, message.clone()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // The request log prints server-side failures with their cause.
        response.extensions_mut().insert(ErrorCause(message));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_the_api_status_and_say_why_in_plain_text() {
        let cases = [
            (ConsoleError::Csrf, 403),
            (ConsoleError::NotSignedIn, 401),
            (ConsoleError::BadRequest("no".into()), 400),
            (ApiError::Conflict("already answered".into()).into(), 409),
            (tonic::Status::not_found("no such task").into(), 404),
            (tonic::Status::unavailable("down").into(), 503),
        ];
        for (error, status) in cases {
            let text = error.to_string();
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{text}");
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "text/plain; charset=utf-8"
            );
        }
    }
}
