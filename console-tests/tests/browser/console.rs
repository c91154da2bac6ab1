//! The console (`/console`) in a real browser: headless Chromium driven
//! over WebDriver (chromedriver, started here on a free port), against a
//! real server and real toolkits on loopback.
//!
//! Opt-in, with `ATP_BROWSER=1` (`.ci/run` sets it and installs Debian's
//! `chromium` and `chromium-driver`): without it each test says, loudly,
//! that it was skipped and how to run it, and passes.
//!
//! With `ATP_CONSOLE_SCREENSHOTS=DIR` the main test also writes the
//! screenshots of docs/console/ into DIR.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use atp_registry::{AppCall, AppReply, Call, Tool, ToolError, ToolKitClient, runtime::Transport};
use atp_server::Config;
use fantoccini::{Client, ClientBuilder, Locator, elements::Element, key::Key};
use serde_json::{Value, json};

use crate::{
    common::*,
    hooks::{Hook, Receiver},
    oauth_provider,
};

/// The variable that turns the browser tests on.
const ENABLE: &str = "ATP_BROWSER";
const ADMIN_KEY: &str = "console-admin-key-0123456789";
const METRICS_TOKEN: &str = "console-metrics-token-0123";
/// The planner's toolkit key (a key serves by one route: the demo's
/// WebSocket would take the planner's calls too).
const PLANNER_KEY: &str = "tk-planner-key-0123";
/// axe-core, vendored (see axe/README.md).
const AXE: &str = include_str!("axe/axe.min.js");

fn enabled(test: &str) -> bool {
    match std::env::var(ENABLE) {
        Ok(v) if v == "1" => true,
        Ok(v) if !v.is_empty() && v != "0" => {
            panic!("{ENABLE}={v:?}: set it to 1 to run the browser tests, or unset it")
        }
        _ => {
            let line = format!(
                "SKIPPED: browser test {test}: {ENABLE} is not 1. Run it with \
                 `{ENABLE}=1 cargo test -p atp-console-tests -- --nocapture` \
                 (needs Debian's chromium and chromium-driver: /usr/bin/chromium, \
                 /usr/bin/chromedriver); `.ci/run` sets it\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            false
        }
    }
}

/// A chromedriver on a free loopback port and a headless Chromium
/// session through it; both end when dropped.
struct Browser {
    client: Client,
    driver: Child,
}

impl Browser {
    async fn start() -> Self {
        let path = std::env::var("ATP_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let mut driver = Command::new(&path)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {path}: {e}"));
        let stdout = driver.stdout.take().expect("piped");
        // It says which port it took once it listens.
        let port = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let line = line.expect("chromedriver's output");
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    let port: u16 = rest.trim_end_matches('.').parse().expect("a port");
                    // Keep draining its output so that it never blocks.
                    std::thread::spawn(move || lines.for_each(drop));
                    return port;
                }
            }
            panic!("chromedriver ended without listening");
        });
        let port = tokio::time::timeout(WAIT, port)
            .await
            .expect("chromedriver listens in time")
            .expect("no panic");
        let binary = std::env::var("ATP_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": binary,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         "--no-first-run", "--disable-extensions"],
            }),
        );
        let client = tokio::time::timeout(
            WAIT,
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("a session in time")
        .expect("a browser session");
        Self { client, driver }
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }

    /// The element `css`, waiting for it (bounded).
    async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} within {WAIT:?}: {e}"))
    }

    /// Polls `condition` (a JavaScript expression) until it is true.
    async fn until(&self, condition: &str) {
        let script = format!("return !!({condition});");
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.client.execute(&script, vec![]).await.expect("script");
            if v == Value::Bool(true) {
                return;
            }
            if Instant::now() >= deadline {
                let page = self
                    .client
                    .execute("return document.body.innerText;", vec![])
                    .await
                    .unwrap_or_default();
                panic!(
                    "never true: {condition}; the page shows:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of `css`, finding it again if the page re-rendered it.
    async fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.find(css).await.text().await {
                Ok(text) => return text,
                Err(e) if e.is_stale_element_reference() && Instant::now() < deadline => {}
                Err(e) => panic!("no text of {css}: {e}"),
            }
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.find(css).await.send_keys(text).await.expect("typed");
    }

    /// Clicks `css`, finding it again if the page re-rendered it between
    /// the find and the click (bounded).
    async fn click(&self, css: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.find(css).await.click().await {
                Ok(()) => return,
                Err(e) if e.is_stale_element_reference() && Instant::now() < deadline => {}
                Err(e) => panic!("could not click {css}: {e}"),
            }
        }
    }

    /// Runs axe-core on the page as it is: no serious or critical
    /// violation of WCAG 2.1 A/AA.
    async fn accessible(&self, what: &str) {
        self.client
            .execute(&format!("{AXE}\nreturn true;"), vec![])
            .await
            .expect("axe loads");
        let found = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})
                   .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                       nodes: v.nodes.map(n => n.target.join(' '))}))))
                   .catch(e => done('axe failed: ' + e));",
                vec![],
            )
            .await
            .expect("axe runs");
        let violations = found.as_array().unwrap_or_else(|| panic!("{found}"));
        let bad: Vec<&Value> = violations
            .iter()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .collect();
        assert!(bad.is_empty(), "{what}: accessibility violations: {bad:#?}");
    }

    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("ATP_CONSOLE_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("screenshot");
        let path = PathBuf::from(dir).join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// A toolkit with one tool whose schema has every kind of field the form
/// generator knows; the tool answers with the arguments it got.
fn planner(base: &str) -> ToolKitClient {
    let client = ToolKitClient::new(PLANNER_KEY, "planner").with_base_url(base);
    client
        .register_tool(
            Tool::new("plan")
                .description("Plans a trip; answers with its arguments.")
                .schema(json!({
                    "type": "object",
                    "properties": {
                        "title": {"type": "string", "description": "What the trip is called."},
                        "pace": {"type": "string", "enum": ["slow", "fast"]},
                        "days": {"type": "integer", "minimum": 1},
                        "budget": {"type": "number"},
                        "insured": {"type": "boolean"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "owner": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "email": {"type": "string"}
                            },
                            "required": ["name"]
                        },
                        "stops": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}, "nights": {"type": "integer"}},
                            "required": ["city"]
                        }}
                    },
                    "required": ["title", "days", "owner"]
                })),
            |call: Call| async move { Ok::<_, ToolError>(Value::Object(call.params().clone())) },
        )
        .expect("valid");
    client
}

/// Loads the console, gives it the admin key, and waits until it shows
/// the toolkits view.
async fn open_console(browser: &Browser, server: &TestServer) {
    browser
        .client
        .goto(&format!("{}/console", server.base))
        .await
        .expect("loads");
    browser.find("#admin-key").await;
    browser.type_into("#admin-key", ADMIN_KEY).await;
    browser.click("#login-form button[type=submit]").await;
    browser
        .until("!document.getElementById('view-toolkits').hidden")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_toolkits_runs_tools_and_follows_calls() {
    if !enabled("console_shows_toolkits_runs_tools_and_follows_calls") {
        return;
    }
    bounded(Duration::from_secs(180), async {
        let server = TestServer::start(Config {
            admin_api_keys: vec![ADMIN_KEY.into()],
            metrics_token: Some(METRICS_TOKEN.into()),
            toolkit_api_keys: vec![TK_KEY.into(), PLANNER_KEY.into()],
            ..keyed_config()
        })
        .await;
        let browser = Browser::start().await;
        open_console(&browser, &server).await;
        browser.until("!document.getElementById('toolkits-empty').hidden").await;
        browser.accessible("the empty toolkits view").await;

        // A toolkit that connects shows up, connected, without a reload.
        let demo = demo_toolkit(TK_KEY, "demo", &server.base);
        let demo_runtime = serve_toolkit(&demo, Transport::WebSocket);
        let _stop_demo = StopOnDrop(demo.clone());
        browser
            .find("[data-toolkit=demo] [data-connection=connected]")
            .await;
        let transport = browser.text("[data-toolkit=demo] [data-transport]").await;
        assert_eq!(transport, "transport: websocket, this server");
        assert!(
            browser
                .text("[data-toolkit=demo] [data-connection]")
                .await
                .starts_with("connected since "),
        );
        let planner = planner(&server.base);
        let planner_runtime = serve_toolkit(
            &planner,
            Transport::Inbox {
                poll_interval: Duration::from_millis(10),
            },
        );
        let _stop_planner = StopOnDrop(planner.clone());
        browser
            .find("[data-toolkit=planner] [data-connection=connected]")
            .await;
        assert_eq!(
            browser.text("[data-toolkit=planner] [data-transport]").await,
            "transport: inbox, this server"
        );
        browser.accessible("the toolkits view").await;
        browser.screenshot("toolkits").await;

        // The live list is open before any call.
        browser.click("#nav a[data-view=calls]").await;
        browser.until("document.getElementById('live-state').dataset.state === 'open'").await;
        browser.click("#nav a[data-view=toolkits]").await;

        // A form from echo's schema; its result.
        browser.click("[data-try='demo/echo']").await;
        browser.type_into("#try-fields input[name=text]", "hi from the browser").await;
        browser.click("#try-submit").await;
        browser.until("document.getElementById('try-outcome').dataset.outcome === 'ok'").await;
        let result: Value =
            serde_json::from_str(&browser.text("#try-result").await).expect("a JSON result");
        assert_eq!(result, json!({"echo": "hi from the browser", "app": "demo"}));
        assert!(browser.text("#try-duration").await.starts_with("Took "));
        // The formats, ready to copy.
        browser.click("[data-format=anthropic] summary").await;
        let anthropic: Value =
            serde_json::from_str(&browser.text("[data-format=anthropic] pre").await).expect("JSON");
        assert_eq!(anthropic["name"], "echo");
        assert_eq!(anthropic["input_schema"]["required"], json!(["text"]));
        // Its Copy button puts that text on the browser's clipboard: pasted
        // into a field (which drops the line breaks), it reads back.
        browser.click("[data-format=anthropic] button").await;
        browser
            .until("document.querySelector('[data-format=anthropic] button').textContent === 'Copied'")
            .await;
        let field = browser.find("#try-fields input[name=text]").await;
        field.clear().await.expect("cleared");
        field.send_keys(&(Key::Control + "v")).await.expect("pasted");
        let pasted = field.prop("value").await.expect("value").unwrap_or_default();
        let pasted: Value = serde_json::from_str(&pasted)
            .unwrap_or_else(|e| panic!("the copied format, pasted: {e}: {pasted:?}"));
        assert_eq!(pasted, anthropic);
        browser.click("[data-format=mcp] summary").await;
        let mcp: Value =
            serde_json::from_str(&browser.text("[data-format=mcp] pre").await).expect("JSON");
        assert_eq!(mcp["inputSchema"]["properties"]["text"]["type"], "string");
        browser.accessible("a tool's result and formats").await;

        // A failing tool: its error shown as one.
        browser.click("[data-try='demo/fails']").await;
        browser.click("#try-submit").await;
        browser.until("document.getElementById('try-outcome').dataset.outcome === 'error'").await;
        assert_eq!(browser.text("#try-outcome-title").await, "Error");
        assert!(
            browser.text("#try-result").await.starts_with("tool_error: "),
            "{}",
            browser.text("#try-result").await
        );
        let outcome = browser.find("#try-outcome").await;
        assert_eq!(outcome.attr("role").await.expect("role").as_deref(), Some("alert"));
        assert_eq!(outcome.attr("class").await.expect("class").as_deref(), Some("error"));
        let color = browser.find("#try-result").await.css_value("color").await.expect("color");
        assert_eq!(color, "rgba(140, 29, 24, 1)", "the error's colour");
        browser.screenshot("error").await;

        // A tool that needs a token: the token field.
        browser.click("[data-try='demo/whoami']").await;
        browser.type_into("#try-token", "a-token-from-the-form").await;
        browser.click("#try-submit").await;
        browser.until("document.getElementById('try-outcome').dataset.outcome === 'ok'").await;
        let result: Value = serde_json::from_str(&browser.text("#try-result").await).expect("JSON");
        assert_eq!(result, json!({"token": "a-token-from-the-form"}));

        // Every kind of field: enum, integer, number, boolean, nested
        // object, arrays of strings and of objects (add, remove).
        browser.click("[data-try='planner/plan']").await;
        browser.type_into("#try-fields input[name=title]", "Alps").await;
        browser.find("#try-fields select[name=pace]").await.select_by_label("fast").await.expect("select");
        browser.type_into("#try-fields input[name=days]", "3").await;
        browser.type_into("#try-fields input[name=budget]", "99.5").await;
        browser.find("#try-fields select[name=insured]").await.select_by_label("false").await.expect("select");
        browser.click("button[aria-label='Add an item to tags']").await;
        browser.click("button[aria-label='Add an item to tags']").await;
        browser.click("button[aria-label='Add an item to tags']").await;
        let tags = browser
            .client
            .find_all(Locator::Css("#try-fields input[name^='tags item']"))
            .await
            .expect("tags");
        assert_eq!(tags.len(), 3);
        tags[0].send_keys("snow").await.expect("typed");
        tags[1].send_keys("dropped").await.expect("typed");
        tags[2].send_keys("peaks").await.expect("typed");
        browser.click("button[aria-label='Remove item 2 of tags']").await;
        browser.type_into("#try-fields input[name=name]", "Ada").await;
        browser.click("button[aria-label='Add an item to stops']").await;
        browser.type_into("#try-fields input[name=city]", "Zermatt").await;
        browser.type_into("#try-fields input[name=nights]", "2").await;
        browser.accessible("a generated form").await;
        browser
            .client
            .execute("window.scrollTo(0, 0); return true;", vec![])
            .await
            .expect("scrolled");
        browser.screenshot("try").await;
        browser.click("#try-submit").await;
        browser.until("document.getElementById('try-outcome').dataset.outcome === 'ok'").await;
        let result: Value = serde_json::from_str(&browser.text("#try-result").await).expect("JSON");
        assert_eq!(
            result,
            json!({
                "title": "Alps", "pace": "fast", "days": 3, "budget": 99.5, "insured": false,
                "tags": ["snow", "peaks"], "owner": {"name": "Ada"},
                "stops": [{"city": "Zermatt", "nights": 2}]
            })
        );

        // The calls, live, newest first; the filters.
        browser.click("#nav a[data-view=calls]").await;
        browser
            .until("document.querySelectorAll('#calls-body tr').length === 4")
            .await;
        let tools: Value = browser
            .client
            .execute("return [...document.querySelectorAll('#calls-body tr')].map(r => [r.dataset.tool, r.dataset.outcome]);", vec![])
            .await
            .expect("rows");
        assert_eq!(
            tools,
            json!([["plan", "ok"], ["whoami", "ok"], ["fails", "tool_error"], ["echo", "ok"]])
        );
        browser.find("#filter-outcome").await.select_by_label("Failed").await.expect("select");
        browser.until("document.querySelectorAll('#calls-body tr').length === 1").await;
        assert!(browser.text("#calls-body tr").await.contains("failed: tool_error"));
        browser.find("#filter-outcome").await.select_by_label("Any").await.expect("select");
        browser.type_into("#filter-tool", "ech").await;
        browser.until("document.querySelectorAll('#calls-body tr').length === 1").await;
        assert_eq!(browser.find("#calls-body tr").await.attr("data-tool").await.expect("attr").as_deref(), Some("echo"));
        browser.find("#filter-tool").await.clear().await.expect("cleared");
        // What the server's metrics say: the console's calls went through
        // the same path as an LLM client's.
        let auth = format!("Bearer {METRICS_TOKEN}");
        let (_, _, metrics) = http(
            "GET",
            &format!("{}/metrics", server.base),
            &[("authorization", auth.as_str())],
            None,
        )
        .await;
        for line in [
            "atp_tool_calls_total{toolkit=\"demo\",tool=\"fails\",transport=\"websocket\",outcome=\"tool_error\"} 1",
            "atp_tool_calls_total{toolkit=\"planner\",tool=\"plan\",transport=\"inbox\",outcome=\"ok\"} 1",
        ] {
            assert!(metrics.contains(line), "no {line} in {metrics}");
        }
        browser.until("document.querySelectorAll('#calls-body tr').length === 4").await;
        browser.accessible("the live calls").await;
        browser.screenshot("calls").await;

        // A toolkit that goes away shows as such, without a reload.
        browser.click("#nav a[data-view=toolkits]").await;
        stop_toolkit(&demo, demo_runtime).await;
        browser
            .find("[data-toolkit=demo] [data-connection=disconnected]")
            .await;

        // No secret anywhere in the page.
        let html = browser.client.source().await.expect("source");
        for secret in [ADMIN_KEY, TK_KEY, PLANNER_KEY, LLM_KEY, METRICS_TOKEN] {
            assert!(!html.contains(secret), "{secret} in the page");
        }
        browser.close().await;
        stop_toolkit(&planner, planner_runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_is_refused_without_the_admin_key() {
    if !enabled("console_is_refused_without_the_admin_key") {
        return;
    }
    bounded(Duration::from_secs(120), async {
        let browser = Browser::start().await;

        // No admin key configured (and not dev mode): no console at all.
        let off = TestServer::start(keyed_config()).await;
        browser.client.goto(&format!("{}/console", off.base)).await.expect("loads");
        let body = browser.text("body").await;
        assert!(body.contains("\"code\":\"not_found\""), "{body}");
        assert!(browser.client.find(Locator::Css("#admin-key")).await.is_err());
        off.stop().await;

        // With admin keys: the page asks for one, refuses a wrong one and
        // shows nothing without the right one.
        let server = TestServer::start(Config {
            admin_api_keys: vec![ADMIN_KEY.into()],
            ..keyed_config()
        })
        .await;
        let demo = demo_toolkit(TK_KEY, "demo", &server.base);
        let runtime = serve_toolkit(&demo, Transport::WebSocket);
        let _stop = StopOnDrop(demo.clone());
        server.wait_served("demo").await;
        browser.client.goto(&format!("{}/console", server.base)).await.expect("loads");
        browser.find("#admin-key").await;
        browser.until("document.getElementById('view-toolkits').hidden").await;
        browser.accessible("the admin key form").await;
        browser.screenshot("login").await;
        browser.type_into("#admin-key", "not-the-admin-key-0123").await;
        browser.click("#login-form button[type=submit]").await;
        browser
            .until("document.getElementById('login-error').textContent === 'The admin key was refused.'")
            .await;
        assert!(browser.client.find(Locator::Css("[data-toolkit=demo]")).await.is_err());
        // The data endpoints, without the key or with an LLM key.
        for auth in [None, Some(format!("Bearer {LLM_KEY}"))] {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("authorization", a)])
                .unwrap_or_default();
            let (status, _, _) = http("GET", &format!("{}/admin/toolkits", server.base), &headers, None).await;
            assert_eq!(status, 401);
            let (status, _, _) = http(
                "POST",
                &format!("{}/admin/toolkits/demo/tools/echo/call", server.base),
                &headers,
                Some(r#"{"arguments": {"text": "x"}}"#),
            )
            .await;
            assert_eq!(status, 401);
        }
        // The right key opens it.
        browser.type_into("#admin-key", ADMIN_KEY).await;
        browser.click("#login-form button[type=submit]").await;
        browser.find("[data-toolkit=demo] [data-connection=connected]").await;
        browser.close().await;
        stop_toolkit(&demo, runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_is_open_in_dev_mode() {
    if !enabled("console_is_open_in_dev_mode") {
        return;
    }
    bounded(Duration::from_secs(120), async {
        let browser = Browser::start().await;
        let server = TestServer::start(Config {
            db: atp_server::DbLocation::Memory,
            ..Config::dev()
        })
        .await;
        browser
            .client
            .goto(&format!("{}/console", server.base))
            .await
            .expect("loads");
        browser
            .until("!document.getElementById('view-toolkits').hidden")
            .await;
        assert!(
            !browser
                .find("#login")
                .await
                .is_displayed()
                .await
                .expect("shown?")
        );
        browser.close().await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_connects_a_user_and_gives_the_token_to_an_oauth_tool() {
    if !enabled("console_connects_a_user_and_gives_the_token_to_an_oauth_tool") {
        return;
    }
    bounded(Duration::from_secs(120), async {
        let provider = oauth_provider::Provider::start(oauth_provider::Options {
            scopes: &["read"],
            tag: "console-",
            ..Default::default()
        })
        .await;
        let server = TestServer::start(Config {
            admin_api_keys: vec![ADMIN_KEY.into()],
            oauth_platforms: vec![provider.platform()],
            ..keyed_config()
        })
        .await;
        let demo = demo_toolkit(TK_KEY, "demo", &server.base);
        let runtime = serve_toolkit(&demo, Transport::WebSocket);
        let _stop = StopOnDrop(demo.clone());
        server.wait_served("demo").await;
        let browser = Browser::start().await;
        open_console(&browser, &server).await;

        // The platform; a connection started for a test user, through the
        // provider and back to the console.
        browser.click("#nav a[data-view=oauth]").await;
        browser
            .until("document.getElementById('platforms-body').textContent.includes('local-app')")
            .await;
        assert!(
            browser
                .find("#connections-empty")
                .await
                .is_displayed()
                .await
                .expect("shown?")
        );
        browser.type_into("#connect-user", "ada@example.com").await;
        browser.click("#connect-form button[type=submit]").await;
        browser
            .until("!document.getElementById('connect-next').hidden")
            .await;
        browser.click("#connect-link").await;
        browser
            .find("[data-connection-user='ada@example.com']")
            .await;
        assert_eq!(
            browser.text("#oauth-message").await,
            "Connected ada@example.com to local-app."
        );
        let url = browser.client.current_url().await.expect("url");
        assert_eq!(url.as_str(), format!("{}/console#oauth", server.base));
        let row = browser
            .text("[data-connection-user='ada@example.com']")
            .await;
        assert!(
            row.contains("local-app") && row.contains("the console"),
            "{row}"
        );
        // Its access token expired at once (the provider's way): so it says.
        assert!(row.contains("expired (refreshed on use)"), "{row}");
        browser.accessible("the OAuth view").await;
        browser.screenshot("oauth").await;

        // The OAuth tool, with that user's connection: the server gives it
        // the stored token, refreshed.
        browser.click("#nav a[data-view=toolkits]").await;
        browser.click("[data-try='demo/whoami']").await;
        browser
            .until("document.querySelectorAll('#try-connection option').length === 2")
            .await;
        browser
            .find("#try-connection")
            .await
            .select_by_label("ada@example.com (local-app, the console)")
            .await
            .expect("select");
        browser.click("#try-submit").await;
        browser
            .until("document.getElementById('try-outcome').dataset.outcome === 'ok'")
            .await;
        let result: Value = serde_json::from_str(&browser.text("#try-result").await).expect("JSON");
        assert_eq!(result, json!({"token": "console-access-2"}));
        assert_eq!(provider.refreshes(), 1);

        // Revoked: gone, and the tool gets no token from it any more.
        browser.click("#nav a[data-view=oauth]").await;
        browser
            .click("button[aria-label=\"Revoke ada@example.com's connection to local-app\"]")
            .await;
        browser
            .until("document.querySelectorAll('[data-connection-user]').length === 0")
            .await;
        let (status, answer) = http_json(
            "GET",
            &format!("{}/admin/oauth", server.base),
            &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(answer["connections"], json!([]));
        let html = browser.client.source().await.expect("source");
        for secret in [ADMIN_KEY, "console-csecret", "console-refresh-1"] {
            assert!(!html.contains(secret), "{secret} in the page");
        }
        browser.close().await;
        stop_toolkit(&demo, runtime).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_webhook_deliveries_and_resends_one() {
    if !enabled("console_shows_webhook_deliveries_and_resends_one") {
        return;
    }
    bounded(Duration::from_secs(120), async {
        let hook = Hook::new();
        hook.set_failing(true);
        let receiver = Receiver::start(&hook, "127.0.0.1:0".parse().expect("addr")).await;
        let server = TestServer::start(Config {
            admin_api_keys: vec![ADMIN_KEY.into()],
            webhook_max_attempts: 1,
            webhook_retry_base: Duration::from_millis(50),
            webhook_timeout: Duration::from_secs(2),
            ..keyed_config()
        })
        .await;
        // A receiver URL with a token in its query: never shown.
        let url = format!("{}?token=receiver-query-secret", receiver.url());
        let (status, registered) = http_json(
            "POST",
            &format!("{}/api/v1/atp/llm-client/webhooks/register/", server.base),
            &[("authorization", &format!("ApiKey {LLM_KEY}"))],
            Some(&json!({"url": url, "events": ["toolkit_connected"]})),
        )
        .await;
        assert_eq!(status, 201, "{registered}");
        let webhook_secret = registered["secret"]
            .as_str()
            .expect("its secret")
            .to_owned();
        // A toolkit connects: the event's delivery fails (500), for good.
        let demo = demo_toolkit(TK_KEY, "demo", &server.base);
        let runtime = serve_toolkit(&demo, Transport::WebSocket);
        let _stop = StopOnDrop(demo.clone());

        let browser = Browser::start().await;
        open_console(&browser, &server).await;
        browser.click("#nav a[data-view=webhooks]").await;
        let failed = browser.find("[data-delivery][data-status=failed]").await;
        let row = failed.text().await.expect("text");
        assert!(
            row.contains("toolkit_connected") && row.contains("HTTP 500"),
            "{row}"
        );
        let shown = browser.text("[data-webhook] h3").await;
        assert_eq!(shown, receiver.url());
        browser.accessible("the webhooks view").await;
        browser.screenshot("webhooks").await;

        // The receiver is fixed; the delivery is sent again, as it was.
        hook.set_failing(false);
        browser.click("[data-resend]").await;
        browser.find("[data-delivery][data-status=delivered]").await;
        let got = hook.deliveries();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, got[1].0, "the same delivery");
        assert_eq!((got[0].1, got[1].1), (500, 200));
        assert!(
            browser
                .text("#webhooks-message")
                .await
                .starts_with("Delivery ")
        );

        let html = browser.client.source().await.expect("source");
        for secret in [
            ADMIN_KEY,
            LLM_KEY,
            "receiver-query-secret",
            webhook_secret.as_str(),
        ] {
            assert!(!html.contains(secret), "{secret} in the page");
        }
        browser.close().await;
        stop_toolkit(&demo, runtime).await;
        server.stop().await;
        receiver.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_drives_an_app_session() {
    if !enabled("console_drives_an_app_session") {
        return;
    }
    bounded(Duration::from_secs(120), async {
        let server = TestServer::start(Config {
            admin_api_keys: vec![ADMIN_KEY.into()],
            ..keyed_config()
        })
        .await;
        // A counter app: +1 per action, over when it reaches its goal.
        let games = ToolKitClient::new(TK_KEY, "games").with_base_url(&server.base);
        games
            .register_app(
                Tool::new("counter")
                    .description("Counts to a goal.")
                    .params(["goal"])
                    .param_schema("goal", json!({"type": "integer"}))
                    .required_params(["goal"]),
                |call: AppCall| async move {
                    let (n, goal) = match call {
                        AppCall::Start { params, .. } => {
                            (0, params.get("goal").and_then(Value::as_i64).unwrap_or(1))
                        }
                        AppCall::Action {
                            state, action_data, ..
                        } => {
                            if action_data["button"] != "add" {
                                return Err(ToolError::new("unknown button"));
                            }
                            (
                                state["n"].as_i64().unwrap_or(0) + 1,
                                state["goal"].as_i64().unwrap_or(1),
                            )
                        }
                    };
                    let reply = AppReply::new(json!({"text": format!("{n} of {goal}")}));
                    Ok::<_, ToolError>(if n >= goal {
                        reply.terminate()
                    } else {
                        reply.state(json!({"n": n, "goal": goal}))
                    })
                },
            )
            .expect("valid");
        let runtime = serve_toolkit(&games, Transport::WebSocket);
        let _stop = StopOnDrop(games.clone());
        server.wait_served("games").await;

        let browser = Browser::start().await;
        open_console(&browser, &server).await;
        browser.click("[data-try='games/counter']").await;
        browser.type_into("#try-fields input[name=goal]", "2").await;
        browser.click("#app-start").await;
        browser
            .until("document.getElementById('app-state').textContent.startsWith('Session ')")
            .await;
        let ui: Value = serde_json::from_str(&browser.text("#app-ui").await).expect("JSON");
        assert_eq!(ui, json!({"text": "0 of 2"}));
        let action = browser.find("#app-action").await;
        action.clear().await.expect("cleared");
        action
            .send_keys(r#"{"button": "add"}"#)
            .await
            .expect("typed");
        browser.click("#app-send").await;
        browser
            .until("document.getElementById('app-ui').textContent.includes('1 of 2')")
            .await;
        browser.accessible("an app session").await;
        browser.screenshot("app").await;
        // A wrong action: the app's error, shown as one; the session lives.
        let action = browser.find("#app-action").await;
        action.clear().await.expect("cleared");
        action
            .send_keys(r#"{"button": "nope"}"#)
            .await
            .expect("typed");
        browser.click("#app-send").await;
        browser
            .until("document.getElementById('app').dataset.outcome === 'error'")
            .await;
        assert!(browser.text("#app-state").await.contains("unknown button"));
        let action = browser.find("#app-action").await;
        action.clear().await.expect("cleared");
        action
            .send_keys(r#"{"button": "add"}"#)
            .await
            .expect("typed");
        browser.click("#app-send").await;
        browser
            .until("document.getElementById('app').dataset.session === 'ended'")
            .await;
        assert_eq!(browser.text("#app-state").await, "The session is over.");
        assert!(browser.text("#app-ui").await.contains("2 of 2"));
        assert!(
            !browser
                .find("#app-send")
                .await
                .is_enabled()
                .await
                .expect("enabled?")
        );
        browser.close().await;
        stop_toolkit(&games, runtime).await;
        server.stop().await;
    })
    .await;
}
