//! The page shell every console page shares: head (viewport, stylesheet, script), the
//! navigation and the sign-out form.

use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::Operator;

/// The pages in the navigation: (path, label).
const NAV: [(&str, &str); 5] = [
    ("/ui/sessions", "Sessions"),
    ("/ui/tasks", "Tasks"),
    ("/ui/deliveries", "Deliveries"),
    ("/ui/agents", "Agents"),
    ("/ui/health", "Health"),
];

/// A complete page. `active` is the navigation entry to mark.
pub fn page(title: &str, active: &str, operator: Option<&Operator>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · ferroclaw" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/ui" { "ferroclaw" }
                    @if let Some(operator) = operator {
                        nav {
                            @for (path, label) in NAV {
                                a href=(path) aria-current=[(path == active).then_some("page")] { (label) }
                            }
                        }
                        @if operator.can_sign_out {
                            form.sign-out method="post" action="/ui/sign-out" {
                                (csrf_field(operator))
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The hidden CSRF field of a state-changing form.
pub fn csrf_field(operator: &Operator) -> Markup {
    html! { input type="hidden" name="csrf" value=(operator.csrf); }
}

/// Markup as an HTML response.
pub fn respond(markup: Markup) -> Response {
    Html(markup.into_string()).into_response()
}
