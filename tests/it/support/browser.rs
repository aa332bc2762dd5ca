//! A real headless Chromium, driven over WebDriver by fantoccini, for the
//! dashboard's end-to-end tests. It needs Debian's `chromium` and
//! `chromium-driver`; `QUOTAWATCH_TEST_CHROMEDRIVER` names the driver (when
//! unset, the tests print `skipped:` and pass).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long an element may take to appear or change; generous, since the
/// browser shares two cores with the server and the test.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct Browser {
    pub client: Client,
    driver_url: String,
    http: reqwest::Client,
    _driver: tokio::process::Child,
}

/// Where screenshots go: `target/screenshots/`, kept as test artifacts.
pub fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(
            || PathBuf::from("screenshots"),
            |target| target.join("screenshots"),
        );
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session, or returns `None`
    /// after printing why the test is skipped.
    pub async fn start(test: &str) -> Option<Self> {
        let Ok(driver) = std::env::var("QUOTAWATCH_TEST_CHROMEDRIVER") else {
            println!("skipped: {test} needs QUOTAWATCH_TEST_CHROMEDRIVER (path to chromedriver)");
            return None;
        };
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("address").port()
        };
        let child = tokio::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {driver}: {error}"));
        let driver_url = format!("http://127.0.0.1:{port}");
        let http = super::client();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = http
                .get(format!("{driver_url}/status"))
                .send()
                .await
                .ok()
                .map(|response| response.status().is_success());
            if ready == Some(true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut options = json!({
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900", "--lang=en-US"
            ]
        });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver_url)
            .await
            .expect("a Chromium session");
        Some(Self {
            client,
            driver_url,
            http,
            _driver: child,
        })
    }

    /// A Chrome DevTools command, through chromedriver.
    pub async fn devtools(&self, command: &str, params: Value) {
        let session = self
            .client
            .session_id()
            .await
            .ok()
            .flatten()
            .expect("session");
        let response = self
            .http
            .post(format!(
                "{}/session/{session}/goog/cdp/execute",
                self.driver_url
            ))
            .json(&json!({"cmd": command, "params": params}))
            .send()
            .await
            .expect("devtools command");
        assert!(
            response.status().is_success(),
            "{command}: {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// Renders the page at `width` CSS pixels (a phone at 390).
    pub async fn viewport(&self, width: u32, height: u32, mobile: bool) {
        self.devtools(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    pub async fn color_scheme(&self, scheme: &str) {
        self.devtools(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
        )
        .await;
    }

    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("no element {css}: {error}"))
    }

    /// Clicks the element matching `css`. The live dashboard may replace
    /// it between finding and clicking, when an update arrives: then the
    /// new one is found and clicked, until `PATIENCE` runs out.
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.find(css).await.click().await {
                Ok(_) => return,
                Err(error) if error.is_stale_element_reference() && Instant::now() < deadline => {}
                Err(error) => panic!("click {css}: {error}"),
            }
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("clear");
        field
            .send_keys(text)
            .await
            .unwrap_or_else(|error| panic!("type into {css}: {error}"));
    }

    /// The text of the first element matching `css`, or None.
    pub async fn text(&self, css: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }

    /// Waits until the text of `css` satisfies `wanted`; returns it and how
    /// long it took.
    pub async fn wait_text(
        &self,
        css: &str,
        within: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> (String, Duration) {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < within {
            last = self.text(css).await;
            if let Some(text) = &last
                && wanted(text)
            {
                return (text.clone(), started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{css} never had the wanted text within {within:?}; last: {last:?}");
    }

    /// Waits until no element matches `css`.
    pub async fn wait_gone(&self, css: &str) {
        let started = Instant::now();
        while started.elapsed() < PATIENCE {
            if self.client.find(Locator::Css(css)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{css} is still there after {PATIENCE:?}");
    }

    pub async fn script(&self, code: &str) -> Value {
        self.client
            .execute(code, vec![])
            .await
            .unwrap_or_else(|error| panic!("script failed: {error}\n{code}"))
    }

    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}
