//! `web_fetch`: a URL's text, from the public internet only.
//!
//! Agents sit on a network whose gateway is the host: a fetch of `127.0.0.1`, a private or
//! link-local address (the cloud metadata service at `169.254.169.254`) or the agents'
//! network would reach services that are not the agent's business. So every hop, the
//! first URL and each redirect, is resolved here, each address checked, and the request
//! sent to exactly the address checked (no second lookup that DNS could answer otherwise).
//! Hosts an operator lists in `agents.web_fetch_allow` skip the address check. The body is
//! read as a stream and reading stops at the cap.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::Url;
use serde_json::Value;

use super::{ToolLimits, ToolResult, text};

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;

pub async fn web_fetch(input: &Value, limits: &ToolLimits) -> ToolResult {
    let mut url = Url::parse(text(input, "url")?).map_err(|e| format!("not a URL: {e}"))?;
    for _ in 0..=MAX_REDIRECTS {
        let response = fetch_one(&url, &limits.web_fetch_allow).await?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| format!("HTTP {status} without a Location from {url}"))?;
            url = url
                .join(location)
                .map_err(|e| format!("{url} redirects to a bad URL {location:?}: {e}"))?;
            continue;
        }
        let body = read_capped(response, limits.output_cap).await?;
        return if status.is_success() {
            Ok(body)
        } else {
            Err(format!("HTTP {status}\n{body}"))
        };
    }
    Err(format!(
        "more than {MAX_REDIRECTS} redirects, the last to {url}"
    ))
}

/// One request to `url`, without following redirects, sent to the address that was checked.
async fn fetch_one(url: &Url, allow: &[String]) -> Result<reqwest::Response, String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{url} is not an http(s) URL"));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("{url} names no host"))?
        .to_string();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| format!("{url} has no port"))?;
    let address = checked_address(&host, port, allow).await?;
    let mut client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(30));
    // A name is pinned to the address checked; an IP literal is that address already.
    if host.parse::<IpAddr>().is_err() && !host.starts_with('[') {
        client = client.resolve(&host, address);
    }
    let client = client.build().map_err(|e| format!("HTTP client: {e}"))?;
    client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| format!("fetching {url}: {e}"))
}

/// The address to connect to for `host`: each address it resolves to must be public,
/// unless the operator allowed the host.
async fn checked_address(host: &str, port: u16, allow: &[String]) -> Result<SocketAddr, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect(),
    };
    let first = *addresses
        .first()
        .ok_or_else(|| format!("{host} resolves to no address"))?;
    if allow.iter().any(|a| a.eq_ignore_ascii_case(bare)) {
        return Ok(first);
    }
    if let Some(inside) = addresses.iter().find(|a| !is_public(a.ip())) {
        return Err(format!(
            "{host} is {} — an address on this machine's own or private networks, which \
             web_fetch does not reach (an operator can allow a host with agents.web_fetch_allow)",
            inside.ip()
        ));
    }
    Ok(first)
}

/// Whether an address belongs to the public internet: not loopback, private, link-local,
/// shared (CGNAT), multicast, unspecified or reserved, in either IP version.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64 into IPv4 space
}

/// Reads the body as it arrives and stops once it holds more than the cap allows.
async fn read_capped(mut response: reqwest::Response, cap_chars: usize) -> Result<String, String> {
    let max_bytes = cap_chars.saturating_mul(4).max(1024);
    let mut body = Vec::new();
    let mut cut = false;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() >= max_bytes {
            body.truncate(max_bytes);
            cut = true;
            break;
        }
    }
    let mut text = super::cap(&String::from_utf8_lossy(&body), cap_chars);
    if cut {
        text.push_str("\n[… the rest of the body was not read]");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn only_public_addresses_pass() {
        for inside in [
            "127.0.0.1",
            "10.1.2.3",
            "172.17.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(inside.parse().unwrap()), "{inside}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    /// A one-shot HTTP server on `addr` answering `response`; returns how many requests
    /// it received by the time it is asked (through the returned closure).
    fn serve(
        addr: &str,
        response: String,
    ) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = stream.write_all(response.as_bytes());
            }
        });
        (port, hits)
    }

    fn limits(allow: &[&str]) -> ToolLimits {
        ToolLimits {
            output_cap: 100,
            web_fetch_allow: allow.iter().map(|s| s.to_string()).collect(),
            ..ToolLimits::default()
        }
    }

    #[tokio::test]
    async fn loopback_metadata_and_private_addresses_are_refused_before_any_request() {
        let (port, hits) = serve(
            "127.0.0.1:0",
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret".into(),
        );
        for url in [
            format!("http://127.0.0.1:{port}/"),
            format!("http://localhost:{port}/"),
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "http://10.0.0.1/".to_string(),
            "http://[::1]/".to_string(),
        ] {
            let err = web_fetch(&serde_json::json!({"url": url}), &limits(&[]))
                .await
                .unwrap_err();
            assert!(err.contains("private networks"), "{url}: {err}");
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        let err = web_fetch(
            &serde_json::json!({"url": "file:///etc/passwd"}),
            &limits(&[]),
        )
        .await
        .unwrap_err();
        assert!(err.contains("not an http(s) URL"), "{err}");
    }

    #[tokio::test]
    async fn a_redirect_to_loopback_is_refused_and_allowed_hosts_are_read_capped() {
        let (secret_port, secret_hits) = serve(
            "127.0.0.1:0",
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret".into(),
        );
        // A "public" host, as the operator's allow-list makes it, that redirects inside.
        let (redirector, _) = serve(
            "127.0.0.2:0",
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{secret_port}/\r\nContent-Length: 0\r\n\r\n"
            ),
        );
        let err = web_fetch(
            &serde_json::json!({"url": format!("http://127.0.0.2:{redirector}/")}),
            &limits(&["127.0.0.2"]),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("127.0.0.1") && err.contains("private networks"),
            "{err}"
        );
        assert_eq!(secret_hits.load(std::sync::atomic::Ordering::SeqCst), 0);

        let big = "y".repeat(100_000);
        let (port, _) = serve(
            "127.0.0.3:0",
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{big}",
                big.len()
            ),
        );
        let body = web_fetch(
            &serde_json::json!({"url": format!("http://127.0.0.3:{port}/")}),
            &limits(&["127.0.0.3"]),
        )
        .await
        .unwrap();
        assert!(body.len() < 1_000, "capped: {} bytes", body.len());
        assert!(body.contains("not read"), "{body}");
    }
}
