//! The deliveries page: recent deliveries by outcome, failures with their plain reason
//! and, where the failure was transient, a retry; rate-limit waits in progress.

use std::collections::BTreeMap;

use axum::Form;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use ferroclaw_proto::v1::delivery_client::DeliveryClient;
use ferroclaw_proto::v1::{ListDeliveriesRequest, RetryDeliveryRequest};
use maud::html;
use serde::Deserialize;
use serde_json::Value;

use super::layout::{self, csrf_field, respond};
use super::{Console, ConsoleError, Operator, from_script, time, urls};

/// Deliveries read from the ledger (the most recent).
const RECENT: u32 = 200;

#[derive(Deserialize)]
pub struct DeliveriesQuery {
    /// Only this outcome (`pending`, `delivered`, `failed`); empty: all.
    #[serde(default)]
    state: String,
}

/// `GET /ui/deliveries`.
pub async fn page(
    State(state): Console,
    operator: Operator,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let Query(query) = query.map_err(|e| ConsoleError::BadRequest(e.body_text()))?;
    let records = DeliveryClient::new(state.app.delivery.clone())
        .list_deliveries(ListDeliveriesRequest { limit: RECENT })
        .await?
        .into_inner()
        .deliveries;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        *counts.entry(r.state.as_str()).or_default() += 1;
    }
    let now = ferroclaw_content::now_ms();
    let body = html! {
        h1 { "Deliveries" }
        nav.filters aria-label="outcomes" {
            a href="/ui/deliveries" aria-current=[query.state.is_empty().then_some("page")] { "all (" (records.len()) ")" }
            @for (word, n) in &counts {
                a href=(format!("/ui/deliveries?state={}", urls::encode(word)))
                    aria-current=[(*word == query.state).then_some("page")] { (word) " (" (n) ")" }
            }
        }
        div.scroll {
            table.deliveries {
                thead { tr {
                    th { "Updated" } th { "Outcome" } th { "To" } th { "Session · seq" }
                    th.num { "Attempts" } th { "Reason" }
                } }
                tbody {
                    @for r in records.iter().filter(|r| query.state.is_empty() || r.state == query.state) {
                        tr {
                            td title=(time::utc(r.updated_at_ms)) { (time::ago(r.updated_at_ms, now)) }
                            td { span class={ "outcome outcome-" (outcome_class(&r.state)) } { (r.state) } }
                            td { (destination(&r.destination_json)) }
                            td { code { (r.session_id) } " · " (r.out_seq) }
                            td.num { (r.attempts) }
                            td.reason {
                                @if !r.reason.is_empty() { (r.reason) }
                                @if r.waiting_until_ms > now {
                                    span.wait { "rate-limited, retrying " (time::ago(r.waiting_until_ms, now)) }
                                } @else if r.rate_limit_waits > 0 {
                                    span.note { " (" (r.rate_limit_waits) " rate-limit waits)" }
                                }
                                @if !r.detail.is_empty() {
                                    details { summary { "detail" } pre { (r.detail) } }
                                }
                                @if r.retryable && r.state == "failed" {
                                    form.retry method="post" data-fetch="retry"
                                        action=(format!("/ui/deliveries/{}/{}/retry", urls::encode(&r.session_id), r.out_seq)) {
                                        (csrf_field(&operator))
                                        button type="submit" { "Retry" }
                                        p.status role="status" {}
                                    }
                                }
                            }
                        }
                    }
                    @if records.is_empty() { tr { td colspan="6" { "No deliveries yet." } } }
                }
            }
        }
        p.note { "The " (RECENT) " most recent deliveries." }
    };
    Ok(respond(layout::page(
        "Deliveries",
        "/ui/deliveries",
        Some(&operator),
        body,
    )))
}

#[derive(Deserialize)]
pub struct RetryForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /ui/deliveries/{session}/{seq}/retry`: delivery sends the row again when its
/// failure was transient, and refuses (with the reason shown) otherwise.
pub async fn retry(
    State(state): Console,
    operator: Operator,
    Path((session_id, out_seq)): Path<(String, i64)>,
    headers: HeaderMap,
    form: Result<Form<RetryForm>, FormRejection>,
) -> Result<Response, ConsoleError> {
    let Form(form) = form.map_err(|e| ConsoleError::BadRequest(e.body_text()))?;
    operator.check_csrf(&state.keys, &form.csrf)?;
    DeliveryClient::new(state.app.delivery.clone())
        .retry_delivery(RetryDeliveryRequest {
            session_id,
            out_seq,
        })
        .await?;
    if from_script(&headers) {
        return Ok((StatusCode::ACCEPTED, "sending again").into_response());
    }
    Ok(Redirect::to("/ui/deliveries").into_response())
}

/// Where a delivery went, in a few words (`api support-42`, `discord 123…`).
fn destination(json: &str) -> String {
    let value: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    let kind = value["kind"].as_str().unwrap_or("?");
    let target = ["conversation", "channel_id", "source"]
        .iter()
        .find_map(|k| value[*k].as_str())
        .unwrap_or("");
    format!("{kind} {target}").trim().to_string()
}

fn outcome_class(state: &str) -> &'static str {
    match state {
        "delivered" => "ok",
        "failed" => "failed",
        "pending" => "pending",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_read_briefly() {
        assert_eq!(
            destination(r#"{"kind":"api","conversation":"c1"}"#),
            "api c1"
        );
        assert_eq!(
            destination(r#"{"kind":"discord","channel_id":"42"}"#),
            "discord 42"
        );
        assert_eq!(destination("nonsense"), "?");
    }
}
