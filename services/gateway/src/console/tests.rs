//! The console through the gateway's whole router, on peers that do not exist: sign-in,
//! cookies, CSRF and the security headers (pages that need a peer answer 503 here; the
//! end-to-end tests cover them against real services).

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt;

fn router(token: Option<&str>) -> axum::Router {
    crate::test_router::offline_router(token)
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    if form.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let request = request
        .body(Body::from(form.unwrap_or_default().to_string()))
        .unwrap();
    answer(router, request).await
}

/// What the router answers to `request`.
async fn answer(router: &axum::Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Signs in; returns the `name=value` cookie and the page's CSRF token.
async fn sign_in(router: &axum::Router) -> (String, String) {
    let answer = call(router, "POST", "/ui/sign-in", None, Some("token=t0ken")).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    let set = answer.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(
        !set.contains("t0ken"),
        "the cookie does not carry the token"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    // Any page renders the CSRF token (the sign-out form); health renders without peers.
    let page = call(router, "GET", "/ui/health", Some(&cookie), None).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let csrf = page
        .body
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF field")
        .to_string();
    (cookie, csrf)
}

fn assert_secured(answer: &Answer) {
    let csp = answer.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    assert_eq!(answer.headers[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(answer.headers[header::REFERRER_POLICY], "no-referrer");
}

#[tokio::test]
async fn sign_in_with_the_token_and_out_again() {
    let router = router(Some("t0ken"));
    let form = call(&router, "GET", "/ui", None, None).await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains(r#"action="/ui/sign-in""#));
    assert!(form.body.contains(r#"name="viewport""#));
    assert!(!form.body.contains("<script>"), "no inline script");
    assert_secured(&form);

    let wrong = call(&router, "POST", "/ui/sign-in", None, Some("token=nope")).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("That is not the API token."));
    assert!(!wrong.headers.contains_key(header::SET_COOKIE));
    assert_secured(&wrong);

    let page = call(&router, "GET", "/ui/tasks", None, None).await;
    assert_eq!(
        page.status,
        StatusCode::SEE_OTHER,
        "a page without a session"
    );
    assert_eq!(page.headers[header::LOCATION], "/ui");
    let forged = call(
        &router,
        "GET",
        "/ui/health",
        Some("ferroclaw_console=a.1.b"),
        None,
    )
    .await;
    assert_eq!(forged.status, StatusCode::SEE_OTHER);

    let (cookie, csrf) = sign_in(&router).await;
    let index = call(&router, "GET", "/ui", Some(&cookie), None).await;
    assert_eq!(index.headers[header::LOCATION], "/ui/sessions");

    let refused = call(&router, "POST", "/ui/sign-out", Some(&cookie), Some("")).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "no CSRF token");
    let out = call(
        &router,
        "POST",
        "/ui/sign-out",
        Some(&cookie),
        Some(&format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(
        out.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let after = call(&router, "GET", "/ui/health", Some(&cookie), None).await;
    assert_eq!(
        after.status,
        StatusCode::SEE_OTHER,
        "the old cookie is dead"
    );
}

#[tokio::test]
async fn state_changing_forms_need_the_sessions_csrf_token() {
    let router = router(Some("t0ken"));
    let (cookie, csrf) = sign_in(&router).await;
    let (other_cookie, other_csrf) = sign_in(&router).await;
    assert_ne!(csrf, other_csrf);
    for (path, form) in [
        ("/ui/tasks/t-1/pause", String::new()),
        ("/ui/conversations/c/messages", "text=hi&sender=op".into()),
        ("/ui/questions/q-1/answer", "option=yes".into()),
        ("/ui/deliveries/ses-1/4/retry", String::new()),
    ] {
        for bad in [
            form.clone(),
            format!("{form}&csrf=nope"),
            format!("{form}&csrf={other_csrf}"),
        ] {
            let answer = call(&router, "POST", path, Some(&cookie), Some(&bad)).await;
            assert_eq!(
                answer.status,
                StatusCode::FORBIDDEN,
                "{path} {bad}: {}",
                answer.body
            );
            assert!(
                answer.body.contains("CSRF"),
                "a plain reason: {}",
                answer.body
            );
            assert!(
                answer.headers[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with("text/plain")
            );
            assert_secured(&answer);
        }
        // With the token the form gets past the check (and no further: no peers here).
        let good = format!("{form}&csrf={csrf}");
        let answer = call(&router, "POST", path, Some(&cookie), Some(&good)).await;
        assert_ne!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            answer.body
        );
        // Without a session a form is refused before anything else.
        let answer = call(&router, "POST", path, None, Some(&good)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let _ = other_cookie;
}

#[tokio::test]
async fn without_a_token_there_is_no_sign_in_but_forms_keep_csrf() {
    let router = router(None);
    let index = call(&router, "GET", "/ui", None, None).await;
    assert_eq!(index.status, StatusCode::SEE_OTHER);
    assert_eq!(index.headers[header::LOCATION], "/ui/sessions");
    let health = call(&router, "GET", "/ui/health", None, None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(!health.body.contains("Sign out"));
    assert!(
        health.body.contains("unreachable"),
        "no peers here: {}",
        health.body
    );
    let refused = call(&router, "POST", "/ui/tasks/t/pause", None, Some("")).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn assets_are_embedded_and_typed() {
    let router = router(Some("t0ken"));
    let js = call(&router, "GET", "/ui/assets/console.js", None, None).await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(
        js.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(js.body.contains("EventSource"));
    let css = call(&router, "GET", "/ui/assets/console.css", None, None).await;
    assert!(
        css.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    let none = call(&router, "GET", "/ui/assets/..%2Fmod.rs", None, None).await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert_secured(&none);
}

#[tokio::test]
async fn a_peer_that_is_down_is_a_plain_503_not_json() {
    let router = router(None);
    let page = call(&router, "GET", "/ui/tasks", None, None).await;
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        page.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(page.body.contains("unavailable"), "{}", page.body);
}

/// A multipart file form as a browser sends it, with `csrf` when given.
async fn send_file(router: &axum::Router, cookie: &str, csrf: Option<&str>) -> Answer {
    let boundary = "XyZ";
    let mut body = String::new();
    if let Some(csrf) = csrf {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n"
        ));
    }
    body.push_str(&format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
         Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    ));
    let request = Request::builder()
        .method("POST")
        .uri("/ui/conversations/c/files")
        .header(header::COOKIE, cookie)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .unwrap();
    answer(router, request).await
}

#[tokio::test]
async fn a_file_form_needs_the_csrf_token_too() {
    let router = router(Some("t0ken"));
    let (cookie, csrf) = sign_in(&router).await;
    for bad in [None, Some("nope")] {
        let answer = send_file(&router, &cookie, bad).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
        assert!(answer.body.contains("CSRF"));
    }
    // With the token it gets past the check (no peers here to take the file).
    let answer = send_file(&router, &cookie, Some(&csrf)).await;
    assert_ne!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
    let plain = call(
        &router,
        "POST",
        "/ui/conversations/c/files",
        Some(&cookie),
        Some(&format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(
        plain.status,
        StatusCode::BAD_REQUEST,
        "not multipart: {}",
        plain.body
    );
}
