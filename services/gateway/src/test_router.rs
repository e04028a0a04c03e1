//! Unit tests' gateway: the whole router, on gRPC peers that do not exist (calls to them
//! fail fast as unavailable), so routing, auth and error shapes can be tested alone.

use std::sync::Arc;

use ferroclaw_common::Config;
use ferroclaw_common::grpc::{CallLimits, channel_with_limits};
use ferroclaw_common::grpc_auth::AttachToken;

use crate::http::{self, AppState};
use crate::ingress::Ingress;

/// The router with `token` as the API token (none: open, as on loopback).
pub fn offline_router(token: Option<&str>) -> axum::Router {
    let mut config = Config::default();
    config.gateway.api_token = token.map(str::to_string);
    let config = Arc::new(config);
    let nowhere = || {
        let limits = CallLimits {
            default_timeout: std::time::Duration::from_secs(2),
            max_in_flight: 8,
        };
        channel_with_limits(
            "http://127.0.0.1:9",
            AttachToken::new(None).expect("no token is a valid token"),
            limits,
        )
        .expect("a literal URL")
    };
    let runner = nowhere();
    http::router(AppState {
        config: config.clone(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        ingress: Ingress::new(config, runner.clone()),
        runner,
        delivery: nowhere(),
        scheduler: nowhere(),
    })
}
