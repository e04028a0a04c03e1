//! Sign-in and sign-out: the API token, checked once in constant time, becomes a session
//! cookie.

use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use ferroclaw_common::grpc_auth;
use maud::html;
use serde::Deserialize;

use super::layout::{page, respond};
use super::{Console, ConsoleError, ConsoleState, Operator, auth};

/// `GET /ui`: the sign-in form, or the sessions page for a signed-in operator.
pub async fn index(State(state): Console, headers: axum::http::HeaderMap) -> Response {
    let signed_in = !state.needs_sign_in()
        || auth::cookie_value(&headers)
            .and_then(|c| state.keys.check(c, ferroclaw_content::now_ms()))
            .is_some();
    if signed_in {
        Redirect::to("/ui/sessions").into_response()
    } else {
        form(None).into_response()
    }
}

/// The sign-in form, with a refusal when the last try failed.
fn form(error: Option<&str>) -> Response {
    respond(page(
        "Sign in",
        "",
        None,
        html! {
            section.sign-in {
                h1 { "Sign in" }
                p { "Enter the gateway's API token (" code { "FERROCLAW_API_TOKEN" } ")." }
                @if let Some(error) = error {
                    p.error role="alert" { (error) }
                }
                form method="post" action="/ui/sign-in" {
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Sign in" }
                }
            }
        },
    ))
}

#[derive(Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    token: String,
}

/// `POST /ui/sign-in`: the right token sets the session cookie; a wrong one gets the form
/// again with 401.
pub async fn sign_in(
    State(state): State<ConsoleState>,
    form_data: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    let Some(expected) = state.app.config.gateway.api_token.as_deref() else {
        // Nothing to sign in to.
        return Redirect::to("/ui/sessions").into_response();
    };
    let given = form_data.map(|Form(f)| f.token).unwrap_or_default();
    if given.is_empty() || !grpc_auth::same_secret(&given, expected) {
        tracing::info!("console sign-in refused: wrong token");
        let mut response = form(Some("That is not the API token."));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let cookie = state.keys.issue(ferroclaw_content::now_ms());
    (
        [(header::SET_COOKIE, auth::set_cookie(&cookie))],
        Redirect::to("/ui/sessions"),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct SignOutForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /ui/sign-out`: ends the session on the server and clears the cookie.
pub async fn sign_out(
    State(state): State<ConsoleState>,
    operator: Operator,
    form_data: Result<Form<SignOutForm>, FormRejection>,
) -> Result<Response, ConsoleError> {
    let csrf = form_data.map(|Form(f)| f.csrf).unwrap_or_default();
    operator.check_csrf(&state.keys, &csrf)?;
    state.keys.revoke(&operator.signed);
    Ok((
        [(header::SET_COOKIE, auth::clear_cookie())],
        Redirect::to("/ui"),
    )
        .into_response())
}
