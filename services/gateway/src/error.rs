//! API errors: one enum, mapped once to an HTTP response (`{"error": {"code", "message"}}`)
//! and once to a gRPC status; and the extractors whose rejections become such errors.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Seconds a client is told to wait (`Retry-After`) when a ferroclaw service is down: about
/// what a restarted service takes to answer again.
pub const RETRY_AFTER_SECS: u64 = 5;

/// The body of every 4xx and 5xx the REST API sends.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"error": {"code": "not_found", "message": "no such endpoint"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// For people: what went wrong, in words that may change.
    pub message: String,
}

/// What a program can act on; stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    BadSignature,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UriTooLong,
    HeadersTooLarge,
    /// A ferroclaw service is down or was lost mid-call: retry after `Retry-After` seconds.
    Unavailable,
    UpstreamError,
    Internal,
}

impl ErrorCode {
    /// The code for a status when nothing more specific is known (responses made below
    /// the handlers: axum's 405, hyper-passed limits).
    pub fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => Self::Unauthorized,
            StatusCode::FORBIDDEN => Self::Forbidden,
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::CONFLICT => Self::Conflict,
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::URI_TOO_LONG => Self::UriTooLong,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Self::HeadersTooLarge,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => Self::Unavailable,
            StatusCode::BAD_GATEWAY => Self::UpstreamError,
            s if s.is_server_error() => Self::Internal,
            _ => Self::BadRequest,
        }
    }
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

/// Why a response is an error, kept on it for the request log.
#[derive(Debug, Clone)]
pub struct ErrorCause(pub String);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("webhook signature rejected: {0}")]
    BadSignature(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UriTooLong(String),
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized | Self::BadSignature(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::BadSignature(_) => ErrorCode::BadSignature,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            Self::UriTooLong(_) => ErrorCode::UriTooLong,
            Self::HeadersTooLarge(_) => ErrorCode::HeadersTooLarge,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Upstream(_) => ErrorCode::UpstreamError,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// A peer's gRPC error as seen by our callers.
impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            tonic::Code::InvalidArgument => Self::BadRequest(message),
            tonic::Code::NotFound => Self::NotFound(message),
            tonic::Code::PermissionDenied => Self::Forbidden(message),
            tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => Self::Conflict(message),
            // Down, hung, cut off mid-call (the internal channels report all three so), or
            // shedding load: worth a retry.
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted => Self::Unavailable(format!(
                "a ferroclaw service is unavailable, retry later: {message}"
            )),
            _ => Self::Upstream(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let body = ErrorBody::new(self.code(), message.clone());
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, Self::Unavailable(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response.extensions_mut().insert(ErrorCause(message));
        response
    }
}

/// `Path`, with a bad parameter (not UTF-8 once percent-decoded, not a number…) answered by
/// the JSON error body instead of axum's plain text.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    Path<T>: FromRequestParts<S, Rejection = PathRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            // A route whose pattern does not fit its extractor: our bug, not the client's.
            Err(rejection) if rejection.status().is_server_error() => {
                Err(ApiError::Internal(rejection.body_text()))
            }
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
        }
    }
}

/// `Query`, with a malformed query string answered by the JSON error body.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        match e {
            ApiError::BadRequest(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::UriTooLong(_)
            | ApiError::HeadersTooLarge(_) => tonic::Status::invalid_argument(message),
            ApiError::Unauthorized | ApiError::BadSignature(_) => {
                tonic::Status::unauthenticated(message)
            }
            ApiError::Forbidden(_) => tonic::Status::permission_denied(message),
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::Conflict(_) => tonic::Status::failed_precondition(message),
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::Upstream(_) | ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_peer_is_503_with_retry_after_and_the_json_body() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Cancelled,
        ] {
            let error = ApiError::from(tonic::Status::new(
                code,
                "ferroclaw.v1.Runner/Enqueue: gone",
            ));
            let response = error.into_response();
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{code:?}"
            );
            assert_eq!(
                response.headers().get(header::RETRY_AFTER),
                Some(&HeaderValue::from(RETRY_AFTER_SECS))
            );
            assert_eq!(
                response.headers().get(header::CONTENT_TYPE),
                Some(&HeaderValue::from_static("application/json"))
            );
            let cause = response
                .extensions()
                .get::<ErrorCause>()
                .map(|c| c.0.clone());
            assert!(cause.is_some_and(|c| c.contains("Runner/Enqueue")));
        }
        let other = ApiError::from(tonic::Status::internal("bug")).into_response();
        assert_eq!(other.status(), StatusCode::BAD_GATEWAY);
        assert!(other.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn codes_serialize_as_documented() {
        let body = serde_json::to_value(ErrorBody::new(ErrorCode::UpstreamError, "x")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "upstream_error", "message": "x"}})
        );
        assert_eq!(
            ErrorCode::for_status(StatusCode::METHOD_NOT_ALLOWED),
            ErrorCode::MethodNotAllowed
        );
        assert_eq!(
            ErrorCode::for_status(StatusCode::IM_A_TEAPOT),
            ErrorCode::BadRequest
        );
        assert_eq!(
            ErrorCode::for_status(StatusCode::NOT_IMPLEMENTED),
            ErrorCode::Internal
        );
    }
}
