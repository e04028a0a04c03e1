//! A tiny Chrome DevTools Protocol client for the console's browser tests: headless
//! Chromium (Debian's `chromium` package) driven over its WebSocket, enough to navigate,
//! run script in the page (fill inputs, click, read the DOM) and take screenshots.
//!
//! [`Browser::launch`] answers `None` when Chromium is not installed, so a test can skip
//! with a message; with `FERROCLAW_REQUIRE_BROWSER=1` (CI) a missing Chromium is an error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// How long Chromium may take to start, a call to answer, a wait to come true.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium with its own throw-away profile; killed when dropped.
pub struct Browser {
    _child: Child,
    /// `host:port` of the DevTools endpoint.
    devtools: String,
    browser: Connection,
    _profile: tempfile::TempDir,
}

/// The `chromium` binary, if installed (`FERROCLAW_CHROMIUM` overrides the name).
fn chromium() -> Option<PathBuf> {
    let name = std::env::var("FERROCLAW_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    if name.contains('/') {
        return Path::new(&name).is_file().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(&name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    /// Starts headless Chromium, or `None` (after printing why) when it is not installed
    /// and `FERROCLAW_REQUIRE_BROWSER` is not `1`.
    pub async fn launch() -> anyhow::Result<Option<Self>> {
        let Some(binary) = chromium() else {
            if std::env::var("FERROCLAW_REQUIRE_BROWSER").as_deref() == Ok("1") {
                bail!("chromium is not installed and FERROCLAW_REQUIRE_BROWSER=1");
            }
            println!("SKIPPED: chromium is not installed (apt-get install chromium)");
            return Ok(None);
        };
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                // Tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--hide-scrollbars",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromium")?;
        let stderr = child.stderr.take().context("chromium's stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        // Chromium prints `DevTools listening on ws://127.0.0.1:<port>/devtools/browser/<id>`.
        let url = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return Ok(url.trim().to_string());
                }
            }
            bail!("chromium exited before it listened")
        })
        .await
        .context("chromium did not start in time")??;
        // Keep reading stderr, so a full pipe never blocks Chromium.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let devtools = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .context("a ws:// DevTools URL")?
            .to_string();
        let browser = Connection::open(&devtools, &url).await?;
        Ok(Some(Self {
            _child: child,
            devtools,
            browser,
            _profile: profile,
        }))
    }

    /// A new tab (all tabs share the profile's cookies).
    pub async fn new_page(&mut self) -> anyhow::Result<Page> {
        let target = self
            .browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let id = target["targetId"].as_str().context("a target id")?;
        let url = format!("ws://{}/devtools/page/{id}", self.devtools);
        let mut page = Page {
            connection: Connection::open(&self.devtools, &url).await?,
        };
        page.call("Page.enable", json!({})).await?;
        page.call("Runtime.enable", json!({})).await?;
        Ok(page)
    }
}

/// One DevTools WebSocket: requests with ids, answers matched by id, events skipped.
struct Connection {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
}

impl Connection {
    async fn open(host_port: &str, url: &str) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(host_port).await?;
        let (ws, _) = tokio_tungstenite::client_async(url, tcp)
            .await
            .with_context(|| format!("DevTools WebSocket {url}"))?;
        Ok(Self { ws, next_id: 1 })
    }

    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::Text(request.to_string())).await?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, async {
            while let Some(message) = self.ws.next().await {
                let Message::Text(text) = message? else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text)?;
                if value["id"] == json!(id) {
                    return Ok(value);
                }
            }
            bail!("the DevTools connection closed")
        })
        .await
        .with_context(|| format!("{method} did not answer in time"))??;
        if let Some(error) = answer.get("error") {
            bail!("{method}: {error}");
        }
        Ok(answer["result"].clone())
    }
}

/// A browser tab.
pub struct Page {
    connection: Connection,
}

impl Page {
    /// A raw DevTools call.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.connection.call(method, params).await
    }

    /// Opens `url` and waits until the document has loaded.
    pub async fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        let result = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(error) = result.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {error}");
        }
        self.wait_for("document.readyState === 'complete'", START_TIMEOUT)
            .await
    }

    /// Runs `expression` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(details) = result.get("exceptionDetails") {
            bail!("{expression}: {details}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expression` until it is truthy. Errors while the page navigates count as
    /// not yet.
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            match self.eval(expression).await {
                Ok(Value::Bool(true)) => return Ok(()),
                Ok(value) => last = value,
                Err(e) => last = json!(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("timed out waiting for `{expression}` (last: {last})")
    }

    /// Sets an input's value by CSS selector (as typing would, with an `input` event).
    pub async fn fill(&mut self, selector: &str, value: &str) -> anyhow::Result<()> {
        let script = format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) return false; \
             e.value = {v}; e.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()",
            s = json!(selector),
            v = json!(value)
        );
        if self.eval(&script).await? != json!(true) {
            bail!("no element {selector}");
        }
        Ok(())
    }

    /// Clicks the element a CSS selector finds.
    pub async fn click(&mut self, selector: &str) -> anyhow::Result<()> {
        let script = format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) return false; e.click(); return true; }})()",
            s = json!(selector)
        );
        if self.eval(&script).await? != json!(true) {
            bail!("no element {selector}");
        }
        Ok(())
    }

    /// The text of the first element a CSS selector finds (`None` when there is none).
    pub async fn text(&mut self, selector: &str) -> anyhow::Result<Option<String>> {
        let script = format!(
            "(() => {{ const e = document.querySelector({s}); return e ? e.textContent : null; }})()",
            s = json!(selector)
        );
        Ok(self.eval(&script).await?.as_str().map(str::to_string))
    }

    /// Emulates a viewport (`mobile` also makes the page honour its viewport meta tag).
    pub async fn viewport(&mut self, width: u32, height: u32, mobile: bool) -> anyhow::Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await?;
        Ok(())
    }

    /// Saves a PNG of the viewport to `path` (creating its directory).
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let data = shot["data"].as_str().context("screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}
